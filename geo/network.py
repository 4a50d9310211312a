"""The road network: OSM file -> array-backed directed segments, adjacency and spatial index.

``load_network(path)`` reads ``.osm``, ``.osm.gz``, ``.osm.bz2`` or ``.osm.pbf`` with pyosmium
(fully offline), keeps drivable roads, splits ways at intersections and builds a
:class:`RoadNetwork`: one row per *directed* segment in flat numpy arrays, a CSR adjacency from
nodes to outgoing segments, and a uniform-grid spatial index over segment pieces that answers
"which segments lie within r metres of these N points" in one vectorised call.

Results are cached in a ``.npz`` file keyed on the source file's content hash, so a restart does
not re-parse OSM.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from geo.model import Segment
from geo.roads import (
    FRC_BY_HIGHWAY,
    HIGHWAY_CLASSES,
    HIGHWAY_CODE,
    free_flow_prior_kmh,
    is_drivable,
    oneway_direction,
)

#: Bump when the cache layout or the loading rules change, so old caches are not reused.
CACHE_FORMAT_VERSION = 3
#: Side of a spatial-index grid cell, metres. A query of radius r visits the (2r / side + 1)^2 cells
#: around the point; with 50 m cells a matcher query (r = 50 m) reads 2 x 2 to 3 x 3 cells, and was
#: 25-35 % faster than with 25 m cells (4 x 4 to 5 x 5 cells, each a cache miss) on Liechtenstein
#: and Helsinki. The side does not change the answers, only the work.
GRID_CELL_M = 50.0
_SUPPORTED_SUFFIXES = (".osm", ".osm.gz", ".osm.bz2", ".osm.pbf", ".pbf", ".xml", ".osm.xml")


class MapLoadError(Exception):
    """A map file is missing, unreadable, not OSM, or has no drivable roads."""


def segment_id_for(osm_way_id: int, from_node: int, to_node: int, salt: int = 0) -> int:
    """Stable id of a directed segment, a positive integer below 2**53.

    Derived from a BLAKE2b hash of ``(way, from-node, to-node)``, so the same road piece gets the
    same id on every load of the same (or an updated) map; 53 bits keep it exact in JSON and
    JavaScript. ``salt`` separates the rare repeated piece within one way.
    """
    key = f"{osm_way_id}:{from_node}:{to_node}" + (f":{salt}" if salt else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 11


class Nearby(NamedTuple):
    """Result of :meth:`RoadNetwork.nearby_segments`: one row per (point, segment) pair.

    Attributes
    ----------
    point
        Index of the query point, int64.
    segment
        Row index of the segment in the network, int64.
    distance_m
        Point-to-segment distance, metres.
    offset_m
        Distance along the segment from its start to the closest point, metres.
    snapped_xy
        Closest point on the segment in the network's metric projection, metres, shape (K, 2).
    """

    point: np.ndarray
    segment: np.ndarray
    distance_m: np.ndarray
    offset_m: np.ndarray
    snapped_xy: np.ndarray


@dataclass
class _RawWay:
    way_id: int
    node_ids: list[int]
    lonlat: list[tuple[float, float]]
    tags: dict[str, str]


class RoadNetwork:
    """Directed road segments in flat numpy arrays.

    Segment arrays (length ``n_segments``): ``segment_ids``, ``way_ids``, ``start_node_ids`` /
    ``end_node_ids`` (OSM ids), ``from_node`` / ``to_node`` (row indices into the node arrays),
    ``highway_code`` (index into :data:`geo.roads.HIGHWAY_CLASSES`), ``frc``, ``name_index``
    (into ``names``), ``length_m``, ``free_flow_prior_kmh``, ``geom_ptr`` (CSR offsets into the
    vertex arrays ``geom_lonlat`` / ``geom_xy``), and ``reverse_of`` (row of the opposite
    direction of the same piece, or -1).

    Node arrays (length ``n_nodes``): ``node_ids`` (OSM), ``node_lonlat``, ``node_xy``;
    adjacency ``out_ptr`` / ``out_segments``: the segments leaving node ``n`` are
    ``out_segments[out_ptr[n]:out_ptr[n + 1]]``.

    Metric coordinates (``*_xy``) are metres in a transverse Mercator projection centred on the
    map (scale error < 0.01 % within 30 km of the centre).
    """

    _ARRAYS = (
        "segment_ids", "way_ids", "start_node_ids", "end_node_ids", "from_node", "to_node",
        "highway_code", "frc", "name_index", "free_flow_prior_kmh", "geom_ptr", "geom_lonlat",
        "reverse_of", "node_ids", "node_lonlat", "names",
    )

    def __init__(self, arrays: dict[str, np.ndarray], source: str = "", source_hash: str = "") -> None:
        for name in self._ARRAYS:
            setattr(self, name, arrays[name])
        self.source = source
        self.source_hash = source_hash
        self.names = np.asarray(self.names, dtype=str)
        lon0 = float((self.node_lonlat[:, 0].min() + self.node_lonlat[:, 0].max()) / 2)
        lat0 = float((self.node_lonlat[:, 1].min() + self.node_lonlat[:, 1].max()) / 2)
        self.projection = f"+proj=tmerc +lat_0={lat0:.6f} +lon_0={lon0:.6f} +k=1 +x_0=0 +y_0=0 +ellps=WGS84 +units=m +no_defs"
        from pyproj import Transformer

        self._fwd = Transformer.from_crs("EPSG:4326", self.projection, always_xy=True)
        self._inv = Transformer.from_crs(self.projection, "EPSG:4326", always_xy=True)
        self.geom_xy = self.to_xy(self.geom_lonlat[:, 0], self.geom_lonlat[:, 1])
        self.node_xy = self.to_xy(self.node_lonlat[:, 0], self.node_lonlat[:, 1])
        piece_vec = np.diff(self.geom_xy, axis=0)
        piece_len = np.hypot(piece_vec[:, 0], piece_vec[:, 1])
        # Pieces that straddle two segments (last vertex of one, first of the next) are masked out.
        valid = np.ones(len(piece_len), dtype=bool)
        valid[self.geom_ptr[1:-1] - 1] = False
        self._piece_start = np.flatnonzero(valid)
        self._piece_len = piece_len[self._piece_start]
        self._piece_segment = np.repeat(np.arange(self.n_segments), np.diff(self.geom_ptr) - 1)
        cum = np.concatenate([[0.0], np.cumsum(self._piece_len)])
        seg_first_piece = np.concatenate([[0], np.cumsum(np.diff(self.geom_ptr) - 1)])
        self._piece_offset = cum[:-1] - cum[seg_first_piece[self._piece_segment]]
        self._piece_ax = self.geom_xy[self._piece_start, 0].copy()
        self._piece_ay = self.geom_xy[self._piece_start, 1].copy()
        self._piece_abx = self.geom_xy[self._piece_start + 1, 0] - self._piece_ax
        self._piece_aby = self.geom_xy[self._piece_start + 1, 1] - self._piece_ay
        self._piece_inv_len2 = 1.0 / np.maximum(self._piece_len, 1e-9) ** 2
        self.length_m = cum[seg_first_piece[1:]] - cum[seg_first_piece[:-1]]
        order = np.argsort(self.segment_ids, kind="stable")
        self._id_order = order
        self._sorted_ids = self.segment_ids[order]
        self.out_ptr, self.out_segments = _csr(self.from_node, self.n_nodes)
        self._build_grid()

    # ------------------------------------------------------------------ basics
    @property
    def n_segments(self) -> int:
        return int(len(self.segment_ids))

    @property
    def n_nodes(self) -> int:
        return int(len(self.node_ids))

    def __repr__(self) -> str:
        return f"<RoadNetwork {Path(self.source).name or '?'}: {self.n_nodes} nodes, {self.n_segments} segments>"

    def to_xy(self, lon: np.ndarray | float, lat: np.ndarray | float) -> np.ndarray:
        """WGS84 degrees to the network's metric projection; returns shape (N, 2), metres."""
        x, y = self._fwd.transform(np.asarray(lon, dtype=float), np.asarray(lat, dtype=float))
        return np.column_stack([np.atleast_1d(x), np.atleast_1d(y)])

    def to_lonlat(self, xy: np.ndarray) -> np.ndarray:
        """Metric projection (N, 2) metres back to WGS84 (N, 2) lon/lat degrees."""
        xy = np.atleast_2d(np.asarray(xy, dtype=float))
        lon, lat = self._inv.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([np.atleast_1d(lon), np.atleast_1d(lat)])

    def _project(self, a: np.ndarray, b: np.ndarray, inverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`to_xy` (or, with ``inverse``, :meth:`to_lonlat`) on two 1-D arrays, for the matcher's hot path.

        ``a``, ``b``: lon, lat degrees (x, y metres when ``inverse``). Returns new contiguous float64
        arrays x, y metres (lon, lat degrees). The same PROJ call as :meth:`to_xy`, so the same
        numbers; it skips pyproj's per-call input handling (``Transformer.transform`` spends about
        10 µs a call on it, as much as projecting 50 points).
        """
        t = self._inv if inverse else self._fwd
        x = np.array(a, dtype=np.float64)  # copies: PROJ works in place
        y = np.array(b, dtype=np.float64)
        if _direct_transform_ok(t):
            t._transformer._transform(x, y, None, None, _PJ_FORWARD, False, False)
            return x, y
        x, y = t.transform(x, y)
        return np.atleast_1d(np.asarray(x, dtype=np.float64)), np.atleast_1d(np.asarray(y, dtype=np.float64))

    def index_of(self, segment_ids: Iterable[int] | np.ndarray | int) -> np.ndarray:
        """Row indices for segment ids (vectorised); -1 where an id is unknown."""
        ids = np.atleast_1d(np.asarray(segment_ids, dtype=np.int64))
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.clip(pos, 0, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos] == ids
        return np.where(found, self._id_order[pos], -1)

    def segment(self, index: int) -> Segment:
        """The :class:`~geo.model.Segment` at row ``index``."""
        a, b = self.geom_ptr[index], self.geom_ptr[index + 1]
        hw = HIGHWAY_CLASSES[int(self.highway_code[index])]
        return Segment(
            segment_id=int(self.segment_ids[index]),
            osm_way_id=int(self.way_ids[index]),
            osm_start_node_id=int(self.start_node_ids[index]),
            osm_end_node_id=int(self.end_node_ids[index]),
            highway=hw,
            frc=int(self.frc[index]),
            name=str(self.names[self.name_index[index]]),
            length_m=float(self.length_m[index]),
            free_flow_prior_kmh=float(self.free_flow_prior_kmh[index]),
            geometry_lonlat=tuple((float(x), float(y)) for x, y in self.geom_lonlat[a:b]),
        )

    def geometry_xy(self, index: int) -> np.ndarray:
        """Vertices of segment ``index`` in metres, shape (V, 2)."""
        return self.geom_xy[self.geom_ptr[index]:self.geom_ptr[index + 1]]

    def geometry_lonlat(self, index: int) -> np.ndarray:
        """Vertices of segment ``index`` in lon/lat degrees, shape (V, 2)."""
        return self.geom_lonlat[self.geom_ptr[index]:self.geom_ptr[index + 1]]

    def successors(self, index: int) -> np.ndarray:
        """Rows of the segments one can drive onto at the end of segment ``index``."""
        n = self.to_node[index]
        return self.out_segments[self.out_ptr[n]:self.out_ptr[n + 1]]

    def point_at_offset(self, index: int, offset_m: float) -> np.ndarray:
        """The point ``offset_m`` metres along segment ``index``, metric (x, y)."""
        g = self.geometry_xy(index)
        d = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(g, axis=0).T))])
        off = min(max(offset_m, 0.0), d[-1])
        return np.array([np.interp(off, d, g[:, 0]), np.interp(off, d, g[:, 1])])

    def find_by_name(self, name: str) -> np.ndarray:
        """Rows of segments whose ``name`` equals ``name`` (case-insensitive)."""
        hits = np.flatnonzero(np.char.lower(self.names) == name.lower())
        return np.flatnonzero(np.isin(self.name_index, hits))

    @property
    def highway(self) -> np.ndarray:
        """``highway`` class name per segment (array of str)."""
        return np.asarray(HIGHWAY_CLASSES)[self.highway_code]

    @cached_property
    def node_graph(self) -> Any:
        """Node-to-node ``scipy.sparse.csr_matrix`` of the shortest parallel segment length, metres.

        For scipy's ``csgraph`` shortest-path routines. Parallel segments keep the shorter length
        (a plain sparse constructor would add them up).
        """
        from scipy.sparse import csr_matrix

        key = self.from_node.astype(np.int64) * self.n_nodes + self.to_node
        order = np.lexsort((self.length_m, key))
        first = np.ones(len(order), dtype=bool)
        first[1:] = key[order][1:] != key[order][:-1]
        keep = order[first]
        # Zero-length segments would vanish from a sparse matrix; keep them as tiny weights.
        w = np.maximum(self.length_m[keep], 1e-3)
        return csr_matrix((w, (self.from_node[keep], self.to_node[keep])), shape=(self.n_nodes, self.n_nodes))

    def summary(self) -> dict[str, Any]:
        """Counts, lengths by class (km, each direction counted) and bbox (lon/lat)."""
        km_by_class = {}
        for code in np.unique(self.highway_code):
            km_by_class[HIGHWAY_CLASSES[int(code)]] = round(float(self.length_m[self.highway_code == code].sum()) / 1000.0, 2)
        lo = self.node_lonlat.min(axis=0)
        hi = self.node_lonlat.max(axis=0)
        return {
            "source": Path(self.source).name,
            "nodes": self.n_nodes,
            "directed_segments": self.n_segments,
            "total_km": round(float(self.length_m.sum()) / 1000.0, 2),
            "km_by_class": km_by_class,
            "bbox": [round(float(v), 6) for v in (lo[0], lo[1], hi[0], hi[1])],
        }

    # ----------------------------------------------------------- spatial index
    def _build_grid(self) -> None:
        # Only one direction of each two-way piece is indexed; queries add the reverse.
        canonical = (self.reverse_of < 0) | (self.reverse_of > np.arange(self.n_segments))
        pieces = np.flatnonzero(canonical[self._piece_segment])
        a = self.geom_xy[self._piece_start[pieces]]
        b = self.geom_xy[self._piece_start[pieces] + 1]
        # Long pieces are cut into sub-pieces no longer than a cell, so each one touches at most
        # 2 x 2 cells instead of a whole bounding box of cells.
        n_sub = np.maximum(1, np.ceil(self._piece_len[pieces] / GRID_CELL_M)).astype(np.int64)
        owner = np.repeat(np.arange(len(pieces)), n_sub)
        k = _ragged_arange(n_sub)
        t0 = (k / n_sub[owner])[:, None]
        t1 = ((k + 1) / n_sub[owner])[:, None]
        p0 = a[owner] + t0 * (b[owner] - a[owner])
        p1 = a[owner] + t1 * (b[owner] - a[owner])
        self._grid_origin = self.geom_xy.min(axis=0) - GRID_CELL_M
        extent = self.geom_xy.max(axis=0) + GRID_CELL_M - self._grid_origin
        self._grid_shape = np.ceil(extent / GRID_CELL_M).astype(np.int64) + 1
        c0 = ((np.minimum(p0, p1) - self._grid_origin) // GRID_CELL_M).astype(np.int64)
        c1 = ((np.maximum(p0, p1) - self._grid_origin) // GRID_CELL_M).astype(np.int64)
        nx = c1[:, 0] - c0[:, 0] + 1
        ny = c1[:, 1] - c0[:, 1] + 1
        counts = nx * ny
        sub = np.repeat(np.arange(len(counts)), counts)
        k = _ragged_arange(counts)
        cell = (c0[sub, 0] + k % nx[sub]) * self._grid_shape[1] + (c0[sub, 1] + k // nx[sub])
        piece = pieces[owner[sub]]
        # One entry per (cell, piece).
        key = np.unique(cell * len(self._piece_start) + piece)
        cell = key // len(self._piece_start)
        n_cells = int(self._grid_shape[0] * self._grid_shape[1])
        self._cell_ptr, order = _csr(cell, n_cells, return_order=True)
        self._cell_pieces = (key % len(self._piece_start))[order]
        self._grid_origin_x, self._grid_origin_y = (float(v) for v in self._grid_origin)
        self._grid_nx, self._grid_ny = (int(v) for v in self._grid_shape)

    def nearby_segments(
        self,
        xy: np.ndarray,
        radius_m: float | np.ndarray,
        max_per_point: int | None = None,
    ) -> Nearby:
        """All segments within ``radius_m`` of each point, in one vectorised call.

        Parameters
        ----------
        xy
            Query points in the network's metric projection, shape (N, 2), metres
            (use :meth:`to_xy` on lon/lat).
        radius_m
            Search radius in metres, a scalar or one per point.
        max_per_point
            Keep only the nearest ``max_per_point`` segments of each point.

        Returns
        -------
        Nearby
            Rows sorted by point, then distance. Both directions of a two-way road appear.
        """
        xy = np.atleast_2d(np.asarray(xy, dtype=float))
        n = len(xy)
        radius = np.broadcast_to(np.asarray(radius_m, dtype=float), (n,))
        ptr, seg, dist, offset, sx, sy = self._nearby_csr(
            np.ascontiguousarray(xy[:, 0]), np.ascontiguousarray(xy[:, 1]), radius, max_per_point)
        point = np.repeat(np.arange(n, dtype=np.int64), np.diff(ptr))
        return Nearby(point, seg, dist, offset, np.column_stack([sx, sy]))

    def _nearby_csr(
        self, x: np.ndarray, y: np.ndarray, radius_m: np.ndarray, max_per_point: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`nearby_segments` in CSR form, for the map matcher's hot path.

        ``x``, ``y``, ``radius_m``: contiguous float64 arrays of one entry per point (metres).
        Returns ``(ptr, segment, distance_m, offset_m, snapped_x, snapped_y)``; the rows of point
        ``i`` are ``ptr[i]:ptr[i + 1]``, nearest first.
        """
        from geo.kernels import nearby_candidates

        radius_m = np.ascontiguousarray(radius_m, dtype=np.float64)
        limit = -1 if max_per_point is None else int(max_per_point)
        return _with_room(lambda buf_cap, out_cap: nearby_candidates(
            x, y, radius_m, *self._grid_args, limit, buf_cap, out_cap),
            len(x) * (limit if limit >= 0 else 16) + 16)

    def _ping_candidates(
        self, x: np.ndarray, y: np.ndarray, sigma: np.ndarray, min_radius_m: float, radius_sigmas: float,
        max_per_point: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The map matcher's candidate search with emission scores (``geo.kernels.ping_candidates``).

        ``x``, ``y``, ``sigma``: contiguous float64 arrays, metres; point ``i`` is searched within
        ``max(min_radius_m, radius_sigmas * sigma[i])``. Returns ``(ptr, segment, offset_m,
        emission)`` in CSR form (rows as :meth:`_nearby_csr`, offsets rounded to float32).
        """
        from geo.kernels import ping_candidates

        return _with_room(lambda buf_cap, out_cap: ping_candidates(
            x, y, sigma, float(min_radius_m), float(radius_sigmas), *self._grid_args, int(max_per_point),
            buf_cap, out_cap), len(x) * max_per_point + 16)

    @cached_property
    def _grid_args(self) -> tuple:
        """The spatial grid as the compiled searches take it (``geo.kernels.nearby_candidates``)."""
        return (self._grid_origin_x, self._grid_origin_y, GRID_CELL_M, self._grid_nx, self._grid_ny,
                self._cell_ptr, self._cell_data, self.length_m, self.reverse_of)

    @cached_property
    def _cell_data(self) -> np.ndarray:
        """Per (cell, piece) entry of the grid, in cell order: the piece's geometry and segment.

        Columns as ``geo.kernels.PC_*``; the compiled search reads a cell's pieces from contiguous rows.
        """
        p = self._cell_pieces
        return np.column_stack([
            self._piece_ax[p], self._piece_ay[p], self._piece_abx[p], self._piece_aby[p], self._piece_inv_len2[p],
            self._piece_offset[p], self._piece_len[p], self._piece_segment[p].astype(np.float64),
        ])

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the network to a compact ``.npz`` cache file; returns the path written."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                **{name: getattr(self, name) for name in self._ARRAYS},
                meta=np.array([CACHE_FORMAT_VERSION, self.source, self.source_hash], dtype=str),
            )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RoadNetwork":
        """Read a cache file written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = z["meta"]
                if int(meta[0]) != CACHE_FORMAT_VERSION:
                    raise MapLoadError(f"{path}: cache format {meta[0]}, expected {CACHE_FORMAT_VERSION}; rebuild it")
                arrays = {name: z[name] for name in cls._ARRAYS}
        except (OSError, ValueError, KeyError) as exc:
            raise MapLoadError(f"{path}: not a roadpulse network cache ({exc})") from None
        return cls(arrays, source=str(meta[1]), source_hash=str(meta[2]))

    def to_networkx(self) -> Any:
        """An osmnx-style ``networkx.MultiDiGraph`` (nodes keyed by OSM id, ``x``/``y`` lon/lat,
        edges with ``length``, ``osmid``, ``highway``, ``segment_id``, ``segment_index``)."""
        import networkx as nx

        g = nx.MultiDiGraph(crs="EPSG:4326")
        for i, osm in enumerate(self.node_ids.tolist()):
            g.add_node(osm, x=float(self.node_lonlat[i, 0]), y=float(self.node_lonlat[i, 1]))
        hw = self.highway
        for i in range(self.n_segments):
            g.add_edge(
                int(self.start_node_ids[i]), int(self.end_node_ids[i]),
                length=float(self.length_m[i]), osmid=int(self.way_ids[i]), highway=str(hw[i]),
                segment_id=int(self.segment_ids[i]), segment_index=i,
            )
        return g


def _with_room(search: Any, out_cap: int) -> tuple:
    """Run a compiled grid search, growing its buffers until they suffice.

    ``search(buf_cap, out_cap)`` returns ``(ok, *found)``; ``ok`` False means a crowded spot or a large
    radius overflowed a buffer (rare): four times the room, and again.
    """
    buf_cap = 256
    while True:
        ok, *found = search(buf_cap, out_cap)
        if ok:
            return tuple(found)
        buf_cap *= 4
        out_cap *= 4


# ------------------------------------------------------------------- projection
_PJ_FORWARD: Any = None
#: Whether pyproj's internal array transform (``Transformer._transformer._transform``) takes the
#: arguments :meth:`RoadNetwork._project` passes and gives what the public ``transform`` gives;
#: None until probed (once per process).
_DIRECT_OK: bool | None = None


def _direct_transform_ok(t: Any) -> bool:
    """Probe, once, pyproj's internal transform call against the public one (on ``t``)."""
    global _DIRECT_OK, _PJ_FORWARD
    if _DIRECT_OK is None:
        try:
            from pyproj.enums import TransformDirection

            _PJ_FORWARD = TransformDirection.FORWARD
            a = np.array([9.52, 9.55, 9.6, 0.0]), np.array([47.14, 47.2, 47.05, 0.0])
            want = t.transform(a[0].copy(), a[1].copy())
            x, y = a[0].copy(), a[1].copy()
            t._transformer._transform(x, y, None, None, _PJ_FORWARD, False, False)
            _DIRECT_OK = bool(np.array_equal(x, want[0], equal_nan=True) and np.array_equal(y, want[1], equal_nan=True))
        except Exception:  # another pyproj: its internals moved; the public call still works
            _DIRECT_OK = False
    return _DIRECT_OK


# ---------------------------------------------------------------------- loading
def file_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$ROADPULSE_CACHE_DIR`` or ``~/.cache/roadpulse/networks``."""
    env = os.environ.get("ROADPULSE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "roadpulse" / "networks"


def load_network(
    path: str | os.PathLike[str],
    *,
    include_service: bool = False,
    cache: bool | str | os.PathLike[str] = True,
) -> RoadNetwork:
    """Load an OSM file into a :class:`RoadNetwork`, offline.

    Parameters
    ----------
    path
        ``.osm``, ``.osm.gz``, ``.osm.bz2`` or ``.osm.pbf`` file, or a cache ``.npz`` written by
        :meth:`RoadNetwork.save`.
    include_service
        Also keep ``highway=service`` roads.
    cache
        ``True``: reuse/write a cache in :func:`default_cache_dir`, keyed on the file's content
        hash and the loading options; a directory: the same, there; ``False``: always parse.

    Raises
    ------
    MapLoadError
        Missing file, not an OSM file, corrupt, or no drivable roads in it.
    """
    path = Path(path)
    if not path.is_file():
        raise MapLoadError(f"{path}: no such map file")
    if path.suffix == ".npz":
        return RoadNetwork.load(path)
    name = path.name.lower()
    if not name.endswith(_SUPPORTED_SUFFIXES):
        raise MapLoadError(f"{path}: unsupported map format; use .osm, .osm.gz, .osm.bz2 or .osm.pbf")
    if path.stat().st_size == 0:
        raise MapLoadError(f"{path}: the map file is empty")
    digest = file_hash(path)
    cache_file = None
    if cache:
        cache_dir = default_cache_dir() if cache is True else Path(cache)
        cache_file = cache_dir / f"{digest[:32]}-v{CACHE_FORMAT_VERSION}{'-svc' if include_service else ''}.npz"
        if cache_file.is_file():
            try:
                return RoadNetwork.load(cache_file)
            except MapLoadError:
                pass  # stale or damaged cache: rebuild below
    arrays = build_arrays(_read_ways(path, include_service))
    network = RoadNetwork(arrays, source=str(path), source_hash=digest)
    if cache_file is not None:
        try:
            network.save(cache_file)
        except OSError:
            pass  # a read-only cache dir must not stop loading
    return network


def _read_ways(path: Path, include_service: bool) -> list[_RawWay]:
    import osmium

    ways: list[_RawWay] = []
    try:
        fp = (
            osmium.FileProcessor(str(path))
            .with_locations()
            .with_filter(osmium.filter.EntityFilter(osmium.osm.WAY))
            .with_filter(osmium.filter.KeyFilter("highway"))
        )
        for w in fp:
            tags = dict(w.tags)
            if not is_drivable(tags, include_service):
                continue
            ids: list[int] = []
            coords: list[tuple[float, float]] = []
            for nd in w.nodes:
                loc = nd.location
                if loc.valid():
                    ids.append(nd.ref)
                    coords.append((loc.lon, loc.lat))
                else:
                    ids.append(-1)  # a node outside a clipped extract
                    coords.append((0.0, 0.0))
            ways.append(_RawWay(w.id, ids, coords, tags))
    except RuntimeError as exc:
        raise MapLoadError(f"{path}: not a readable OSM file ({str(exc).strip() or type(exc).__name__})") from None
    if not ways:
        raise MapLoadError(f"{path}: no drivable roads in this file (is it an OSM map?)")
    return ways


def _runs(way: _RawWay) -> list[tuple[list[int], list[tuple[float, float]]]]:
    """Split a way at missing nodes (clipped extracts) and drop repeated consecutive nodes."""
    runs = []
    ids: list[int] = []
    coords: list[tuple[float, float]] = []
    for nid, c in zip(way.node_ids, way.lonlat):
        if nid < 0:
            if len(ids) >= 2:
                runs.append((ids, coords))
            ids, coords = [], []
            continue
        if ids and ids[-1] == nid:
            continue
        ids.append(nid)
        coords.append(c)
    if len(ids) >= 2:
        runs.append((ids, coords))
    return runs


def build_arrays(ways: list[_RawWay]) -> dict[str, np.ndarray]:
    """Split ways at intersections into directed segments; see :class:`RoadNetwork` for the arrays."""
    runs_by_way = [(w, _runs(w)) for w in ways]
    uses: dict[int, int] = {}
    for _, runs in runs_by_way:
        for ids, _ in runs:
            for nid in ids:
                uses[nid] = uses.get(nid, 0) + 1
            uses[ids[0]] += 1  # run ends are always segment ends
            uses[ids[-1]] += 1
    node_index: dict[int, int] = {}
    node_lonlat: list[tuple[float, float]] = []
    names: dict[str, int] = {"": 0}
    seg_way, seg_a, seg_b, seg_hw, seg_name, seg_ff, seg_rev = [], [], [], [], [], [], []
    geom: list[tuple[float, float]] = []
    geom_ptr = [0]
    ids_seen: set[int] = set()
    seg_ids: list[int] = []

    def node_row(nid: int, c: tuple[float, float]) -> int:
        row = node_index.get(nid)
        if row is None:
            row = node_index[nid] = len(node_lonlat)
            node_lonlat.append(c)
        return row

    for way, runs in runs_by_way:
        tags = way.tags
        hw = HIGHWAY_CODE[tags["highway"]]
        name = tags.get("name") or tags.get("ref") or ""
        name_i = names.setdefault(name, len(names))
        direction = oneway_direction(tags)
        ff_fwd = free_flow_prior_kmh(tags, forward=True)
        ff_bwd = free_flow_prior_kmh(tags, forward=False)
        for ids, coords in runs:
            cuts = [0] + [i for i in range(1, len(ids) - 1) if uses[ids[i]] > 1] + [len(ids) - 1]
            pieces = list(zip(cuts[:-1], cuts[1:]))
            # A loop piece (same start and end node) is split in the middle so both halves have
            # distinct end nodes and therefore distinct ids per direction.
            split: list[tuple[int, int]] = []
            for i, j in pieces:
                if ids[i] == ids[j] and j - i >= 2:
                    m = (i + j) // 2
                    split += [(i, m), (m, j)]
                elif ids[i] != ids[j]:
                    split.append((i, j))
            for i, j in split:
                for forward in (True, False):
                    if (forward and direction == -1) or (not forward and direction == 1):
                        continue
                    a, b = (i, j) if forward else (j, i)
                    na, nb = ids[a], ids[b]
                    salt = 0
                    sid = segment_id_for(way.way_id, na, nb)
                    while sid in ids_seen:
                        salt += 1
                        sid = segment_id_for(way.way_id, na, nb, salt)
                    ids_seen.add(sid)
                    seg_ids.append(sid)
                    seg_way.append(way.way_id)
                    seg_a.append(node_row(na, coords[a]))
                    seg_b.append(node_row(nb, coords[b]))
                    seg_hw.append(hw)
                    seg_name.append(name_i)
                    seg_ff.append(ff_fwd if forward else ff_bwd)
                    # Two-way pieces are emitted forward then backward: they are each other's reverse.
                    seg_rev.append(len(seg_ids) - 2 if (not forward and direction == 0) else -1)
                    part = coords[i:j + 1] if forward else coords[i:j + 1][::-1]
                    geom.extend(part)
                    geom_ptr.append(len(geom))
    if not seg_ids:
        raise MapLoadError("no drivable road segments after trimming (map too small or clipped)")
    reverse_of = np.asarray(seg_rev, dtype=np.int64)
    back = np.flatnonzero(reverse_of >= 0)
    reverse_of[reverse_of[back]] = back
    node_ids = np.fromiter(node_index.keys(), dtype=np.int64, count=len(node_index))
    from_node = np.asarray(seg_a, dtype=np.int64)
    to_node = np.asarray(seg_b, dtype=np.int64)
    highway_code = np.asarray(seg_hw, dtype=np.int8)
    return {
        "segment_ids": np.asarray(seg_ids, dtype=np.int64),
        "way_ids": np.asarray(seg_way, dtype=np.int64),
        "start_node_ids": node_ids[from_node],
        "end_node_ids": node_ids[to_node],
        "from_node": from_node,
        "to_node": to_node,
        "highway_code": highway_code,
        "frc": np.asarray([FRC_BY_HIGHWAY[HIGHWAY_CLASSES[c]] for c in seg_hw], dtype=np.int8),
        "name_index": np.asarray(seg_name, dtype=np.int32),
        "free_flow_prior_kmh": np.asarray(seg_ff, dtype=np.float64),
        "geom_ptr": np.asarray(geom_ptr, dtype=np.int64),
        "geom_lonlat": np.asarray(geom, dtype=np.float64),
        "reverse_of": reverse_of,
        "node_ids": node_ids,
        "node_lonlat": np.asarray(node_lonlat, dtype=np.float64),
        "names": np.asarray(list(names.keys()), dtype=str),
    }


# ---------------------------------------------------------------- array helpers
def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(c)`` for each ``c`` in ``counts``, without a Python loop."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


def _csr(keys: np.ndarray, n: int, return_order: bool = False):
    """CSR pointer array for integer ``keys`` in ``[0, n)`` and the stable order grouping them."""
    order = np.argsort(keys, kind="stable")
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n), out=ptr[1:])
    return (ptr, order) if return_order else (ptr, order.astype(np.int64))
