"""The pipeline's operators as plain objects: both runners call exactly these.

* :class:`IngestMatch` -- raw ping messages of one source (a Kafka partition of ``roadpulse.pings``,
  or the whole input of the embedded runner) -> dead letters and traversals. Per device (pseudonym) it
  keeps a :class:`DeviceState`: the trip-trim state (:mod:`streams.ingest`) and the matcher state
  (:mod:`geo.matcher`), serialisable for a Faust table. The source's watermark is the newest valid
  event time it has seen; a device idle for longer than the matcher's ``max_gap_s`` (plus
  :data:`EXPIRY_SLACK_S` for late uploads) of that watermark has its trip ended (trimmed tail
  discarded, matcher flushed) exactly as a later ping after such a gap would have ended it, so results
  do not depend on when the runner gets to the expiry.
* :class:`Aggregate` -- traversals + per-source watermarks -> segment speeds, through
  :class:`congestion.estimator.SpeedEstimator`. Its watermark is the minimum over the sources it
  expects (a Kafka pipeline has one source per ping partition), so no source's traversals arrive
  behind the windows another source's progress has closed.

The operators hold no Kafka objects: :mod:`streams.app` moves bytes between topics and tables,
:mod:`streams.embedded` calls them directly. Business logic stays in ``geo`` and ``congestion``.
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from congestion.estimator import EstimatorConfig, SpeedEstimator
from congestion.record import SegmentSpeed
from geo.matcher import SPLIT_REASONS, MatcherConfig, MatcherState, OnlineMatcher, points_at_offsets
from geo.model import Ping, Traversal
from geo.network import RoadNetwork
from streams import metrics
from streams.ingest import (
    DeadLetter,
    Pseudonymiser,
    Rejection,
    TripTrimmer,
    TripTrimState,
    decode_message,
)
from streams.settings import Settings

#: Extra event time, beyond the matcher's ``max_gap_s``, before an idle device's trip is ended by the
#: watermark, seconds. Uploads are batched (~30 s) and phone clocks skew, so a device's pings reach a
#: source up to minutes behind the source's newest event time; ending its trip earlier would cut trips
#: that are still going, and differently in each runner. Runners publish identical speeds when
#: ``grace_s >= max_gap_s + EXPIRY_SLACK_S + window_step_s`` (a trip's last traversals are then never late).
EXPIRY_SLACK_S: float = 300.0

#: Details of the rejections made per device after decoding (see :meth:`streams.ingest.TripTrimmer.push`).
_ORDER_DETAIL = {
    "duplicate": "repeats the device's last ping",
    "out_of_order": "older than the device's last ping",
    "teleport": "impossible jump from the device's last ping",
}

#: Matcher drop reasons -> the bounded ``reason`` label of ``PINGS_UNMATCHED``.
_UNMATCHED_REASON = {
    "no_candidate": "no_candidate",
    "no_transition": "no_route",
    "duplicate": "stationary",
    "out_of_order": "late",
    "device_mismatch": "no_route",
}


@dataclass
class PipelineStats:
    """Counters of one runner (the embedded pipeline's ``stats``; a worker's part of the flow).

    ``rejected`` and ``unmatched`` are by reason; ``dropped_traversals`` by the estimator's reasons.
    """

    received: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    dead_letters: int = 0
    trimmed: int = 0
    matched: int = 0
    unmatched: Counter[str] = field(default_factory=Counter)
    traversals: int = 0
    dropped_traversals: Counter[str] = field(default_factory=Counter)
    published: int = 0
    published_ok: int = 0
    devices_expired: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PipelineStats":
        """Inverse of :meth:`to_dict` (the workers' per-partition ledger in the ``devices`` table)."""
        out = cls(**{k: v for k, v in d.items() if k not in ("rejected", "unmatched", "dropped_traversals")})
        out.rejected.update(d.get("rejected", {}))
        out.unmatched.update(d.get("unmatched", {}))
        out.dropped_traversals.update(d.get("dropped_traversals", {}))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "received": self.received, "rejected": dict(self.rejected), "dead_letters": self.dead_letters,
            "trimmed": self.trimmed, "matched": self.matched, "unmatched": dict(self.unmatched),
            "traversals": self.traversals, "dropped_traversals": dict(self.dropped_traversals),
            "published": self.published, "published_ok": self.published_ok,
            "devices_expired": self.devices_expired,
        }


def matcher_config(settings: Settings) -> MatcherConfig:
    """Matcher parameters from settings (the lag bound; the rest are the matcher's defaults)."""
    return MatcherConfig(max_lag_s=float(settings.max_match_lag_s))


def estimator_config(settings: Settings) -> EstimatorConfig:
    """Estimator windows, grace and k from settings."""
    return EstimatorConfig.from_settings(settings)


def warm_up_matcher(matcher: OnlineMatcher) -> int:
    """Match a short synthetic drive so that the matcher's compiled kernels are loaded before real input.

    The kernels (:mod:`geo.kernels`) are compiled once per machine and cached, but each process still
    loads them on first call (about 1-2 s); a worker that does this before it joins its consumer group
    does not spend that time with its partitions' input waiting.

    Parameters
    ----------
    matcher
        The matcher to warm up (its network's route table is built too).

    Returns
    -------
    int
        Traversals the synthetic drive produced (0 on a network with no drivable chain of segments).
    """
    net = matcher.network
    if net.n_segments == 0:
        return 0
    # a chain of up to 8 connected segments (no U-turns), sampled every ~15 m, 2 s apart; started from
    # the longest segments until one leads on (the longest may be a dead end at the map's edge)
    chain: list[int] = []
    for start in np.argsort(-net.length_m)[:100]:
        chain = [int(start)]
        while len(chain) < 8:
            here = chain[-1]
            nxt = [int(s) for s in net.successors(here) if int(s) not in chain and int(s) != net.reverse_of[here]]
            if not nxt:
                break
            chain.append(nxt[0])
        if len(chain) >= 3:
            break
    offsets = [np.arange(0.0, float(net.length_m[r]), 15.0) for r in chain]
    segments = np.repeat(np.asarray(chain, dtype=np.int64), [len(o) for o in offsets])
    lonlat = net.to_lonlat(points_at_offsets(net, segments, np.concatenate(offsets)))
    t0 = 1_700_000_000.0
    pings = [Ping("warm-up", t0 + 2.0 * i, float(lat), float(lon), 5.0, None, None)
             for i, (lon, lat) in enumerate(lonlat)]
    emitted = 0
    # both code paths: a whole upload at once (vectorised search) and single pings
    state = matcher.new_state()
    for res in matcher.push_many([(state, pings[: len(pings) // 2])]):
        state, emitted = res.state, emitted + len(res.traversals)
    for p in pings[len(pings) // 2:]:
        res = matcher.push(state, [p])
        state, emitted = res.state, emitted + len(res.traversals)
    return emitted + len(matcher.finish(state).traversals)


# ------------------------------------------------------------------------------------------ device state


@dataclass
class DeviceState:
    """Everything remembered about one device (pseudonym) between batches."""

    trim: TripTrimState
    match: MatcherState

    _HEAD = struct.Struct("<BiI")  # version, source partition, length of the trim part

    def to_bytes(self, source: int) -> bytes:
        """Table value: a header naming the source partition (so a worker can find its keys after a
        rebalance), the trim state, the matcher state."""
        trim = self.trim.to_bytes()
        return b"".join((self._HEAD.pack(1, source, len(trim)), trim, self.match.to_bytes()))

    @classmethod
    def from_bytes(cls, data: bytes, device: str) -> tuple[int, "DeviceState"]:
        """``(source partition, state)`` from :meth:`to_bytes`. Raises ``ValueError`` on foreign bytes."""
        h = cls._HEAD
        if len(data) < h.size or data[0] != 1:
            raise ValueError("not a device state")
        _, source, n = h.unpack_from(data, 0)
        trim = TripTrimState.from_bytes(data[h.size:h.size + n], device)
        return source, cls(trim, MatcherState.from_bytes(data[h.size + n:]))

    @staticmethod
    def source_of(data: bytes) -> int:
        return DeviceState._HEAD.unpack_from(data, 0)[1]


# ------------------------------------------------------------------------------------------ ingest+match


@dataclass
class IngestMatchOutput:
    """What one :meth:`IngestMatch.process_messages` call produced."""

    dead_letters: list[DeadLetter] = field(default_factory=list)
    traversals: list[Traversal] = field(default_factory=list)


class IngestMatch:
    """Validate, pseudonymise, trim and map-match the pings of one source.

    Parameters
    ----------
    network
        Road network.
    settings
        Pseudonym key and rotation, trim distance, match lag.
    source
        The source's number (Kafka partition of the pings topic; 0 when embedded).
    stats
        Counters to update (shared with the rest of a runner); a new one when ``None``.
    matcher
        A ready :class:`~geo.matcher.OnlineMatcher` to share (its route table is the costly part).
    """

    def __init__(self, network: RoadNetwork, settings: Settings, source: int = 0,
                 stats: PipelineStats | None = None, matcher: OnlineMatcher | None = None) -> None:
        self.source = source
        self.stats = stats if stats is not None else PipelineStats()
        self.matcher = matcher or OnlineMatcher(network, matcher_config(settings))
        self.gap_s = self.matcher.config.max_gap_s
        self.pseudonymiser = Pseudonymiser(settings.pseudonym_key, settings.pseudonym_rotation_s)
        self.trimmer = TripTrimmer(settings.trip_trim_m, self.gap_s)
        self.devices: dict[str, DeviceState] = {}
        #: Newest valid event time seen (epoch s); ``None`` before the first ping.
        self.watermark: float | None = None
        self._expiry_checked_at = -math.inf
        #: Keys changed / deleted since :meth:`take_changes`.
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        #: Counts not yet added to the Prometheus metrics (see :meth:`_publish_metrics`).
        self._unpublished_matched = 0
        self._unpublished_traversals = 0
        self._unpublished_unmatched: Counter[str] = Counter()

    # -------------------------------------------------------------- input
    def process_messages(self, messages: Iterable[tuple[bytes | None, bytes]], now: float | None = None
                         ) -> IngestMatchOutput:
        """Run a batch of raw messages (Kafka ``(key, value)``) through ingest and the matcher.

        Parameters
        ----------
        messages
            Raw messages of this source, in arrival order.
        now
            Wall clock for the age checks of validation; ``None`` (replays) checks only sanity.
        """
        out = IngestMatchOutput()
        pings: list[Ping] = []
        origin: list[tuple[int, int]] = []  # (message number, index in its batch) of each ping
        message_of: list[int] = []
        decoded = []
        received = 0
        for m, (key, value) in enumerate(messages):
            d = decode_message(key, value, now=now)
            decoded.append((key, value, d))
            received += d.n_received
            pings.extend(d.pings)
            origin.extend((m, i) for i in d.indexes)
            message_of.extend([m] * len(d.pings))
        self.stats.received += received
        metrics.PINGS_RECEIVED.inc(received)  # once per batch: a metric update takes a lock
        late_rejects: dict[int, list[Rejection]] = {}
        for pos, reason in self._match(self.pseudonymiser.apply(pings), out.traversals, message_of):
            m, i = origin[pos]
            late_rejects.setdefault(m, []).append(Rejection(reason, _ORDER_DETAIL.get(reason, reason), i))
        for m, (key, value, d) in enumerate(decoded):
            extra = late_rejects.get(m, [])
            if d.dead_letter is None and not extra:
                continue
            rejections = (*(d.dead_letter.rejections if d.dead_letter else ()), *extra)
            n = (d.dead_letter.n_pings if d.dead_letter else 0) + len(extra)
            out.dead_letters.append(DeadLetter(key, value if value is not None else b"", rejections, n))
        for dl in out.dead_letters:
            self.stats.dead_letters += 1
            for r in dl.rejections:
                # a whole-message rejection (no index) stands for every ping the message carried, so that
                # received = rejected + matched + unmatched holds (e.g. batch_too_large)
                n = dl.n_pings if r.index is None else 1
                self.stats.rejected[r.reason] += n
                metrics.PINGS_REJECTED.labels(reason=r.reason).inc(n)
        self._expire(out.traversals)
        self._publish_metrics()
        return out

    def process_pings(self, pings: Sequence[Ping]) -> list[Traversal]:
        """Already-validated pings with raw device ids (simulator, files): pseudonymise, trim, match.

        Returns the traversals; ordering rejections are counted in ``stats.rejected``.
        """
        self.stats.received += len(pings)
        metrics.PINGS_RECEIVED.inc(len(pings))
        traversals: list[Traversal] = []
        for _, reason in self._match(self.pseudonymiser.apply(pings), traversals):
            self.stats.rejected[reason] += 1
            metrics.PINGS_REJECTED.labels(reason=reason).inc()
        self._expire(traversals)
        self._publish_metrics()
        return traversals

    def _match(self, pings: list[Ping], traversals: list[Traversal], message_of: Sequence[int] | None = None
               ) -> list[tuple[int, str]]:
        """Trim and match pseudonymised pings; returns ``(position, reason)`` of ordering rejections.

        The matcher's fixed-lag decisions depend on how a device's pings are cut into pushes, so a
        device's pings are pushed one message at a time (``message_of[pos]``: the message of each
        ping): the result depends on the messages, never on how a runner happened to batch them.
        Devices are still matched together, one vectorised ``push_many`` per round.
        """
        if not pings:
            return []
        chunks: dict[str, list[list[int]]] = {}
        last_msg: dict[str, int] = {}
        for pos, p in enumerate(pings):
            m = message_of[pos] if message_of is not None else 0
            dev_chunks = chunks.get(p.device)
            if dev_chunks is None:
                chunks[p.device] = [[pos]]
            elif last_msg[p.device] != m:
                dev_chunks.append([pos])
            else:
                dev_chunks[-1].append(pos)
            last_msg[p.device] = m
        rejected: list[tuple[int, str]] = []
        newest = self.watermark if self.watermark is not None else -math.inf
        stale_before = newest - self.gap_s - EXPIRY_SLACK_S
        n_rounds = max(len(c) for c in chunks.values())
        for r in range(n_rounds):
            items: list[tuple[MatcherState, list[Ping]]] = []
            devices: list[str] = []
            for dev, dev_chunks in chunks.items():
                if r >= len(dev_chunks):
                    continue
                positions = dev_chunks[r]
                state = self.devices.get(dev)
                if state is None:
                    # Pings of a device without state that are older than the expiry horizon belong to a trip
                    # the watermark has already ended: after a crash, the replay since the last commit
                    # re-delivers pings of trips that ended (and were deleted) since; re-matching them as a
                    # new trip would publish their traversals twice. Counted as unmatched ``late``.
                    fresh = [k for k in positions if pings[k].ts >= stale_before]
                    if len(fresh) < len(positions):
                        n_late = len(positions) - len(fresh)
                        self._unmatched("late", n_late)
                        positions = fresh
                        if not positions:
                            continue
                    state = self.devices[dev] = DeviceState(TripTrimState(), self.matcher.new_state())
                res = self.trimmer.push(state.trim, [pings[k] for k in positions])
                rejected.extend((positions[i], reason) for i, reason in res.rejected)
                if res.trimmed:
                    self.stats.trimmed += res.trimmed
                    self._unmatched("trip_trim", res.trimmed)
                if res.released:
                    items.append((state.match, res.released))
                    devices.append(dev)
                newest = max(newest, state.trim.last_ts)
                self._dirty.add(dev)
                self._deleted.discard(dev)
            if items:
                t0 = time.perf_counter()
                results = self.matcher.push_many(items)
                metrics.MATCH_LATENCY.observe(time.perf_counter() - t0)
                for dev, res in zip(devices, results):
                    self.devices[dev].match = res.state
                    self._count_match(res.matched, res.dropped, res.traversals)
                    traversals.extend(res.traversals)
        if newest > -math.inf:
            self.watermark = newest
        return rejected

    def _count_match(self, matched: int, dropped: Counter[str], traversals: list[Traversal]) -> None:
        self.stats.matched += matched
        self._unpublished_matched += matched
        for reason, n in dropped.items():
            if reason in SPLIT_REASONS or n <= 0:
                continue
            self._unmatched(_UNMATCHED_REASON.get(reason, "no_route"), n)
        self.stats.traversals += len(traversals)
        self._unpublished_traversals += len(traversals)

    def _unmatched(self, reason: str, n: int) -> None:
        self.stats.unmatched[reason] += n
        self._unpublished_unmatched[reason] += n

    def _publish_metrics(self) -> None:
        """Add the batch's counts to the Prometheus metrics: once per batch, not per device (every
        metric update takes a lock, and a labelled one a lookup too)."""
        metrics.PINGS_MATCHED.inc(self._unpublished_matched)
        metrics.TRAVERSALS_EMITTED.inc(self._unpublished_traversals)
        for reason, n in self._unpublished_unmatched.items():
            metrics.PINGS_UNMATCHED.labels(reason=reason).inc(n)
        self._unpublished_matched = self._unpublished_traversals = 0
        self._unpublished_unmatched.clear()

    # -------------------------------------------------------------- trip ends
    def _expire(self, traversals: list[Traversal]) -> None:
        """End the trips of devices idle for ``gap_s + EXPIRY_SLACK_S`` of this source's watermark."""
        wm = self.watermark
        if wm is None or wm - self._expiry_checked_at < 1.0:  # at most one scan per event-second
            return
        self._expiry_checked_at = wm
        cutoff = wm - self.gap_s - EXPIRY_SLACK_S
        idle = [dev for dev, st in self.devices.items() if st.trim.last_ts < cutoff]
        for dev in idle:
            traversals.extend(self._end_device(dev))

    def _end_device(self, dev: str) -> list[Traversal]:
        state = self.devices.pop(dev)
        discarded = self.trimmer.finish(state.trim)
        self.stats.trimmed += discarded
        if discarded:
            self._unmatched("trip_trim", discarded)
        res = self.matcher.finish(state.match)
        self._count_match(0, res.dropped, res.traversals)
        self.stats.devices_expired += 1
        self._dirty.discard(dev)
        self._deleted.add(dev)
        return res.traversals

    def finish(self) -> list[Traversal]:
        """End every device's trip (end of input): flush the matcher, discard held tails."""
        out: list[Traversal] = []
        for dev in list(self.devices):
            out.extend(self._end_device(dev))
        self._publish_metrics()
        return out

    # -------------------------------------------------------------- persistence (Faust tables)
    def take_changes(self) -> tuple[dict[str, bytes], set[str]]:
        """Serialised states of devices changed since the last call, and devices deleted."""
        changed = {dev: self.devices[dev].to_bytes(self.source) for dev in self._dirty if dev in self.devices}
        deleted = set(self._deleted)
        self._dirty.clear()
        self._deleted.clear()
        return changed, deleted

    def load(self, states: Iterable[tuple[str, bytes]], watermark: float | None) -> None:
        """Restore devices (``(pseudonym, to_bytes value)``) and the watermark after a (re)assignment."""
        self.devices.clear()
        for dev, data in states:
            _, st = DeviceState.from_bytes(data, dev)
            self.devices[dev] = st
        self.watermark = watermark
        self._dirty.clear()
        self._deleted.clear()


# ------------------------------------------------------------------------------------------ aggregate


class Aggregate:
    """Windowed speed estimation over traversals from one or more sources.

    Parameters
    ----------
    network, settings
        Road network; windows, grace and k from settings.
    sources
        Sources whose watermarks must all be known before any window closes (Kafka: the partitions
        of the pings topic; embedded: ``[0]``).
    stats
        Counters to update.
    idle_source_s
        Wall-clock seconds after which a source that sends nothing stops holding the watermark back
        (a partition without devices); ``None`` waits for every source forever.
    """

    def __init__(self, network: RoadNetwork, settings: Settings, sources: Sequence[int] = (0,),
                 stats: PipelineStats | None = None, idle_source_s: float | None = None) -> None:
        self.network = network
        self.config = estimator_config(settings)
        self.estimator = SpeedEstimator(network, self.config)
        self.sources = list(sources)
        self.stats = stats if stats is not None else PipelineStats()
        self.idle_source_s = idle_source_s
        self.source_watermarks: dict[int, float] = {}
        self._last_heard: dict[int, float] = {}
        self._started = time.monotonic()
        #: Traversals waiting for the watermark to come within the estimator's future horizon.
        self._pending: list[tuple[int, str, float, float, float]] = []

    def add(self, traversals: Sequence[Traversal]) -> None:
        """Add traversal objects."""
        if traversals:
            n = len(traversals)
            self.add_arrays(
                np.fromiter((t.segment_id for t in traversals), dtype=np.int64, count=n),
                [t.device for t in traversals],
                np.fromiter((t.t_enter for t in traversals), dtype=float, count=n),
                np.fromiter((t.t_exit for t in traversals), dtype=float, count=n),
                np.fromiter((t.fraction for t in traversals), dtype=float, count=n),
            )

    def add_arrays(self, segment_ids: np.ndarray, devices: Sequence[str], t_enter: np.ndarray,
                   t_exit: np.ndarray, fraction: np.ndarray) -> None:
        """Add traversals given as columns (the wire form of :func:`decode_traversals`).

        A source far ahead of the slowest one (a backlog consumed unevenly) can deliver traversals
        beyond the estimator's ``max_future_s`` horizon; those that no source has outrun (``t_exit``
        at most the newest source watermark) wait here until the watermark catches up, instead of
        being dropped as ``future``: what is published must not depend on consumption order.
        Set the sending source's watermark (:meth:`set_source_watermark`) before adding its batch.
        """
        if not len(segment_ids):
            return
        seg = np.asarray(segment_ids, dtype=np.int64)
        dev = list(devices)
        t_in = np.asarray(t_enter, dtype=float)
        t_out = np.asarray(t_exit, dtype=float)
        frac = np.asarray(fraction, dtype=float)
        est_wm = self.estimator.watermark
        if est_wm is not None and self.source_watermarks:
            horizon = est_wm + self.config.max_future_s - 1.0
            newest = max(self.source_watermarks.values())
            hold = (t_out > horizon) & (t_out <= newest)
            if hold.any():
                idx = np.flatnonzero(hold)
                self._pending.extend((int(seg[i]), dev[i], float(t_in[i]), float(t_out[i]), float(frac[i]))
                                     for i in idx)
                keep = np.flatnonzero(~hold)
                seg, t_in, t_out, frac = seg[keep], t_in[keep], t_out[keep], frac[keep]
                dev = [dev[i] for i in keep]
        if len(seg):
            self._count(self.estimator.add_arrays(seg, dev, t_in, t_out, frac))

    def _release_pending(self) -> None:
        est_wm = self.estimator.watermark
        if not self._pending or est_wm is None:
            return
        horizon = est_wm + self.config.max_future_s - 1.0
        ready = [t for t in self._pending if t[3] <= horizon]
        if ready:
            self._pending = [t for t in self._pending if t[3] > horizon]
            cols = list(zip(*ready))
            self._count(self.estimator.add_arrays(np.asarray(cols[0], dtype=np.int64), list(cols[1]),
                                                  np.asarray(cols[2]), np.asarray(cols[3]), np.asarray(cols[4])))

    def _count(self, res: Any) -> None:
        for reason, n in res.dropped.items():
            if n:
                self.stats.dropped_traversals[reason] += n

    def set_source_watermark(self, source: int, watermark: float | None) -> None:
        if watermark is None:
            return
        self._last_heard[source] = time.monotonic()
        if watermark > self.source_watermarks.get(source, -math.inf):
            self.source_watermarks[source] = float(watermark)

    def watermark(self) -> float | None:
        """Minimum over the expected sources' watermarks; ``None`` while one is still unknown."""
        now = time.monotonic()
        marks = []
        for s in self.sources:
            wm = self.source_watermarks.get(s)
            heard = self._last_heard.get(s, self._started)
            if self.idle_source_s is not None and now - heard > self.idle_source_s:
                continue  # idle source: does not hold the others back
            if wm is None:
                return None
            marks.append(wm)
        return min(marks) if marks else None

    def advance(self, watermark_s: float | None = None) -> list[SegmentSpeed]:
        """Close the windows the watermark (given, else :meth:`watermark`) has passed; returns them."""
        wm = self.watermark() if watermark_s is None else watermark_s
        if wm is None:
            return []
        speeds = self.estimator.advance(wm)
        self._release_pending()
        if speeds:
            newest = max(self.source_watermarks.values(), default=wm)
            metrics.WATERMARK_LAG.set(max(0.0, newest - wm))
            self.stats.published += len(speeds)
            self.stats.published_ok += sum(1 for s in speeds if s.status == "ok")
            metrics.record_published(speeds)
        return speeds

    def flush(self) -> list[SegmentSpeed]:
        """Close every window that holds data (end of input): advance past the newest one."""
        est = self.estimator
        cfg = self.config
        marks = list(self.source_watermarks.values()) + ([est.watermark] if est.watermark is not None else [])
        if not marks:
            return []
        return self.advance(max(marks) + cfg.span_s + cfg.grace_s + cfg.step_s)

    # -------------------------------------------------------------- persistence
    def state_bytes(self) -> bytes:
        """Estimator state plus source watermarks, one blob."""
        meta = json.dumps({"sources": {str(k): v for k, v in self.source_watermarks.items()},
                           "pending": self._pending}).encode()
        return struct.pack("<I", len(meta)) + meta + self.estimator.state_bytes()

    def load_state(self, data: bytes) -> None:
        (n,) = struct.unpack_from("<I", data, 0)
        meta = json.loads(data[4:4 + n])
        self.source_watermarks = {int(k): float(v) for k, v in meta["sources"].items()}
        self._pending = [tuple(t) for t in meta.get("pending", [])]
        self.estimator = SpeedEstimator.from_state_bytes(self.network, self.config, data[4 + n:])


# ------------------------------------------------------------------------------------------ wire forms


def segment_partition(segment_id: int, partitions: int) -> int:
    """Partition of the traversals topic that owns a segment (ids are uniform 53-bit hashes)."""
    return int(segment_id) % partitions


def encode_traversals(source: int, watermark: float | None, traversals: Sequence[Traversal]) -> bytes:
    """One traversals-topic message: the source's watermark and a column batch of traversals."""
    return json.dumps({
        "source": source,
        "watermark": watermark,
        "segment_id": [t.segment_id for t in traversals],
        "device": [t.device for t in traversals],
        "t_enter": [t.t_enter for t in traversals],
        "t_exit": [t.t_exit for t in traversals],
        "fraction": [t.fraction for t in traversals],
    }, separators=(",", ":")).encode()


@dataclass
class TraversalBatch:
    """Decoded traversals-topic message."""

    source: int
    watermark: float | None
    segment_id: np.ndarray
    device: list[str]
    t_enter: np.ndarray
    t_exit: np.ndarray
    fraction: np.ndarray


def decode_traversals(value: bytes) -> TraversalBatch:
    """Inverse of :func:`encode_traversals`. Raises ``ValueError`` on a foreign message."""
    try:
        d = json.loads(value)
        return TraversalBatch(
            int(d["source"]), None if d["watermark"] is None else float(d["watermark"]),
            np.asarray(d["segment_id"], dtype=np.int64), list(d["device"]),
            np.asarray(d["t_enter"], dtype=float), np.asarray(d["t_exit"], dtype=float),
            np.asarray(d["fraction"], dtype=float),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a traversals message: {exc}") from None


def split_by_partition(traversals: Sequence[Traversal], partitions: int) -> dict[int, list[Traversal]]:
    """Traversals grouped by the traversals-topic partition of their segment."""
    out: dict[int, list[Traversal]] = {}
    for t in traversals:
        out.setdefault(segment_partition(t.segment_id, partitions), []).append(t)
    return out


def encode_speed(speed: SegmentSpeed) -> tuple[bytes, bytes]:
    """``(key, value)`` of a segment-speeds message: key = segment id, value = the JSON wire form."""
    return str(speed.segment_id).encode(), orjson.dumps(speed.to_dict())
