"""Hostile input through the embedded pipeline (the same operators the Kafka worker runs), files and maps.

Every kind of bad message in :func:`hostile_messages` must come out as one dead letter with its original
bytes and the specific reason(s), be counted under that reason in ``roadpulse_pings_rejected_total``,
and leave the pipeline processing good pings exactly as if the junk had never arrived. The Kafka test
(``tests/test_hostile_kafka.py``) sends the same catalogue to a real worker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from geo.pings import REJECT_REASONS
from simulator.config import SimulationConfig
from simulator.day import simulate_day
from streams.cli import main
from streams.embedded import EmbeddedPipeline
from streams.ingest import MAX_BATCH_PINGS, MAX_MESSAGE_BYTES
from streams.operators import PipelineStats
from streams.settings import Settings

SETTINGS = Settings(map="kotka", grace_s=600.0)
#: Off the Kotka map but a valid position: hostile devices' valid pings match nothing (no_candidate).
FAR_LAT, FAR_LON = 10.0, 10.0


@dataclass(frozen=True)
class Hostile:
    """One hostile message and what the pipeline must make of it.

    ``reasons``: the rejections its dead letter lists, in order (empty: accepted, no dead letter);
    ``pings``: how many pings those rejections stand for (what ``roadpulse_pings_rejected_total`` grows by).
    """

    kind: str
    key: bytes | None
    value: bytes
    reasons: tuple[str, ...] = ()
    pings: int = 0


def _batch(device: str, *pings: dict, **extra) -> bytes:
    return json.dumps({"device": device, "pings": list(pings), **extra}).encode()


def hostile_messages(t: float) -> list[Hostile]:
    """The catalogue: every kind of hostile input, valid pings at event time ``t`` (epoch s) and after.

    Needs ``now`` (the wall clock) near ``t`` for the far-future case; messages of one device are in the
    order they must be sent (duplicate, out-of-order and teleport depend on the device's history).
    """
    far = {"lat": FAR_LAT, "lon": FAR_LON}
    ping = {"ts": t, **far}
    big = [{"ts": t + i * 0.001, **far} for i in range(MAX_BATCH_PINGS + 1)]
    return [
        Hostile("truncated JSON", b"h-json", b'{"device": "h-json", "pings": [{"ts": ', ("malformed_json",), 1),
        Hostile("binary, not UTF-8", b"h-bin", b"\xff\xfe\xfd\x00\x81 binary junk", ("malformed_json",), 1),
        Hostile("a CSV line", b"h-csv", b"device,ts,lat,lon\nh-csv,1715670000,60.46,26.94", ("malformed_json",), 1),
        Hostile("JSON array", b"h-arr", b"[1, 2, 3]", ("not_an_object",), 1),
        Hostile("JSON null", b"h-null", b"null", ("not_an_object",), 1),
        Hostile("pings not a list", b"h-type", json.dumps({"device": "h-type", "pings": {"ts": t}}).encode(),
                ("bad_type",), 1),
        Hostile("latitude as text", b"h-type", _batch("h-type", {**ping, "lat": "north"}), ("bad_type",), 1),
        Hostile("timestamp as a list", b"h-type", _batch("h-type", {**ping, "ts": [1, 2]}), ("bad_timestamp",), 1),
        Hostile("timestamp true", b"h-type", _batch("h-type", {**ping, "ts": True}), ("bad_timestamp",), 1),
        Hostile("timestamp words", b"h-type", _batch("h-type", {**ping, "ts": "yesterday noon"}), ("bad_timestamp",), 1),
        Hostile("RFC 3339 without offset", b"h-type", _batch("h-type", {**ping, "ts": "2024-05-14T07:00:00"}),
                ("bad_timestamp",), 1),
        Hostile("NaN latitude", b"h-nan", b'{"device": "h-nan", "pings": [{"ts": %r, "lat": NaN, "lon": 10.0}]}' % t,
                ("not_finite",), 1),
        Hostile("Infinity longitude", b"h-nan",
                b'{"device": "h-nan", "pings": [{"ts": %r, "lat": 10.0, "lon": -Infinity}]}' % t, ("not_finite",), 1),
        Hostile("1e400 latitude", b"h-nan", b'{"device": "h-nan", "pings": [{"ts": %r, "lat": 1e400, "lon": 10.0}]}' % t,
                ("not_finite",), 1),
        Hostile("'nan' string", b"h-nan", _batch("h-nan", {**ping, "lon": "nan"}), ("not_finite",), 1),
        Hostile("infinite timestamp", b"h-nan", b'{"device": "h-nan", "pings": [{"ts": Infinity, "lat": 10.0, "lon": 10.0}]}',
                ("not_finite",), 1),
        Hostile("latitude 91", b"h-range", _batch("h-range", {**ping, "lat": 91.0}), ("lat_out_of_range",), 1),
        Hostile("longitude -181", b"h-range", _batch("h-range", {**ping, "lon": -181.0}), ("lon_out_of_range",), 1),
        Hostile("timestamp in 1990", b"h-time", _batch("h-time", {**ping, "ts": 631_152_000}), ("ts_too_old",), 1),
        Hostile("timestamp in 10 years", b"h-time", _batch("h-time", {**ping, "ts": t + 10 * 365 * 86400}),
                ("ts_in_future",), 1),
        Hostile("accuracy -5 m", b"h-opt", _batch("h-opt", {**ping, "accuracy_m": -5}), ("bad_accuracy",), 1),
        Hostile("speed 500 m/s", b"h-opt", _batch("h-opt", {**ping, "speed_mps": 500}), ("bad_speed",), 1),
        Hostile("heading 400", b"h-opt", _batch("h-opt", {**ping, "heading_deg": 400}), ("bad_heading",), 1),
        Hostile("no latitude", b"h-miss", _batch("h-miss", {"ts": t, "lon": FAR_LON}), ("missing_field",), 1),
        Hostile("no device, no key", None, json.dumps(ping).encode(), ("missing_field",), 1),
        Hostile("key not UTF-8, no device", b"\xff\xfe\x80", json.dumps(ping).encode(), ("missing_field",), 1),
        Hostile("device with control characters", b"h-dev", _batch("h-dev", {**ping, "device": "\x00\x07\x1b[2J"}),
                ("bad_device",), 1),
        Hostile("device a lone surrogate", b"h-dev",
                b'{"pings": [{"device": "\\ud800", "ts": %r, "lat": 10.0, "lon": 10.0}]}' % t, ("bad_device",), 1),
        Hostile("device 200 characters", b"h-dev", _batch("h-dev", {**ping, "device": "x" * 200}), ("bad_device",), 1),
        Hostile("device a list", b"h-dev", _batch("h-dev", {**ping, "device": ["a"]}), ("bad_device",), 1),
        Hostile("empty batch", b"h-empty", _batch("h-empty"), ("empty_batch",), 1),
        Hostile("huge batch", b"h-huge", _batch("h-huge", *big), ("batch_too_large",), len(big)),
        Hostile("oversized message", b"h-big", _batch("h-big", ping, padding="x" * MAX_MESSAGE_BYTES),
                ("message_too_large",), 1),
        Hostile("batch with one bad ping", b"h-mixed",
                _batch("h-mixed", ping, {**ping, "ts": t + 1, "lat": 95.0}, {**ping, "ts": t + 2, "lat": FAR_LAT + 1e-4}),
                ("lat_out_of_range",), 1),
        Hostile("a device's first upload", b"h-seq", _batch("h-seq", ping, {**ping, "ts": t + 5, "lat": FAR_LAT + 1e-4})),
        Hostile("duplicate ping", b"h-seq", _batch("h-seq", {**ping, "ts": t + 5, "lat": FAR_LAT + 1e-4}),
                ("duplicate",), 1),
        Hostile("out-of-order ping", b"h-seq", _batch("h-seq", {**ping, "ts": t + 2}), ("out_of_order",), 1),
        Hostile("teleport (55 km in 5 s)", b"h-seq", _batch("h-seq", {**ping, "ts": t + 10, "lat": FAR_LAT + 0.5}),
                ("teleport",), 1),
        Hostile("out of order inside a batch", b"h-seq",
                _batch("h-seq", {**ping, "ts": t + 20, "lat": FAR_LAT + 2e-4}, {**ping, "ts": t + 15}),
                ("out_of_order",), 1),
        Hostile("emoji device id (valid)", "🚗💥".encode(), json.dumps({"device": "🚗💥", "pings": [ping]}).encode()),
    ]


def rejected_metric() -> dict[str, float]:
    """``roadpulse_pings_rejected_total`` by reason, from this process's registry."""
    return {r: REGISTRY.get_sample_value("roadpulse_pings_rejected_total", {"reason": r}) or 0.0
            for r in REJECT_REASONS}


def accounted(stats: PipelineStats) -> int:
    """Pings with a fate: rejected (by reason) + matched + unmatched (by reason, trip trimming included)."""
    return sum(stats.rejected.values()) + stats.matched + sum(stats.unmatched.values())


def recent_uploads(network, hours: float = 0.5, probe_share: float = 0.3, seed: int = 5
                   ) -> tuple[list[tuple[bytes, bytes]], float]:
    """A simulated stretch on ``network`` shifted to end one minute ago, as device uploads ``(key, value)``
    (so that wall-clock checks apply), and an event time 10 minutes into it (for :func:`hostile_messages`)."""
    sim = simulate_day(network, SimulationConfig(hours=hours, start_s=8 * 3600, seed=seed, probe_share=probe_share))
    uploads = list(sim.ping_batches())
    shift = time.time() - 60.0 - max(p.ts for _, ps in uploads for p in ps)
    messages = [(d.encode(), json.dumps({"device": d, "pings": [{**p.to_dict(), "ts": p.ts + shift} for p in ps]}).encode())
                for d, ps in uploads]
    t_mid = min(p.ts for _, ps in uploads for p in ps) + shift + 600.0
    return messages, t_mid


@pytest.fixture(scope="module")
def recent_hour(kotka):
    return recent_uploads(kotka)


def _run(network, messages, now: float, chunk: int = 50):
    published, dead = [], []
    pipe = EmbeddedPipeline(network, SETTINGS, on_publish=published.extend, on_reject=dead.append)
    for i in range(0, len(messages), chunk):
        pipe.process_messages(messages[i:i + chunk], now=now)
    pipe.finish()
    return pipe, [s.to_dict() for s in published], dead


def test_every_hostile_message_is_rejected_with_its_reason_and_the_rest_is_unharmed(kotka, recent_hour) -> None:
    messages, t_mid = recent_hour
    now = time.time()
    clean, clean_speeds, clean_dead = _run(kotka, messages, now)
    assert clean_dead == [] and sum(1 for s in clean_speeds if s["status"] == "ok") >= 20

    hostile = hostile_messages(t_mid)
    published, dead = [], []
    pipe = EmbeddedPipeline(kotka, SETTINGS, on_publish=published.extend, on_reject=dead.append)
    half = len(messages) // 2
    for i in range(0, half, 50):
        pipe.process_messages(messages[i:min(i + 50, half)], now=now)
    for h in hostile:  # one at a time: each must produce exactly its own dead letter and counts
        before, n_dead = rejected_metric(), len(dead)
        pipe.process_messages([(h.key, h.value)], now=now)
        got = dead[n_dead:]
        if not h.reasons:
            assert got == [], f"{h.kind}: valid input was dead-lettered ({got[0].rejections if got else ''})"
            continue
        assert len(got) == 1, f"{h.kind}: expected one dead letter, got {len(got)}"
        dl = got[0]
        assert dl.original == h.value and dl.key == h.key, f"{h.kind}: the dead letter must keep the original bytes"
        assert tuple(r.reason for r in dl.rejections) == h.reasons, f"{h.kind}: {dl.rejections}"
        after = rejected_metric()
        grew = {r: after[r] - before[r] for r in REJECT_REASONS if after[r] != before[r]}
        assert grew == {h.reasons[0]: h.pings}, f"{h.kind}: metric grew by {grew}"
        headers = dict(dl.headers())
        assert headers["reason"].decode() == h.reasons[0]
        assert json.loads(headers["rejections"])[0]["reason"] == h.reasons[0]
    for i in range(half, len(messages), 50):
        pipe.process_messages(messages[i:i + 50], now=now)
    pipe.finish()
    # the good pings gave exactly the speeds of the clean run: the junk changed nothing
    strip = [{k: v for k, v in s.to_dict().items() if k != "published_at"} for s in published]
    assert strip == [{k: v for k, v in s.items() if k != "published_at"} for s in clean_speeds]
    # every ping has a fate, and the extra rejections are exactly the catalogue's
    s = pipe.stats
    assert s.received == accounted(s)
    extra = {r: s.rejected[r] for r in s.rejected}
    expected = {}
    for h in hostile:
        if h.reasons:
            expected[h.reasons[0]] = expected.get(h.reasons[0], 0) + h.pings
    assert extra == expected
    assert s.matched == clean.stats.matched and s.traversals == clean.stats.traversals


# ------------------------------------------------------------------ property: junk never breaks the pipeline

_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=True),
                         st.text(max_size=12))
_field_value = st.one_of(_json_scalar, st.lists(_json_scalar, max_size=3),
                         st.floats(1.7e9, 1.8e9), st.floats(-91, 91), st.floats(-181, 181))
_ping_like = st.dictionaries(st.sampled_from(["device", "ts", "lat", "lon", "accuracy_m", "speed_mps",
                                              "heading_deg", "junk"]), _field_value, max_size=7)
_value = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda d: json.dumps(d).encode(), _ping_like),
    st.builds(lambda dev, ps: json.dumps({"device": dev, "pings": ps}).encode(),
              st.one_of(st.text(max_size=8), st.integers()), st.lists(_ping_like, max_size=6)),
    st.builds(lambda ps: json.dumps({"pings": ps}).encode(), st.one_of(_json_scalar, st.lists(_json_scalar, max_size=3))),
)
_message = st.tuples(st.one_of(st.none(), st.binary(max_size=8), st.sampled_from([b"dev-a", b"dev-b"])), _value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(junk=st.lists(_message, min_size=1, max_size=25), chunk=st.integers(1, 10))
def test_any_junk_is_dead_lettered_counted_and_accounted_for(kotka, junk, chunk) -> None:
    dead = []
    pipe = EmbeddedPipeline(kotka, SETTINGS, on_reject=dead.append)
    before = rejected_metric()
    for i in range(0, len(junk), chunk):
        pipe.process_messages(junk[i:i + chunk], now=1.75e9)  # never raises
    pipe.finish()
    s = pipe.stats
    assert s.received == accounted(s)
    originals = {v for _, v in junk}
    assert all(dl.original in originals and dl.rejections for dl in dead)
    assert all(r.reason in REJECT_REASONS for dl in dead for r in dl.rejections)
    after = rejected_metric()
    assert {r: after[r] - before[r] for r in REJECT_REASONS if after[r] != before[r]} == dict(s.rejected)
    assert s.dead_letters == len(dead)


# ------------------------------------------------------------------ files, maps


def test_malformed_ping_files_are_read_with_counted_rejections(kotka, tmp_path, capsys) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(
        "device,ts,lat,lon,speed_mps\n"
        "car-1,1715670000,60.4664,26.9458,10\n"
        "car-1,1715670005,NaN,26.9458,10\n"         # not_finite
        "car-1,1715670010,60.4664,east,10\n"        # bad_type
        "car-1,1715670015,60.4664,26.9458,10,extra\n"  # more cells than the header
        "car-1,not-a-time,60.4664,26.9458,10\n"     # bad_timestamp
        "\x00\x07,1715670020,60.4664,26.9458,10\n"  # bad_device
        "car-1,1715670025,99,26.9458,10\n"          # lat_out_of_range
        "car-1,1715670030,60.4665,26.9458,1e9\n"    # bad_speed
    )
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"device": "car-2", "ts": 1715670000, "lat": 60.4664, "lon": 26.9458}\n{broken\n[1]\n'
                     '{"device": "car-2", "pings": []}\n')
    out = tmp_path / "speeds.jsonl"
    assert main(["replay", "--pings", str(csv), "--embedded", "--out", str(out), "--map", "kotka", "--no-progress"]) == 0
    err = capsys.readouterr().err
    for reason in ("not_finite", "bad_type", "bad_timestamp", "bad_device", "lat_out_of_range", "bad_speed"):
        assert reason in err, err
    assert main(["replay", "--pings", str(jsonl), "--embedded", "--out", str(out), "--map", "kotka", "--no-progress"]) == 0
    err = capsys.readouterr().err
    for reason in ("malformed_json", "not_an_object", "empty_batch"):
        assert reason in err, err
    headerless = tmp_path / "headerless.csv"
    headerless.write_text("car-1,1715670000,60.4664,26.9458\n")
    assert main(["replay", "--pings", str(headerless), "--embedded", "--out", str(out), "--map", "kotka",
                 "--no-progress"]) == 2
    assert "header" in capsys.readouterr().err


@pytest.mark.parametrize("name, content", [
    ("missing.osm.pbf", None),
    ("garbage.osm.pbf", b"\x00\x01 this is not a protobuf" * 100),
    ("truncated.osm.pbf", "monaco-half"),
    ("empty.osm", b""),
    ("notosm.osm", b"<html><body>404 not found</body></html>"),
    ("broken.osm.gz", b"\x1f\x8b\x08\x00 not really gzip"),
])
def test_a_corrupt_or_missing_map_stops_the_worker_with_a_clear_error(tmp_path, capsys, name, content) -> None:
    from tests.conftest import shared_map

    path = tmp_path / name
    if content == "monaco-half":
        data = shared_map("monaco-2021.osm.pbf").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        path.write_bytes(content)
    t0 = time.monotonic()
    # the map loads before any broker is contacted: this needs no Kafka, and must not hang
    code = main(["worker", "--map", str(path), "--kafka", "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - t0 < 30
    assert str(path) in err and "Traceback" not in err
    assert any(w in err for w in ("no such map file", "not a readable OSM file", "empty", "no drivable roads")), err


def test_a_corrupt_network_cache_is_rebuilt(tmp_path) -> None:
    from geo import bundled_map, load_network

    cache = tmp_path / "cache"
    net = load_network(bundled_map("kotka"), cache=cache)
    files = list(cache.rglob("*.npz"))
    assert files, "the first load writes a cache file"
    for f in files:
        f.write_bytes(b"corrupt" * 10)
    again = load_network(bundled_map("kotka"), cache=cache)
    assert again.n_segments == net.n_segments
    assert (again.segment_ids == net.segment_ids).all()
