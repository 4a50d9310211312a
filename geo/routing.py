"""Bounded shortest driving distances between road segments, for the map matcher.

The matcher needs, for every pair of candidate segments ``(a, b)`` of two consecutive pings, the
driving distance from the end of ``a`` to the start of ``b``. Like FMM's UBODT (upper-bounded
origin-destination table), :class:`RouteTable` precomputes every pair whose shortest route is at
most ``delta_m`` metres, once per network, in one row of targets per source segment (CSR), nearest
first. The matcher only needs routes up to a bound (a few hundred metres between pings a few
seconds apart), so a lookup scans the source's row from the start and stops at the bound: a few
cache lines, not a probe into a table of tens of megabytes. Pairs further apart are
answered on demand by a bounded Dijkstra search (:meth:`RouteTable.distances_from`).

Routes are *edge-based*: the search runs on the line graph of the directed segments, where a
segment leads to the segments leaving its end node except its own reverse (no U-turn at an
intersection; at a dead end the U-turn is the only way on: allowed, at ``uturn_penalty_m``). Node-based shortest
paths would let a noisy trace "visit" every short side stub with a free U-turn. One-way streets
are respected because segments are directed.

Memory is bounded by ``delta_m``: entries grow with the number of segments times the segments
within ``delta_m`` of each, not with the square of the network (12 bytes an entry).
"""

from __future__ import annotations

import numpy as np

from geo.network import RoadNetwork

#: Default bound of the precomputed table, metres.
DEFAULT_DELTA_M = 2000.0
#: Sources per scipy Dijkstra call while building (bounds the dense scratch matrix).
_BUILD_CHUNK = 256
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
    The pairs live in CSR form: the targets ``b`` of source ``a`` are ``col[row_ptr[a]:row_ptr[a + 1]]``,
    ordered by gap (float32, metres, in ``gap_m``), with the segment before ``b`` on the shortest
    route (``pred``, for path recovery) alongside: 12 bytes a pair. (An open-addressing hash table
    was 2.5x larger and, probed one pair at a time from compiled code, 5x slower: every probe a
    cache miss.)
    """

    def __init__(self, network: RoadNetwork, delta_m: float = DEFAULT_DELTA_M, uturn_penalty_m: float = 0.0) -> None:
        from scipy.sparse.csgraph import dijkstra

        self.network = network
        self.delta_m = float(delta_m)
        self.uturn_penalty_m = float(uturn_penalty_m)
        n = network.n_segments
        self._n = n
        self.line_graph = _line_graph(network, self.uturn_penalty_m)
        cols, gaps, preds = [], [], []
        counts = np.zeros(n, dtype=np.int64)
        for start in range(0, n, _BUILD_CHUNK):
            src = np.arange(start, min(start + _BUILD_CHUNK, n))
            dist, pred = dijkstra(self.line_graph, directed=True, indices=src, limit=self.delta_m,
                                  return_predecessors=True)
            rows, c = np.nonzero(np.isfinite(dist) & (pred >= 0))
            counts[src] = np.bincount(rows, minlength=len(src))
            # The line graph charges the length of the segment entered; the gap excludes b itself.
            g = np.maximum(dist[rows, c] - self._weight(pred[rows, c], c), 0.0).astype(np.float32)
            p = pred[rows, c].astype(np.int32)
            # Each source's row nearest first: a scan for a target stops at the transition's bound.
            order = np.lexsort((c, g, rows))
            cols.append(c[order].astype(np.int32))
            gaps.append(g[order])
            preds.append(p[order])
            del dist, pred
        self.row_ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=self.row_ptr[1:])
        self.col = np.concatenate(cols) if cols else np.zeros(0, np.int32)
        self.gap_m = np.concatenate(gaps) if gaps else np.zeros(0, np.float32)
        self.pred = np.concatenate(preds) if preds else np.zeros(0, np.int32)

    def _weight(self, pred: np.ndarray, seg: np.ndarray) -> np.ndarray:
        """Weight of the line-graph edge ``pred -> seg``: its length, plus the U-turn penalty at a dead end."""
        w = np.maximum(self.network.length_m[seg], _MIN_WEIGHT_M)
        return w + np.where(self.network.reverse_of[seg] == pred, self.uturn_penalty_m, 0.0)

    # ------------------------------------------------------------ lookups
    def _find_one(self, a: int, b: int) -> int:
        """Entry of the pair ``(a, b)``, -1 if absent."""
        lo, hi = int(self.row_ptr[a]), int(self.row_ptr[a + 1])
        hit = np.flatnonzero(self.col[lo:hi] == b)
        return lo + int(hit[0]) if len(hit) else -1

    def gap_one(self, a: int, b: int) -> float:
        """:meth:`gap` for a single pair (``inf`` if absent)."""
        i = self._find_one(int(a), int(b))
        return float(self.gap_m[i]) if i >= 0 else float("inf")

    @property
    def nbytes(self) -> int:
        """Memory held by the table, bytes."""
        return int(self.row_ptr.nbytes + self.col.nbytes + self.gap_m.nbytes + self.pred.nbytes)

    def __len__(self) -> int:
        return int(len(self.col))

    # ---------------------------------------------------------------- queries
    def gap(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Metres driven between the end of segment rows ``a`` and the start of ``b`` (vectorised).

        ``inf`` where ``b`` is not reachable from ``a`` within ``delta_m`` (see
        :meth:`distances_from`) and where ``a == b`` (a loop back onto the same segment).
        """
        from geo.kernels import table_find_many

        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        shape = a.shape
        i = table_find_many(self.row_ptr, self.col, self.gap_m, np.ascontiguousarray(a.ravel()),
                            np.ascontiguousarray(b.ravel()))
        return np.where(i >= 0, self.gap_m[i].astype(np.float64), np.inf).reshape(shape)

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
                i = self._find_one(a, node)
                p = int(self.pred[i]) if i >= 0 else -1
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
