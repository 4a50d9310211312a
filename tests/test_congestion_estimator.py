"""SpeedEstimator: space-mean speed, windows, lateness, dedupe, outliers, statuses, free flow, state."""

from __future__ import annotations

import math

import numpy as np
import pytest

from congestion.estimator import DROP_REASONS, EstimatorConfig, SpeedEstimator
from congestion.quality import JAM_THRESHOLDS, confidence, jam_level
from congestion.record import SAMPLE_BANDS
from geo.model import Traversal

STEP = 60.0
BASE = 28_594_500 * STEP  # 2024-05-14 07:00:00 UTC, on the step grid


def _long_segment(net, min_len: float = 300.0) -> tuple[int, float, float]:
    """(segment id, length m, prior km/h) of a real segment at least ``min_len`` long."""
    rows = np.flatnonzero((net.length_m >= min_len) & (net.free_flow_prior_kmh >= 50))
    row = int(rows[np.argsort(net.length_m[rows])][len(rows) // 2])
    return int(net.segment_ids[row]), float(net.length_m[row]), float(net.free_flow_prior_kmh[row])


def _trav(sid: int, device: str, t_exit: float, speed_kmh: float, length: float, fraction: float = 1.0) -> Traversal:
    tt = fraction * length / (speed_kmh / 3.6)
    return Traversal(sid, device, t_exit - tt, t_exit, fraction)


def test_space_mean_is_harmonic_not_arithmetic(kotka):
    sid, length, _ = _long_segment(kotka)
    speeds = [20.0, 60.0, 100.0]
    est = SpeedEstimator(kotka)
    res = est.add([_trav(sid, f"d{i}", BASE + 200 + i, v, length) for i, v in enumerate(speeds)])
    assert res.accepted == 3
    recs = [r for r in est.advance(BASE + 3600) if r.status == "ok"]
    assert recs, "three devices must publish"
    harmonic = len(speeds) / sum(1 / v for v in speeds)  # 39.13 km/h
    arithmetic = sum(speeds) / len(speeds)  # 60 km/h
    for r in recs:
        assert r.speed_kmh == pytest.approx(harmonic, abs=0.05)
        assert abs(r.speed_kmh - arithmetic) > 20
        # Travel time is the mean travel time of the traversals.
        mean_tt = np.mean([length / (v / 3.6) for v in speeds])
        assert r.travel_time_s == pytest.approx(mean_tt, abs=0.1)
        assert r.sample_count == "3-4"
        assert r.speed_stddev_kmh > 0


def test_partial_traversals_weighted_by_covered_length(kotka):
    sid, length, _ = _long_segment(kotka)
    est = SpeedEstimator(kotka)
    # Full traversals at 30 and 60, and a half traversal at 90 km/h.
    trs = [_trav(sid, "a", BASE + 100, 30, length), _trav(sid, "b", BASE + 110, 60, length),
           _trav(sid, "c", BASE + 120, 90, length, fraction=0.5)]
    est.add(trs)
    r = next(r for r in est.advance(BASE + 3600) if r.status == "ok")
    dist = length * 2.5
    time_s = sum(t.t_exit - t.t_enter for t in trs)
    assert r.speed_kmh == pytest.approx(dist / time_s * 3.6, abs=0.05)


def test_windows_exact_at_boundaries(kotka):
    sid, length, _ = _long_segment(kotka)
    est = SpeedEstimator(kotka)
    t = BASE + 10 * STEP  # exactly on a pane boundary
    est.add([_trav(sid, f"d{i}", t, 50.0, length) for i in range(3)])
    ok = [r for r in est.advance(BASE + 7200) if r.status == "ok"]
    # Half-open windows [start, end): t belongs to the 5 windows ending at t + 60 ... t + 300.
    assert [r.window_end for r in ok] == [t + STEP * k for k in range(1, 6)]
    assert all(r.window_end - r.window_start == 300.0 for r in ok)
    assert all(r.window_start <= t < r.window_end for r in ok)


def test_window_closes_exactly_at_end_plus_grace(kotka):
    sid, length, _ = _long_segment(kotka)
    est = SpeedEstimator(kotka, EstimatorConfig(grace_s=120.0))
    t = BASE + 30
    est.add([_trav(sid, f"d{i}", t, 50.0, length) for i in range(3)])
    first_end = BASE + STEP
    assert est.advance(first_end + 120.0 - 1e-6) == []
    out = est.advance(first_end + 120.0)
    assert [r.window_end for r in out] == [first_end]


def test_late_inside_grace_counted_beyond_grace_dropped(kotka):
    sid, length, _ = _long_segment(kotka)
    est = SpeedEstimator(kotka, EstimatorConfig(grace_s=120.0))
    est.add([_trav(sid, f"d{i}", BASE + 20 + i, 40.0, length) for i in range(2)])
    first_end = BASE + STEP
    assert est.advance(first_end + 100.0) == []  # watermark already past the traversals below
    late_ok = est.add([_trav(sid, "d2", BASE + 40, 40.0, length)])
    assert late_ok.accepted == 1 and late_ok.late_accepted == 1
    out = est.advance(first_end + 120.0)
    assert len(out) == 1 and out[0].status == "ok" and out[0].sample_count == "3-4"
    too_late = est.add([_trav(sid, "d3", BASE + 50, 40.0, length)])
    assert too_late.accepted == 0 and too_late.dropped["late"] == 1
    assert est.counts["late"] == 1 and est.counts["late_accepted"] == 1
    # The late traversal in a still-open pane is accepted.
    in_open = est.add([_trav(sid, "d3", first_end + 5, 40.0, length)])
    assert in_open.accepted == 1


def test_duplicates_dropped_and_counted(kotka):
    sid, length, _ = _long_segment(kotka)
    est = SpeedEstimator(kotka)
    trs = [_trav(sid, f"d{i}", BASE + 100 + i, 30.0 + 10 * i, length) for i in range(3)]
    r1 = est.add(trs + [trs[0]])  # a replay inside the batch
    r2 = est.add(trs[1:])  # replays in a later batch
    assert r1.accepted == 3 and r1.dropped["duplicate"] == 1
    assert r2.accepted == 0 and r2.dropped["duplicate"] == 2
    ref = SpeedEstimator(kotka)
    ref.add(trs)
    a = [r.speed_kmh for r in est.advance(BASE + 3600)]
    b = [r.speed_kmh for r in ref.advance(BASE + 3600)]
    assert a == b


def test_outlier_reasons_counted(kotka):
    sid, length, prior = _long_segment(kotka)
    est = SpeedEstimator(kotka)
    t = BASE + 100
    bad = [
        Traversal(123, "u", t - 10, t),  # unknown segment
        Traversal(sid, "a", t, t),  # zero travel time
        Traversal(sid, "b", t - 10, float("nan")),  # no exit time
        Traversal(sid, "c", t - 10, t, fraction=0.0),  # empty
        Traversal(sid, "d", t - 10, t, fraction=1.5),
        _trav(sid, "e", t, 40.0, length, fraction=5.0 / length),  # 5 m partial
        _trav(sid, "f", t, min(200.0, 3 * prior) + 20.0, length),  # impossible
        _trav(sid, "g", t, 1.0, length, fraction=0.5),  # parked at the destination
        Traversal(sid, "h", t - 4000, t),  # a parked car, 66 min on one segment
    ]
    res = est.add(bad)
    assert res.accepted == 0 and res.total == len(bad)
    assert res.dropped["unknown_segment"] == 1
    assert res.dropped["bad_time"] == 2
    assert res.dropped["bad_fraction"] == 2
    assert res.dropped["short_partial"] == 1
    assert res.dropped["impossible_speed"] == 1
    assert res.dropped["stopped"] == 2
    assert set(res.dropped) == set(DROP_REASONS)
    est.advance(t)
    fut = est.add([_trav(sid, "x", t + 7200, 40.0, length)])
    assert fut.dropped["future"] == 1
    assert est.advance(t + 7200) == []  # nothing was ever published


def test_below_k_never_published_and_no_data_is_null(kotka):
    sid, length, _ = _long_segment(kotka)
    est = SpeedEstimator(kotka, EstimatorConfig(k_anonymity=3, stale_after_s=600.0))
    est.add([_trav(sid, "a", BASE + 100, 40, length), _trav(sid, "b", BASE + 101, 40, length)])
    assert est.advance(BASE + 3600) == []  # 2 devices: nothing, not even no_data
    assert est.counts["suppressed_below_k"] == 5
    est.add([_trav(sid, f"d{i}", BASE + 4000 + i, 40, length) for i in range(3)])
    out = est.advance(BASE + 9000)
    statuses = [r.status for r in out]
    assert statuses == ["ok"] * 5 + ["stale", "no_data"]
    for r in out[5:]:
        assert r.speed_kmh is None and r.travel_time_s is None and r.jam_level is None
        assert r.sample_count is None and r.speed_stddev_kmh is None and r.confidence == 0.0
        assert r.free_flow_speed_kmh > 0
    stale, none = out[5], out[6]
    assert stale.window_end == out[4].window_end + STEP
    assert none.window_end - out[4].window_end > 600.0


def test_sample_count_bands_and_confidence_grow_with_samples(kotka):
    sid, length, _ = _long_segment(kotka)
    confs, bands = [], []
    for n in (3, 8, 30):
        est = SpeedEstimator(kotka)
        rng = np.random.default_rng(n)
        est.add([_trav(sid, f"d{i}", BASE + 200 + i, 50 * rng.lognormal(0, 0.1), length) for i in range(n)])
        r = next(r for r in est.advance(BASE + 3600) if r.window_end == BASE + 5 * STEP)
        confs.append(r.confidence)
        bands.append(r.sample_count)
    assert bands == ["3-4", "5-9", "20-49"]
    assert all(b in SAMPLE_BANDS for b in bands)
    assert confs[0] < confs[1] < confs[2] <= 1.0


def test_jam_levels_follow_documented_thresholds():
    ff = 100.0
    ratios = [1.2, 0.85, 0.8, 0.79, 0.65, 0.6, 0.5, 0.4, 0.35, 0.2, 0.15, 0.1]
    levels = jam_level(np.array(ratios) * ff, ff).tolist()
    expected = [sum(r < b for b in JAM_THRESHOLDS) for r in ratios]
    assert levels == expected
    assert levels[0] == 0 and levels[-1] == 5
    assert jam_level(4.0, 10.0).item() == 5  # standstill whatever the free flow
    c = confidence(np.array([3, 3, 3]), 50.0, np.array([5.0, 5.0, 25.0]), np.array([0.0, 300.0, 0.0]))
    assert c[0] > c[1] and c[0] > c[2] and np.all((c > 0) & (c <= 1))


def test_free_flow_learned_off_peak_after_enough_samples(kotka):
    sid, length, prior = _long_segment(kotka)
    row = int(kotka.index_of(sid)[0])
    cfg = EstimatorConfig(utc_offset_h=0.0, off_peak_hours=(22, 5), free_flow_min_samples=30)
    est = SpeedEstimator(kotka, cfg)
    night = BASE - 7 * 3600 + 3600  # 01:00 UTC
    rng = np.random.default_rng(5)
    true_ff = prior + 15.0
    speeds = true_ff * rng.lognormal(0, 0.08, 40)
    est.add([_trav(sid, f"n{i % 4}", night + 20 * i, v, length) for i, v in enumerate(speeds[:20])])
    est.advance(night + 2000)
    assert not est.free_flow.learned([row])[0]
    assert est.free_flow.speeds([row])[0] == pytest.approx(prior)
    est.add([_trav(sid, f"n{i % 4}", night + 2100 + 20 * i, v, length) for i, v in enumerate(speeds[20:])])
    # Daytime traversals at a crawl must not move free flow.
    day = BASE + 3 * 3600
    est.add([_trav(sid, f"d{i}", day + i, 10.0, length) for i in range(30)])
    est.advance(day + 3600)
    assert est.free_flow.learned([row])[0]
    assert est.free_flow.speeds([row])[0] == pytest.approx(np.percentile(speeds, 85), abs=3.0)
    # ... and it survives a restart.
    again = SpeedEstimator.from_state_bytes(kotka, cfg, est.state_bytes())
    assert again.free_flow.speeds([row])[0] == est.free_flow.speeds([row])[0]


def test_free_flow_needs_k_devices(kotka):
    sid, length, prior = _long_segment(kotka)
    row = int(kotka.index_of(sid)[0])
    cfg = EstimatorConfig(utc_offset_h=0.0, off_peak_hours=(0, 5), free_flow_min_samples=10)
    est = SpeedEstimator(kotka, cfg)
    night = BASE - 5 * 3600
    est.add([_trav(sid, "lonely", night + 60 * i, prior + 30, length) for i in range(40)])
    est.advance(night + 4000)
    assert not est.free_flow.learned([row])[0]  # one person's habit stays private


def _feed(est, trs, watermarks):
    out = []
    for batch, wm in zip(trs, watermarks):
        est.add(batch)
        out += est.advance(wm, now_s=wm)
    return out


def test_restart_from_state_gives_the_same_records(helsinki):
    rng = np.random.default_rng(11)
    rows = np.flatnonzero(helsinki.length_m > 50)[:12]
    trs = []
    for i in range(600):
        row = int(rng.choice(rows))
        trs.append(_trav(int(helsinki.segment_ids[row]), f"v{rng.integers(40)}", BASE + rng.uniform(0, 1800),
                         float(rng.uniform(10, 60)), float(helsinki.length_m[row])))
    trs.sort(key=lambda t: t.t_exit)
    batches = [trs[i:i + 100] for i in range(0, 600, 100)]
    wms = [b[-1].t_exit - 20 for b in batches]
    wms[-1] += 4000
    whole_est = SpeedEstimator(helsinki)
    whole = _feed(whole_est, batches, wms)
    first = SpeedEstimator(helsinki)
    part = _feed(first, batches[:3], wms[:3])
    resumed = SpeedEstimator.from_state_bytes(helsinki, EstimatorConfig(), first.state_bytes())
    part += _feed(resumed, batches[3:], wms[3:])
    assert len(whole) > 20
    assert [r.to_dict() for r in part] == [r.to_dict() for r in whole]
    assert resumed.counts == whole_est.counts
    with pytest.raises(ValueError, match="window grid"):
        SpeedEstimator.from_state_bytes(helsinki, EstimatorConfig(step_s=30.0), first.state_bytes())
    with pytest.raises(ValueError, match="not a roadpulse estimator state"):
        SpeedEstimator.from_state_bytes(helsinki, EstimatorConfig(), b"garbage")


def test_state_from_another_network_is_refused(helsinki, kotka):
    with pytest.raises(ValueError, match="different road network"):
        SpeedEstimator.from_state_bytes(kotka, EstimatorConfig(), SpeedEstimator(helsinki).state_bytes())


def test_config_validation_and_settings():
    with pytest.raises(ValueError, match="whole multiple"):
        EstimatorConfig(step_s=60, span_s=150)
    with pytest.raises(ValueError):
        EstimatorConfig(k_anonymity=0)
    from streams.settings import load_settings

    s = load_settings(environ={"ROADPULSE_K_ANONYMITY": "5", "ROADPULSE_WINDOW_SPAN_S": "600"})
    cfg = EstimatorConfig.from_settings(s)
    assert cfg.k_anonymity == 5 and cfg.span_s == 600.0 and cfg.n_panes == 10
    assert math.isclose(cfg.grace_s, s.grace_s)


def test_add_arrays_matches_add(helsinki):
    rng = np.random.default_rng(3)
    rows = rng.choice(np.flatnonzero(helsinki.length_m > 30), 200)
    trs = [_trav(int(helsinki.segment_ids[r]), f"p{rng.integers(30)}", BASE + rng.uniform(0, 900),
                 float(rng.uniform(15, 50)), float(helsinki.length_m[r])) for r in rows]
    a, b = SpeedEstimator(helsinki), SpeedEstimator(helsinki)
    ra = a.add(trs)
    from congestion.estimator import device_keys

    rb = b.add_arrays(np.array([t.segment_id for t in trs]), device_keys([t.device for t in trs]),
                      np.array([t.t_enter for t in trs]), np.array([t.t_exit for t in trs]))
    assert ra == rb
    batch = b.advance_arrays(BASE + 5000)
    assert [r.to_dict() for r in a.advance(BASE + 5000)] == [r.to_dict() for r in batch.records()]
