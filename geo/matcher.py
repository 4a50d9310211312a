"""Online HMM map matching: pings in, the road segments each device drove out.

The model is Newson & Krumm's (2009) hidden Markov model:

* **states** are candidate road positions ``(segment, offset)`` within a search radius of a ping
  (:meth:`geo.network.RoadNetwork.nearby_segments`, one call per batch of pings);
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

Speed: the per-ping work is sequential and tiny (a handful of candidates), so it runs compiled
(numba, :mod:`geo.kernels`): one candidate search (with emission scores) for all pings of a
push, then per device one call that runs the Viterbi recursion (transitions from the route
table's rows, exact pruning of hypotheses that cannot win, convergence and lag decisions) and the
traversal builder. The Python around them is kept to whole-array work per push: the pings' fields
are read in one pass, screening is a few comparisons per device when its pings are in order, and
traversal objects are built field by field in C loops. The numpy code of
:meth:`OnlineMatcher._transitions` remains the reference for steps whose routes exceed the route
table's bound (a bounded Dijkstra), which the compiled recursion hands back.

Lag contract: a ping's candidate is decided no later than the first push that brings a ping at
least ``max_lag_s`` newer; a traversal is emitted when the ping following its exit is decided.
"""

from __future__ import annotations

import copy
import struct
import types
import weakref
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter

import numpy as np

from geo import kernels as K
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
def _empty_i() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


def _empty_f() -> np.ndarray:
    return np.zeros(0, dtype=np.float64)


@dataclass
class MatcherState:
    """Everything the matcher remembers about one device between pushes.

    Small (typically a few hundred bytes serialised) and exactly serialisable with
    :meth:`to_bytes` / :meth:`from_bytes`.

    The undecided window of the Viterbi lattice is kept flat (what the compiled kernels work on):
    one entry per step (ping) in ``step_ts`` / ``step_seq``, the steps' candidates in CSR form
    (``step_ptr``, ``S + 1`` entries) in ``cand_seg`` (segment rows), ``cand_off`` (metres,
    float32-exact so they round-trip through :meth:`to_bytes`) and ``cand_bp`` (index of the
    candidate's best predecessor in the previous step, -1 in the first step), and ``scores``
    (log-likelihood of the newest step's candidates, relative to the best). Arrays are never
    modified in place, so copies may share them.
    """

    device: str = ""
    last_ts: float = float("-inf")
    last_lon: float = float("nan")
    last_lat: float = float("nan")
    seq: int = 0
    trip: int = 0
    step_ts: np.ndarray = field(default_factory=_empty_f)
    step_seq: np.ndarray = field(default_factory=_empty_i)
    step_ptr: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    cand_seg: np.ndarray = field(default_factory=_empty_i)
    cand_off: np.ndarray = field(default_factory=_empty_f)
    cand_bp: np.ndarray = field(default_factory=_empty_i)
    scores: np.ndarray = field(default_factory=_empty_f)
    last_xy: tuple[float, float] = (0.0, 0.0)
    anchored: bool = False
    open_seg: int = -1
    open_t_enter: float = 0.0
    open_entry_off: float = 0.0
    pos_off: float = 0.0
    outliers: int = 0

    def copy(self) -> "MatcherState":
        """Shallow copy (arrays are never modified in place, so sharing them is safe)."""
        twin = object.__new__(MatcherState)
        twin.__dict__.update(self.__dict__)
        return twin

    @property
    def window_pings(self) -> int:
        """Pings in the undecided window (including the decided anchor)."""
        return len(self.step_ts)

    # ------------------------------------------------------------ serialisation
    _HEAD = struct.Struct("<BBBxiqqdddddddddi")
    _VERSION = 1

    def to_bytes(self) -> bytes:
        """Compact binary form (little-endian); :meth:`from_bytes` restores it exactly."""
        dev = self.device.encode()
        n = len(self.step_ts)
        head = self._HEAD.pack(
            self._VERSION, int(self.anchored), min(len(dev), 255), n, self.seq, self.trip,
            self.last_ts, self.last_lon, self.last_lat, self.last_xy[0], self.last_xy[1],
            self.open_t_enter, self.open_entry_off, self.pos_off, 0.0, self.open_seg,
        )
        parts = [head, dev[:255], struct.pack("<i", self.outliers)]
        if n:
            ptr, segs, offs, bp = _compact(self.step_ptr, self.cand_seg, self.cand_off, self.cand_bp)
            parts += [self.step_ts.astype("<f8").tobytes(), (self.seq - self.step_seq).astype("<u4").tobytes(),
                      np.diff(ptr).astype("<u1").tobytes(), segs.astype("<i4").tobytes(),
                      offs.astype("<f4").tobytes(), np.maximum(bp, 0).astype("<u1").tobytes(),
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
        st = cls(device, last_ts, last_lon, last_lat, seq, trip, last_xy=(x, y), anchored=bool(anchored),
                 open_seg=open_seg, open_t_enter=t_enter, open_entry_off=entry_off, pos_off=pos_off,
                 outliers=outliers)
        if n:
            def take(dtype: str, count: int) -> np.ndarray:
                nonlocal pos
                if count < 0 or pos + count * np.dtype(dtype).itemsize > len(data):
                    raise ValueError("not a matcher state (truncated)")
                arr = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
                pos += arr.nbytes
                return arr

            st.step_ts = take("<f8", n).astype(np.float64)
            st.step_seq = seq - take("<u4", n).astype(np.int64)
            counts = take("<u1", n).astype(np.int64)
            total = int(counts.sum())
            st.step_ptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(counts, out=st.step_ptr[1:])
            st.cand_seg = take("<i4", total).astype(np.int64)
            st.cand_off = take("<f4", total).astype(np.float64)
            st.cand_bp = take("<u1", total).astype(np.int64)
            st.cand_bp[:counts[0]] = -1
            st.scores = take("<f8", int(counts[-1])).astype(np.float64)
        if pos != len(data):
            raise ValueError("not a matcher state (trailing bytes)")
        return st


def _compact(ptr: np.ndarray, segs: np.ndarray, offs: np.ndarray,
             bp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Drop candidates of earlier steps that no surviving hypothesis passes through (windows of 3+ steps)."""
    n = len(ptr) - 1
    if n < 3:
        return ptr, segs, offs, bp
    keep = np.ones(len(segs), dtype=bool)
    for k in range(n - 1, 0, -1):
        lo = ptr[k - 1]
        child = bp[ptr[k]:ptr[k + 1]][keep[ptr[k]:ptr[k + 1]]]
        used = np.zeros(ptr[k] - lo, dtype=bool)
        used[child] = True
        keep[lo:ptr[k]] = used
    if keep.all():
        return ptr, segs, offs, bp
    # New index of each kept candidate within its step, to remap the back pointers.
    new_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.add.reduceat(keep.astype(np.int64), ptr[:-1]), out=new_ptr[1:])
    step = np.repeat(np.arange(n), np.diff(ptr))
    rank = np.cumsum(keep) - 1 - new_ptr[step]
    new_bp = bp.copy()
    later = ptr[1]
    new_bp[later:] = rank[ptr[step[later:] - 1] + bp[later:]]
    return new_ptr, segs[keep], offs[keep], new_bp[keep]


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
    """Candidates of the accepted pings of one push (all devices), from one vectorised search."""

    __slots__ = ("ts", "x", "y", "sigma", "cand_ptr", "segs", "offs", "emis")


_NO_PRE = np.zeros((0, 0))
_TS, _LAT, _LON, _ACCURACY, _DEVICE = (attrgetter(k) for k in ("ts", "lat", "lon", "accuracy_m", "device"))


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
        t = self.table
        # Arguments of the compiled kernels, bound once (numba's per-call cost grows with them).
        self._net_args = (network.length_m, network.reverse_of, t.row_ptr, t.col, t.gap_m)
        self._emit_args = (network.segment_ids, network.length_m, network.reverse_of, t.row_ptr, t.col, t.gap_m, t.pred,
                           float(config.uturn_penalty_m), MIN_COVER_M)
        self._cf = self._config_vector(self._max_lag_s)
        self._viterbi_emit_args = (network.segment_ids, t.pred, float(config.uturn_penalty_m), MIN_COVER_M)

    def _config_vector(self, max_lag_s: float) -> np.ndarray:
        cfg = self.config
        cf = np.zeros(K.N_CONFIG)
        cf[K.CF_MAX_GAP_S] = cfg.max_gap_s
        cf[K.CF_BEAM] = cfg.beam
        cf[K.CF_MAX_DETOUR_M] = cfg.max_detour_m
        cf[K.CF_VMAX_MPS] = self._vmax
        cf[K.CF_SPEED_SLACK_M] = cfg.speed_slack_m
        cf[K.CF_UTURN_M] = cfg.uturn_penalty_m
        cf[K.CF_BACKTRACK_M] = cfg.backtrack_m
        cf[K.CF_BETA_M] = cfg.beta_m
        cf[K.CF_BETA_SIGMAS] = cfg.beta_sigmas
        cf[K.CF_MAX_LAG_S] = max_lag_s
        cf[K.CF_DELTA_M] = self.table.delta_m
        cf[K.CF_MAX_OUTLIERS] = cfg.max_outliers
        return cf

    def _without_lag(self) -> "OnlineMatcher":
        """This matcher for whole traces: plain Viterbi, no lag bound (decisions at convergence or the end)."""
        twin = self.__dict__.get("_unlagged")
        if twin is None:
            twin = copy.copy(self)
            twin._max_lag_s = float("inf")
            twin._cf = twin._config_vector(twin._max_lag_s)
            twin._unlagged = twin
            self._unlagged = twin
        return twin

    def new_state(self) -> MatcherState:
        """An empty state for a device not seen before."""
        return MatcherState()

    # ------------------------------------------------------------------ public
    def push(self, state: MatcherState, pings: Sequence[Ping]) -> MatchResult:
        """Feed one device's new pings (in event-time order); returns decided traversals.

        Deterministic: the same state and pings give the same result and the same new state.
        """
        return self._push_many([(state, pings)])[0][0]

    def push_many(self, items: Sequence[tuple[MatcherState, Sequence[Ping]]]) -> list[MatchResult]:
        """:meth:`push` for many devices at once, with one vectorised candidate search for all.

        This is how a stream operator should call the matcher with a batch of records.
        """
        return [r[0] for r in self._push_many(items)]

    def finish(self, state: MatcherState) -> MatchResult:
        """End the device's trip (trip over, or device timed out): decide and emit everything."""
        st = state.copy()
        res = MatchResult(st, [])
        self._run(st, None, 0, 0, res, finish=True)
        return res

    # ---------------------------------------------------------------- internals
    def _push_many(
        self,
        items: Sequence[tuple[MatcherState, Sequence[Ping]]],
        inplace: bool = False,
        finish: bool = False,
        decided: list | None = None,
    ) -> list[tuple[MatchResult, list[int], dict[int, str], np.ndarray]]:
        """Push for many devices.

        Returns, per device, its result, the indices of the pings accepted by the screening, the
        screening's drop reasons (ping index -> reason) and each accepted ping's step number (or an
        ``ST_*`` code when the model dropped it). ``finish`` ends every trip after its pings;
        ``decided`` collects each device's decided positions as ``(trip0, kind, seq, seg, off)``:
        the trip number at the start and the events of :func:`geo.kernels.viterbi_run` (for
        :func:`match_trace`).
        """
        # 1. Every ping's fields in one pass over all devices (C-level attribute reads).
        items = [(s, p if isinstance(p, (list, tuple)) else list(p)) for s, p in items]
        flat = items[0][1] if len(items) == 1 else [p for _, pings in items for p in pings]
        n_all = len(flat)
        devices = list(map(_DEVICE, flat))
        # Pairs of consecutive pings not strictly in time order, counted up to each ping.
        disorder = np.zeros(max(n_all, 1), dtype=np.int64)
        try:
            ts: np.ndarray | None = np.fromiter(map(_TS, flat), dtype=np.float64, count=n_all)
        except (TypeError, ValueError):
            ts = None  # a time that is no number: left to the ping-by-ping rules
        if ts is not None and n_all > 1:
            np.cumsum(~(ts[1:] > ts[:-1]), out=disorder[1:])
        # 2. Per-device screening (device, order, duplicates). Usually a device's pings are its own
        #    and strictly newer than the last one seen: nothing to drop, decided with a few
        #    comparisons. Otherwise the sequential rules, ping by ping.
        states, results, screened = [], [], []
        kept_parts: list[np.ndarray] = []
        all_kept = True
        a = 0
        for state, pings in items:
            st = state if inplace else state.copy()
            n = len(pings)
            b = a + n
            dropped: Counter[str] = Counter()
            drops: dict[int, str] = {}
            device = st.device or (devices[a] if n else "")
            if n and ts is not None and ts[a] > st.last_ts and disorder[b - 1] == disorder[a] and (
                    devices.count(device) == n if n == n_all else devices[a:b].count(device) == n):
                kept_at: list[int] | np.ndarray = np.arange(n)
                last = pings[-1]
                st.device, st.last_ts, st.last_lat, st.last_lon = device, last.ts, last.lat, last.lon
            else:
                kept_at = []
                device, last_ts, last_lat, last_lon = st.device, st.last_ts, st.last_lat, st.last_lon
                for i, p in enumerate(pings):
                    if not device:
                        device = p.device
                    elif p.device != device:
                        drops[i] = "device_mismatch"
                        continue
                    t = p.ts
                    if t < last_ts:
                        drops[i] = "out_of_order"
                        continue
                    if t == last_ts and p.lat == last_lat and p.lon == last_lon:
                        drops[i] = "duplicate"
                        continue
                    last_ts, last_lat, last_lon = t, p.lat, p.lon
                    kept_at.append(i)
                if drops:
                    dropped.update(drops.values())
                    all_kept = False
                st.device, st.last_ts, st.last_lat, st.last_lon = device, last_ts, last_lat, last_lon
            kept_parts.append(np.asarray(kept_at, dtype=np.int64) + a)
            states.append(st)
            screened.append((kept_at, drops))
            results.append(MatchResult(st, [], 0, 0, dropped))
            a = b
        # 3. One candidate search for the accepted pings of all devices.
        batch = None
        if n_all:
            if all_kept and ts is not None:
                batch = self._candidates(flat, ts)
            else:
                kept = [flat[i] for i in np.concatenate(kept_parts).tolist()]
                if kept:
                    batch = self._candidates(kept)
        start = 0
        out = []
        for st, res, (kept_at, drops) in zip(states, results, screened):
            count = len(kept_at)
            seqs = self._run(st, batch, start, count, res, finish, decided) if count or finish else _EMPTY_I
            start += count
            res.unmatched = sum(v for k, v in res.dropped.items() if k not in SPLIT_REASONS)
            out.append((res, kept_at, drops, seqs))
        return out

    def _candidates(self, pings: Sequence[Ping], ts: np.ndarray | None = None) -> _Batch:
        """Candidates of the accepted ``pings`` (all devices); ``ts`` their times, if already read."""
        cfg = self.config
        n = len(pings)
        if ts is None:
            ts = np.fromiter(map(_TS, pings), dtype=np.float64, count=n)
        lon = np.fromiter(map(_LON, pings), dtype=np.float64, count=n)
        lat = np.fromiter(map(_LAT, pings), dtype=np.float64, count=n)
        acc = None
        if cfg.use_accuracy:
            accs = list(map(_ACCURACY, pings))
            if accs.count(None) != n:
                acc = np.array([np.nan if v is None else v for v in accs], dtype=np.float64)
        b = _Batch()
        b.ts = ts
        sigma = np.full(n, cfg.sigma_m)
        if acc is not None:
            has = np.isfinite(acc)
            if has.any():
                sigma[has] = np.clip(acc[has], cfg.min_sigma_m, cfg.max_sigma_m)
        b.sigma = sigma
        b.x, b.y = self.network._project(lon, lat)
        # Radius max(search_radius_m, radius_sigmas * sigma); float32-exact offsets (the state
        # stores them as float32 and must round-trip exactly); emission -0.5 (d / sigma)^2.
        b.cand_ptr, b.segs, b.offs, b.emis = self.network._ping_candidates(
            b.x, b.y, sigma, cfg.search_radius_m, cfg.radius_sigmas, cfg.max_candidates)
        return b

    def _transitions(
        self, sa: np.ndarray, oa: np.ndarray, xa: tuple[float, float], ta: float,
        sb: np.ndarray, ob: np.ndarray, xb: tuple[float, float], tb: float, sigma_b: float,
    ) -> np.ndarray:
        """Log transition scores between two steps' candidates, shape (len(sa), len(sb)).

        The vectorised reference of the compiled recursion's transitions; used for steps whose
        routes may exceed the route table's bound (bounded Dijkstra).
        """
        ka, kb = len(sa), len(sb)
        gc = float(np.hypot(xb[0] - xa[0], xb[1] - xa[1]))
        n = ka * kb
        return self._combo_scores(
            np.repeat(sa, kb), np.repeat(oa, kb), np.tile(sb, ka), np.tile(ob, ka),
            np.full(n, gc), np.full(n, tb - ta), np.full(n, sigma_b),
        ).reshape(ka, kb)

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

    # -- the sequential part (compiled): Viterbi recursion, convergence, fixed lag, traversals
    def _run(self, st: MatcherState, b: _Batch | None, start: int, count: int, res: MatchResult,
             finish: bool = False, decided: list | None = None) -> np.ndarray:
        """Feed one device's accepted pings (batch rows ``start:start + count``) into its state.

        Updates ``st`` and ``res``; returns each ping's step number or ``ST_*`` code.
        """
        if b is None:
            p_ts = p_x = p_y = p_sig = _EMPTY_F
            c_ptr = np.zeros(1, dtype=np.int64)
            c_seg, c_off, c_emis = _EMPTY_I, _EMPTY_F, _EMPTY_F
        else:
            end = start + count
            p_ts, p_x, p_y, p_sig = b.ts[start:end], b.x[start:end], b.y[start:end], b.sigma[start:end]
            c_ptr = b.cand_ptr[start:end + 1]
            c_seg, c_off, c_emis = b.segs, b.offs, b.emis
        status = np.empty(count, dtype=np.int64)
        sc = np.array([float(st.anchored), st.outliers, st.seq, st.trip, st.last_xy[0], st.last_xy[1], 0.0, 0.0])
        anchored = st.anchored and len(st.step_ts) > 0
        ot = np.array([st.open_seg, st.open_t_enter, st.open_entry_off, st.pos_off,
                       st.cand_seg[0] if anchored else -1, st.cand_off[0] if anchored else 0.0,
                       st.step_ts[0] if anchored else 0.0])
        window = (st.step_ts, st.step_seq, st.step_ptr, st.cand_seg, st.cand_off, st.cand_bp, st.scores)
        trip0 = st.trip
        i0, pre = 0, _NO_PRE
        events = []
        emitted = None
        while True:
            if i0 == 0:
                # The usual case, one call: the recursion over all pings, then their traversals.
                stop, S, M, nk, E, estop, why, T, wi, wf = K.viterbi_emit(
                    *window, sc, p_ts, p_x, p_y, p_sig, c_ptr, c_seg, c_off, c_emis, i0, pre, finish, status,
                    *self._net_args, self._cf, ot, *self._viterbi_emit_args)
                ni, nf = 2 * S + 1 + 2 * M, S + M + nk
                ei, ef = wi[ni:ni + 3 * E], wf[nf:nf + 2 * E]
                if estop >= 0:
                    ni, nf = ni + 3 * E, nf + 2 * E
                    emitted = [estop, why, wi[ni:ni + T], wf[nf:nf + 3 * T].reshape(3, T)]
                wi, wf = wi[:2 * S + 1 + 2 * M], wf[:S + M + nk]
            else:
                stop, S, M, _, E, wi, wf, ei, ef = K.viterbi_run(
                    *window, sc, p_ts, p_x, p_y, p_sig, c_ptr, c_seg, c_off, c_emis, i0, pre, finish, status,
                    *self._net_args, self._cf)
            window = K.unpack_window(S, M, wi, wf)
            if E:
                events.append(K.unpack_events(E, ei, ef))
            if stop == count:
                break
            # Routes may be longer than the table's bound: this step's transitions via Dijkstra.
            w_ts, _, w_ptr, w_seg, w_off = window[:5]
            a0, a1 = w_ptr[-2], w_ptr[-1]
            c0, c1 = c_ptr[stop], c_ptr[stop + 1]
            pre = self._transitions(w_seg[a0:a1], w_off[a0:a1], (sc[K.SC_X], sc[K.SC_Y]), float(w_ts[-1]),
                                    c_seg[c0:c1], c_off[c0:c1], (p_x[stop], p_y[stop]), float(p_ts[stop]),
                                    float(p_sig[stop]))
            i0 = stop
        (st.step_ts, st.step_seq, st.step_ptr, st.cand_seg, st.cand_off, st.cand_bp, st.scores) = window
        anchored_f, outliers, seq, trip, x, y, gap_splits, break_splits = sc.tolist()
        st.anchored = bool(anchored_f)
        st.outliers = int(outliers)
        st.seq = int(seq)
        st.trip = int(trip)
        st.last_xy = (x, y)
        n_dropped = count - int(np.count_nonzero(status >= 0)) if count and status.min() < 0 else 0
        res.matched += count - n_dropped
        if n_dropped:
            no_cand = int(np.count_nonzero(status == K.ST_NO_CANDIDATE))
            if no_cand:
                res.dropped["no_candidate"] += no_cand
            if n_dropped - no_cand:
                res.dropped["no_transition"] += n_dropped - no_cand
        if gap_splits:
            res.dropped["gap_split"] += int(gap_splits)
        if break_splits:
            res.dropped["break_split"] += int(break_splits)
        if events:
            ek, eq, eg, eo, et = (np.concatenate(a) for a in zip(*events)) if len(events) > 1 else events[0]
            if decided is not None:
                decided.append((trip0, ek, eq, eg, eo))
            # The compiled call emitted the traversals already when it ran to the end (one chunk).
            self._traversals(st, ek, eg, eo, et, ot, res.traversals, emitted if len(events) == 1 else None)
        open_seg, st.open_t_enter, st.open_entry_off, st.pos_off = ot.tolist()[:4]
        st.open_seg = int(open_seg)
        return status

    def _traversals(self, st: MatcherState, ek: np.ndarray, eg: np.ndarray, eo: np.ndarray, et: np.ndarray,
                    ot: np.ndarray, out: list[Traversal], first: list | None = None) -> None:
        """Decided positions -> traversals (compiled; moves beyond the route table in Python).

        ``first``: the result of the first compiled call (from ``e0`` 0), if already made.
        """
        e0, n = 0, len(ek)
        dev = st.device
        cap = 4 * n + 64
        while True:
            if first is not None:
                (stop, why, seg_ids, times), first = first, None
            else:
                stop, why, seg_ids, times = K.emit_traversals_packed(ek, eg, eo, et, e0, ot, cap, *self._emit_args)
            if len(seg_ids):
                t0, t1, frac = times.tolist()
                out += _traversal_objects(seg_ids.tolist(), dev, t0, t1, frac)
            if stop == n:
                return
            if why == 2:  # output buffer full (long routes between decided pings): more room
                cap *= 4
                e0 = stop
                continue
            self._advance_far(st, ot, int(eg[stop]), float(eo[stop]), float(et[stop]), out)
            e0 = stop + 1

    def _advance_far(self, st: MatcherState, ot: np.ndarray, sb: int, ob: float, tb: float,
                     out: list[Traversal]) -> None:
        """Move the decided position from the previous one in ``ot`` to (sb, ob) at ``tb``, for a
        pair beyond the route table's bound (bounded Dijkstra); emits traversals."""
        sa, oa, ta = int(ot[K.OT_PREV_SEG]), float(ot[K.OT_PREV_OFF]), float(ot[K.OT_PREV_TS])
        L = self._len
        la = float(L[sa])
        dev = st.device
        far, pred = self.table.distances_from(np.array([sa]), np.inf)
        gap = float(far[0, sb])
        path = self.table.path_between(sa, sb, pred[0]) if np.isfinite(gap) else None
        emitted: list[tuple[int, float, float, float]] = []

        def close(seg: int, t_exit: float, exit_off: float) -> None:
            ls = float(L[seg])
            covered = exit_off - ot[K.OT_ENTRY_OFF]
            frac = 1.0 if ls <= 0 else min(1.0, covered / ls)
            # A touch of less than MIN_COVER_M (turning at a node, float rounding) is no traversal.
            if covered >= MIN_COVER_M or frac >= 0.999:
                emitted.append((seg, float(ot[K.OT_T_ENTER]), t_exit, frac))
            ot[K.OT_SEG] = -1

        done = False
        if int(self._rev[sa]) == sb:
            p = max(oa, la - ob)
            d1 = p - oa
            turn = d1 + (p - (la - ob))
            if turn + self.config.uturn_penalty_m <= (la - oa) + gap + ob:
                t_turn = ta + (tb - ta) * (d1 / turn) if turn > 0 else ta
                close(sa, t_turn, max(p, float(ot[K.OT_POS_OFF])))
                ot[K.OT_SEG], ot[K.OT_T_ENTER], ot[K.OT_ENTRY_OFF], ot[K.OT_POS_OFF] = sb, t_turn, la - p, ob
                done = True
        if not done:
            assert path is not None
            lens = [float(L[s]) for s in path]
            total = (la - oa) + sum(lens) + ob
            rate = (tb - ta) / total if total > 0 else 0.0
            x = la - oa
            t = ta + rate * x
            close(sa, t, la)
            for s, ls in zip(path, lens):
                t_next = ta + rate * (x + ls)
                emitted.append((s, t, t_next, 1.0))
                x += ls
                t = t_next
            ot[K.OT_SEG], ot[K.OT_T_ENTER], ot[K.OT_ENTRY_OFF], ot[K.OT_POS_OFF] = sb, t, 0.0, ob
        ot[K.OT_PREV_SEG], ot[K.OT_PREV_OFF], ot[K.OT_PREV_TS] = sb, ob, tb
        ids = self.network.segment_ids
        out += [Traversal(int(ids[s]), dev, a, b_, f) for s, a, b_, f in emitted]


_EMPTY_I = np.zeros(0, dtype=np.int64)
_EMPTY_F = np.zeros(0, dtype=np.float64)
#: A new device's state; copies of it are new states (arrays are never modified in place).
_EMPTY_STATE = MatcherState()


def _slot_setters() -> tuple | None:
    """The slot setters of :class:`Traversal`'s fields, if it is a plain slotted class (it is)."""
    names = ("segment_id", "device", "t_enter", "t_exit", "fraction")
    d = vars(Traversal)
    if "__post_init__" in d or not all(isinstance(d.get(k), types.MemberDescriptorType) for k in names):
        return None
    return tuple(d[k].__set__ for k in names)


_TRAVERSAL_SET = _slot_setters()
_exhaust = deque(maxlen=0).extend


def _traversal_objects(ids: list[int], device: str, t0: list[float], t1: list[float],
                       frac: list[float]) -> list[Traversal]:
    """``[Traversal(i, device, a, b, f) ...]`` built field by field in C loops.

    The frozen dataclass's ``__init__`` (five ``object.__setattr__`` calls from Python) costs
    about 1.5 µs a traversal, as much as matching a ping; setting the slots through their
    descriptors with ``map`` gives the same objects for a third of that.
    """
    if _TRAVERSAL_SET is None or len(ids) <= 2:  # (a few: the constructor is cheaper than six C loops)
        return [Traversal(i, device, a, b, f) for i, a, b, f in zip(ids, t0, t1, frac)]
    s_id, s_dev, s_t0, s_t1, s_frac = _TRAVERSAL_SET
    objs = list(map(object.__new__, repeat(Traversal, len(ids))))
    _exhaust(map(s_id, objs, ids))
    _exhaust(map(s_dev, objs, repeat(device)))
    _exhaust(map(s_t0, objs, t0))
    _exhaust(map(s_t1, objs, t1))
    _exhaust(map(s_frac, objs, frac))
    return objs


_REASON_OF_CODE = {K.ST_NO_CANDIDATE: "no_candidate", K.ST_NO_TRANSITION: "no_transition"}



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
    m = (matcher if matcher is not None else OnlineMatcher(network, config))._without_lag()
    decided: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    [(res, kept_at, drops, seqs)] = m._push_many([(_EMPTY_STATE.copy(), pings)], inplace=True, finish=True,
                                                 decided=decided)
    n = len(pings)
    seg = np.full(n, -1, dtype=np.int64)
    off = np.full(n, np.nan)
    trip = np.full(n, -1, dtype=np.int64)
    reason = [""] * n
    for i, why in drops.items():
        reason[i] = why
    kept_at = np.asarray(kept_at, dtype=np.int64)
    if len(seqs) and seqs.min() < 0:
        for i in np.flatnonzero(seqs < 0).tolist():
            reason[int(kept_at[i])] = _REASON_OF_CODE[int(seqs[i])]
    for trip0, ek, eq, eg, eo in decided:
        # What was decided for each matched ping's step.
        K.place_decided(kept_at, seqs, trip0, ek, eq, eg, eo, seg, off, trip)
    ids, rows, x, y = K.snap_matched(seg, off, network.segment_ids, *_cumulative_geometry(network), network.length_m)
    snapped = np.full((n, 2), np.nan)
    if len(rows):
        lon, lat = network._project(x, y, inverse=True)
        snapped[rows, 0] = lon
        snapped[rows, 1] = lat
    return TraceMatch(seg, ids, off, snapped, trip, reason, res.traversals, res.dropped, res.matched, res.unmatched)


#: Per network: vertex x, y, segment vertex pointers and cumulative distance along the vertex arrays.
_CUM: "weakref.WeakKeyDictionary[RoadNetwork, tuple[np.ndarray, ...]]" = weakref.WeakKeyDictionary()


def points_at_offsets(network: RoadNetwork, segments: np.ndarray, offsets_m: np.ndarray) -> np.ndarray:
    """Points ``offsets_m`` metres along ``segments`` (vectorised), metric (N, 2)."""
    segments = np.ascontiguousarray(segments, dtype=np.int64)
    offsets_m = np.ascontiguousarray(np.broadcast_to(offsets_m, segments.shape), dtype=np.float64)
    x, y = K.points_at_offsets(*_cumulative_geometry(network), network.length_m, segments, offsets_m)
    return np.column_stack([x, y])


def _cumulative_geometry(network: RoadNetwork) -> tuple[np.ndarray, ...]:
    """Vertex x, y (metres), segment vertex pointers and cumulative metres along the vertex arrays."""
    geom = _CUM.get(network)
    if geom is None:
        g = network.geom_xy
        cum = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(g, axis=0).T))])
        geom = _CUM[network] = (np.ascontiguousarray(g[:, 0]), np.ascontiguousarray(g[:, 1]), network.geom_ptr, cum)
    return geom
