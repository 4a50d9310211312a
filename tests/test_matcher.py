"""The HMM map matcher on real maps: accuracy on simulated traces with a known path, real GPX
traces from GraphHopper's map-matching test suite, messy input, and online == batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from geo import load_network
from geo.matcher import DROP_REASONS, MatcherConfig, MatcherState, OnlineMatcher, match_trace
from geo.model import Ping
from simulator.formats import ReadReport, read_pings
from tests.conftest import SHARED_TRACES, shared_map
from tests.matcher_traces import random_route, segment_accuracy, simulate_trace

REGIMES = [  # (sigma m, interval s, required mean segment-level accuracy)
    (10.0, 5.0, 0.98),
    (30.0, 30.0, 0.93),
]


def _mean_accuracy(network, sigma: float, interval: float, n_traces: int, seed: int, route_m: float = 3000.0) -> float:
    matcher = OnlineMatcher(network, MatcherConfig(sigma_m=sigma))
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(n_traces):
        trace = simulate_trace(network, random_route(network, rng, route_m), rng, sigma_m=sigma, interval_s=interval)
        res = match_trace(network, trace.pings, matcher=matcher)
        accs.append(segment_accuracy(network, trace, res.traversals))
    return float(np.mean(accs))


@pytest.mark.parametrize("sigma,interval,required", REGIMES)
@pytest.mark.parametrize("map_name", ["helsinki", "kotka"])
def test_accuracy_on_bundled_maps(request, map_name, sigma, interval, required):
    network = request.getfixturevalue(map_name)
    acc = _mean_accuracy(network, sigma, interval, n_traces=24 if interval > 10 else 12, seed=7)
    assert acc >= required, f"{map_name} sigma={sigma} m every {interval} s: accuracy {acc:.3f} < {required}"


@pytest.mark.parametrize("sigma,interval,required", REGIMES)
@pytest.mark.parametrize("map_file", ["monaco-2021.osm.pbf", "liechtenstein-2024.osm.pbf"])
def test_accuracy_on_shared_maps(map_file, sigma, interval, required):
    network = load_network(shared_map(map_file))
    acc = _mean_accuracy(network, sigma, interval, n_traces=16 if interval > 10 else 8, seed=11, route_m=4000.0)
    assert acc >= required, f"{map_file} sigma={sigma} m every {interval} s: accuracy {acc:.3f} < {required}"


# ------------------------------------------------------------------ real traces
def _trace(name: str) -> list[Ping]:
    path = SHARED_TRACES / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return list(read_pings(path))


def _graphhopper_map(name: str):
    path = SHARED_TRACES / name
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return load_network(path)


def _trace_length_m(network, pings: list[Ping]) -> float:
    xy = network.to_xy([p.lon for p in pings], [p.lat for p in pings])
    return float(np.hypot(*np.diff(xy, axis=0).T).sum())


def test_issue_70_streets_in_order():
    network = _graphhopper_map("issue-70.osm.gz")
    res = match_trace(network, _trace("issue-70.gpx"))
    names: list[str] = []
    for t in res.traversals:
        name = str(network.names[network.name_index[network.index_of(t.segment_id)[0]]])
        if not names or names[-1] != name:
            names.append(name)
    assert names == ["Милана Видака", "Бранка Радичевића", "Здравка Челара"]


def test_issue_13_matched_length_close_to_trace_length():
    network = _graphhopper_map("map-issue13.osm.gz")
    pings = _trace("issue-13.gpx")
    assert len({p.ts for p in pings}) == 1  # every point has the same timestamp: no speed test possible
    res = match_trace(network, pings)
    assert res.unmatched == 0
    assert abs(res.matched_length_m(network) - _trace_length_m(network, pings)) <= 2.5


def test_issue_127_two_identical_untimed_points():
    # Same coordinates as issue-13, so it belongs to map-issue13.
    network = _graphhopper_map("map-issue13.osm.gz")
    report = ReadReport()
    pings = list(read_pings(SHARED_TRACES / "issue-127.gpx", report))
    assert len(pings) == 2 and report.synthetic_times == 2
    res = match_trace(network, pings)
    assert res.matched == 2
    assert (res.segment_index >= 0).all()
    assert res.matched_length_m(network) == pytest.approx(0.0, abs=1.0)


def test_andorra_matched_length_below_one_and_a_half_trace_length():
    network = _graphhopper_map("andorra-2013.osm.pbf")
    pings = _trace("andorra_for_map_matching.gpx")
    res = match_trace(network, pings)
    length = res.matched_length_m(network)
    trace_length = _trace_length_m(network, pings)
    assert 0.5 * trace_length < length < 1.5 * trace_length


# -------------------------------------------------------------- messy input
@pytest.fixture(scope="module")
def clean(helsinki):
    rng = np.random.default_rng(5)
    trace = simulate_trace(helsinki, random_route(helsinki, rng, 2500), rng, sigma_m=5.0, interval_s=5.0)
    res = match_trace(helsinki, trace.pings, MatcherConfig(sigma_m=5.0))
    return trace, [t.segment_id for t in res.traversals]


def _ids(res) -> list[int]:
    return [t.segment_id for t in res.traversals]


def test_duplicates_and_out_of_order_are_dropped_and_counted(helsinki, clean):
    trace, expected = clean
    p = list(trace.pings)
    messy = p[:10] + [p[9], p[9]] + p[10:20] + [p[15]] + p[20:]
    res = match_trace(helsinki, messy, MatcherConfig(sigma_m=5.0))
    assert res.dropped["duplicate"] == 2
    assert res.dropped["out_of_order"] == 1
    assert res.unmatched == 3
    assert res.reason[10] == res.reason[11] == "duplicate" and res.reason[22] == "out_of_order"
    assert _ids(res) == expected
    assert set(res.dropped) <= set(DROP_REASONS)


def test_outliers_are_skipped_without_breaking_the_trip(helsinki, clean):
    trace, expected = clean
    p = list(trace.pings)
    far = dataclasses.replace(p[12], lat=p[12].lat + 0.2)  # 22 km away: no road near it
    # On a road 300-600 m away, 5 s after the previous fix: an impossible speed.
    here = helsinki.to_xy(p[25].lon, p[25].lat)[0]
    mid = np.array([helsinki.geometry_xy(i).mean(axis=0) for i in range(helsinki.n_segments)])
    d = np.hypot(*(mid - here).T)
    target = int(np.flatnonzero((d > 300) & (d < 600))[0])
    lon, lat = helsinki.to_lonlat(helsinki.point_at_offset(target, helsinki.length_m[target] / 2))[0]
    jump = dataclasses.replace(p[25], lon=float(lon), lat=float(lat))
    messy = p[:12] + [far] + p[13:25] + [jump] + p[26:]
    res = match_trace(helsinki, messy, MatcherConfig(sigma_m=5.0))
    assert res.dropped["no_candidate"] == 1
    assert res.dropped["no_transition"] == 1
    assert res.segment_index[12] == -1 and res.segment_index[25] == -1
    assert set(res.trip[res.trip >= 0]) == {0}  # one trip, not split
    assert segment_overlap(_ids(res), expected) >= 0.95


def test_long_gap_splits_the_trip(helsinki, clean):
    trace, _ = clean
    p = list(trace.pings)
    shifted = p[:20] + [dataclasses.replace(q, ts=q.ts + 600.0) for q in p[20:]]
    res = match_trace(helsinki, shifted, MatcherConfig(sigma_m=5.0, max_gap_s=120.0))
    assert res.dropped["gap_split"] == 1
    assert set(res.trip.tolist()) == {0, 1}
    assert (res.trip[:20] == 0).all() and (res.trip[20:] == 1).all()
    # No traversal spans the gap.
    assert all(t.t_exit <= p[19].ts or t.t_enter >= p[20].ts + 600.0 for t in res.traversals)


def test_stop_at_a_light_adds_no_segments(helsinki, clean):
    trace, expected = clean
    rng = np.random.default_rng(9)
    p = list(trace.pings)
    k = 15
    xy = helsinki.to_xy(p[k].lon, p[k].lat)
    stop = []
    for s in range(1, 31):  # 30 s standing still, one fix a second, 5 m noise around the same spot
        lon, lat = helsinki.to_lonlat(xy + rng.normal(0, 5.0, size=2))[0]
        stop.append(dataclasses.replace(p[k], ts=p[k].ts + s, lon=float(lon), lat=float(lat)))
    later = [dataclasses.replace(q, ts=q.ts + 30.0) for q in p[k + 1:]]
    res = match_trace(helsinki, p[:k + 1] + stop + later, MatcherConfig(sigma_m=5.0))
    assert res.unmatched == 0
    assert _ids(res) == expected
    # The stop shows as time spent on the road, not as extra segments: traversals stay contiguous.
    span = later[-1].ts - p[0].ts
    assert sum(t.travel_time_s for t in res.traversals) == pytest.approx(span, abs=1e-6)


def test_u_turn_in_the_middle_of_a_segment(kotka):
    net = kotka
    two_way = np.flatnonzero((net.reverse_of >= 0) & (net.length_m > 200))
    seg = int(two_way[0])
    rev = int(net.reverse_of[seg])
    length = float(net.length_m[seg])
    from geo.matcher import points_at_offsets

    out = np.arange(20.0, 150.0, 10.0)            # drive in...
    back = length - np.arange(150.0, 30.0, -10.0)  # ...turn at 150 m and drive back on the reverse
    xy = np.vstack([points_at_offsets(net, np.full(len(out), seg), out),
                    points_at_offsets(net, np.full(len(back), rev), back)])
    lonlat = net.to_lonlat(xy)
    pings = [Ping("u", 1_700_000_000.0 + 2.0 * i, float(lat), float(lon)) for i, (lon, lat) in enumerate(lonlat)]
    res = match_trace(net, pings, MatcherConfig(sigma_m=3.0))
    ids = _ids(res)
    assert ids == [int(net.segment_ids[seg]), int(net.segment_ids[rev])]
    first, second = res.traversals
    assert first.fraction == pytest.approx(130.0 / length, abs=0.02)
    assert second.fraction == pytest.approx(110.0 / length, abs=0.02)
    assert first.t_exit == pytest.approx(second.t_enter)


def segment_overlap(a: list[int], b: list[int]) -> float:
    from tests.matcher_traces import lcs_weight

    return lcs_weight(a, b, [1.0] * len(a), [1.0] * len(b)) / max(len(a), len(b), 1)


# ---------------------------------------------------------- online vs batch
def _online(matcher: OnlineMatcher, pings: list[Ping], round_trip: bool = True):
    """Feed pings one at a time; returns (traversals, [(newest ts before the push, traversal)], max state bytes)."""
    state = matcher.new_state()
    out, emitted, biggest = [], [], 0
    newest_before = -np.inf
    for p in pings:
        res = matcher.push(state, [p])
        blob = res.state.to_bytes()
        biggest = max(biggest, len(blob))
        state = MatcherState.from_bytes(blob) if round_trip else res.state
        if round_trip:
            assert state.to_bytes() == blob
        emitted += [(newest_before, t) for t in res.traversals]
        out += res.traversals
        newest_before = max(newest_before, p.ts)
    out += matcher.finish(state).traversals
    return out, emitted, biggest


@pytest.mark.parametrize("interval", [1.0, 5.0])
def test_online_agrees_with_batch_and_respects_the_lag(helsinki, interval):
    cfg = MatcherConfig(sigma_m=10.0, max_lag_s=30.0)
    matcher = OnlineMatcher(helsinki, cfg)
    rng = np.random.default_rng(21)
    same = total = 0
    for _ in range(4):
        trace = simulate_trace(helsinki, random_route(helsinki, rng, 2500), rng, sigma_m=10.0, interval_s=interval)
        batch = match_trace(helsinki, trace.pings, matcher=matcher).traversals
        online, emitted, biggest = _online(matcher, trace.pings)
        key = lambda t: (t.segment_id, round(t.t_enter, 6), round(t.t_exit, 6), round(t.fraction, 6))  # noqa: E731
        b, o = [key(t) for t in batch], [key(t) for t in online]
        from tests.matcher_traces import lcs_weight

        same += lcs_weight(b, o, [1.0] * len(b), [1.0] * len(o))
        total += max(len(b), len(o))
        assert biggest <= 2048, f"state grew to {biggest} bytes"
        ts = np.array([p.ts for p in trace.pings])
        for newest_before, t in emitted:
            # The first ping at or after the traversal's exit decides it; it must not already
            # have been max_lag_s old at the previous push.
            deciding = ts[np.searchsorted(ts, t.t_exit - 1e-6)]
            assert newest_before - deciding < cfg.max_lag_s + 1e-6
    assert same / total >= 0.99


def test_push_is_deterministic_and_state_round_trips(helsinki):
    rng = np.random.default_rng(4)
    trace = simulate_trace(helsinki, random_route(helsinki, rng, 2000), rng, sigma_m=10.0, interval_s=2.0)
    matcher = OnlineMatcher(helsinki)
    with_bytes, _, _ = _online(matcher, trace.pings, round_trip=True)
    in_memory, _, _ = _online(matcher, trace.pings, round_trip=False)
    assert with_bytes == in_memory
    # Batches of any size give the same result as one ping at a time.
    state = matcher.new_state()
    chunked = []
    for i in range(0, len(trace.pings), 7):
        res = matcher.push(state, trace.pings[i:i + 7])
        chunked += res.traversals
        state = res.state
    chunked += matcher.finish(state).traversals
    assert chunked == in_memory
    with pytest.raises(ValueError):
        MatcherState.from_bytes(b"\x07garbage")


def test_push_many_equals_separate_pushes(helsinki):
    rng = np.random.default_rng(8)
    matcher = OnlineMatcher(helsinki)
    traces = [simulate_trace(helsinki, random_route(helsinki, rng, 1500), rng, sigma_m=10.0, interval_s=5.0,
                             device=f"d{i}") for i in range(3)]
    separate = []
    for t in traces:
        r = matcher.push(matcher.new_state(), t.pings)
        separate.append(r.traversals + matcher.finish(r.state).traversals)
    together = matcher.push_many([(matcher.new_state(), t.pings) for t in traces])
    for r, expected in zip(together, separate):
        assert r.traversals + matcher.finish(r.state).traversals == expected
        assert {t.device for t in expected} == {r.state.device}



def test_push_many_screens_each_device_alike_clean_or_messy(helsinki):
    """One push_many with clean devices (screened in a few comparisons) next to messy ones
    (duplicates, out of order, a foreign ping, equal times: the ping-by-ping rules) gives every
    device what it gets pushed alone, drop counts included."""
    rng = np.random.default_rng(12)
    matcher = OnlineMatcher(helsinki)
    traces = [simulate_trace(helsinki, random_route(helsinki, rng, 1500), rng, sigma_m=10.0, interval_s=5.0,
                             device=f"d{i}") for i in range(4)]
    p1, p3 = list(traces[1].pings), list(traces[3].pings)
    moved = dataclasses.replace(p3[8], lat=p3[8].lat + 1e-4)  # same time, other position: kept
    batches = [
        list(traces[0].pings),
        p1[:10] + [p1[9], p1[9]] + p1[10:20] + [p1[15], traces[0].pings[3]] + p1[20:],
        list(traces[2].pings),
        p3[:9] + [moved] + p3[9:],
    ]
    together = matcher.push_many([(matcher.new_state(), b) for b in batches])
    for b, r in zip(batches, together):
        alone = matcher.push(matcher.new_state(), b)
        assert r.traversals == alone.traversals and r.state.to_bytes() == alone.state.to_bytes()
        assert (r.matched, r.unmatched, r.dropped) == (alone.matched, alone.unmatched, alone.dropped)
    assert together[1].dropped == {"duplicate": 2, "out_of_order": 1, "device_mismatch": 1}
    assert together[3].unmatched == 0 and together[3].matched == len(batches[3])
    assert together[0].unmatched == together[2].unmatched == 0
    # A state carried over: the next push's first ping older than the last one seen is dropped.
    again = matcher.push(together[0].state, [traces[0].pings[5]] + list(traces[0].pings[-1:]))
    assert again.dropped == {"out_of_order": 1, "duplicate": 1}


def test_fast_projection_matches_pyproj(helsinki):
    """The matcher's projection shortcut gives pyproj's public results bit for bit, both ways."""
    rng = np.random.default_rng(3)
    lon = helsinki.node_lonlat[:, 0] + rng.normal(0, 1e-3, helsinki.n_nodes)
    lat = helsinki.node_lonlat[:, 1] + rng.normal(0, 1e-3, helsinki.n_nodes)
    for n in (1, 7, len(lon)):
        x, y = helsinki._project(lon[:n], lat[:n])
        assert np.array_equal(np.column_stack([x, y]), helsinki.to_xy(lon[:n], lat[:n]))
        back = helsinki._project(x, y, inverse=True)
        assert np.array_equal(np.column_stack(back), helsinki.to_lonlat(np.column_stack([x, y])))


def test_traversal_times_are_interpolated_and_ordered(helsinki, clean):
    trace, _ = clean
    res = match_trace(helsinki, trace.pings, MatcherConfig(sigma_m=5.0))
    t0, t1 = trace.pings[0].ts, trace.pings[-1].ts
    prev_exit = t0
    for t in res.traversals:
        assert t0 <= t.t_enter <= t.t_exit <= t1
        assert t.t_enter == pytest.approx(prev_exit)
        assert 0 < t.fraction <= 1
        prev_exit = t.t_exit
    full = [t for t in res.traversals if t.fraction == 1.0]
    assert full and all(t.travel_time_s > 0 for t in full)


# ------------------------------------------- compiled hot path (geo.kernels)
def test_candidate_search_matches_brute_force(helsinki):
    # Every segment within the radius of a point, found by projecting the point onto every piece.
    net = helsinki
    rng = np.random.default_rng(12)
    xy = net.geom_xy[rng.integers(len(net.geom_xy), size=60)] + rng.normal(0, 25.0, size=(60, 2))
    near = net.nearby_segments(xy, 40.0)
    g = net.geom_xy
    seg_of_piece = np.repeat(np.arange(net.n_segments), np.diff(net.geom_ptr) - 1)
    starts = np.concatenate([np.arange(net.geom_ptr[s], net.geom_ptr[s + 1] - 1) for s in range(net.n_segments)])
    a, b = g[starts], g[starts + 1]
    for i, p in enumerate(xy):
        ab = b - a
        t = np.clip(((p - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-18), 0.0, 1.0)
        d = np.hypot(*(a + t[:, None] * ab - p).T)
        best = {}
        for s, di in zip(seg_of_piece[d <= 40.0], d[d <= 40.0]):
            best[int(s)] = min(best.get(int(s), np.inf), float(di))
        rows = near.point == i
        assert set(near.segment[rows].tolist()) == set(best)
        got = dict(zip(near.segment[rows].tolist(), near.distance_m[rows].tolist()))
        assert all(abs(got[s] - best[s]) < 1e-6 for s in best)
        assert np.all(np.diff(near.distance_m[rows]) >= -1e-4)  # nearest first


def test_route_table_agrees_with_dijkstra(helsinki):
    from geo.matcher import route_table

    table = route_table(helsinki)
    rng = np.random.default_rng(13)
    src = rng.choice(helsinki.n_segments, size=12, replace=False)
    far, _ = table.distances_from(src, table.delta_m)
    for k, a in enumerate(src.tolist()):
        gap = table.gap(np.full(helsinki.n_segments, a), np.arange(helsinki.n_segments))
        reach = np.isfinite(far[k]) & (np.arange(helsinki.n_segments) != a)
        assert np.array_equal(np.isfinite(gap), reach)
        assert np.allclose(gap[reach], far[k][reach], atol=1e-3 + 1e-6 * far[k][reach])
        b = int(rng.choice(np.flatnonzero(reach)))
        path = table.path_between(a, b)
        assert table.gap_one(a, b) == pytest.approx(helsinki.length_m[path].sum(), abs=0.05)


def test_a_hole_beyond_the_route_table_bound_is_bridged(helsinki):
    # A 110 s hole in a trace: with a route table bounded at 600 m, routes between the pings on
    # either side exceed its bound, so transitions and the decided path come from a bounded
    # Dijkstra instead (the compiled recursion hands those steps back to Python).
    rng = np.random.default_rng(14)
    cfg = MatcherConfig(sigma_m=10.0, route_table_m=600.0)
    matcher = OnlineMatcher(helsinki, cfg)
    for _ in range(3):
        trace = simulate_trace(helsinki, random_route(helsinki, rng, 3000), rng, sigma_m=10.0, interval_s=5.0)
        k = len(trace.pings) // 3
        pings = trace.pings[:k] + trace.pings[k + 22:]
        res = match_trace(helsinki, pings, matcher=matcher)
        assert res.unmatched == 0 and set(res.trip.tolist()) == {0}
        prev_exit = pings[0].ts
        for t in res.traversals:  # contiguous in time across the hole
            assert t.t_enter == pytest.approx(prev_exit)
            prev_exit = t.t_exit
        assert segment_accuracy(helsinki, trace, res.traversals) >= 0.9
        # Online, in pushes of 4 pings through serialised state: the same traversals once converged.
        state, online = matcher.new_state(), []
        for i in range(0, len(pings), 4):
            r = matcher.push(state, pings[i:i + 4])
            online += r.traversals
            state = MatcherState.from_bytes(r.state.to_bytes())
        online += matcher.finish(state).traversals
        assert segment_overlap(_ids(res), _ids_of(online)) >= 0.95


def _ids_of(traversals) -> list[int]:
    return [t.segment_id for t in traversals]
