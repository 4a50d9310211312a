"""Estimates vs truth: the accuracy acceptance, ``roadpulse evaluate``, and the simulator's truth file."""

from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest

from congestion.estimator import EstimatorConfig, SpeedEstimator, device_keys
from congestion.evaluation import TRUTH_COLUMNS, EvaluationInputError, evaluate, read_speeds, read_truth
from streams.cli import main

BASE = 28_594_500 * 60.0


def _write_truth(path, rows) -> None:
    with gzip.open(path, "wt") as fh:
        fh.write(",".join(TRUTH_COLUMNS) + "\n")
        for s, w, ws, v, tt, n, p in rows:
            fh.write(f"{s},{w},{ws},{v:.2f},{tt:.2f},{n},{p}\n")


def _write_speeds(path, records) -> None:
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r.to_dict(), allow_nan=False) + "\n")


def _traffic(net, seed: int = 42, hours: float = 2.0, probe_share: float = 0.12):
    """All vehicles on ~40 real segments: a known speed profile (free flow with a congestion dip),
    lognormal spread between drivers, Poisson arrivals; a random share of them carry probes."""
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero((net.length_m > 60) & (net.length_m < 600))
    rows = rng.choice(rows, size=min(40, len(rows)), replace=False)
    seg, dev, t_in, t_out, probe = [], [], [], [], []
    vid = 0
    for row in rows:
        ff = float(net.free_flow_prior_kmh[row])
        dip = rng.uniform(0.2, 0.7)
        rate = rng.uniform(8, 25) / 60.0  # vehicles per second
        n = rng.poisson(rate * hours * 3600)
        enter = BASE + np.sort(rng.uniform(0, hours * 3600, n))
        phase = (enter - BASE) / (hours * 3600)
        profile = ff * (1 - dip * np.exp(-(((phase - 0.5) / 0.18) ** 2)))
        v = profile * rng.lognormal(0.0, 0.3, n)
        seg.append(np.full(n, row))
        t_in.append(enter)
        t_out.append(enter + net.length_m[row] / (v / 3.6))
        dev.append(np.arange(vid, vid + n))
        vid += n
        probe.append(rng.random(n) < probe_share)
    return tuple(np.concatenate(a) for a in (seg, dev, t_in, t_out, probe))


def _edie_truth(net, seg, dev, t_in, t_out, probe, window: int = 300):
    """Space-mean speed of ALL vehicles per segment and tumbling window (Edie: distance / time in window)."""
    speed = net.length_m[seg] / (t_out - t_in)
    out = []
    w0 = int(np.floor(t_in.min() / window))
    w1 = int(np.floor(t_out.max() / window))
    for w in range(w0, w1 + 1):
        a, b = w * window, (w + 1) * window
        overlap = np.minimum(t_out, b) - np.maximum(t_in, a)
        on = overlap > 0
        for row in np.unique(seg[on]):
            sel = on & (seg == row)
            dist = float((overlap[sel] * speed[sel]).sum())
            time_s = float(overlap[sel].sum())
            v = dist / time_s * 3.6
            out.append((int(net.segment_ids[row]), a, window, v, net.length_m[row] / (v / 3.6),
                        int(sel.sum()), int((sel & probe).sum())))
    return out


def _estimate(net, seg, dev, t_in, t_out, probe):
    p = np.flatnonzero(probe)
    order = p[np.argsort(t_out[p])]
    est = SpeedEstimator(net, EstimatorConfig(k_anonymity=3))
    records = []
    for chunk in np.array_split(order, 40):
        if len(chunk) == 0:
            continue
        est.add_arrays(net.segment_ids[seg[chunk]], device_keys(dev[chunk]), t_in[chunk], t_out[chunk])
        records += est.advance(float(t_out[chunk].max()) - 10.0)
    records += est.advance(float(t_out.max()) + 3600.0)
    return records


@pytest.mark.parametrize("name", ["helsinki", "kotka"])
def test_accuracy_against_truth_of_all_vehicles(name, request, tmp_path):
    net = request.getfixturevalue(name)
    seg, dev, t_in, t_out, probe = _traffic(net)
    truth_rows = _edie_truth(net, seg, dev, t_in, t_out, probe)
    records = _estimate(net, seg, dev, t_in, t_out, probe)
    _write_truth(tmp_path / "truth_segments.csv.gz", truth_rows)
    _write_speeds(tmp_path / "speeds.jsonl", records)
    report = evaluate(*(read_speeds(tmp_path / "speeds.jsonl")[0], read_truth(tmp_path / "truth_segments.csv.gz")))
    overall = report["overall"]
    assert overall["pairs"] >= 300, report  # enough published windows (all have >= 3 devices) to judge
    assert overall["mae_kmh"] <= 5.0, report
    assert abs(overall["bias_kmh"]) <= 2.0, report
    assert 0.2 < overall["coverage"] <= 1.0
    # The naive arithmetic mean of the same probes over the same windows is visibly biased upward.
    p = probe
    naive = []
    for s, w, ws, v, *_ in truth_rows:
        row = int(net.index_of(s)[0])
        sel = p & (seg == row) & (t_out >= w) & (t_out < w + ws)
        if len(np.unique(dev[sel])) >= 3:
            naive.append(np.mean(net.length_m[row] / (t_out[sel] - t_in[sel]) * 3.6) - v)
    assert np.mean(naive) > 2.0


def test_evaluate_cli_report_and_plots(helsinki, tmp_path, capsys):
    seg, dev, t_in, t_out, probe = _traffic(helsinki, seed=3, hours=1.5)
    _write_truth(tmp_path / "truth.csv.gz", _edie_truth(helsinki, seg, dev, t_in, t_out, probe))
    records = _estimate(helsinki, seg, dev, t_in, t_out, probe)
    _write_speeds(tmp_path / "speeds.jsonl", records)
    with open(tmp_path / "speeds.jsonl", "a") as fh:
        fh.write('{"segment_id": 1}\n')  # a malformed line is reported, not fatal
    code = main(["evaluate", "--speeds", str(tmp_path / "speeds.jsonl"), "--truth", str(tmp_path / "truth.csv.gz"),
                 "--plots", str(tmp_path / "plots"), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["speeds_file_problems"] == 1
    assert [b["band_kmh"] for b in report["bands"]] == ["0-30", "30-50", "50-80", "80+"]
    assert sum(b["pairs"] for b in report["bands"]) == report["overall"]["pairs"] > 0
    for p in report["plots"]:
        with open(p, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert {p.rsplit("/", 1)[-1] for p in report["plots"]} == {"speed_scatter.png", "congested_segments.png"}
    # The human-readable table.
    assert main(["evaluate", "--speeds", str(tmp_path / "speeds.jsonl"), "--truth", str(tmp_path / "truth.csv.gz")]) == 0
    out = capsys.readouterr().out
    assert "MAE" in out and "coverage" in out and "malformed" in out


def test_evaluate_rejects_wrong_files_with_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "truth.csv"
    bad.write_text("segment,start,speed\n1,2,3\n")
    speeds = tmp_path / "s.jsonl"
    speeds.write_text("not json\n")
    with pytest.raises(EvaluationInputError, match="header"):
        read_truth(bad)
    with pytest.raises(EvaluationInputError, match="no SegmentSpeed records"):
        read_speeds(speeds)
    assert main(["evaluate", "--speeds", str(speeds), "--truth", str(bad)]) == 2
    assert "error" in capsys.readouterr().err
    short = tmp_path / "short.csv"
    short.write_text(",".join(TRUTH_COLUMNS) + "\n1,2,300,40.0\n")
    with pytest.raises(EvaluationInputError, match=r"short.csv:2"):
        read_truth(short)


def test_reads_what_the_simulator_writes(kotka, tmp_path):
    """The evaluator's reader against the simulator's own truth file, fed by its true probe paths."""
    from simulator import SimulationConfig, simulate_day

    result = simulate_day(kotka, SimulationConfig(hours=1.0, start_s=7 * 3600, seed=2, probe_share=0.3))
    paths = result.write(tmp_path)
    truth = read_truth(paths["truth_segments"])
    assert len(truth) > 0 and set(truth.window_s.tolist()) >= {300.0}
    with gzip.open(paths["truth_paths"], "rt") as fh:
        rows = list(csv.DictReader(fh))
    seg = np.array([int(r["segment_id"]) for r in rows])
    t_in = np.array([float(r["t_enter"]) for r in rows])
    t_out = np.array([float(r["t_exit"]) for r in rows])
    est = SpeedEstimator(kotka)
    res = est.add_arrays(seg, [r["device"] for r in rows], t_in, t_out)
    assert res.accepted > 0.9 * len(rows)
    records = est.advance(float(t_out.max()) + 3600)
    report = evaluate(records, truth)
    assert report["window_s"] == [300.0]
    assert report["overall"]["pairs"] > 0
    assert report["overall"]["mae_kmh"] <= 5.0
