"""The feed server over real HTTP on a loopback port: snapshot, ETag, gzip, SSE resume, DATEX II,
bad parameters, auth, history, readiness, OpenAPI and metrics.

Records are built from the real Helsinki network's segments by :func:`make_records` (speeds set
directly as a share of each segment's free-flow prior; jam levels from ``congestion.quality``) —
a way to put chosen states into the store, not an estimator.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from congestion.quality import jam_level
from congestion.record import FIELD_NAMES, SegmentSpeed, sample_band
from streams.feed import BackgroundFeedServer
from streams.feed_store import FeedStore
from streams.settings import load_settings

T0 = 1_715_670_000.0  # event time of the first window, epoch seconds


# ---------------------------------------------------------------- helpers
def make_records(network, rows: np.ndarray, ratio: float | np.ndarray, window_end: float,
                 window_s: float = 300.0, status: str = "ok") -> list[SegmentSpeed]:
    """Records for network ``rows`` at ``ratio`` x their free-flow prior (``status`` ok), or
    no-speed records for ``status`` no_data/stale."""
    rows = np.asarray(rows, dtype=np.int64)
    ff = network.free_flow_prior_kmh[rows].astype(float)
    ratio = np.broadcast_to(np.asarray(ratio, dtype=float), rows.shape)
    speed = ff * ratio
    levels = jam_level(speed, ff)
    out = []
    for i, row in enumerate(rows.tolist()):
        length = float(network.length_m[row])
        ok = status == "ok"
        out.append(SegmentSpeed(
            segment_id=int(network.segment_ids[row]),
            osm_way_id=int(network.way_ids[row]),
            osm_start_node_id=int(network.start_node_ids[row]),
            osm_end_node_id=int(network.end_node_ids[row]),
            frc=int(network.frc[row]),
            length_m=length,
            speed_kmh=round(float(speed[i]), 2) if ok else None,
            speed_stddev_kmh=round(0.1 * float(speed[i]), 2) if ok else None,
            free_flow_speed_kmh=float(ff[i]),
            travel_time_s=round(length / (float(speed[i]) / 3.6), 2) if ok else None,
            free_flow_travel_time_s=round(length / (float(ff[i]) / 3.6), 2),
            jam_level=int(levels[i]) if ok else None,
            confidence=0.8 if ok else 0.0,
            sample_count=sample_band(4) if ok else None,
            status=status,
            window_start=window_end - window_s,
            window_end=window_end,
            published_at=window_end + 5.0,
        ))
    return out


def request(url: str, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One real HTTP request; returns (status, headers with lower-case names, raw body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def get_json(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    status, hdrs, body = request(url, path, headers)
    if hdrs.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    return status, hdrs, json.loads(body) if body else None


class SSEClient:
    """A minimal EventSource over http.client: yields (event, id, data) as they arrive."""

    def __init__(self, url: str, path: str = "/v1/stream", headers: dict[str, str] | None = None) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
        self.conn.request("GET", path, headers=headers or {})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}

    def events(self) -> Iterator[tuple[str, str, Any]]:
        event, event_id, data = "message", "", []
        while True:
            line = self.resp.fp.readline()
            if not line:
                return
            line = line.decode().rstrip("\n")
            if line == "":
                if data:
                    yield event, event_id, json.loads("\n".join(data))
                event, data = "message", []
            elif line.startswith(":"):
                continue
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "id":
                    event_id = value
                elif name == "data":
                    data.append(value)

    def next_event(self) -> tuple[str, str, Any]:
        return next(self.events())

    def close(self) -> None:
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def settings():
    return load_settings(environ={})


@pytest.fixture()
def server(helsinki, settings):
    store = FeedStore(helsinki, buffer_events=4)
    with BackgroundFeedServer(helsinki, settings, store=store, publish_interval_s=60.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def rows(helsinki):
    rng = np.random.default_rng(7)
    return np.sort(rng.choice(helsinki.n_segments, size=400, replace=False))


def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# ---------------------------------------------------------------- snapshot
def test_snapshot_is_geojson_with_contract_fields(server, helsinki, rows):
    ratios = np.linspace(0.1, 1.0, len(rows))
    records = make_records(helsinki, rows, ratios, T0)
    server.publish(records)
    status, hdrs, doc = get_json(server.url, "/v1/segments")
    assert status == 200
    assert hdrs["content-type"].startswith("application/geo+json")
    assert doc["type"] == "FeatureCollection"
    assert len(doc["features"]) == len(rows)
    by_id = {r.segment_id: r for r in records}
    for feature in doc["features"]:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "LineString"
        coords = feature["geometry"]["coordinates"]
        assert len(coords) >= 2
        props = feature["properties"]
        assert set(FIELD_NAMES) <= set(props)
        rec = by_id[props["segment_id"]]
        assert props["speed_kmh"] == pytest.approx(rec.speed_kmh)
        assert props["jam_level"] == rec.jam_level
        row = int(helsinki.index_of(rec.segment_id)[0])
        assert coords[0] == pytest.approx(helsinki.geometry_lonlat(row)[0].tolist(), abs=1e-5)
    # Every jam level appears: the ratios span free flow to standstill.
    assert {f["properties"]["jam_level"] for f in doc["features"]} == set(range(6))


def test_snapshot_filters(server, helsinki, rows):
    server.publish(make_records(helsinki, rows, np.linspace(0.1, 1.0, len(rows)), T0))
    lo = helsinki.node_lonlat.min(axis=0)
    hi = helsinki.node_lonlat.max(axis=0)
    mid = (lo + hi) / 2
    bbox = (lo[0], lo[1], mid[0], mid[1])
    status, _, doc = get_json(server.url, "/v1/segments?bbox=" + ",".join(f"{v:.6f}" for v in bbox))
    assert status == 200
    # Expected: rows whose vertex bounding box intersects the query box, from the network arrays.
    expected = set()
    for row in rows.tolist():
        g = helsinki.geometry_lonlat(row)
        if g[:, 0].max() >= bbox[0] and g[:, 0].min() <= bbox[2] and g[:, 1].max() >= bbox[1] and g[:, 1].min() <= bbox[3]:
            expected.add(int(helsinki.segment_ids[row]))
    got = {f["properties"]["segment_id"] for f in doc["features"]}
    assert got == expected and 0 < len(got) < len(rows)

    frcs = sorted(set(helsinki.frc[rows].tolist()))
    pick = frcs[:1]
    _, _, doc = get_json(server.url, f"/v1/segments?frc={','.join(map(str, pick))}")
    assert {f["properties"]["frc"] for f in doc["features"]} == set(pick)
    assert len(doc["features"]) == int(np.isin(helsinki.frc[rows], pick).sum())

    _, _, doc = get_json(server.url, "/v1/segments?min_jam_level=4")
    levels = [f["properties"]["jam_level"] for f in doc["features"]]
    assert levels and min(levels) >= 4
    _, _, all_doc = get_json(server.url, "/v1/segments")
    assert len(levels) == sum(f["properties"]["jam_level"] >= 4 for f in all_doc["features"])


def test_etag_not_modified_and_gzip(server, helsinki, rows):
    server.publish(make_records(helsinki, rows, 0.9, T0))
    status, hdrs, body = request(server.url, "/v1/segments", {"Accept-Encoding": "gzip"})
    assert status == 200
    assert hdrs["content-encoding"] == "gzip"
    assert "max-age" in hdrs["cache-control"] or "no-cache" in hdrs["cache-control"]
    etag = hdrs["etag"]
    plain_status, plain_hdrs, plain = request(server.url, "/v1/segments")
    assert plain_status == 200 and "content-encoding" not in plain_hdrs
    assert json.loads(gzip.decompress(body)) == json.loads(plain)
    assert len(body) < len(plain) / 3

    status, hdrs, body = request(server.url, "/v1/segments", {"If-None-Match": etag})
    assert status == 304 and body == b"" and hdrs["etag"] == etag
    # A different filter set is a different representation.
    status, _, _ = request(server.url, "/v1/segments?min_jam_level=1", {"If-None-Match": etag})
    assert status == 200
    # A new publication changes the ETag.
    server.publish(make_records(helsinki, rows[:10], 0.3, T0 + 60))
    status, hdrs, _ = request(server.url, "/v1/segments", {"If-None-Match": etag})
    assert status == 200 and hdrs["etag"] != etag


# ---------------------------------------------------------------- SSE
def test_sse_delivers_changes_and_resumes(server, helsinki, rows):
    server.publish(make_records(helsinki, rows, 0.9, T0))
    client = SSEClient(server.url)
    assert client.status == 200 and client.headers["content-type"].startswith("text/event-stream")
    events = client.events()
    kind, first_id, data = next(events)
    assert kind == "snapshot" and len(data["segments"]) == len(rows)

    # Only the segments whose values changed are sent; a window-only move is not.
    changed = rows[:25]
    server.publish(make_records(helsinki, rows[25:], 0.9, T0 + 60) + make_records(helsinki, changed, 0.3, T0 + 60))
    kind, id1, data = next(events)
    assert kind == "speeds" and id1 != first_id
    assert {s["segment_id"] for s in data["segments"]} == {int(helsinki.segment_ids[r]) for r in changed}
    assert all(s["jam_level"] == 3 or s["jam_level"] == 4 for s in data["segments"])
    client.close()
    _wait_for(lambda: server.store.n_subscribers == 0)

    # Missed while disconnected: two publications.
    server.publish(make_records(helsinki, rows[:5], 0.1, T0 + 120))
    server.publish(make_records(helsinki, rows[5:8], 0.5, T0 + 180))
    client = SSEClient(server.url, headers={"Last-Event-ID": id1})
    events = client.events()
    kind, id2, data = next(events)
    assert kind == "speeds" and len(data["segments"]) == 5
    kind, id3, data = next(events)
    assert kind == "speeds" and len(data["segments"]) == 3 and id3 != id2
    # ... and then live again.
    server.publish(make_records(helsinki, rows[8:9], 0.2, T0 + 240))
    kind, _, data = next(events)
    assert kind == "speeds" and [s["segment_id"] for s in data["segments"]] == [int(helsinki.segment_ids[rows[8]])]
    client.close()

    # Further behind than the buffer (4 events): a full snapshot instead.
    for k in range(6):
        server.publish(make_records(helsinki, rows[k:k + 1], 0.15 + 0.1 * k, T0 + 300 + 60 * k))
    client = SSEClient(server.url, f"/v1/stream?last_event_id={id1}")
    kind, _, data = client.next_event()
    assert kind == "snapshot" and len(data["segments"]) == len(rows)
    client.close()
    # An id of another server run is also answered with a snapshot.
    client = SSEClient(server.url, headers={"Last-Event-ID": "zzzzzz-3"})
    assert client.next_event()[0] == "snapshot"
    client.close()


def test_slow_subscriber_is_cut_off_and_can_resume(helsinki, rows):
    import asyncio

    store = FeedStore(helsinki, buffer_events=50, max_pending=3)

    async def scenario() -> None:
        store.bind_loop(asyncio.get_running_loop())
        sub = store.subscribe()
        for k in range(5):
            store.publish(make_records(helsinki, rows[k:k + 1], 0.2 + 0.1 * k, T0 + 60 * k))
        assert sub.overflowed
        assert await sub.queue.get() is None  # the stream handler closes; the client reconnects
        store.unsubscribe(sub)
        assert len(store.catch_up(f"{store.boot}-1")) == 4

    asyncio.run(scenario())


# ---------------------------------------------------------------- DATEX II
def test_datex2_parses(server, helsinki, rows):
    records = make_records(helsinki, rows, np.linspace(0.1, 1.0, len(rows)), T0)
    server.publish(records)
    status, hdrs, body = request(server.url, "/v1/datex2")
    assert status == 200 and "xml" in hdrs["content-type"]
    root = ET.fromstring(body)
    assert "datex2" in root.tag.lower() or "datex" in (root.tag.split("}")[0]).lower()
    text = body.decode()
    # Every published segment appears in the document.
    assert sum(str(r.segment_id) in text for r in records) == len(records)
    status, hdrs2, _ = request(server.url, "/v1/datex2", {"If-None-Match": hdrs["etag"]})
    assert status == 304
    status, _, small = request(server.url, "/v1/datex2?min_jam_level=5")
    assert status == 200 and len(small) < len(body)


# ---------------------------------------------------------------- errors, auth
@pytest.mark.parametrize("path", [
    "/v1/segments?bbox=1,2,3",
    "/v1/segments?bbox=a,b,c,d",
    "/v1/segments?bbox=25,60,24,61",
    "/v1/segments?bbox=0,0,200,1",
    "/v1/segments?bbox=nan,0,1,1",
    "/v1/segments?frc=x",
    "/v1/segments?frc=9",
    "/v1/segments?min_jam_level=6",
    "/v1/segments?min_jam_level=high",
    "/v1/segments?min_jam=3",
    "/v1/datex2?frc=-1",
    "/v1/stream?foo=1",
    "/v1/stream?min_jam_level=2",
    "/v1/segments/not-a-number",
    "/v1/segments/99999999999999999999",
])
def test_bad_parameters_are_400_json(server, helsinki, rows, path):
    server.publish(make_records(helsinki, rows, 0.5, T0))
    status, hdrs, doc = get_json(server.url, path)
    assert status == 400
    assert hdrs["content-type"].startswith("application/json")
    assert doc["error"] and doc["status"] == 400


def test_unknown_segment_404_and_methods_are_read_only(server, helsinki):
    status, _, doc = get_json(server.url, "/v1/segments/12345")
    assert status == 404 and "error" in doc
    status, hdrs, body = request(server.url, "/v1/segments", method="POST")
    assert status == 405 and json.loads(body)["error"]
    status, _, body = request(server.url, "/no/such/path")
    assert status == 404 and json.loads(body)["status"] == 404


def test_bearer_token_enforced(helsinki, settings, rows):
    import dataclasses

    secured = dataclasses.replace(settings, feed_token="s3cret-token")
    with BackgroundFeedServer(helsinki, secured, publish_interval_s=60.0) as srv:
        srv.publish(make_records(helsinki, rows, 0.5, T0))
        for path in ("/v1/segments", "/v1/datex2", "/v1/network", "/v1/stream",
                     f"/v1/segments/{int(helsinki.segment_ids[rows[0]])}"):
            status, hdrs, body = request(srv.url, path)
            assert status == 401, path
            assert hdrs["www-authenticate"].startswith("Bearer")
            assert json.loads(body)["error"]
            status, _, _ = request(srv.url, path, {"Authorization": "Bearer wrong"})
            assert status == 401
        status, hdrs, _ = request(srv.url, "/v1/segments", {"Authorization": "Bearer s3cret-token"})
        assert status == 200 and hdrs["cache-control"].startswith("private")
        status, _, _ = request(srv.url, "/v1/segments?access_token=s3cret-token")
        assert status == 200
        client = SSEClient(srv.url, "/v1/stream?access_token=s3cret-token")
        assert client.status == 200 and client.next_event()[0] == "snapshot"
        client.close()
        # Health, readiness and the page stay open (probes and the login-free page shell).
        assert request(srv.url, "/healthz")[0] == 200
        assert request(srv.url, "/readyz")[0] == 200
        assert request(srv.url, "/")[0] == 200


# ---------------------------------------------------------------- one segment, network, probes
def test_segment_detail_with_history(server, helsinki, rows):
    row = int(rows[3])
    sid = int(helsinki.segment_ids[row])
    # 90 minutes of 1-minute windows: 30 min free, 30 min jammed, 30 min free again.
    for k in range(90):
        ratio = 0.3 if 30 <= k < 60 else 0.95
        server.publish(make_records(helsinki, [row], ratio, T0 + 60 * k, window_s=60.0))
    status, _, doc = get_json(server.url, f"/v1/segments/{sid}")
    assert status == 200
    assert doc["segment_id"] == sid and doc["geometry"]["type"] == "LineString"
    assert doc["latest"]["window_end"] == T0 + 60 * 89 and doc["latest"]["jam_level"] == 0
    hist = doc["history"]
    # The last hour only: the first free-flow run is cut at the horizon.
    assert hist[0]["window_end"] >= T0 + 60 * 89 - 3600
    jammed = int(jam_level(30.0, 100.0))
    assert [h["jam_level"] for h in hist] == [0, jammed, 0]
    assert hist[1]["window_start"] == T0 + 60 * 29 and hist[1]["window_end"] == T0 + 60 * 59
    assert all(h["window_start"] < h["window_end"] for h in hist)


def test_network_layer(server, helsinki):
    status, hdrs, doc = get_json(server.url, "/v1/network", {"Accept-Encoding": "gzip"})
    assert status == 200 and hdrs["content-encoding"] == "gzip"
    assert len(doc["features"]) == helsinki.n_segments
    assert "OpenStreetMap" in doc["attribution"]
    assert "max-age=86400" in hdrs["cache-control"]
    assert request(server.url, "/v1/network", {"If-None-Match": hdrs["etag"]})[0] == 304


def test_readiness_follows_data(helsinki, settings, rows):
    now = [1000.0]
    store = FeedStore(helsinki, clock=lambda: now[0])
    with BackgroundFeedServer(helsinki, settings, store=store, publish_interval_s=2.0) as srv:
        assert request(srv.url, "/healthz")[0] == 200
        status, _, doc = get_json(srv.url, "/readyz")
        assert status == 503 and "no segment speeds" in doc["reason"]
        srv.publish(make_records(helsinki, rows, 0.5, T0))
        status, _, doc = get_json(srv.url, "/readyz")
        assert status == 200 and doc["segments_with_data"] == len(rows)
        now[0] += 60.0  # nothing published for a minute at a 2 s cadence
        status, _, doc = get_json(srv.url, "/readyz")
        assert status == 503 and "no segment speeds for" in doc["reason"]


def test_openapi_and_metrics(server, helsinki, rows):
    server.publish(make_records(helsinki, rows, np.linspace(0.1, 1.0, len(rows)), T0))
    status, _, doc = get_json(server.url, "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    for path in ("/v1/segments", "/v1/stream", "/v1/datex2", "/v1/segments/{segment_id}", "/healthz", "/readyz"):
        assert path in doc["paths"], path
    assert {p["name"] for p in doc["paths"]["/v1/segments"]["get"]["parameters"]} == {"bbox", "frc", "min_jam_level"}
    request(server.url, "/v1/segments")
    client = SSEClient(server.url)
    client.next_event()
    status, hdrs, body = request(server.url, "/metrics")
    text = body.decode()
    assert status == 200
    assert 'roadpulse_http_requests_total{code="200",handler="segments"}' in text
    clients = [line for line in text.splitlines() if line.startswith("roadpulse_feed_clients ")]
    assert clients and float(clients[0].split()[1]) >= 1
    jammed = [line for line in text.splitlines() if line.startswith('roadpulse_segments_by_jam_level{jam_level="5"}')]
    assert jammed and float(jammed[0].split()[1]) > 0
    client.close()


def test_store_ignores_late_older_windows_and_unknown_segments(helsinki, rows):
    store = FeedStore(helsinki)
    new = make_records(helsinki, rows[:3], 0.3, T0 + 60)
    old = make_records(helsinki, rows[:3], 0.9, T0)
    assert store.publish(new) == 3
    assert store.publish(old) == 0
    assert store.latest(new[0].segment_id).window_end == T0 + 60
    import dataclasses

    stranger = dataclasses.replace(new[0], segment_id=1)
    store.publish([stranger])
    assert store.rejected_unknown_segment == 1
