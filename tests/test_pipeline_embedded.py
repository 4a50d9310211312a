"""The embedded runner: simulated pings in, segment speeds out, no broker."""

from __future__ import annotations

import dataclasses
import json

import pytest

from congestion.record import SegmentSpeed
from simulator.config import SimulationConfig
from simulator.day import simulate_day
from simulator.formats import write_pings
from streams.cli import main
from streams.embedded import EmbeddedPipeline, run_file
from streams.operators import IngestMatch
from streams.settings import Settings

SETTINGS = Settings(map="kotka", grace_s=300.0)


@pytest.fixture(scope="module")
def sim(kotka):
    return simulate_day(kotka, SimulationConfig(hours=1.0, start_s=7 * 3600, seed=11, probe_share=0.15))


def _run_uploads(kotka, uploads, as_messages: bool):
    out: list[SegmentSpeed] = []
    pipe = EmbeddedPipeline(kotka, SETTINGS, on_publish=out.extend)
    for device, pings in uploads:
        if as_messages:
            value = json.dumps({"device": device, "pings": [p.to_dict() for p in pings]}).encode()
            pipe.process_messages([(device.encode(), value)])
        else:
            pipe.process_pings(pings)
    final = pipe.finish()
    return out, final, pipe.stats


def test_messages_and_pings_give_the_same_speeds(kotka, sim) -> None:
    uploads = list(sim.ping_batches())
    from_messages, final, stats = _run_uploads(kotka, uploads, as_messages=True)
    from_pings, _, stats2 = _run_uploads(kotka, uploads, as_messages=False)
    assert from_messages == from_pings and stats.to_dict() == stats2.to_dict()
    assert final and final == from_messages[-len(final):]  # finish() returns what it published last
    ok = [s for s in from_messages if s.status == "ok"]
    assert len(ok) >= 20
    n = sum(len(p) for _, p in uploads)
    assert stats.received == n
    # every valid ping is accounted for: matched, trimmed, or dropped by the matcher for a reason
    accounted = stats.matched + stats.trimmed + sum(v for k, v in stats.unmatched.items() if k != "trip_trim")
    assert accounted + sum(stats.rejected.values()) == n
    assert stats.published == len(from_messages)


def test_advance_closes_windows_by_event_time(kotka, sim) -> None:
    published: list[SegmentSpeed] = []
    pipe = EmbeddedPipeline(kotka, SETTINGS, on_publish=published.extend)
    uploads = list(sim.ping_batches())
    start = min(p.ts for _, b in uploads for p in b)
    first_half = [p for _, b in uploads for p in b if p.ts < start + 1800]
    pipe.process_pings(first_half)
    before = len(published)
    wm = max(p.ts for p in first_half)
    assert all(s.window_end + SETTINGS.grace_s <= wm for s in published)  # only windows the input closed
    closed = pipe.advance(wm + 3600)
    assert closed and published[before:] == closed
    assert all(s.window_end + SETTINGS.grace_s <= wm + 3600 for s in closed)
    assert pipe.advance(wm + 3600) == []  # nothing closes twice


def test_pseudonyms_rotate_with_the_key(kotka, sim) -> None:
    uploads = list(sim.ping_batches())
    msgs = [(d.encode(), json.dumps({"device": d, "pings": [p.to_dict() for p in ps]}).encode()) for d, ps in uploads]
    daily = IngestMatch(kotka, SETTINGS)
    hourly = IngestMatch(kotka, dataclasses.replace(SETTINGS, pseudonym_rotation_s=600.0))
    t_daily = daily.process_messages(msgs).traversals + daily.finish()
    t_rot = hourly.process_messages(msgs).traversals + hourly.finish()
    raw = {d for d, _ in uploads}
    devs_daily, devs_rot = {t.device for t in t_daily}, {t.device for t in t_rot}
    assert not (devs_daily | devs_rot) & raw
    assert not devs_daily & devs_rot  # different epochs, different keys
    assert len(devs_rot) > len(devs_daily)  # trips crossing a 10-minute boundary get a second pseudonym


def test_replay_embedded_command_writes_speeds(kotka, sim, tmp_path, capsys) -> None:
    pings = [p for _, b in sim.ping_batches() for p in b]
    path = tmp_path / "pings.csv.gz"
    write_pings(path, sorted(pings, key=lambda p: p.ts))
    out = tmp_path / "speeds.jsonl"
    stats = run_file(path, kotka, SETTINGS, tmp_path / "direct.jsonl")
    cfg = tmp_path / "roadpulse.toml"
    cfg.write_text('map = "kotka"\ngrace_s = 300.0\n')
    assert main(["--config", str(cfg), "replay", "--pings", str(path), "--embedded", "--out", str(out),
                 "--no-progress"]) == 0
    lines = out.read_text().splitlines()
    records = [SegmentSpeed.from_dict(json.loads(line)) for line in lines]
    assert len(records) == stats.published and any(r.status == "ok" for r in records)
    assert lines == (tmp_path / "direct.jsonl").read_text().splitlines()
    assert "segment speeds" in capsys.readouterr().out
    assert main(["replay", "--pings", str(path), "--out", str(out)]) == 2  # --out without --embedded


def test_warm_up_matches_a_synthetic_drive(kotka) -> None:
    """The worker warms the matcher up before it joins its group; the drive it uses must really match."""
    from geo.matcher import OnlineMatcher
    from streams.operators import matcher_config, warm_up_matcher

    matcher = OnlineMatcher(kotka, matcher_config(SETTINGS))
    assert warm_up_matcher(matcher) >= 2  # a chain of segments: several traversals, not a lone point
