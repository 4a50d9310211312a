"""Road network loading and queries, on real OSM data."""

from __future__ import annotations

import bz2
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from pyproj import Geod

from geo import MapLoadError, bundled_map, load_network, segment_id_for
from geo.network import RoadNetwork
from geo.roads import oneway_direction, parse_maxspeed_kmh
from tests.conftest import BUNDLED, SHARED_MAP_FILES, SHARED_TRACES, shared_map

GEOD = Geod(ellps="WGS84")


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_maps_load(name: str) -> None:
    net = load_network(bundled_map(name), cache=False)
    assert net.n_segments > 300
    assert np.all(net.length_m > 0)
    assert len(np.unique(net.segment_ids)) == net.n_segments
    assert np.all(net.segment_ids < 2**53) and np.all(net.segment_ids >= 0)


@pytest.mark.parametrize("name", SHARED_MAP_FILES)
def test_shared_maps_load(name: str) -> None:
    net = load_network(shared_map(name))
    s = net.summary()
    assert s["directed_segments"] == net.n_segments > 300
    assert s["total_km"] > 10
    assert len(np.unique(net.segment_ids)) == net.n_segments


def test_liechtenstein_size() -> None:
    net = load_network(shared_map("liechtenstein-2024.osm.pbf"))
    # 1,952 car-road ways in the file become ~5.6k directed segments; with service roads ~12.5k.
    assert net.n_segments > 5000
    assert load_network(shared_map("liechtenstein-2024.osm.pbf"), include_service=True).n_segments > 12000


def test_ids_are_stable_across_loads_and_formats(tmp_path: Path, helsinki: RoadNetwork) -> None:
    again = load_network(bundled_map("helsinki"), cache=False)
    assert np.array_equal(np.sort(again.segment_ids), np.sort(helsinki.segment_ids))
    # Ids are the documented hash of (way, from-node, to-node); only a piece repeated within one
    # way needs a salt.
    plain = [
        segment_id_for(int(w), int(a), int(b)) == int(s)
        for w, a, b, s in zip(helsinki.way_ids, helsinki.start_node_ids, helsinki.end_node_ids, helsinki.segment_ids)
    ]
    assert np.mean(plain) > 0.99


def test_xml_gz_and_bz2_give_the_same_network(tmp_path: Path) -> None:
    src = SHARED_TRACES / "issue-70.osm.gz"
    if not src.is_file():
        pytest.skip("graphhopper traces not present")
    xml = tmp_path / "issue-70.osm"
    with gzip.open(src, "rb") as fin, open(xml, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    bz = tmp_path / "issue-70.osm.bz2"
    bz.write_bytes(bz2.compress(xml.read_bytes()))
    nets = [load_network(p, cache=False) for p in (src, xml, bz)]
    for net in nets[1:]:
        assert np.array_equal(net.segment_ids, nets[0].segment_ids)
        assert np.allclose(net.length_m, nets[0].length_m)


def test_oneways_have_one_direction_two_way_roads_both(helsinki: RoadNetwork, kotka: RoadNetwork) -> None:
    import osmium

    for net, name in ((helsinki, "helsinki"), (kotka, "kotka")):
        tags_by_way = {}
        for w in osmium.FileProcessor(str(bundled_map(name)), osmium.osm.WAY):
            if "highway" in w.tags:
                tags_by_way[w.id] = dict(w.tags)
        pairs = set(zip(net.way_ids.tolist(), net.start_node_ids.tolist(), net.end_node_ids.tolist()))
        n_oneway = n_twoway = 0
        for way, a, b in pairs:
            direction = oneway_direction(tags_by_way[way])
            reverse_present = (way, b, a) in pairs
            if direction == 0:
                assert reverse_present, f"two-way way {way} lacks its reverse"
                n_twoway += 1
            else:
                assert not reverse_present, f"one-way way {way} has both directions"
                n_oneway += 1
        assert n_oneway > 20 and n_twoway > 100
        # reverse_of pairs point at each other and at the mirrored node pair
        rev = net.reverse_of
        has = np.flatnonzero(rev >= 0)
        assert np.array_equal(rev[rev[has]], has)
        assert np.array_equal(net.start_node_ids[rev[has]], net.end_node_ids[has])


def test_oneway_tag_rules() -> None:
    assert oneway_direction({"highway": "residential", "oneway": "yes"}) == 1
    assert oneway_direction({"highway": "residential", "oneway": "-1"}) == -1
    assert oneway_direction({"highway": "residential", "junction": "roundabout"}) == 1
    assert oneway_direction({"highway": "motorway"}) == 1
    assert oneway_direction({"highway": "motorway", "oneway": "no"}) == 0
    assert oneway_direction({"highway": "primary"}) == 0


def test_maxspeed_parsing() -> None:
    assert parse_maxspeed_kmh("50") == 50
    assert parse_maxspeed_kmh("30 mph") == pytest.approx(48.28, abs=0.01)
    assert parse_maxspeed_kmh("FI:urban") == 50
    assert parse_maxspeed_kmh("50;30") == 30
    assert parse_maxspeed_kmh("none") is None
    assert parse_maxspeed_kmh("signals") is None


def test_free_flow_priors_vary_by_class(kotka: RoadNetwork) -> None:
    hw = kotka.highway
    motorway = kotka.free_flow_prior_kmh[hw == "motorway"]
    residential = kotka.free_flow_prior_kmh[hw == "residential"]
    assert motorway.min() > residential.max() - 1e-9 or np.median(motorway) > np.median(residential)
    assert len(np.unique(kotka.free_flow_prior_kmh)) >= 3


@pytest.mark.parametrize("name", BUNDLED)
def test_segment_lengths_match_geodesic_geometry(name: str) -> None:
    net = load_network(bundled_map(name))
    geodesic = 0.0
    for i in range(net.n_segments):
        g = net.geometry_lonlat(i)
        geodesic += GEOD.line_length(g[:, 0], g[:, 1])
    assert abs(net.length_m.sum() - geodesic) / geodesic < 0.005


def test_known_street_in_helsinki_by_name(helsinki: RoadNetwork) -> None:
    rows = helsinki.find_by_name("Mannerheimintie")
    assert len(rows) > 5
    seg = helsinki.segment(int(rows[0]))
    assert seg.name == "Mannerheimintie"
    lon, lat = np.mean(seg.geometry_lonlat, axis=0)
    assert 24.93 < lon < 24.96 and 60.16 < lat < 60.18


def test_adjacency_is_consistent(helsinki: RoadNetwork) -> None:
    for i in range(0, helsinki.n_segments, 7):
        nxt = helsinki.successors(i)
        assert np.all(helsinki.from_node[nxt] == helsinki.to_node[i])
    assert helsinki.out_ptr[-1] == helsinki.n_segments


@pytest.mark.parametrize("name", BUNDLED)
def test_spatial_query_matches_brute_force(name: str) -> None:
    net = load_network(bundled_map(name))
    rng = np.random.default_rng(42)
    lo, hi = net.geom_xy.min(axis=0), net.geom_xy.max(axis=0)
    near_roads = net.geom_xy[rng.integers(0, len(net.geom_xy), 150)] + rng.normal(0, 20, (150, 2))
    pts = np.vstack([rng.uniform(lo, hi, (150, 2)), near_roads])
    radius = 35.0
    res = net.nearby_segments(pts, radius)
    lines = np.array([shapely.LineString(net.geometry_xy(i)) for i in range(net.n_segments)])
    for i in range(len(pts)):
        d = shapely.distance(shapely.Point(pts[i]), lines)
        mine = res.point == i
        assert set(res.segment[mine].tolist()) == set(np.flatnonzero(d <= radius).tolist())
        assert np.allclose(res.distance_m[mine], d[res.segment[mine]], atol=1e-3)
        assert np.all(np.diff(res.distance_m[mine]) >= -1e-9)
        for seg, off, snapped in zip(res.segment[mine], res.offset_m[mine], res.snapped_xy[mine]):
            assert lines[seg].project(shapely.Point(snapped)) == pytest.approx(off, abs=1e-3)
    assert res.point.size > 300


def test_spatial_query_max_per_point(helsinki: RoadNetwork) -> None:
    pts = helsinki.geom_xy[::50]
    res = helsinki.nearby_segments(pts, 60.0, max_per_point=3)
    assert np.bincount(res.point).max() <= 3
    assert np.all(res.distance_m <= 60.0)


def test_cache_roundtrip_and_hash_key(tmp_path: Path) -> None:
    src = tmp_path / "k.osm.pbf"
    shutil.copy(bundled_map("kotka"), src)
    cache_dir = tmp_path / "cache"
    first = load_network(src, cache=cache_dir)
    files = list(cache_dir.glob("*.npz"))
    assert len(files) == 1
    again = load_network(src, cache=cache_dir)
    for name in RoadNetwork._ARRAYS:
        assert np.array_equal(getattr(first, name), getattr(again, name)), name
    assert np.allclose(first.length_m, again.length_m)
    # A different file content gets its own cache entry.
    shutil.copy(bundled_map("helsinki"), src)
    other = load_network(src, cache=cache_dir)
    assert len(list(cache_dir.glob("*.npz"))) == 2
    assert other.n_segments != first.n_segments
    # A damaged cache is rebuilt, not fatal.
    for f in cache_dir.glob("*.npz"):
        f.write_bytes(b"not a cache")
    assert load_network(src, cache=cache_dir).n_segments == other.n_segments


def test_clipped_extract_trims_ways() -> None:
    # Helsinki is a bbox clip: ways reference nodes outside the file. It must load anyway and
    # keep only geometry inside the file's nodes.
    net = load_network(bundled_map("helsinki"))
    lo = net.geom_lonlat.min(axis=0)
    hi = net.geom_lonlat.max(axis=0)
    assert hi[0] - lo[0] < 0.05 and hi[1] - lo[1] < 0.05


@pytest.mark.parametrize(
    "content,suffix,message",
    [
        (b"", ".osm.pbf", "empty"),
        (b"this is not xml at all", ".osm", "not a readable OSM file"),
        (b"\x00\x01garbage" * 100, ".osm.pbf", "not a readable OSM file"),
        (b'<?xml version="1.0"?><osm version="0.6"></osm>', ".osm", "no drivable roads"),
        (b"lat,lon\n1,2\n", ".csv", "unsupported map format"),
    ],
)
def test_bad_map_files_raise_map_load_error(tmp_path: Path, content: bytes, suffix: str, message: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(MapLoadError, match=message):
        load_network(path, cache=False)


def test_missing_map_raises(tmp_path: Path) -> None:
    with pytest.raises(MapLoadError, match="no such map file"):
        load_network(tmp_path / "nope.osm.pbf")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_map_info_and_build(tmp_path: Path) -> None:
    out = _cli("map", "info", "kotka")
    assert out.returncode == 0, out.stderr
    assert "directed segments" in out.stdout and "motorway" in out.stdout and "load time" in out.stdout
    cache = tmp_path / "kotka.npz"
    out = _cli("map", "build", "kotka", "-o", str(cache))
    assert out.returncode == 0, out.stderr
    net = load_network(cache)
    assert net.n_segments == load_network(bundled_map("kotka")).n_segments


@pytest.mark.parametrize("content", [b"", b"garbage not a map", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64])
def test_cli_bad_map_is_one_line_exit_2(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.osm.pbf"
    path.write_bytes(content)
    out = _cli("map", "info", str(path))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
