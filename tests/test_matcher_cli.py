"""``roadpulse match``: whole trace files in, per-ping matches and per-trip traversals out."""

from __future__ import annotations

import csv

import numpy as np

from geo import bundled_map
from simulator.formats import write_pings
from streams.cli import main
from tests.matcher_traces import random_route, simulate_trace


def test_match_command_writes_pings_and_traversals(kotka, tmp_path, capsys):
    rng = np.random.default_rng(3)
    pings = []
    for dev in ("a", "b"):
        pings += simulate_trace(kotka, random_route(kotka, rng, 1500), rng, sigma_m=8.0, interval_s=5.0,
                                device=dev, accuracy=True).pings
    src = tmp_path / "pings.csv"
    write_pings(src, pings)
    out = tmp_path / "matched.csv"
    assert main(["match", "--map", str(bundled_map("kotka")), "--pings", str(src), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert len(rows) == len(pings)
    assert {r["device"] for r in rows} == {"a", "b"}
    matched = [r for r in rows if r["segment_id"]]
    assert len(matched) == len(rows)
    seg_ids = {int(s) for s in kotka.segment_ids}
    assert all(int(r["segment_id"]) in seg_ids and int(r["osm_way_id"]) > 0 for r in matched)
    trav = list(csv.DictReader(open(tmp_path / "matched.traversals.csv", encoding="utf-8")))
    assert {r["device"] for r in trav} == {"a", "b"}
    for r in trav:
        row = int(kotka.index_of(int(r["segment_id"]))[0])
        assert int(r["osm_start_node_id"]) == int(kotka.start_node_ids[row])
        assert int(r["osm_end_node_id"]) == int(kotka.end_node_ids[row])
        assert 0 < float(r["fraction"]) <= 1 and float(r["travel_time_s"]) >= 0
    assert "matched" in capsys.readouterr().out


def test_match_command_reports_a_missing_file(tmp_path, capsys):
    code = main(["match", "--map", "kotka", "--pings", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o.csv")])
    assert code == 2
    assert "no such ping file" in capsys.readouterr().err
