"""Bounded shortest driving distances between road segments, for the map matcher.

The matcher needs, for every pair of candidate segments ``(a, b)`` of two consecutive pings, the
driving distance from the end of ``a`` to the start of ``b``. Like FMM's UBODT (upper-bounded
origin-destination table), :class:`RouteTable` precomputes every pair whose shortest route is at
most ``delta_m`` metres, once per network, in an open-addressing hash table that answers whole
arrays of pairs with a few vectorised gathers. Pairs further apart are answered on demand by a
bounded Dijkstra search (:meth:`RouteTable.distances_from`).

Routes are *edge-based*: the search runs on the line graph of the directed segments, where a
segment leads to the segments leaving its end node except its own reverse (no U-turn at an
intersection; at a dead end the U-turn is the only way on: allowed, at ``uturn_penalty_m``). Node-based shortest
paths would let a noisy trace "visit" every short side stub with a free U-turn. One-way streets
are respected because segments are directed.

Memory is bounded by ``delta_m``: entries grow with the number of segments times the segments
within ``delta_m`` of each, not with the square of the network (about 32 bytes an entry).
"""

from __future__ import annotations

import numpy as np

from geo.network import RoadNetwork

#: Default bound of the precomputed table, metres.
DEFAULT_DELTA_M = 2000.0
#: Sources per scipy Dijkstra call while building (bounds the dense scratch matrix).
_BUILD_CHUNK = 256
_FIB_INT = 0x9E3779B97F4A7C15
_FIB = np.uint64(_FIB_INT)
_MASK64 = (1 << 64) - 1
#: Weight of a zero-length segment (a sparse matrix would drop an exact zero).
_MIN_WEIGHT_M = 1e-3


class RouteTable:
    """Shortest driving distances between segment pairs up to ``delta_m`` metres apart.

    ``gap(a, b)`` is the length of the segments driven strictly between leaving segment ``a``
    at its end and entering segment ``b`` at its start (0 when ``b`` follows ``a`` directly).

    Parameters
    ----------
    network
        The road network.
    delta_m
        Largest route distance kept in the table, metres.

    Notes
    -----
    The pairs live in an open-addressing hash table keyed on ``a * n_segments + b``, holding the
    gap (float32, metres) and the segment before ``b`` on the shortest route (path recovery):
    16 bytes a slot at a load factor of at most 0.6.
    """

    def __init__(self, network: RoadNetwork, delta_m: float = DEFAULT_DELTA_M, uturn_penalty_m: float = 0.0) -> None:
        from scipy.sparse.csgraph import dijkstra

        self.network = network
        self.delta_m = float(delta_m)
        self.uturn_penalty_m = float(uturn_penalty_m)
        n = network.n_segments
        self._n = n
        self.line_graph = _line_graph(network, self.uturn_penalty_m)
        keys, gaps, preds = [], [], []
        for start in range(0, n, _BUILD_CHUNK):
            src = np.arange(start, min(start + _BUILD_CHUNK, n))
            dist, pred = dijkstra(self.line_graph, directed=True, indices=src, limit=self.delta_m,
                                  return_predecessors=True)
            rows, cols = np.nonzero(np.isfinite(dist) & (pred >= 0))
            keys.append(src[rows] * n + cols)
            # The line graph charges the length of the segment entered; the gap excludes b itself.
            gaps.append(np.maximum(dist[rows, cols] - self._weight(pred[rows, cols], cols), 0.0).astype(np.float32))
            preds.append(pred[rows, cols].astype(np.int32))
            del dist, pred
        self._build_hash(np.concatenate(keys).astype(np.int64), np.concatenate(gaps), np.concatenate(preds))

    def _weight(self, pred: np.ndarray, seg: np.ndarray) -> np.ndarray:
        """Weight of the line-graph edge ``pred -> seg``: its length, plus the U-turn penalty at a dead end."""
        w = np.maximum(self.network.length_m[seg], _MIN_WEIGHT_M)
        return w + np.where(self.network.reverse_of[seg] == pred, self.uturn_penalty_m, 0.0)

    # ------------------------------------------------------------ hash table
    def _build_hash(self, keys: np.ndarray, gaps: np.ndarray, preds: np.ndarray) -> None:
        # Open addressing with linear probing, load factor <= 0.6: a lookup is a handful of
        # vectorised gathers (~60 ns a pair here, 7x faster than a binary search over sorted keys).
        m = len(keys)
        self._bits = max(4, int(np.ceil(np.log2(max(m, 1) / 0.6))))
        size = 1 << self._bits
        mask = size - 1
        slot_key = np.full(size, -1, dtype=np.int64)
        slot_row = np.zeros(size, dtype=np.int32)
        home = self._home(keys)
        pending = np.arange(m)
        rounds = 0
        while len(pending):
            s = (home[pending] + rounds) & mask
            free = np.flatnonzero(slot_key[s] == -1)
            # Several keys may claim one free slot in the same round: the first (lowest row) wins.
            won, first = np.unique(s[free], return_index=True)
            rows = pending[free[first]]
            slot_key[won] = keys[rows]
            slot_row[won] = rows
            placed = np.zeros(len(pending), dtype=bool)
            placed[free[first]] = True
            pending = pending[~placed]
            rounds += 1
        self._max_probe = rounds
        self._slot_key = slot_key
        used = slot_key >= 0
        self._slot_gap = np.where(used, gaps[slot_row] if m else 0.0, np.inf).astype(np.float32)
        self._slot_pred = np.where(used, preds[slot_row] if m else 0, -1).astype(np.int32)
        self._n_entries = m

    def _home(self, keys: np.ndarray) -> np.ndarray:
        """Home slot of each key: Fibonacci hashing (multiply, keep the top bits)."""
        with np.errstate(over="ignore"):
            return ((keys.astype(np.uint64) * _FIB) >> np.uint64(64 - self._bits)).astype(np.int64)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 where absent (vectorised)."""
        out = np.full(len(keys), -1, dtype=np.int64)
        home = self._home(keys)
        mask = (1 << self._bits) - 1
        active = np.arange(len(keys))
        r = 0
        while len(active) and r < self._max_probe:
            s = (home[active] + r) & mask
            sk = self._slot_key[s]
            hit = sk == keys[active]
            out[active[hit]] = s[hit]
            active = active[~hit & (sk != -1)]
            r += 1
        return out

    def _find_one(self, key: int) -> int:
        """Slot of one key, -1 if absent (plain Python: cheaper than numpy for a single key)."""
        slot = ((key * _FIB_INT) & _MASK64) >> (64 - self._bits)
        mask = (1 << self._bits) - 1
        keys = self._slot_key
        for _ in range(self._max_probe):
            k = int(keys[slot])
            if k == key:
                return slot
            if k == -1:
                return -1
            slot = (slot + 1) & mask
        return -1

    def gap_one(self, a: int, b: int) -> float:
        """:meth:`gap` for a single pair (``inf`` if absent)."""
        slot = self._find_one(int(a) * self._n + int(b))
        return float(self._slot_gap[slot]) if slot >= 0 else float("inf")

    @property
    def nbytes(self) -> int:
        """Memory held by the table, bytes."""
        return int(self._slot_key.nbytes + self._slot_gap.nbytes + self._slot_pred.nbytes)

    def __len__(self) -> int:
        return self._n_entries

    # ---------------------------------------------------------------- queries
    def gap(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Metres driven between the end of segment rows ``a`` and the start of ``b`` (vectorised).

        ``inf`` where ``b`` is not reachable from ``a`` within ``delta_m`` (see
        :meth:`distances_from`) and where ``a == b`` (a loop back onto the same segment).
        """
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        slot = self._find(a * self._n + b)
        return np.where(slot >= 0, self._slot_gap[slot].astype(np.float64), np.inf)

    def distances_from(self, sources: np.ndarray, limit_m: float) -> tuple[np.ndarray, np.ndarray]:
        """Bounded Dijkstra from segment rows ``sources``, for pairs beyond the table's bound.

        Returns ``(gap, pred)``, dense arrays of shape (len(sources), n_segments): the gap in
        metres as in :meth:`gap` (``inf`` beyond ``limit_m``) and the predecessor segment row on
        the shortest route (negative where none).
        """
        from scipy.sparse.csgraph import dijkstra

        sources = np.asarray(sources, dtype=np.int64)
        dist, pred = dijkstra(self.line_graph, directed=True, indices=sources, limit=float(limit_m),
                              return_predecessors=True)
        dist, pred = np.atleast_2d(dist), np.atleast_2d(pred)
        cols = np.broadcast_to(np.arange(self._n), pred.shape)
        gap = dist - self._weight(pred, cols)
        gap[pred < 0] = np.inf
        return np.maximum(gap, 0.0), pred

    def path_between(self, a: int, b: int, pred_row: np.ndarray | None = None) -> list[int]:
        """Segment rows driven strictly between segment ``a`` and segment ``b`` (empty if adjacent).

        Uses the table, or ``pred_row`` (a row of :meth:`distances_from` for source ``a``) for pairs
        beyond its bound. Raises ``KeyError`` when ``b`` is not reachable.
        """
        path: list[int] = []
        node = int(b)
        a = int(a)
        for _ in range(self._n + 1):
            if pred_row is not None:
                p = int(pred_row[node])
            else:
                slot = self._find_one(a * self._n + node)
                p = int(self._slot_pred[slot]) if slot >= 0 else -1
            if p < 0:
                raise KeyError((a, b))
            if p == a:
                path.reverse()
                return path
            path.append(p)
            node = p
        raise KeyError((a, b))


def _line_graph(network: RoadNetwork, uturn_penalty_m: float):
    """Segment-to-segment ``csr_matrix``: ``a -> b`` when ``b`` leaves ``a``'s end node, weight len(b).

    The reverse of ``a`` is excluded unless it is the only way on (dead end, where the U-turn
    costs ``uturn_penalty_m`` extra).
    """
    from scipy.sparse import csr_matrix

    n = network.n_segments
    end = network.to_node
    deg = network.out_ptr[end + 1] - network.out_ptr[end]
    a = np.repeat(np.arange(n), deg)
    starts = np.repeat(network.out_ptr[end], deg)
    k = np.arange(len(a)) - np.repeat(np.cumsum(deg) - deg, deg)
    b = network.out_segments[starts + k]
    rev = network.reverse_of[a]
    uturn = b == rev
    # Only way on at a dead end: keep the U-turn there.
    keep = ~uturn | (deg[a] == 1)
    a, b = a[keep], b[keep]
    w = np.maximum(network.length_m[b], _MIN_WEIGHT_M) + np.where(uturn[keep], uturn_penalty_m, 0.0)
    return csr_matrix((w, (a, b)), shape=(n, n))
