"""The traffic simulator on the bundled maps: determinism, realism, ground-truth consistency, CLI."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
from collections import defaultdict

import numpy as np
import pytest

from simulator import Incident, PhoneModel, SimulationConfig, parse_incident, simulate_day
from simulator.formats import ReadReport, read_pings
from streams.cli import main as cli_main

#: A small busy morning on Kotka: ~2k vehicles, ~1 s to simulate.
SMALL = SimulationConfig(hours=1.0, start_s=7 * 3600 + 1800, trips_per_day=30_000, seed=7, warmup_s=600)


def _rows(path):
    with gzip.open(path, "rt") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def small_run(kotka, tmp_path_factory):
    result = simulate_day(kotka, SMALL)
    out = tmp_path_factory.mktemp("sim")
    return result, result.write(out)


def test_same_seed_same_bytes_other_seed_differs(kotka, small_run, tmp_path):
    result, paths = small_run
    again = simulate_day(kotka, SMALL).write(tmp_path / "again")
    for name, path in paths.items():
        assert path.read_bytes() == again[name].read_bytes(), name
    other = simulate_day(kotka, dataclasses.replace(SMALL, seed=8)).write(tmp_path / "other")
    assert other["pings"].read_bytes() != paths["pings"].read_bytes()
    assert other["truth_segments"].read_bytes() != paths["truth_segments"].read_bytes()


def test_files_have_the_contract_columns_and_read_back(small_run):
    result, paths = small_run
    seg_rows = _rows(paths["truth_segments"])
    assert list(seg_rows[0]) == ["segment_id", "window_start", "window_s", "speed_kmh", "travel_time_s", "vehicles",
                                 "probe_vehicles"]
    assert {int(r["window_s"]) for r in seg_rows} == {60, 300}
    assert all(int(r["vehicles"]) >= 1 and int(r["window_start"]) % int(r["window_s"]) == 0 for r in seg_rows)
    path_rows = _rows(paths["truth_paths"])
    assert list(path_rows[0]) == ["device", "trip_id", "seq", "segment_id", "t_enter", "t_exit"]
    report = ReadReport()
    pings = list(read_pings(paths["pings"], report))
    assert report.n_rejected == 0 and len(pings) == len(result.pings) > 1000
    assert {p.device for p in pings} <= {r["device"] for r in path_rows}
    summary = json.loads(paths["summary"].read_text())
    assert summary["vehicles"] > 1000 and summary["pings"] == len(pings)
    assert 0.02 < summary["probe_vehicles"] / summary["vehicles"] < 0.09  # 5 % penetration


def test_truth_paths_are_connected_and_add_up_to_trip_times(kotka, small_run):
    result, paths = small_run
    by_device = defaultdict(list)
    for r in _rows(paths["truth_paths"]):
        by_device[r["device"]].append(r)
    assert len(by_device) == result.is_probe.sum() > 50
    trips = {}
    for device, rows in by_device.items():
        rows.sort(key=lambda r: int(r["seq"]))
        assert [int(r["seq"]) for r in rows] == list(range(len(rows)))
        assert len({r["trip_id"] for r in rows}) == 1  # one device id per trip
        seg = kotka.index_of([int(r["segment_id"]) for r in rows])
        assert (seg >= 0).all()
        assert (kotka.to_node[seg[:-1]] == kotka.from_node[seg[1:]]).all(), "path not connected"
        t_in = np.array([float(r["t_enter"]) for r in rows])
        t_out = np.array([float(r["t_exit"]) for r in rows])
        assert (t_out > t_in).all()
        np.testing.assert_allclose(t_out[:-1], t_in[1:], atol=2e-3)
        trip = int(rows[0]["trip_id"])
        trips[trip] = device
        trip_time = result.traffic.arrive_s[trip] - result.traffic.depart_s[trip]
        assert abs((t_out - t_in).sum() - trip_time) < 0.01 * len(rows)
    # Device ids change per trip: no id is shared by two trips.
    assert len(set(trips.values())) == len(trips)


def test_segment_truth_counts_match_the_probe_paths(kotka, small_run):
    """probe_vehicles in truth_segments = distinct probe devices on the segment in the window
    (recomputed from truth_paths); vehicles counts all traffic, so never fewer."""
    _, paths = small_run
    expected = defaultdict(set)
    for r in _rows(paths["truth_paths"]):
        a, b = float(r["t_enter"]), float(r["t_exit"])
        for w in range(int(a // 300), int(b // 300) + 1):
            if min(b, (w + 1) * 300) > max(a, w * 300):
                expected[(int(r["segment_id"]), w * 300)].add(r["device"])
    got = {}
    for r in _rows(paths["truth_segments"]):
        if r["window_s"] == "300":
            got[(int(r["segment_id"]), int(r["window_start"]))] = (int(r["probe_vehicles"]), int(r["vehicles"]))
    for key, devices in expected.items():
        assert got[key][0] == len(devices)
    assert sum(p for p, _ in got.values()) == sum(len(d) for d in expected.values())
    assert all(v >= p for p, v in got.values()) and sum(v for _, v in got.values()) > 5 * len(expected)


def test_peaks_are_slower_than_the_night(kotka):
    """A busy Kotka weekday: the morning peak hour's space-mean speed is below the night's, on the
    segment ground truth of all vehicles."""
    cfg = SimulationConfig(hours=6.0, start_s=3 * 3600, trips_per_day=80_000, seed=3, probe_share=0.0)
    result = simulate_day(kotka, cfg)
    t = result.truth
    m = t.window_s == 300
    hour = ((t.window_start[m] - cfg.day_start_epoch_s) // 3600).astype(int)
    length = kotka.length_m[t.segment[m]]
    # Space-mean over the network per hour: total distance / total time.
    dist = np.bincount(hour, length * t.vehicles[m], 24)
    time_s = np.bincount(hour, t.travel_time_s[m] * t.vehicles[m], 24)
    speed = dist / np.maximum(time_s, 1e-9) * 3.6
    night, peak = speed[3], speed[8]
    assert peak < night - 2.0, (night, peak)
    # On the busiest segments the drop is much larger than on average.
    by_hour = result.summary()["mean_speed_kmh_by_hour"]
    assert by_hour["08"] < by_hour["03"] and by_hour["08"] < by_hour["05"]


def test_incident_drops_speed_locally_and_clears(kotka):
    secondary = np.flatnonzero(kotka.highway == "secondary")
    seg_row = int(secondary[np.argmax(kotka.length_m[secondary])])
    seg_id = int(kotka.segment_ids[seg_row])
    inc = parse_incident(f"{seg_id}:08:00:08:30:0.3")
    assert inc == Incident((seg_id,), 8 * 3600.0, 8.5 * 3600.0, 0.3)
    cfg = SimulationConfig(hours=1.5, start_s=7.5 * 3600, trips_per_day=30_000, seed=5, incidents=(inc,),
                           probe_share=0.0)
    truth = simulate_day(kotka, cfg).truth
    day0 = cfg.day_start_epoch_s

    def speed(segment: int, a: float, b: float) -> float:
        m = (truth.segment == segment) & (truth.window_s == 300)
        m &= (truth.window_start >= day0 + a * 3600) & (truth.window_start < day0 + b * 3600)
        assert m.sum() >= 2, "no traffic on the segment"
        return float(np.average(truth.speed_kmh[m], weights=truth.vehicles[m]))

    before, during, after = speed(seg_row, 7.5, 8.0), speed(seg_row, 8.05, 8.5), speed(seg_row, 8.6, 9.0)
    assert during < 0.5 * before
    assert after > 0.85 * before
    # Local: a segment on another part of the map keeps its speed.
    busy = np.bincount(truth.segment, truth.vehicles, kotka.n_segments)
    distance = np.hypot(*(kotka.node_xy[kotka.from_node] - kotka.node_xy[kotka.from_node[seg_row]]).T)
    far = int(np.argmax(np.where(distance > 1000, busy, 0)))
    assert speed(far, 8.05, 8.5) > 0.85 * speed(far, 7.5, 8.0)


def _errors_m(network, result):
    p = result.pings
    got = network.to_xy(p.lon, p.lat)
    true = network.to_xy(p.true_lon, p.true_lat)
    return got - true


@pytest.mark.parametrize("sigma", [8.0, 20.0])
def test_gps_noise_matches_the_configured_sigma(kotka, sigma):
    phones = PhoneModel(sigma_m=sigma, outlier_rate=0.0, canyon_bias_m=0.0)
    cfg = dataclasses.replace(SMALL, probe_share=0.3, phones=phones)
    result = simulate_day(kotka, cfg)
    err = _errors_m(kotka, result)
    assert len(err) > 5000
    for axis in (0, 1):
        assert abs(err[:, axis].mean()) < 0.05 * sigma
        assert 0.95 * sigma < err[:, axis].std() < 1.05 * sigma


def test_outliers_canyon_bias_and_cross_track_error_from_files(kotka, tmp_path):
    """Default phone model: outlier share as configured; and, measured from the written files only,
    the distance of pings to their vehicle's true path matches a folded Gaussian of sigma plus bias."""
    phones = PhoneModel(outlier_rate=0.03)
    cfg = dataclasses.replace(SMALL, probe_share=0.3, phones=phones)
    result = simulate_day(kotka, cfg)
    err = np.hypot(*_errors_m(kotka, result).T)
    # Outliers are >= 40 m off; Gaussian(8 m) + bias(<= 6 m) almost never reaches 40 m.
    assert 0.02 < (err > 40.0).mean() < 0.04
    paths = result.write(tmp_path)
    pings = list(read_pings(paths["pings"]))
    device_no = {d: i for i, d in enumerate(sorted({p.device for p in pings}))}
    path_rows = _rows(paths["truth_paths"])
    on_path = np.array([device_no[r["device"]] for r in path_rows], dtype=np.int64) * kotka.n_segments \
        + kotka.index_of([int(r["segment_id"]) for r in path_rows])
    xy = kotka.to_xy(np.array([p.lon for p in pings]), np.array([p.lat for p in pings]))
    near = kotka.nearby_segments(xy, 60.0)
    ping_device = np.array([device_no[p.device] for p in pings], dtype=np.int64)
    hit = np.isin(ping_device[near.point] * kotka.n_segments + near.segment, on_path)
    best = np.full(len(pings), np.inf)
    np.minimum.at(best, near.point[hit], near.distance_m[hit])
    inlier = best[np.isfinite(best) & (best < 40.0)]
    assert len(inlier) > 0.9 * len(pings)
    # Cross-track error of a 2-D Gaussian of sigma per axis: median 0.674 sigma; the canyon bias
    # adds to it, path corners take a little off.
    assert 0.5 * 8.0 < np.median(inlier) < 1.0 * 8.0


def test_sampling_interval_dropouts_and_batches(kotka):
    for interval in (5.0, 30.0):
        phones = PhoneModel(interval_s=interval, dropout_rate=0.1, gaps_per_hour=0.0)
        result = simulate_day(kotka, dataclasses.replace(SMALL, probe_share=0.3, phones=phones))
        p = result.pings
        order = np.lexsort((p.ts, p.device))
        same = p.device[order][1:] == p.device[order][:-1]
        gaps = np.diff(p.ts[order])[same]
        # Most gaps are one interval; about 10 % of fixes are lost, so some are two.
        assert abs(np.median(gaps) - interval) < 0.1 * interval
        assert 0.05 < (gaps > 1.5 * interval).mean() < 0.2
    # Uploads: every batch is one device, within the upload interval, in upload order.
    batches = list(result.ping_batches())
    assert len(batches) == int(p.batch.max()) + 1
    assert all(len({q.device for q in b}) == 1 and b[0].device == d for d, b in batches)
    assert (np.diff(p.upload_s) >= 0).all()


def test_jsonl_output_reads_back_as_the_same_pings(kotka, small_run, tmp_path):
    result, paths = small_run
    jl = result.write(tmp_path, ping_format="jsonl")["pings"]
    assert jl.name == "pings.jsonl.gz"
    first = json.loads(gzip.open(jl, "rt").readline())
    assert set(first) == {"device", "pings"} and "device" not in first["pings"][0]
    assert list(read_pings(jl)) == list(read_pings(paths["pings"]))


def test_cli_simulate_writes_files_and_rejects_bad_flags(tmp_path, capsys):
    out = tmp_path / "day"
    code = cli_main(["simulate", "--map", "kotka", "--hours", "0.5", "--start", "07:00", "--trips", "20000",
                     "--seed", "2", "--probe-share", "0.1", "--out", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "vehicles" in text and "km driven" in text
    for name in ("pings.csv.gz", "truth_segments.csv.gz", "truth_paths.csv.gz", "summary.json"):
        assert (out / name).stat().st_size > 100
    assert cli_main(["simulate", "--map", "kotka", "--hours", "1", "--out", str(out), "--incident", "1:08:00"]) == 2
    assert "SEGMENT_ID" in capsys.readouterr().err
    assert cli_main(["simulate", "--map", "kotka", "--hours", "1", "--out", str(out),
                     "--incident", "1:08:00:09:00:0.5", "--no-progress"]) == 2
    assert "not on this map" in capsys.readouterr().err


def test_runs_on_helsinki_too(helsinki):
    result = simulate_day(helsinki, SimulationConfig(hours=0.5, start_s=17 * 3600, trips_per_day=15_000, seed=1))
    s = result.summary()
    assert s["vehicles"] > 200 and s["pings"] > 100
    assert 5.0 < s["mean_speed_kmh"] < 60.0
