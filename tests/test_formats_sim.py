"""Ping file formats added for the simulator: SUMO FCD XML, batch writing, reproducible gzip."""

from __future__ import annotations

import gzip
import json

import pytest

from geo.model import Ping
from simulator.formats import ReadReport, read_pings, write_ping_batches
from simulator.sumo import DEFAULT_FCD_EPOCH_S, read_fcd

FCD = """<?xml version="1.0" encoding="UTF-8"?>
<fcd-export xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="http://sumo.dlr.de/xsd/fcd_file.xsd">
    <timestep time="0.00">
        <vehicle id="veh0" x="26.946120" y="60.529110" angle="93.50" type="DEFAULT_VEHTYPE" speed="12.31" pos="5.10" lane="-2563#1_0" slope="0.00"/>
    </timestep>
    <timestep time="5.00">
        <vehicle id="veh0" x="26.947230" y="60.529050" angle="95.20" type="DEFAULT_VEHTYPE" speed="13.02" pos="70.20" lane="-2563#1_0" slope="0.00"/>
        <vehicle id="veh7" x="26.951000" y="60.525000" angle="181.00" type="DEFAULT_VEHTYPE" speed="0.00" pos="3.00" lane="99_0" slope="0.00"/>
        <person id="ped1" x="26.950000" y="60.525000" angle="0.00" speed="1.20" pos="1.00" edge="99" slope="0.00"/>
    </timestep>
    <timestep time="10.00">
        <vehicle id="veh7" x="2512.40" y="1903.22" angle="181.00" type="DEFAULT_VEHTYPE" speed="4.10" pos="30.00" lane="99_0" slope="0.00"/>
        <vehicle id="veh8" x="26.952000" y="60.524000" angle="400.00" speed="4.10"/>
    </timestep>
</fcd-export>
"""


@pytest.mark.parametrize("name", ["probes.fcd.xml", "probes.xml.gz"])
def test_fcd_reader_yields_pings_and_counts_bad_rows(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt") as fh:
            fh.write(FCD)
    else:
        path.write_text(FCD)
    report = ReadReport()
    pings = list(read_pings(path, report))
    assert [(p.device, p.ts - DEFAULT_FCD_EPOCH_S) for p in pings] == [("veh0", 0.0), ("veh0", 5.0), ("veh7", 5.0)]
    first = pings[0]
    assert (first.lon, first.lat, first.speed_mps, first.heading_deg) == (26.94612, 60.52911, 12.31, 93.5)
    # The person is not a vehicle; metric x/y (no --fcd-output.geo) and a bad angle are rejected, counted.
    assert report.rows == 5 and report.accepted == 3
    assert report.rejected == {"lat_out_of_range": 1, "bad_heading": 1}


def test_fcd_reader_places_sumo_time_on_a_given_epoch(tmp_path):
    path = tmp_path / "x.xml"
    path.write_text(FCD)
    pings = list(read_fcd(path, begin_epoch_s=1_700_000_000.0))
    assert pings[1].ts == 1_700_000_005.0


def test_fcd_reader_rejects_files_that_are_not_fcd(tmp_path):
    path = tmp_path / "net.xml"
    path.write_text("<net><edge id='1'/></net>")
    with pytest.raises(ValueError, match="not a SUMO FCD"):
        list(read_pings(path))
    path.write_text("this is not xml")
    with pytest.raises(ValueError, match="not an XML"):
        list(read_pings(path))


def _batches():
    a = [Ping("dev,a", 1_715_670_000.0 + i, round(60.52 + i * 1e-4, 7), 26.95, 12.0, 8.5, 90.0) for i in range(3)]
    b = [Ping("dev-b", 1_715_670_001.5, 60.53, 26.94)]
    return [("dev,a", a), ("dev-b", b)]


@pytest.mark.parametrize("name", ["p.csv", "p.csv.gz", "p.jsonl", "p.jsonl.gz"])
def test_batch_writer_round_trips(tmp_path, name):
    path = tmp_path / name
    assert write_ping_batches(path, _batches()) == 4
    assert list(read_pings(path)) == [p for _, b in _batches() for p in b]
    if "jsonl" in name:
        lines = (gzip.open(path, "rt") if name.endswith(".gz") else open(path)).read().splitlines()
        assert len(lines) == 2 and json.loads(lines[1]) == {
            "device": "dev-b", "pings": [{"ts": 1_715_670_001.5, "lat": 60.53, "lon": 26.94}]}


def test_gzip_output_is_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_ping_batches(a / "p.csv.gz", _batches())
    write_ping_batches(b / "p.csv.gz", _batches())
    assert (a / "p.csv.gz").read_bytes() == (b / "p.csv.gz").read_bytes()
