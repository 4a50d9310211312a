"""Online HMM map matching: pings in, the road segments each device drove out.

The model is Newson & Krumm's (2009) hidden Markov model:

* **states** are candidate road positions ``(segment, offset)`` within a search radius of a ping
  (:meth:`geo.network.RoadNetwork.nearby_segments`, one vectorised call per batch of pings);
* **emission**: a Gaussian in the point-to-segment distance, ``-0.5 (d / sigma)^2`` in log space,
  with ``sigma`` from the ping's ``accuracy_m`` when it has one;
* **transition**: exponential in ``|route distance - straight-line distance|`` with scale
  ``beta_m``; route distances come from a precomputed bounded table (:class:`geo.routing.RouteTable`,
  FMM's UBODT idea) and respect one-way streets; a route faster than ``max_speed_kmh`` is
  impossible; a U-turn costs ``uturn_penalty_m`` extra metres.

It runs online, like Goh et al. (2012): a per-device :class:`MatcherState` keeps only the
undecided window of the Viterbi lattice. A prefix of the path is *decided* as soon as every
surviving hypothesis shares it (the convergence point), and at the latest once the newest ping is
``max_lag_s`` of event time ahead of it (fixed lag: the best hypothesis wins). Decided stretches
become :class:`~geo.model.Traversal` s with entry and exit times interpolated along the matched
route between pings. The state serialises to a few hundred bytes (:meth:`MatcherState.to_bytes`)
so it can live in a Faust table.

Batch matching (:func:`match_trace`) is the same engine fed the whole trace at once, so online and
batch results agree wherever the lag bound does not force an early decision.

Lag contract: a ping's candidate is decided no later than the first push that brings a ping at
least ``max_lag_s`` newer; a traversal is emitted when the ping following its exit is decided.
"""

from __future__ import annotations

import copy
import struct
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from geo.model import Ping, Traversal
from geo.network import RoadNetwork
from geo.routing import DEFAULT_DELTA_M, RouteTable

#: Every reason a ping can be dropped by the matcher, or a trip split. Bounded: metric labels.
DROP_REASONS: tuple[str, ...] = (
    "duplicate",        # same time and position as the previous ping
    "out_of_order",     # older than the newest ping already seen
    "device_mismatch",  # pushed into another device's state
    "no_candidate",     # no road within the search radius (outlier or off the map)
    "no_transition",    # no feasible route from the previous ping (skipped as an outlier)
    "gap_split",        # trip split: time gap above max_gap_s (an event, not a dropped ping)
    "break_split",      # trip split: no feasible route for several pings in a row (an event)
)
#: The reasons in :data:`DROP_REASONS` that are events rather than dropped pings.
SPLIT_REASONS: frozenset[str] = frozenset({"gap_split", "break_split"})
#: Shortest stretch of a segment that counts as a (partial) traversal, metres.
MIN_COVER_M = 1.0


@dataclass(frozen=True)
class MatcherConfig:
    """Parameters of the matcher. Distances in metres, times in seconds.

    Attributes
    ----------
    sigma_m
        GPS error (1 sigma) for pings without ``accuracy_m``.
    use_accuracy
        Use a ping's ``accuracy_m`` as its sigma (clipped to ``[min_sigma_m, max_sigma_m]``).
    search_radius_m
        Smallest candidate search radius; the radius is ``max(search_radius_m, radius_sigmas * sigma)``.
    max_candidates
        Nearest candidates kept per ping (both directions of a two-way road count).
    beta_m, beta_sigmas
        Scale of the exponential transition in ``|route - straight line|``:
        ``max(beta_m, beta_sigmas * sigma)``. The straight line between two noisy fixes is itself
        off by about ``sqrt(2) sigma``, so the scale grows with the noise.
    max_speed_kmh
        Transitions faster than this (plus ``speed_slack_m``) are impossible.
    max_detour_m
        Routes longer than the straight line plus this are impossible (bounds the search).
    max_gap_s
        A longer gap between pings ends the trip and starts a new one.
    max_lag_s
        Event-time lag after which a ping's match is decided even without convergence.
    uturn_penalty_m
        Extra route metres charged for turning back onto the reverse of a segment.
    backtrack_m
        Backward movement on one segment tolerated as GPS jitter (stops at lights); also at least
        ``2 sigma``.
    max_outliers
        Consecutive pings with no feasible transition skipped as outliers before the trip is split.
    beam
        Hypotheses more than this many log-likelihood units below the best are pruned.
    route_table_m
        Bound of the precomputed route table (:class:`geo.routing.RouteTable`).
    """

    sigma_m: float = 10.0
    use_accuracy: bool = True
    min_sigma_m: float = 3.0
    max_sigma_m: float = 60.0
    search_radius_m: float = 50.0
    radius_sigmas: float = 3.0
    max_candidates: int = 32
    beta_m: float = 5.0
    beta_sigmas: float = 1.5
    max_speed_kmh: float = 180.0
    speed_slack_m: float = 50.0
    max_detour_m: float = 2000.0
    max_gap_s: float = 120.0
    max_lag_s: float = 30.0
    uturn_penalty_m: float = 100.0
    backtrack_m: float = 15.0
    max_outliers: int = 2
    beam: float = 40.0
    route_table_m: float = DEFAULT_DELTA_M


# --------------------------------------------------------------------------- state
@dataclass
class _Step:
    """One ping in the undecided window: its candidates and back pointers into the previous step."""

    ts: float
    seq: int
    segs: np.ndarray   # int64 segment rows
    offs: np.ndarray   # float64 offsets (float32-exact, so they round-trip through to_bytes)
    bp: np.ndarray     # int64 index into the previous step's candidates (-1 for the first step)


@dataclass
class MatcherState:
    """Everything the matcher remembers about one device between pushes.

    Small (typically a few hundred bytes serialised) and exactly serialisable with
    :meth:`to_bytes` / :meth:`from_bytes`.
    """

    device: str = ""
    last_ts: float = float("-inf")
    last_lon: float = float("nan")
    last_lat: float = float("nan")
    seq: int = 0
    trip: int = 0
    steps: list[_Step] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    last_xy: tuple[float, float] = (0.0, 0.0)
    anchored: bool = False
    open_seg: int = -1
    open_t_enter: float = 0.0
    open_entry_off: float = 0.0
    pos_off: float = 0.0
    outliers: int = 0

    def copy(self) -> "MatcherState":
        """Shallow copy (arrays are never modified in place, so sharing them is safe)."""
        return MatcherState(
            self.device, self.last_ts, self.last_lon, self.last_lat, self.seq, self.trip, list(self.steps),
            self.scores, self.last_xy, self.anchored, self.open_seg, self.open_t_enter, self.open_entry_off,
            self.pos_off, self.outliers,
        )

    @property
    def window_pings(self) -> int:
        """Pings in the undecided window (including the decided anchor)."""
        return len(self.steps)

    # ------------------------------------------------------------ serialisation
    _HEAD = struct.Struct("<BBBxiqqdddddddddi")
    _VERSION = 1

    def to_bytes(self) -> bytes:
        """Compact binary form (little-endian); :meth:`from_bytes` restores it exactly."""
        steps = _compact(self.steps)
        dev = self.device.encode()
        n = len(steps)
        head = self._HEAD.pack(
            self._VERSION, int(self.anchored), min(len(dev), 255), n, self.seq, self.trip,
            self.last_ts, self.last_lon, self.last_lat, self.last_xy[0], self.last_xy[1],
            self.open_t_enter, self.open_entry_off, self.pos_off, 0.0, self.open_seg,
        )
        parts = [head, dev[:255], struct.pack("<i", self.outliers)]
        if n:
            ts = np.array([s.ts for s in steps], dtype="<f8")
            seq = np.array([self.seq - s.seq for s in steps], dtype="<u4")
            counts = np.array([len(s.segs) for s in steps], dtype="<u1")
            segs = np.concatenate([s.segs for s in steps]).astype("<i4")
            offs = np.concatenate([s.offs for s in steps]).astype("<f4")
            bp = np.concatenate([np.maximum(s.bp, 0) for s in steps]).astype("<u1")
            parts += [ts.tobytes(), seq.tobytes(), counts.tobytes(), segs.tobytes(), offs.tobytes(), bp.tobytes(),
                      np.asarray(self.scores, dtype="<f8").tobytes()]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> "MatcherState":
        """Inverse of :meth:`to_bytes`.

        Raises
        ------
        ValueError
            Bytes that are not a matcher state of this version.
        """
        h = cls._HEAD
        if len(data) < h.size + 4 or data[0] != cls._VERSION:
            raise ValueError("not a matcher state (wrong version or truncated)")
        (_, anchored, dev_len, n, seq, trip, last_ts, last_lon, last_lat, x, y, t_enter, entry_off, pos_off,
         _, open_seg) = h.unpack_from(data, 0)
        pos = h.size
        device = data[pos:pos + dev_len].decode()
        pos += dev_len
        (outliers,) = struct.unpack_from("<i", data, pos)
        pos += 4
        st = cls(device, last_ts, last_lon, last_lat, seq, trip, [], np.zeros(0), (x, y), bool(anchored), open_seg,
                 t_enter, entry_off, pos_off, outliers)
        if n:
            def take(dtype: str, count: int) -> np.ndarray:
                nonlocal pos
                arr = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
                pos += arr.nbytes
                return arr

            ts = take("<f8", n)
            dseq = take("<u4", n)
            counts = take("<u1", n).astype(np.int64)
            total = int(counts.sum())
            segs = take("<i4", total).astype(np.int64)
            offs = take("<f4", total).astype(np.float64)
            bp = take("<u1", total).astype(np.int64)
            st.scores = take("<f8", int(counts[-1])).copy()
            ptr = np.concatenate([[0], np.cumsum(counts)])
            for k in range(n):
                a, b = ptr[k], ptr[k + 1]
                st.steps.append(_Step(float(ts[k]), seq - int(dseq[k]), segs[a:b], offs[a:b],
                                      bp[a:b] if k else np.full(b - a, -1, dtype=np.int64)))
        if pos != len(data):
            raise ValueError("not a matcher state (trailing bytes)")
        return st


def _compact(steps: list[_Step]) -> list[_Step]:
    """Drop candidates of intermediate steps that no surviving hypothesis passes through."""
    if len(steps) < 3:
        return steps
    out = [steps[-1]]
    keep = np.unique(steps[-1].bp)
    for k in range(len(steps) - 2, 0, -1):
        s = steps[k]
        if len(keep) == len(s.segs):
            out.append(s)
            keep = np.unique(s.bp)
            continue
        remap = np.full(len(s.segs), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        child = out[-1]
        out[-1] = _Step(child.ts, child.seq, child.segs, child.offs, remap[child.bp])
        out.append(_Step(s.ts, s.seq, s.segs[keep], s.offs[keep], s.bp[keep]))
        keep = np.unique(s.bp[keep])
    s = steps[0]
    if len(keep) != len(s.segs):
        remap = np.full(len(s.segs), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        child = out[-1]
        out[-1] = _Step(child.ts, child.seq, child.segs, child.offs, remap[child.bp])
        s = _Step(s.ts, s.seq, s.segs[keep], s.offs[keep], s.bp[keep])
    out.append(s)
    out.reverse()
    return out


@dataclass
class MatchResult:
    """What one :meth:`OnlineMatcher.push` or :meth:`OnlineMatcher.finish` produced.

    Attributes
    ----------
    state
        The device's new state (persist ``state.to_bytes()``).
    traversals
        Traversals decided by this call, in driving order.
    matched
        Pings taken into the model.
    unmatched
        Pings dropped (the sum of ``dropped`` over ping-dropping reasons).
    dropped
        Reason (from :data:`DROP_REASONS`) -> count; trip splits are counted here too.
    """

    state: MatcherState
    traversals: list[Traversal]
    matched: int = 0
    unmatched: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


# --------------------------------------------------------------------------- engine
_TABLES: "weakref.WeakKeyDictionary[RoadNetwork, dict[tuple[float, float], RouteTable]]" = weakref.WeakKeyDictionary()


def route_table(network: RoadNetwork, delta_m: float = DEFAULT_DELTA_M, uturn_penalty_m: float = 0.0) -> RouteTable:
    """The network's :class:`~geo.routing.RouteTable` for these parameters, built once and shared."""
    per_net = _TABLES.setdefault(network, {})
    key = (float(delta_m), float(uturn_penalty_m))
    table = per_net.get(key)
    if table is None:
        table = per_net[key] = RouteTable(network, delta_m, uturn_penalty_m)
    return table


class _Batch:
    """Candidates and transitions for the accepted pings of one push, computed vectorised."""

    __slots__ = ("ts", "xy", "sigma", "cand_ptr", "segs", "offs", "emis", "dist", "snap")


class OnlineMatcher:
    """Map-match devices' pings as they arrive.

    Parameters
    ----------
    network
        The road network; its route table is built on first use (about 1 s on Liechtenstein).
    config
        Matcher parameters.
    """

    def __init__(self, network: RoadNetwork, config: MatcherConfig = MatcherConfig()) -> None:
        self.network = network
        self.config = config
        self.table = route_table(network, config.route_table_m, config.uturn_penalty_m)
        self._len = network.length_m
        self._rev = network.reverse_of
        self._to = network.to_node
        self._from = network.from_node
        self._vmax = config.max_speed_kmh / 3.6
        self._max_lag_s = config.max_lag_s

    def new_state(self) -> MatcherState:
        """An empty state for a device not seen before."""
        return MatcherState()

    # ------------------------------------------------------------------ public
    def push(self, state: MatcherState, pings: Sequence[Ping]) -> MatchResult:
        """Feed one device's new pings (in event-time order); returns decided traversals.

        Deterministic: the same state and pings give the same result and the same new state.
        """
        return self.push_many([(state, pings)])[0]

    def push_many(self, items: Sequence[tuple[MatcherState, Sequence[Ping]]]) -> list[MatchResult]:
        """:meth:`push` for many devices at once, with one vectorised candidate search for all.

        This is how a stream operator should call the matcher with a batch of records.
        """
        return [r for r, _ in self._push_many(items, None)]

    def finish(self, state: MatcherState) -> MatchResult:
        """End the device's trip (trip over, or device timed out): decide and emit everything."""
        st = state.copy()
        out: list[Traversal] = []
        self._end_trip(st, out, None)
        return MatchResult(st, out)

    # ---------------------------------------------------------------- internals
    def _push_many(
        self,
        items: Sequence[tuple[MatcherState, Sequence[Ping]]],
        sink: Callable[[int, int, float], None] | None,
        inplace: bool = False,
    ) -> list[tuple[MatchResult, list[int | str]]]:
        """Push for many devices; also returns, per ping, its step number or its drop reason."""
        cfg = self.config
        # 1. Per-device screening (duplicates, order) in plain Python: cheap and sequential.
        states, accepted, results, statuses = [], [], [], []
        for state, pings in items:
            st = state if inplace else state.copy()
            dropped: Counter[str] = Counter()
            keep: list[Ping] = []
            status: list[int | str] = []
            for p in pings:
                reason = ""
                if not st.device:
                    st.device = p.device
                elif p.device != st.device:
                    reason = "device_mismatch"
                if not reason and p.ts < st.last_ts:
                    reason = "out_of_order"
                if not reason and p.ts == st.last_ts and p.lat == st.last_lat and p.lon == st.last_lon:
                    reason = "duplicate"
                if reason:
                    dropped[reason] += 1
                    status.append(reason)
                    continue
                st.last_ts, st.last_lat, st.last_lon = p.ts, p.lat, p.lon
                status.append(len(keep))
                keep.append(p)
            states.append(st)
            accepted.append(keep)
            statuses.append(status)
            results.append(MatchResult(st, [], 0, 0, dropped))
        flat = [p for keep in accepted for p in keep]
        batch = self._candidates(flat) if flat else None
        start = 0
        out = []
        for st, keep, res, status in zip(states, accepted, results, statuses):
            seqs: list[int | str] = [-1] * len(keep)
            if keep:
                self._run(st, batch, start, len(keep), res, sink, seqs)
            start += len(keep)
            res.unmatched = sum(v for k, v in res.dropped.items() if k not in SPLIT_REASONS)
            out.append((res, [s if isinstance(s, str) else seqs[s] for s in status]))
        return out

    def _candidates(self, pings: list[Ping]) -> _Batch:
        cfg = self.config
        n = len(pings)
        b = _Batch()
        b.ts = np.fromiter((p.ts for p in pings), dtype=np.float64, count=n)
        lon = np.fromiter((p.lon for p in pings), dtype=np.float64, count=n)
        lat = np.fromiter((p.lat for p in pings), dtype=np.float64, count=n)
        sigma = np.full(n, cfg.sigma_m)
        if cfg.use_accuracy:
            acc = np.fromiter((np.nan if p.accuracy_m is None else p.accuracy_m for p in pings), dtype=np.float64, count=n)
            has = np.isfinite(acc)
            sigma[has] = np.clip(acc[has], cfg.min_sigma_m, cfg.max_sigma_m)
        b.sigma = sigma
        b.xy = self.network.to_xy(lon, lat)
        radius = np.maximum(cfg.search_radius_m, cfg.radius_sigmas * sigma)
        near = self.network.nearby_segments(b.xy, radius, max_per_point=cfg.max_candidates)
        ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(near.point, minlength=n), out=ptr[1:])
        b.cand_ptr = ptr
        b.segs = near.segment
        # float32-exact offsets: the state stores them as float32 and must round-trip exactly.
        b.offs = near.offset_m.astype(np.float32).astype(np.float64)
        b.dist = near.distance_m
        b.emis = -0.5 * (near.distance_m / sigma[near.point]) ** 2
        return b

    def _transitions(
        self, sa: np.ndarray, oa: np.ndarray, xa: tuple[float, float], ta: float,
        sb: np.ndarray, ob: np.ndarray, xb: np.ndarray, tb: float, sigma_b: float,
    ) -> np.ndarray:
        """Log transition scores between two steps' candidates, shape (len(sa), len(sb))."""
        ka, kb = len(sa), len(sb)
        gc = float(np.hypot(xb[0] - xa[0], xb[1] - xa[1]))
        n = ka * kb
        return self._combo_scores(
            np.repeat(sa, kb), np.repeat(oa, kb), np.tile(sb, ka), np.tile(ob, ka),
            np.full(n, gc), np.full(n, tb - ta), np.full(n, sigma_b),
        ).reshape(ka, kb)

    def _batch_transitions(self, b: _Batch, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Transition scores between all candidates of consecutive ``kept`` pings, in one go.

        Returns the flat scores and the offset of each pair's (k_prev x k_next) block in them.
        """
        ptr = b.cand_ptr
        p, q = kept[:-1], kept[1:]
        ka = ptr[p + 1] - ptr[p]
        kb = ptr[q + 1] - ptr[q]
        sizes = ka * kb
        block = np.zeros(len(p) + 1, dtype=np.int64)
        np.cumsum(sizes, out=block[1:])
        pair = np.repeat(np.arange(len(p)), sizes)
        r = np.arange(int(block[-1])) - block[pair]
        kbp = kb[pair]
        ia = ptr[p][pair] + r // kbp
        ib = ptr[q][pair] + r % kbp
        gc = np.hypot(*(b.xy[q] - b.xy[p]).T)
        dt = b.ts[q] - b.ts[p]
        scores = self._combo_scores(b.segs[ia], b.offs[ia], b.segs[ib], b.offs[ib], gc[pair], dt[pair],
                                    b.sigma[q][pair])
        return scores, block

    def _combo_scores(self, sa: np.ndarray, oa: np.ndarray, sb: np.ndarray, ob: np.ndarray,
                      gc: np.ndarray, dt: np.ndarray, sigma_b: np.ndarray) -> np.ndarray:
        """Log transition score of each (from, to) candidate combination (all arrays aligned)."""
        cfg = self.config
        route = self._route_distances(sa, oa, sb, ob, np.maximum(cfg.backtrack_m, 2.0 * sigma_b), gc, dt)
        beta = np.maximum(cfg.beta_m, cfg.beta_sigmas * sigma_b)
        return -np.abs(route - gc) / beta

    def _route_distances(
        self, sa: np.ndarray, oa: np.ndarray, sb: np.ndarray, ob: np.ndarray, tol: np.ndarray,
        gc: np.ndarray, dt: np.ndarray,
    ) -> np.ndarray:
        """Route metres (with U-turn penalty) from (sa, oa) to (sb, ob); ``inf`` if impossible.

        Impossible: longer than the straight line plus ``max_detour_m``, or faster than
        ``max_speed_kmh`` (plus ``speed_slack_m``); pings with equal times skip the speed test.
        """
        cfg = self.config
        la = self._len[sa]
        gap = self.table.gap(sa, sb)
        lim = gc + cfg.max_detour_m
        timed = dt > 0
        lim[timed] = np.minimum(lim[timed], self._vmax * dt[timed] + cfg.speed_slack_m)
        miss = np.flatnonzero(~np.isfinite(gap) & (sa != sb) & (lim > self.table.delta_m))
        if len(miss):
            # Beyond the table's bound: bounded Dijkstra from those sources (long gaps only).
            src, inv = np.unique(sa[miss], return_inverse=True)
            far, _ = self.table.distances_from(src, float(lim[miss].max()))
            gap[miss] = far[inv, sb[miss]]
        route = (la - oa) + gap + ob
        ut = np.flatnonzero(self._rev[sa] == sb)
        if len(ut):
            # Turning back onto the reverse: in place (mid-segment or at the end), with a penalty.
            p = np.maximum(oa[ut], la[ut] - ob[ut])
            turn = (p - oa[ut]) + (p - (la[ut] - ob[ut])) + cfg.uturn_penalty_m
            route[ut] = np.minimum(turn, route[ut])
        same = np.flatnonzero(sa == sb)
        if len(same):
            # Along one segment. Backward beyond GPS jitter (``tol``) costs 1.5 U-turn penalties:
            # more than one real U-turn onto the reverse, less than the two U-turns that would
            # otherwise explain it on a segment that bends back on itself (hairpins), where the
            # nearest piece can be the wrong one for a noisy fix.
            # Backward within the jitter tolerance is a device standing still: route 0, so steady
            # backward driving still pays |0 - straight line| at every step and a U-turn wins.
            back = oa[same] - ob[same]
            route[same] = np.where(back <= 0, -back, np.where(back > tol[same], back + 1.5 * cfg.uturn_penalty_m, 0.0))
        route[route > lim] = np.inf
        return route

    # -- the sequential part: Viterbi recursion, convergence, fixed lag
    def _run(self, st: MatcherState, b: _Batch, start: int, count: int, res: MatchResult,
             sink: Callable[[int, int, float], None] | None, seqs: list[int | str]) -> None:
        cfg = self.config
        out = res.traversals
        ptr = b.cand_ptr
        counts = ptr[start + 1:start + count + 1] - ptr[start:start + count]
        kept = start + np.flatnonzero(counts > 0)
        pre, block = self._batch_transitions(b, kept) if len(kept) > 1 else (None, None)
        pair_of = {int(q): j for j, q in enumerate(kept[1:].tolist())}
        # Ping (batch row) of the newest step and which of its candidates survive, while known.
        prev_ping, prev_alive = -1, None
        for i in range(start, start + count):
            c0, c1 = ptr[i], ptr[i + 1]
            if c0 == c1:
                res.dropped["no_candidate"] += 1
                seqs[i - start] = "no_candidate"
                continue
            ts = float(b.ts[i])
            segs, offs, emis = b.segs[c0:c1], b.offs[c0:c1], b.emis[c0:c1]
            if st.steps and ts - st.steps[-1].ts > cfg.max_gap_s:
                res.dropped["gap_split"] += 1
                self._end_trip(st, out, sink)
            if not st.steps:
                scores = emis - emis.max()
                alive = np.flatnonzero(scores >= -cfg.beam)
                self._append(st, ts, segs[alive], offs[alive], np.full(len(alive), -1), scores[alive], b.xy[i])
                prev_ping, prev_alive = i, alive
                seqs[i - start] = st.seq - 1
                res.matched += 1
                kept_new = self._decide_ready(st, out, sink)
                if kept_new is not None:
                    prev_alive = prev_alive[kept_new]
                continue
            prev = st.steps[-1]
            j = pair_of.get(i, -1)
            if j >= 0 and prev_ping == int(kept[j]):
                kb = c1 - c0
                trans = pre[block[j]:block[j + 1]].reshape(-1, kb)[prev_alive]
            else:
                trans = self._transitions(prev.segs, prev.offs, st.last_xy, prev.ts, segs, offs, b.xy[i], ts,
                                          float(b.sigma[i]))
            tot = st.scores[:, None] + trans
            bp = np.argmax(tot, axis=0)
            best = tot[bp, np.arange(len(segs))] + emis
            top = best.max()
            if not np.isfinite(top):
                st.outliers += 1
                if st.outliers <= cfg.max_outliers:
                    res.dropped["no_transition"] += 1
                    seqs[i - start] = "no_transition"
                    continue
                res.dropped["break_split"] += 1
                self._end_trip(st, out, sink)
                scores = emis - emis.max()
                alive = np.flatnonzero(scores >= -cfg.beam)
                self._append(st, ts, segs[alive], offs[alive], np.full(len(alive), -1), scores[alive], b.xy[i])
            else:
                st.outliers = 0
                scores = best - top
                alive = np.flatnonzero(scores >= -cfg.beam)
                self._append(st, ts, segs[alive], offs[alive], bp[alive], scores[alive], b.xy[i])
            prev_ping, prev_alive = i, alive
            seqs[i - start] = st.seq - 1
            res.matched += 1
            kept_new = self._decide_ready(st, out, sink)
            if kept_new is not None:
                prev_alive = prev_alive[kept_new]

    def _append(self, st: MatcherState, ts: float, segs: np.ndarray, offs: np.ndarray, bp: np.ndarray,
                scores: np.ndarray, xy: np.ndarray) -> None:
        st.steps.append(_Step(ts, st.seq, segs, offs, bp))
        st.seq += 1
        st.scores = scores
        st.last_xy = (float(xy[0]), float(xy[1]))

    def _decide_ready(self, st: MatcherState, out: list[Traversal], sink) -> np.ndarray | None:
        """Decide the converged prefix, then anything older than the lag bound.

        Returns which candidates of the newest step survive (indices into it), or ``None`` if all do.
        """
        steps = st.steps
        first = 1 if st.anchored else 0
        last = len(steps) - 1
        kept: np.ndarray | None = None
        # Convergence: walk back until all surviving hypotheses share one ancestor.
        conv = -1
        conv_idx = 0
        if len(steps[-1].segs) == 1:
            conv, conv_idx = last, 0
        else:
            anc = set(steps[-1].bp.tolist())
            k = last - 1
            while k >= first:
                if len(anc) == 1:
                    conv, conv_idx = k, next(iter(anc))
                    break
                bpk = steps[k].bp
                anc = {int(bpk[a]) for a in anc}
                k -= 1
        if conv >= first:
            kept = self._decide(st, conv, conv_idx, out, sink)
        # Fixed lag: force the best hypothesis for steps older than max_lag_s.
        steps = st.steps
        first = 1 if st.anchored else 0
        horizon = steps[-1].ts - self._max_lag_s
        due = -1
        for k in range(len(steps) - 1, first - 1, -1):
            if steps[k].ts <= horizon:
                due = k
                break
        if due >= first:
            j = int(np.argmax(st.scores))
            for k in range(len(steps) - 1, due, -1):
                j = int(steps[k].bp[j])
            keep = self._decide(st, due, j, out, sink)
            kept = keep if kept is None else kept[keep]
        return kept

    def _decide(self, st: MatcherState, c: int, j: int, out: list[Traversal], sink) -> np.ndarray:
        """Fix candidate ``j`` of step ``c`` and its ancestors; emit the path up to it.

        Returns the indices of the newest step's candidates that survive.
        """
        steps = st.steps
        chain = [0] * (c + 1)
        chain[c] = j
        for k in range(c, 0, -1):
            chain[k - 1] = int(steps[k].bp[chain[k]])
        first = 1 if st.anchored else 0
        if not st.anchored:
            s0 = steps[0]
            i0 = chain[0]
            st.open_seg = int(s0.segs[i0])
            st.open_t_enter = s0.ts
            st.open_entry_off = st.pos_off = float(s0.offs[i0])
            if sink is not None:
                sink(s0.seq, st.open_seg, st.pos_off)
        for k in range(max(first, 1), c + 1):
            a, bstep = steps[k - 1], steps[k]
            self._advance(st, int(a.segs[chain[k - 1]]), float(a.offs[chain[k - 1]]), a.ts,
                          int(bstep.segs[chain[k]]), float(bstep.offs[chain[k]]), bstep.ts, out)
            if sink is not None:
                sink(bstep.seq, int(bstep.segs[chain[k]]), float(bstep.offs[chain[k]]))
        # Collapse step c to the chosen candidate; drop later hypotheses that do not descend from it.
        sc = steps[c]
        new = [_Step(sc.ts, sc.seq, sc.segs[j:j + 1], sc.offs[j:j + 1], np.full(1, -1))]
        alive_prev = np.array([j])
        for k in range(c + 1, len(steps)):
            s = steps[k]
            remap = np.full(len(steps[k - 1].segs), -1, dtype=np.int64)
            remap[alive_prev] = np.arange(len(alive_prev))
            nb = remap[s.bp]
            keep = np.flatnonzero(nb >= 0)
            new.append(_Step(s.ts, s.seq, s.segs[keep], s.offs[keep], nb[keep]))
            alive_prev = keep
        if len(alive_prev) != len(st.scores):
            st.scores = st.scores[alive_prev]
        st.steps = new
        st.anchored = True
        return alive_prev

    def _advance(self, st: MatcherState, sa: int, oa: float, ta: float, sb: int, ob: float, tb: float,
                 out: list[Traversal]) -> None:
        """Move the decided position from (sa, oa) at ``ta`` to (sb, ob) at ``tb``, emitting traversals."""
        cfg = self.config
        L = self._len
        if sa == sb:
            # Forward along the segment, or backward jitter of a stopped device: no new segment.
            st.pos_off = max(st.pos_off, ob)
            return
        la = float(L[sa])
        dev = st.device
        pred_row = None
        try:
            path = self.table.path_between(sa, sb)
            gap = None
        except KeyError:  # beyond the table's bound: the transition used a bounded Dijkstra
            far, pred = self.table.distances_from(np.array([sa]), np.inf)
            gap, pred_row = float(far[0, sb]), pred[0]
            path = self.table.path_between(sa, sb, pred_row) if np.isfinite(gap) else None
        if int(self._rev[sa]) == sb:
            if gap is None:
                gap = self.table.gap_one(sa, sb)
            p = max(oa, la - ob)
            d1 = p - oa
            turn = d1 + (p - (la - ob))
            if turn + self.config.uturn_penalty_m <= (la - oa) + gap + ob:
                t_turn = ta + (tb - ta) * (d1 / turn) if turn > 0 else ta
                self._close(st, sa, t_turn, max(p, st.pos_off), out)
                st.open_seg, st.open_t_enter, st.open_entry_off, st.pos_off = sb, t_turn, la - p, ob
                return
        assert path is not None
        lens = [float(L[s]) for s in path]
        total = (la - oa) + sum(lens) + ob
        rate = (tb - ta) / total if total > 0 else 0.0
        x = la - oa
        t = ta + rate * x
        self._close(st, sa, t, la, out)
        for s, ls in zip(path, lens):
            t_next = ta + rate * (x + ls)
            out.append(Traversal(int(self.network.segment_ids[s]), dev, t, t_next, 1.0))
            x += ls
            t = t_next
        st.open_seg, st.open_t_enter, st.open_entry_off, st.pos_off = sb, t, 0.0, ob

    def _close(self, st: MatcherState, seg: int, t_exit: float, exit_off: float, out: list[Traversal]) -> None:
        """Emit the open traversal of ``seg`` up to ``exit_off`` at ``t_exit``."""
        la = float(self._len[seg])
        covered = exit_off - st.open_entry_off
        frac = 1.0 if la <= 0 else min(1.0, covered / la)
        # A touch of less than MIN_COVER_M (turning at a node, float rounding) is no traversal.
        if covered >= MIN_COVER_M or frac >= 0.999:
            out.append(Traversal(int(self.network.segment_ids[seg]), st.device, st.open_t_enter, t_exit, frac))
        st.open_seg = -1

    def _end_trip(self, st: MatcherState, out: list[Traversal], sink) -> None:
        """Decide the best path through the window, close the last traversal, reset the trip."""
        if st.steps:
            self._decide(st, len(st.steps) - 1, int(np.argmax(st.scores)), out, sink)
            last = st.steps[-1]
            if st.open_seg >= 0:
                self._close(st, st.open_seg, last.ts, st.pos_off, out)
        st.steps = []
        st.scores = np.zeros(0)
        st.anchored = False
        st.open_seg = -1
        st.pos_off = st.open_entry_off = 0.0
        st.outliers = 0
        st.trip += 1


# --------------------------------------------------------------------------- batch
@dataclass
class TraceMatch:
    """Result of :func:`match_trace` for one device's trace.

    Per-ping arrays (one row per input ping, in input order): ``segment_index`` (network row, or
    -1 when the ping was dropped), ``segment_id`` (-1 likewise), ``offset_m`` (metres from the
    segment start, NaN when dropped), ``snapped_lonlat`` (degrees, NaN when dropped), ``trip``
    (trip number within the trace, -1 when dropped) and ``reason`` (``""`` or the drop reason).
    """

    segment_index: np.ndarray
    segment_id: np.ndarray
    offset_m: np.ndarray
    snapped_lonlat: np.ndarray
    trip: np.ndarray
    reason: list[str]
    traversals: list[Traversal]
    dropped: Counter[str]
    matched: int
    unmatched: int

    def matched_length_m(self, network: RoadNetwork) -> float:
        """Driven length covered by the traversals, metres (fraction x segment length)."""
        if not self.traversals:
            return 0.0
        ids = np.array([t.segment_id for t in self.traversals], dtype=np.int64)
        frac = np.array([t.fraction for t in self.traversals])
        return float((network.length_m[network.index_of(ids)] * frac).sum())


def match_trace(network: RoadNetwork, pings: Sequence[Ping], config: MatcherConfig = MatcherConfig(),
                matcher: OnlineMatcher | None = None) -> TraceMatch:
    """Map-match one device's whole trace (batch mode).

    The same engine as :class:`OnlineMatcher`, fed the whole trace and then finished, without
    the lag bound (the whole trace is known, so decisions wait for convergence or the end).
    Online matching agrees with it wherever hypotheses converge within ``max_lag_s``. Pass
    ``matcher`` to reuse one (and its route table) across traces.

    Parameters
    ----------
    network
        Road network.
    pings
        The device's pings in event-time order (one device; others are dropped as ``device_mismatch``).
    config
        Matcher parameters (ignored when ``matcher`` is given).
    """
    m = matcher if matcher is not None else OnlineMatcher(network, config)
    # The whole trace is known: plain Viterbi, no lag bound (decisions at convergence or the end).
    m = copy.copy(m)
    m._max_lag_s = float("inf")
    decided: dict[int, tuple[int, float]] = {}
    trip_of_seq: dict[int, int] = {}
    work = m.new_state()

    def sink(seq: int, seg: int, off: float) -> None:
        decided[seq] = (seg, off)
        trip_of_seq[seq] = work.trip

    [(res, status)] = m._push_many([(work, pings)], sink, inplace=True)
    m._end_trip(work, res.traversals, sink)
    n = len(pings)
    seg = np.full(n, -1, dtype=np.int64)
    off = np.full(n, np.nan)
    trip = np.full(n, -1, dtype=np.int64)
    reason = [""] * n
    for i, s in enumerate(status):
        if isinstance(s, str):
            reason[i] = s
        elif s in decided:
            seg[i], off[i] = decided[s]
            trip[i] = trip_of_seq[s]
    ok = seg >= 0
    snapped = np.full((n, 2), np.nan)
    if ok.any():
        snapped[ok] = network.to_lonlat(points_at_offsets(network, seg[ok], off[ok]))
    ids = np.where(ok, network.segment_ids[np.maximum(seg, 0)], -1)
    return TraceMatch(seg, ids, off, snapped, trip, reason, res.traversals, res.dropped, res.matched, res.unmatched)


_CUM: "weakref.WeakKeyDictionary[RoadNetwork, np.ndarray]" = weakref.WeakKeyDictionary()


def points_at_offsets(network: RoadNetwork, segments: np.ndarray, offsets_m: np.ndarray) -> np.ndarray:
    """Points ``offsets_m`` metres along ``segments`` (vectorised), metric (N, 2)."""
    segments = np.asarray(segments, dtype=np.int64)
    g = network.geom_xy
    ptr = network.geom_ptr
    cum = _CUM.get(network)
    if cum is None:
        cum = _CUM[network] = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(g, axis=0).T))])
    start = cum[ptr[segments]]
    target = start + np.clip(offsets_m, 0.0, network.length_m[segments])
    # Vertex j with cum[j] <= target < cum[j+1], kept within the segment's own vertices.
    j = np.searchsorted(cum, target, side="right") - 1
    j = np.clip(j, ptr[segments], ptr[segments + 1] - 2)
    piece = np.maximum(cum[j + 1] - cum[j], 1e-12)
    t = np.clip((target - cum[j]) / piece, 0.0, 1.0)[:, None]
    return g[j] + t * (g[j + 1] - g[j])
