"""Windowed space-mean speed estimator: traversals in, k-anonymous segment speeds out.

Windows
-------
Event time is cut into *panes* of ``step_s`` seconds aligned to the epoch (pane ``p`` is
``[p * step, (p + 1) * step)``). A window is ``span_s`` long (a whole number of steps) and a new
one ends every ``step_s``: window ``m`` is ``[m * step - span, m * step)`` (half-open, so a
traversal exactly on a boundary belongs to the later window) and consists of the ``span / step``
panes before its end. A traversal belongs to the pane of its **exit time** (it is observed when it
ends), hence to ``span / step`` consecutive windows.

A window closes when ``window_end + grace_s <= watermark`` (event time, given to
:meth:`SpeedEstimator.advance`). A traversal is accepted while the first window that contains it
is still open; then every window it belongs to is still open too, so it counts everywhere or
nowhere. Accepted traversals whose exit time is already behind the watermark are counted as
``late_accepted``; those whose first window has closed are dropped as ``late``.

Per segment and window
----------------------
- ``speed_kmh``: space-mean speed = total covered length / total travel time (partial
  traversals weighted by the length they cover; for full traversals this is the harmonic mean of
  their speeds, not the arithmetic mean that overstates speed whenever speeds vary);
- ``speed_stddev_kmh``: length-weighted standard deviation of traversal speeds;
- distinct devices (exact, on 40-bit device-key hashes: a collision can only lower the count);
- jam level and confidence (:mod:`congestion.quality`), free flow (:mod:`congestion.freeflow`).

Privacy gate: a segment-window is published only when at least ``k_anonymity`` distinct devices
contributed; sample counts leave only as bands. Segments that were published and now have no
publishable data get one ``stale`` record (null speed), then one ``no_data`` record once their last
``ok`` window is older than ``stale_after_s``; segments that never reached k are never mentioned.

Outlier filter (each dropped traversal is counted under exactly one reason, in this order):
``unknown_segment``, ``bad_time`` (non-finite or ``t_exit <= t_enter``), ``bad_fraction`` (not
in (0, 1]), ``short_partial`` (a partial traversal covering < ``min_covered_m``),
``impossible_speed`` (above ``max_speed_factor`` x the map prior or ``max_speed_kmh``),
``stopped`` (a partial traversal slower than ``stop_speed_kmh`` -- parked or stopped at the
destination -- or any traversal longer than ``max_travel_time_s``), ``late``, ``future`` (more than
``max_future_s`` ahead of the watermark), ``duplicate`` (same device, segment and ``t_enter`` as an
accepted traversal: at-least-once delivery replays).

State is per segment and the clock is the watermark, so instances that each see a subset of
segments publish exactly the records one instance would (given the same watermarks).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from congestion._arrays import first_occurrence, group, run_starts, unique_sorted
from congestion.freeflow import FreeFlowLearner, is_off_peak, solar_utc_offset_h
from congestion.quality import confidence, jam_level
from congestion.record import SAMPLE_BAND_EDGES, SAMPLE_BANDS, SegmentSpeed, unchecked_record
from geo.model import Traversal
from geo.network import RoadNetwork

#: Reasons a traversal is dropped, in the order they are tested.
DROP_REASONS: tuple[str, ...] = (
    "unknown_segment", "bad_time", "bad_fraction", "short_partial", "impossible_speed",
    "stopped", "late", "future", "duplicate",
)
#: Status codes of :class:`SpeedBatch` (index into :data:`congestion.record.STATUSES` order).
STATUS_OK, STATUS_NO_DATA, STATUS_STALE = 0, 1, 2
_STATUS_NAMES = ("ok", "no_data", "stale")
_STATE_VERSION = 1
_DEV_BITS = 40
_DEV_MASK = (1 << _DEV_BITS) - 1
_MASK63 = (1 << 63) - 1


@dataclass(frozen=True)
class EstimatorConfig:
    """Knobs of :class:`SpeedEstimator` (units in the names).

    Parameters
    ----------
    step_s, span_s
        Window step and span, seconds; ``span_s`` must be a whole multiple of ``step_s``.
    grace_s
        How long after its end a window waits for late traversals, seconds (event time).
    k_anonymity
        Distinct devices needed before a segment-window is published.
    stale_after_s
        After this long without an ``ok`` window a segment goes from ``stale`` to ``no_data``.
    min_covered_m
        Partial traversals covering less than this are dropped (``short_partial``), metres.
    max_speed_kmh, max_speed_factor
        Traversals faster than ``min(max_speed_kmh, max_speed_factor * prior)`` are dropped
        (``impossible_speed``).
    stop_speed_kmh
        Partial traversals slower than this are dropped as ``stopped``.
    max_travel_time_s
        Traversals longer than this are dropped as ``stopped`` (a parked car), seconds.
    max_future_s
        Traversals more than this ahead of the watermark are dropped as ``future``, seconds.
    free_flow_percentile, free_flow_min_samples
        Free flow = this percentile of off-peak speeds once a segment has this many off-peak
        traversals (from >= ``k_anonymity`` devices); the map prior until then.
    off_peak_hours
        ``(start, end)`` local hours of low demand used to learn free flow (wraps midnight).
    utc_offset_h
        Local time minus UTC, hours; ``None``: mean solar time of the map's centre longitude.
    """

    step_s: float = 60.0
    span_s: float = 300.0
    grace_s: float = 120.0
    k_anonymity: int = 3
    stale_after_s: float = 900.0
    min_covered_m: float = 10.0
    max_speed_kmh: float = 200.0
    max_speed_factor: float = 3.0
    stop_speed_kmh: float = 3.0
    max_travel_time_s: float = 1800.0
    max_future_s: float = 3600.0
    free_flow_percentile: float = 85.0
    free_flow_min_samples: int = 30
    off_peak_hours: tuple[int, int] = (21, 6)
    utc_offset_h: float | None = None

    def __post_init__(self) -> None:
        if not (self.step_s > 0 and math.isfinite(self.step_s)):
            raise ValueError("step_s must be a positive number of seconds")
        ratio = self.span_s / self.step_s
        if not (self.span_s >= self.step_s and abs(ratio - round(ratio)) < 1e-9):
            raise ValueError(f"span_s ({self.span_s}) must be a whole multiple of step_s ({self.step_s})")
        if self.grace_s < 0 or self.stale_after_s < 0:
            raise ValueError("grace_s and stale_after_s must be >= 0")
        if int(self.k_anonymity) < 1:
            raise ValueError("k_anonymity must be >= 1")
        if len(self.off_peak_hours) != 2 or not all(0 <= int(h) <= 24 for h in self.off_peak_hours):
            raise ValueError("off_peak_hours must be (start_hour, end_hour) within 0..24")
        if self.max_speed_kmh <= 0 or self.max_speed_factor <= 0 or self.max_travel_time_s <= 0:
            raise ValueError("max_speed_kmh, max_speed_factor and max_travel_time_s must be > 0")

    @property
    def n_panes(self) -> int:
        """Steps per window span."""
        return int(round(self.span_s / self.step_s))

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "EstimatorConfig":
        """Window, grace and k from :class:`streams.settings.Settings`, plus explicit overrides."""
        values = {
            "step_s": float(settings.window_step_s),
            "span_s": float(settings.window_span_s),
            "grace_s": float(settings.grace_s),
            "k_anonymity": int(settings.k_anonymity),
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class AddResult:
    """What one :meth:`SpeedEstimator.add` call did with its traversals.

    ``accepted`` includes ``late_accepted``; every input is either accepted or in ``dropped``
    under one reason of :data:`DROP_REASONS`.
    """

    accepted: int
    late_accepted: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return int(sum(self.dropped.values()))

    @property
    def total(self) -> int:
        return self.accepted + self.dropped_total


@dataclass(frozen=True)
class SpeedBatch:
    """Columnar segment speeds closed by one :meth:`SpeedEstimator.advance_arrays` call.

    One row per record, ordered by window end, then segment id. Arrays: ``rows`` (segment rows),
    ``status`` (:data:`STATUS_OK` / :data:`STATUS_NO_DATA` / :data:`STATUS_STALE`),
    ``speed_kmh``, ``speed_stddev_kmh``, ``travel_time_s`` (NaN unless ok),
    ``free_flow_speed_kmh``, ``free_flow_travel_time_s``, ``jam_level`` (-1 unless ok),
    ``confidence``, ``band`` (index into :data:`SAMPLE_BANDS`, -1 unless ok), ``window_start``,
    ``window_end`` (epoch s); ``published_at`` (epoch s, one value).
    """

    network: RoadNetwork
    rows: np.ndarray
    status: np.ndarray
    speed_kmh: np.ndarray
    speed_stddev_kmh: np.ndarray
    travel_time_s: np.ndarray
    free_flow_speed_kmh: np.ndarray
    free_flow_travel_time_s: np.ndarray
    jam_level: np.ndarray
    confidence: np.ndarray
    band: np.ndarray
    window_start: np.ndarray
    window_end: np.ndarray
    published_at: float

    def __len__(self) -> int:
        return int(len(self.rows))

    @classmethod
    def concat(cls, network: RoadNetwork, parts: list["SpeedBatch"], published_at: float) -> "SpeedBatch":
        names = [f.name for f in fields(cls) if f.name not in ("network", "published_at")]
        if not parts:
            empty = {n: np.zeros(0) for n in names}
            for n in ("rows", "status", "jam_level", "band"):
                empty[n] = np.zeros(0, dtype=np.int64)
            return cls(network=network, published_at=published_at, **empty)
        return cls(network=network, published_at=published_at,
                   **{n: np.concatenate([getattr(p, n) for p in parts]) for n in names})

    def records(self) -> list[SegmentSpeed]:
        """The batch as :class:`~congestion.record.SegmentSpeed` records."""
        net = self.network
        rows = self.rows
        cols = (
            net.segment_ids[rows].tolist(), net.way_ids[rows].tolist(), net.start_node_ids[rows].tolist(),
            net.end_node_ids[rows].tolist(), net.frc[rows].tolist(), np.round(net.length_m[rows], 2).tolist(),
            _none_nan(self.speed_kmh), _none_nan(self.speed_stddev_kmh), self.free_flow_speed_kmh.tolist(),
            _none_nan(self.travel_time_s), self.free_flow_travel_time_s.tolist(),
            [None if j < 0 else j for j in self.jam_level.tolist()], self.confidence.tolist(),
            [None if b < 0 else SAMPLE_BANDS[b] for b in self.band.tolist()],
            [_STATUS_NAMES[s] for s in self.status.tolist()], self.window_start.tolist(), self.window_end.tolist(),
        )
        pub = [float(self.published_at)] * len(rows)
        # The columns were validated as arrays (status/None pattern, ranges), so the records are
        # assembled without re-checking each one: this is the feed's hot path.
        return [unchecked_record(values) for values in zip(*cols, pub)]


def _none_nan(a: np.ndarray) -> list[float | None]:
    return [None if v != v else v for v in a.tolist()]


# ---------------------------------------------------------------------- device keys
@functools.lru_cache(maxsize=1 << 16)
def _device_key(device: str) -> int:
    return int.from_bytes(hashlib.blake2b(device.encode(), digest_size=8).digest(), "big") & _MASK63


def device_keys(devices: Sequence[str] | np.ndarray) -> np.ndarray:
    """Stable non-negative int64 keys of device pseudonyms (BLAKE2b, same in every process).

    Pass the result to :meth:`SpeedEstimator.add_arrays` to skip hashing on the hot path.
    """
    if isinstance(devices, np.ndarray) and devices.dtype.kind in "iu":
        return devices.astype(np.int64) & _MASK63
    return np.fromiter((_device_key(str(d)) for d in devices), dtype=np.int64, count=len(devices))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _dedupe_keys(dev: np.ndarray, segment_ids: np.ndarray, t_enter: np.ndarray) -> np.ndarray:
    t_ms = np.round(t_enter * 1000.0).astype(np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        k = _mix64(dev.view(np.uint64) ^ _mix64(segment_ids.view(np.uint64) ^ _mix64(t_ms)))
    return k.view(np.int64)


# ---------------------------------------------------------------------- panes
class _RawPane:
    """Accepted traversals of one pane that is still open, plus its dedupe keys."""

    __slots__ = ("chunks", "keys")

    def __init__(self) -> None:
        self.chunks: list[tuple[np.ndarray, ...]] = []  # (rows, dev, covered_m, tt_s, t_exit, key)
        self.keys: set[int] = set()

    def arrays(self) -> tuple[np.ndarray, ...]:
        if len(self.chunks) == 1:
            return self.chunks[0]
        return tuple(np.concatenate(c) for c in zip(*self.chunks))


@dataclass
class _PaneSummary:
    """Per-segment sufficient statistics of a frozen pane (rows sorted)."""

    rows: np.ndarray
    n: np.ndarray
    sum_len: np.ndarray  # metres covered
    sum_tt: np.ndarray  # seconds
    sum_lv: np.ndarray  # sum covered * speed (m * m/s)
    sum_lv2: np.ndarray  # sum covered * speed^2
    max_exit: np.ndarray  # newest exit time, epoch s
    pairs: np.ndarray  # unique (row << 40 | device40), sorted

    _NAMES = ("rows", "n", "sum_len", "sum_tt", "sum_lv", "sum_lv2", "max_exit")


def _summarise(rows, dev, covered, tt, t_exit) -> _PaneSummary:
    order = np.argsort(rows, kind="stable")
    r = rows[order]
    start = np.flatnonzero(run_starts(r))
    cov, t = covered[order], tt[order]
    v = cov / t
    return _PaneSummary(
        rows=r[start],
        n=np.diff(np.append(start, len(r))),
        sum_len=np.add.reduceat(cov, start),
        sum_tt=np.add.reduceat(t, start),
        sum_lv=np.add.reduceat(cov * v, start),
        sum_lv2=np.add.reduceat(cov * v * v, start),
        max_exit=np.maximum.reduceat(t_exit[order], start),
        pairs=unique_sorted((rows << _DEV_BITS) | (dev & _DEV_MASK)),
    )


# ---------------------------------------------------------------------- estimator
class SpeedEstimator:
    """Sliding-window, k-anonymous space-mean speeds per segment (see the module docstring).

    Parameters
    ----------
    network
        The road network whose segment ids the traversals use.
    config
        Windows, privacy and filter settings.

    Attributes
    ----------
    counts
        Cumulative counters: ``accepted``, ``late_accepted``, one per drop reason,
        ``windows_closed``, ``suppressed_below_k`` (segment-windows with data but < k devices),
        ``published_ok`` / ``published_stale`` / ``published_no_data``.
    """

    def __init__(self, network: RoadNetwork, config: EstimatorConfig = EstimatorConfig()) -> None:
        if network.n_segments >= 1 << (63 - _DEV_BITS):
            raise ValueError(f"network too large for the estimator's packed keys ({network.n_segments} segments)")
        self.network = network
        self.config = config
        self._length = np.asarray(network.length_m, dtype=float)
        prior = np.asarray(network.free_flow_prior_kmh, dtype=float)
        self._max_speed_ms = np.minimum(config.max_speed_kmh, config.max_speed_factor * prior) / 3.6
        self.free_flow = FreeFlowLearner(prior, config.free_flow_percentile, config.free_flow_min_samples, config.k_anonymity)
        if config.utc_offset_h is None:
            lon = network.node_lonlat[:, 0]
            self._utc_offset_h = solar_utc_offset_h(float((lon.min() + lon.max()) / 2))
        else:
            self._utc_offset_h = float(config.utc_offset_h)
        self._raw: dict[int, _RawPane] = {}
        self._frozen: dict[int, _PaneSummary] = {}
        self._closed: int | None = None  # index m of the last closed window (end = m * step)
        self._watermark: float | None = None
        n = network.n_segments
        self._tracked = np.zeros(0, dtype=np.int64)  # rows published ok and not yet no_data
        self._last_ok_end = np.full(n, np.nan)
        self._is_stale = np.zeros(n, dtype=bool)
        self.counts: dict[str, int] = {k: 0 for k in ("accepted", "late_accepted", *DROP_REASONS,
                                                      "windows_closed", "suppressed_below_k",
                                                      "published_ok", "published_stale", "published_no_data")}

    # ------------------------------------------------------------------ input
    @property
    def watermark(self) -> float | None:
        """Highest watermark given to :meth:`advance`, epoch seconds."""
        return self._watermark

    @property
    def closed_until(self) -> float | None:
        """End of the last closed window, epoch seconds (``None`` before the first)."""
        return None if self._closed is None else self._closed * self.config.step_s

    def add(self, traversals: Sequence[Traversal]) -> AddResult:
        """Add traversals (the object path; :meth:`add_arrays` is the fast one)."""
        n = len(traversals)
        return self.add_arrays(
            np.fromiter((t.segment_id for t in traversals), dtype=np.int64, count=n),
            [t.device for t in traversals],
            np.fromiter((t.t_enter for t in traversals), dtype=float, count=n),
            np.fromiter((t.t_exit for t in traversals), dtype=float, count=n),
            np.fromiter((t.fraction for t in traversals), dtype=float, count=n),
        )

    def add_arrays(
        self,
        segment_ids: np.ndarray,
        devices: np.ndarray | Sequence[str],
        t_enter: np.ndarray,
        t_exit: np.ndarray,
        fraction: np.ndarray | None = None,
    ) -> AddResult:
        """Add a batch of traversals given as arrays.

        Parameters
        ----------
        segment_ids
            Stable segment ids, int64.
        devices
            Device pseudonyms (strings), or int64 keys from :func:`device_keys` (fast).
        t_enter, t_exit
            Event times, epoch seconds.
        fraction
            Covered share of each segment in (0, 1]; ``None``: all full traversals.
        """
        seg = np.asarray(segment_ids, dtype=np.int64).reshape(-1)
        n = len(seg)
        dropped = {r: 0 for r in DROP_REASONS}
        if n == 0:
            return AddResult(0, 0, dropped)
        dev = device_keys(devices)
        t_in = np.asarray(t_enter, dtype=float).reshape(-1)
        t_out = np.asarray(t_exit, dtype=float).reshape(-1)
        frac = np.ones(n) if fraction is None else np.asarray(fraction, dtype=float).reshape(-1)
        if not (len(dev) == len(t_in) == len(t_out) == len(frac) == n):
            raise ValueError("add_arrays: all arrays must have the same length")
        cfg = self.config
        rows = self.network.index_of(seg)
        reason = np.full(n, -1, dtype=np.int8)  # index into DROP_REASONS, -1 = kept

        def mark(mask: np.ndarray, name: str) -> None:
            reason[(reason < 0) & mask] = DROP_REASONS.index(name)

        mark(rows < 0, "unknown_segment")
        rows_safe = np.where(rows < 0, 0, rows)
        with np.errstate(invalid="ignore", divide="ignore"):
            tt = t_out - t_in
            mark(~(np.isfinite(t_in) & np.isfinite(t_out) & (tt > 0)), "bad_time")
            mark(~((frac > 0) & (frac <= 1)), "bad_fraction")
            covered = frac * self._length[rows_safe]
            partial = frac < 1.0 - 1e-9
            mark(partial & (covered < cfg.min_covered_m), "short_partial")
            speed = covered / tt  # m/s
            mark(speed > self._max_speed_ms[rows_safe], "impossible_speed")
            mark((partial & (speed * 3.6 < cfg.stop_speed_kmh)) | (tt > cfg.max_travel_time_s), "stopped")
            pane = np.floor(t_out / cfg.step_s)
        if self._closed is not None:
            # The first window holding pane p ends at (p + 1) * step; it must still be open.
            mark(pane + 1 <= self._closed, "late")
        if self._watermark is not None:
            mark(t_out > self._watermark + cfg.max_future_s, "future")
        keep = np.flatnonzero(reason < 0)
        key = _dedupe_keys(dev[keep], seg[keep], t_in[keep])
        # Duplicates inside the batch: keep the first occurrence.
        dup = ~first_occurrence(key)
        pane_k = pane[keep].astype(np.int64)
        order = np.argsort(pane_k, kind="stable")
        bounds = np.flatnonzero(np.diff(pane_k[order])) + 1
        for idx in np.split(order, bounds):
            if len(idx) == 0:
                continue
            p = int(pane_k[idx[0]])
            raw = self._raw.get(p)
            if raw is None:
                raw = self._raw[p] = _RawPane()
            seen = raw.keys
            idx = idx[~dup[idx]]
            ks = key[idx].tolist()
            old = np.fromiter(map(seen.__contains__, ks), dtype=bool, count=len(ks))
            dup[idx[old]] = True
            new = idx[~old]
            if len(new) == 0:
                continue
            seen.update(key[new].tolist())
            sel = keep[new]
            raw.chunks.append((rows[sel], dev[sel], covered[sel], tt[sel], t_out[sel], key[new]))
        reason[keep[dup]] = DROP_REASONS.index("duplicate")
        counts = np.bincount(reason[reason >= 0], minlength=len(DROP_REASONS))
        for i, name in enumerate(DROP_REASONS):
            dropped[name] = int(counts[i])
            self.counts[name] += int(counts[i])
        accepted_mask = reason < 0
        accepted = int(accepted_mask.sum())
        late = 0
        if self._watermark is not None:
            late = int((accepted_mask & (t_out < self._watermark)).sum())
        self.counts["accepted"] += accepted
        self.counts["late_accepted"] += late
        return AddResult(accepted, late, dropped)

    # ------------------------------------------------------------------ output
    def advance(self, watermark_s: float, now_s: float | None = None) -> list[SegmentSpeed]:
        """Close every window with ``end + grace <= watermark_s``; return the records to publish.

        Parameters
        ----------
        watermark_s
            Event-time watermark, epoch seconds (a lower watermark than before is ignored).
        now_s
            ``published_at`` of the records; default the watermark.
        """
        return self.advance_arrays(watermark_s, now_s).records()

    def advance_arrays(self, watermark_s: float, now_s: float | None = None) -> SpeedBatch:
        """:meth:`advance` returning columnar arrays (the fast path; no per-record objects)."""
        w = float(watermark_s)
        if not math.isfinite(w):
            raise ValueError(f"watermark {watermark_s!r} is not a finite time")
        if self._watermark is None or w > self._watermark:
            self._watermark = w
        w = self._watermark
        published_at = w if now_s is None else float(now_s)
        cfg = self.config
        last = math.floor((w - cfg.grace_s) / cfg.step_s)
        if self._closed is None:
            panes = list(self._raw) + list(self._frozen)
            self._closed = last if not panes else min(last, min(panes))
        parts: list[SpeedBatch] = []
        m = self._closed + 1
        while m <= last:
            if len(self._tracked) == 0:
                # Nothing to retract: jump to the first window that holds data.
                upcoming = [p for p in (*self._raw, *self._frozen) if p >= m - cfg.n_panes]
                if not upcoming:
                    break
                m = max(m, min(upcoming) + 1)
                if m > last:
                    break
            part = self._close_window(m, published_at)
            if part is not None:
                parts.append(part)
            self._closed = m
            m += 1
        self._closed = max(self._closed, last)
        # Panes no window will read again.
        for p in [p for p in self._frozen if p <= self._closed - cfg.n_panes]:
            del self._frozen[p]
        for p in [p for p in self._raw if p < self._closed]:  # cannot happen, kept for safety
            self._freeze(p)
        return SpeedBatch.concat(self.network, parts, published_at)

    def _freeze(self, p: int) -> None:
        raw = self._raw.pop(p, None)
        if raw is None or not raw.chunks:
            return
        rows, dev, covered, tt, t_exit, _ = raw.arrays()
        self._frozen[p] = _summarise(rows, dev, covered, tt, t_exit)
        cfg = self.config
        off = is_off_peak(t_exit, cfg.off_peak_hours, self._utc_offset_h)
        if off.any():
            self.free_flow.observe(rows[off], covered[off] / tt[off] * 3.6, dev[off])

    def _close_window(self, m: int, published_at: float) -> SpeedBatch | None:
        cfg = self.config
        self._freeze(m - 1)
        end = m * cfg.step_s
        start = end - cfg.span_s
        parts = [self._frozen[p] for p in range(m - cfg.n_panes, m) if p in self._frozen]
        self.counts["windows_closed"] += 1
        ok_rows = np.zeros(0, dtype=np.int64)
        out: dict[str, np.ndarray] = {}
        if parts:
            cat = {name: np.concatenate([getattr(s, name) for s in parts]) for name in _PaneSummary._NAMES}
            all_rows = cat["rows"]
            n_seg = self.network.n_segments
            if n_seg <= 8 * len(all_rows):
                # Dense grouping through a segment-sized lookup table: no sort needed.
                present = np.zeros(n_seg, dtype=bool)
                present[all_rows] = True
                rows = np.flatnonzero(present)
                position = np.cumsum(present) - 1
                inv = position[all_rows]
            else:
                rows, inv = group(all_rows)
                position = None
            k = len(rows)

            def total(name: str) -> np.ndarray:
                return np.bincount(inv, weights=cat[name], minlength=k)

            n = np.bincount(inv, weights=cat["n"], minlength=k).astype(np.int64)
            sum_len, sum_tt, sum_lv, sum_lv2 = total("sum_len"), total("sum_tt"), total("sum_lv"), total("sum_lv2")
            max_exit = np.full(k, -np.inf)
            np.maximum.at(max_exit, inv, cat["max_exit"])
            pairs = unique_sorted(np.concatenate([s.pairs for s in parts]))
            pair_rows = pairs >> _DEV_BITS
            pair_pos = position[pair_rows] if position is not None else np.searchsorted(rows, pair_rows)
            n_dev = np.bincount(pair_pos, minlength=k)
            ok = n_dev >= cfg.k_anonymity
            self.counts["suppressed_below_k"] += int(k - ok.sum())
            if ok.any():
                ok_rows = rows[ok]
                speed = sum_len[ok] / sum_tt[ok] * 3.6
                mean_v = sum_lv[ok] / sum_len[ok]
                sd = np.sqrt(np.maximum(sum_lv2[ok] / sum_len[ok] - mean_v**2, 0.0)) * 3.6
                ff = self.free_flow.speeds(ok_rows)
                length = self._length[ok_rows]
                bands = np.searchsorted(np.asarray(SAMPLE_BAND_EDGES), n[ok], side="right") - 1
                out = {
                    "rows": ok_rows,
                    "status": np.full(len(ok_rows), STATUS_OK, dtype=np.int64),
                    "speed_kmh": np.round(speed, 1),
                    "speed_stddev_kmh": np.round(sd, 1),
                    "travel_time_s": np.round(length / (speed / 3.6), 1),
                    "free_flow_speed_kmh": np.round(ff, 1),
                    "free_flow_travel_time_s": np.round(length / (ff / 3.6), 1),
                    "jam_level": jam_level(speed, ff).astype(np.int64),
                    "confidence": confidence(n_dev[ok], speed, sd, end - max_exit[ok]),
                    "band": bands.astype(np.int64),
                }
        # Segments published before that have nothing publishable now.
        is_ok = np.zeros(self.network.n_segments, dtype=bool)
        is_ok[ok_rows] = True
        gone = self._tracked[~is_ok[self._tracked]]
        age = end - self._last_ok_end[gone]
        to_stale = gone[~self._is_stale[gone] & (age <= cfg.stale_after_s)]
        to_none = gone[age > cfg.stale_after_s]
        self._last_ok_end[ok_rows] = end
        self._is_stale[ok_rows] = False
        self._is_stale[to_stale] = True
        self._is_stale[to_none] = False
        self._last_ok_end[to_none] = np.nan
        is_ok[self._tracked] = True  # now: tracked after this window
        is_ok[to_none] = False
        self._tracked = np.flatnonzero(is_ok)
        self.counts["published_ok"] += len(ok_rows)
        self.counts["published_stale"] += len(to_stale)
        self.counts["published_no_data"] += len(to_none)
        quiet_rows = np.concatenate([to_stale, to_none]).astype(np.int64)
        if len(ok_rows) + len(quiet_rows) == 0:
            return None
        if len(quiet_rows):
            ff = self.free_flow.speeds(quiet_rows)
            nq = len(quiet_rows)
            nan = np.full(nq, np.nan)
            quiet = {
                "rows": quiet_rows,
                "status": np.concatenate([np.full(len(to_stale), STATUS_STALE), np.full(len(to_none), STATUS_NO_DATA)]).astype(np.int64),
                "speed_kmh": nan, "speed_stddev_kmh": nan, "travel_time_s": nan,
                "free_flow_speed_kmh": np.round(ff, 1),
                "free_flow_travel_time_s": np.round(self._length[quiet_rows] / (ff / 3.6), 1),
                "jam_level": np.full(nq, -1, dtype=np.int64),
                "confidence": np.zeros(nq),
                "band": np.full(nq, -1, dtype=np.int64),
            }
            out = quiet if not out else {k: np.concatenate([out[k], quiet[k]]) for k in out}
        order = np.argsort(self.network.segment_ids[out["rows"]], kind="stable")
        out = {k: v[order] for k, v in out.items()}
        size = len(out["rows"])
        return SpeedBatch(
            network=self.network, published_at=published_at,
            window_start=np.full(size, start), window_end=np.full(size, end), **out,
        )

    # ------------------------------------------------------------------ persistence
    def state_bytes(self) -> bytes:
        """Everything needed to resume after a restart (open panes, pane summaries, segment
        statuses, free-flow histograms, counters) as one ``.npz`` blob."""
        arrays: dict[str, np.ndarray] = {}
        raw_p, raw_cols = [], [[] for _ in range(6)]
        for p, raw in self._raw.items():
            if not raw.chunks:
                continue
            cols = raw.arrays()
            raw_p.append(np.full(len(cols[0]), p, dtype=np.int64))
            for i, c in enumerate(cols):
                raw_cols[i].append(c)
        names = ("rows", "dev", "covered", "tt", "t_exit", "key")
        dtypes = (np.int64, np.int64, float, float, float, np.int64)
        arrays["raw_pane"] = np.concatenate(raw_p) if raw_p else np.zeros(0, dtype=np.int64)
        for name, cols, dt in zip(names, raw_cols, dtypes):
            arrays[f"raw_{name}"] = np.concatenate(cols) if cols else np.zeros(0, dtype=dt)
        frozen = sorted(self._frozen)
        arrays["fz_pane"] = np.asarray(frozen, dtype=np.int64)
        arrays["fz_len"] = np.asarray([len(self._frozen[p].rows) for p in frozen], dtype=np.int64)
        arrays["fz_pairs_len"] = np.asarray([len(self._frozen[p].pairs) for p in frozen], dtype=np.int64)
        for name in (*_PaneSummary._NAMES, "pairs"):
            parts = [getattr(self._frozen[p], name) for p in frozen]
            arrays[f"fz_{name}"] = np.concatenate(parts) if parts else np.zeros(0)
        arrays["tracked"] = self._tracked
        arrays["last_ok_end"] = self._last_ok_end[self._tracked]
        arrays["is_stale"] = self._is_stale[self._tracked]
        arrays.update(self.free_flow.state())
        meta = {
            "version": _STATE_VERSION,
            "n_segments": self.network.n_segments,
            "source_hash": self.network.source_hash,
            "ids_digest": _ids_digest(self.network),
            "step_s": self.config.step_s,
            "span_s": self.config.span_s,
            "closed": self._closed,
            "watermark": self._watermark,
            "counts": self.counts,
            "config": asdict(self.config),
        }
        buf = io.BytesIO()
        np.savez(buf, meta=np.asarray(json.dumps(meta)), **arrays)
        return buf.getvalue()

    @classmethod
    def from_state_bytes(cls, network: RoadNetwork, config: EstimatorConfig, b: bytes) -> "SpeedEstimator":
        """Resume from :meth:`state_bytes` on the same network and window grid.

        Raises
        ------
        ValueError
            The blob is not an estimator state, belongs to another network, or ``config`` has a
            different ``step_s`` / ``span_s`` than the saved state.
        """
        try:
            with np.load(io.BytesIO(b), allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            meta = json.loads(str(data.pop("meta")))
        except Exception as exc:  # noqa: BLE001 - any decoding failure means "not a state blob"
            raise ValueError(f"not a roadpulse estimator state ({type(exc).__name__}: {exc})") from None
        if meta.get("version") != _STATE_VERSION:
            raise ValueError(f"estimator state version {meta.get('version')}, expected {_STATE_VERSION}")
        if meta["n_segments"] != network.n_segments or meta["ids_digest"] != _ids_digest(network):
            raise ValueError("estimator state belongs to a different road network")
        if meta["step_s"] != config.step_s or meta["span_s"] != config.span_s:
            raise ValueError(
                f"estimator state uses step {meta['step_s']} s / span {meta['span_s']} s; "
                f"config has {config.step_s} / {config.span_s} (the window grid cannot change on restart)"
            )
        est = cls(network, config)
        est._closed = meta["closed"]
        est._watermark = meta["watermark"]
        for k, v in meta["counts"].items():
            est.counts[k] = int(v)
        raw_pane = data["raw_pane"]
        for p in np.unique(raw_pane).tolist():
            sel = raw_pane == p
            pane = est._raw[int(p)] = _RawPane()
            cols = tuple(data[f"raw_{n}"][sel] for n in ("rows", "dev", "covered", "tt", "t_exit", "key"))
            pane.chunks.append(cols)
            pane.keys.update(cols[5].tolist())
        offs = np.concatenate([[0], np.cumsum(data["fz_len"])]).astype(np.int64)
        poffs = np.concatenate([[0], np.cumsum(data["fz_pairs_len"])]).astype(np.int64)
        for i, p in enumerate(data["fz_pane"].tolist()):
            a, b2 = offs[i], offs[i + 1]
            kw = {name: data[f"fz_{name}"][a:b2] for name in _PaneSummary._NAMES}
            kw["rows"] = kw["rows"].astype(np.int64)
            kw["n"] = kw["n"].astype(np.int64)
            kw["pairs"] = data["fz_pairs"][poffs[i]:poffs[i + 1]].astype(np.int64)
            est._frozen[int(p)] = _PaneSummary(**kw)
        est._tracked = data["tracked"].astype(np.int64)
        est._last_ok_end[est._tracked] = data["last_ok_end"]
        est._is_stale[est._tracked] = data["is_stale"]
        est.free_flow.load_state(data)
        return est


def _ids_digest(network: RoadNetwork) -> str:
    return hashlib.blake2b(np.ascontiguousarray(network.segment_ids).tobytes(), digest_size=16).hexdigest()
