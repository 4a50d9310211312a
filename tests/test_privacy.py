"""Privacy over the whole pipeline (the embedded runner: the same operators the Kafka workers run).

* k-anonymity, as a property: for any set of devices and any k, no segment speed is published from
  fewer than k distinct devices -- checked against the traversals that actually reached the aggregate;
* no device id, pseudonym or raw ping coordinate in the INFO log, the CLI's output, a metric label, or
  anything the feed serves (GeoJSON, DATEX II, per-segment history, the SSE snapshot);
* pseudonyms are keyed and rotate: another key or another rotation epoch gives pseudonyms that share
  nothing with the old ones, while the published speeds stay the same.
The Kafka workers' logs and metric labels are checked in ``tests/test_hostile_kafka.py`` and
``tests/test_crash_safety.py``.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import json
import logging
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from geo import bundled_map, load_network
from simulator.config import SimulationConfig
from simulator.day import simulate_day
from simulator.formats import write_pings
from streams.cli import main
from streams.embedded import EmbeddedPipeline
from streams.feed import BackgroundFeedServer
from streams.ingest import Pseudonymiser
from streams.metrics import unbounded_label_values
from streams.settings import Settings
from tests.test_hostile_input import hostile_messages

SETTINGS = Settings(map="kotka", grace_s=600.0)
NET = load_network(bundled_map("kotka"))
_SIM = simulate_day(NET, SimulationConfig(hours=0.75, start_s=8 * 3600, seed=17, probe_share=0.4))
UPLOADS = list(_SIM.ping_batches())
# the devices with the most pings: long trips that share the main roads
_BY_DEVICE: dict[str, list] = {}
for _d, _ps in UPLOADS:
    _BY_DEVICE.setdefault(_d, []).extend(_ps)
DEVICES = sorted(_BY_DEVICE, key=lambda d: -len(_BY_DEVICE[d]))[:60]


def messages_of(devices: set[str]) -> list[tuple[bytes, bytes]]:
    return [(d.encode(), json.dumps({"device": d, "pings": [p.to_dict() for p in ps]}).encode())
            for d, ps in UPLOADS if d in devices]


def run_recording(settings: Settings, messages, chunk: int = 50):
    """Run the embedded pipeline; returns (published speeds, traversals that reached the aggregate, pipeline)."""
    published, seen = [], []
    pipe = EmbeddedPipeline(NET, settings, on_publish=published.extend)
    add = pipe.aggregate.add

    def recording_add(traversals):  # a spy: records, changes nothing
        seen.extend(traversals)
        add(traversals)

    pipe.aggregate.add = recording_add
    for i in range(0, len(messages), chunk):
        pipe.process_messages(messages[i:i + chunk])
    pipe.finish()
    return published, seen, pipe


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(devices=st.sets(st.sampled_from(DEVICES), min_size=1, max_size=40), k=st.integers(1, 5),
       chunk=st.integers(1, 80))
def test_no_segment_speed_is_published_from_fewer_than_k_devices(devices, k, chunk) -> None:
    published, seen, _ = run_recording(dataclasses.replace(SETTINGS, k_anonymity=k), messages_of(devices), chunk)
    by_segment: dict[int, list] = {}
    for t in seen:
        by_segment.setdefault(t.segment_id, []).append(t)
    for s in published:
        if s.status != "ok":
            assert s.speed_kmh is None and s.sample_count is None
            continue
        contributors = {t.device for t in by_segment.get(s.segment_id, []) if s.window_start <= t.t_exit < s.window_end}
        assert len(contributors) >= k, f"segment-window published from {len(contributors)} < k={k} devices"


def test_k_anonymity_property_is_not_vacuous() -> None:
    """The property above sees real publications: with all 60 devices, k=3 publishes ok speeds, k=60 none."""
    msgs = messages_of(set(DEVICES))
    ok3 = [s for s in run_recording(dataclasses.replace(SETTINGS, k_anonymity=3), msgs)[0] if s.status == "ok"]
    ok60 = [s for s in run_recording(dataclasses.replace(SETTINGS, k_anonymity=60), msgs)[0] if s.status == "ok"]
    assert len(ok3) >= 20 and ok60 == []


# ------------------------------------------------------------------ nothing identifying leaves the pipeline


def secrets_of(uploads, settings: Settings = SETTINGS) -> tuple[set[str], set[tuple[float, float]]]:
    """(device ids and their pseudonyms, raw ping positions rounded to the feed's 7 decimals)."""
    pseudo = Pseudonymiser(settings.pseudonym_key, settings.pseudonym_rotation_s)
    ids, positions = set(), set()
    for d, ps in uploads:
        ids.add(d)
        for p in ps:
            ids.add(pseudo.pseudonym(d, p.ts))
            positions.add((round(p.lon, 7), round(p.lat, 7)))
    return ids, positions


@pytest.fixture(scope="module")
def full_run():
    msgs = [(d.encode(), json.dumps({"device": d, "pings": [p.to_dict() for p in ps]}).encode()) for d, ps in UPLOADS]
    return run_recording(SETTINGS, msgs, chunk=100)


def test_no_ids_or_coordinates_in_logs_cli_output_or_metric_labels(tmp_path, caplog, capsys, full_run) -> None:
    ids, positions = secrets_of(UPLOADS)
    path = tmp_path / "pings.csv"
    write_pings(path, sorted((p for _, ps in UPLOADS for p in ps), key=lambda p: p.ts))
    t_mid = min(p.ts for _, ps in UPLOADS for p in ps) + 600
    with caplog.at_level(logging.INFO):
        pipe = EmbeddedPipeline(NET, SETTINGS)
        pipe.process_messages([(h.key, h.value) for h in hostile_messages(t_mid)], now=t_mid)
        pipe.finish()
        assert main(["replay", "--pings", str(path), "--embedded", "--out", str(tmp_path / "s.jsonl"), "--map", "kotka",
                     "--no-progress"]) == 0
    out = capsys.readouterr()
    text = caplog.text + out.out + out.err
    assert "embedded run" in caplog.text  # the INFO log was captured
    coordinates = {repr(v) for pos in positions for v in pos} | {f"{v:.5f}" for pos in positions for v in pos}
    leaked = [s for s in ids | coordinates if s in text]
    assert not leaked, f"{len(leaked)} ids / coordinates in the log or output, e.g. {leaked[:3]}"
    # metric labels: bounded enums only, and none of the secrets
    assert unbounded_label_values(REGISTRY) == []
    values = {v for fam in REGISTRY.collect() if fam.name.startswith("roadpulse_") for s in fam.samples
              for v in s.labels.values()}
    assert not values & ids
    assert not any(c in v for v in values for c in coordinates)


def _get(url: str, path: str) -> bytes:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200, (path, resp.status, body[:200])
        return gzip.decompress(body) if resp.getheader("Content-Encoding") == "gzip" else body
    finally:
        conn.close()


def _sse_snapshot(url: str) -> bytes:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", "/v1/stream")
        resp = conn.getresponse()
        lines = []
        while True:
            line = resp.fp.readline()
            if not line or (line.strip() == b"" and any(x.startswith(b"data:") for x in lines)):
                return b"".join(lines)
            lines.append(line)
    finally:
        conn.close()


def _positions(obj) -> set[tuple[float, float]]:
    """Every ``[lon, lat]`` pair in a GeoJSON document."""
    out = set()
    if isinstance(obj, list):
        if len(obj) == 2 and all(isinstance(v, (int, float)) for v in obj):
            out.add((round(obj[0], 7), round(obj[1], 7)))
        for v in obj:
            out |= _positions(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            out |= _positions(v)
    return out


def test_the_feed_serves_no_ids_or_ping_coordinates(full_run) -> None:
    published, _, _ = full_run
    ok = [s for s in published if s.status == "ok"]
    assert len(ok) >= 20
    ids, positions = secrets_of(UPLOADS)
    with BackgroundFeedServer(NET, SETTINGS) as srv:
        srv.publish(published)
        bodies = {path: _get(srv.url, path) for path in ("/v1/segments", "/v1/datex2")}
        for s in ok[:5]:
            bodies[f"/v1/segments/{s.segment_id}"] = _get(srv.url, f"/v1/segments/{s.segment_id}")
        bodies["/v1/stream"] = _sse_snapshot(srv.url)
    for path, body in bodies.items():
        text = body.decode()
        leaked = [s for s in ids if s in text]
        assert not leaked, f"{path}: {len(leaked)} device ids / pseudonyms, e.g. {leaked[:3]}"
    geo = _positions(json.loads(bodies["/v1/segments"]))
    assert geo, "the snapshot carries road geometry"
    assert not geo & positions, "a ping position appears in the feed"


# ------------------------------------------------------------------ keyed, rotating pseudonyms


def test_pseudonyms_change_when_the_key_rotates_and_speeds_do_not(full_run) -> None:
    published, seen, _ = full_run
    msgs = [(d.encode(), json.dumps({"device": d, "pings": [p.to_dict() for p in ps]}).encode()) for d, ps in UPLOADS]
    new_key = dataclasses.replace(SETTINGS, pseudonym_key="rotated-secret")
    published_2, seen_2, _ = run_recording(new_key, msgs, chunk=100)
    raw = {d for d, _ in UPLOADS}
    old, new = {t.device for t in seen}, {t.device for t in seen_2}
    assert old and new and not old & raw and not new & raw  # raw ids never reach the aggregate
    assert not old & new  # a new key: no pseudonym survives
    assert len(old) == len(new)  # ... but the same devices are told apart
    strip = lambda speeds: [{k: v for k, v in s.to_dict().items() if k != "published_at"} for s in speeds]  # noqa: E731
    assert strip(published_2) == strip(published)  # and the speeds do not depend on the key
    # the rotation epoch: the same device gets unlinkable pseudonyms in consecutive epochs
    pseudo = Pseudonymiser(SETTINGS.pseudonym_key, 600.0)
    t = UPLOADS[0][1][0].ts
    a, b = pseudo.pseudonym("phone-1", t), pseudo.pseudonym("phone-1", t + 600.0)
    assert a != b and pseudo.pseudonym("phone-1", t) == a and len(a) == 16  # stable within an epoch
