"""streams.metrics: names and types, pre-initialised series, the publication and network helpers,
the aiohttp middleware and /metrics handler over real HTTP, the worker metrics server, and the
privacy rule that label values come from bounded enums only."""

from __future__ import annotations

import asyncio
import math
import urllib.request

import numpy as np
import pytest
from aiohttp import ClientSession, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from congestion.quality import jam_level
from congestion.record import SegmentSpeed, sample_band
from geo.pings import REJECT_REASONS, PingRejected, parse_ping
from streams import metrics

EXPECTED = {
    "PINGS_RECEIVED": ("roadpulse_pings_received", "counter", ()),
    "PINGS_REJECTED": ("roadpulse_pings_rejected", "counter", ("reason",)),
    "PINGS_MATCHED": ("roadpulse_pings_matched", "counter", ()),
    "PINGS_UNMATCHED": ("roadpulse_pings_unmatched", "counter", ("reason",)),
    "TRAVERSALS_EMITTED": ("roadpulse_traversals_emitted", "counter", ()),
    "MATCH_LATENCY": ("roadpulse_match_latency_seconds", "histogram", ()),
    "EVENT_TIME_LAG": ("roadpulse_event_time_lag_seconds", "histogram", ()),
    "WATERMARK_LAG": ("roadpulse_watermark_lag_seconds", "gauge", ()),
    "SEGMENTS_PUBLISHED": ("roadpulse_segments_published", "counter", ("jam_level", "frc")),
    "NETWORK_FRESH_RATIO": ("roadpulse_network_fresh_ratio", "gauge", ()),
    "FEED_CLIENTS": ("roadpulse_feed_clients", "gauge", ()),
    "HTTP_REQUESTS": ("roadpulse_http_requests", "counter", ("handler", "code")),
    "HTTP_LATENCY": ("roadpulse_http_request_duration_seconds", "histogram", ("handler",)),
    "CONSUMER_LAG": ("roadpulse_consumer_lag_messages", "gauge", ("topic",)),
    "BUILD_INFO": ("roadpulse_build", "info", ()),
}


def scrape() -> dict[str, list]:
    """The default registry as Prometheus would parse it: family name -> samples."""
    text = metrics.metrics_text().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    hits = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


def records_from_network(network, rows: np.ndarray, ratio: float, window_end: float, status: str = "ok"):
    """Real contract records for network rows at ``ratio`` x free flow (no estimator involved)."""
    out = []
    for row in rows.tolist():
        ff = float(network.free_flow_prior_kmh[row])
        speed = ff * ratio
        ok = status == "ok"
        length = float(network.length_m[row])
        out.append(SegmentSpeed(
            segment_id=int(network.segment_ids[row]), osm_way_id=int(network.way_ids[row]),
            osm_start_node_id=int(network.start_node_ids[row]), osm_end_node_id=int(network.end_node_ids[row]),
            frc=int(network.frc[row]), length_m=length,
            speed_kmh=speed if ok else None, speed_stddev_kmh=1.0 if ok else None, free_flow_speed_kmh=ff,
            travel_time_s=length / (speed / 3.6) if ok else None, free_flow_travel_time_s=length / (ff / 3.6),
            jam_level=int(jam_level(speed, ff)) if ok else None, confidence=0.8 if ok else 0.0,
            sample_count=sample_band(4) if ok else None, status=status,
            window_start=window_end - 300.0, window_end=window_end, published_at=window_end + 5.0,
        ))
    return out


def test_names_types_and_label_names_follow_the_contract():
    families = {f.name: f for f in metrics.REGISTRY.collect()}
    for attr, (name, typ, labels) in EXPECTED.items():
        obj = getattr(metrics, attr)
        assert obj._name == name, attr
        assert obj._type == typ, attr
        assert tuple(obj._labelnames) == labels, attr
        assert name in families, name
    for family in families.values():
        if family.name.startswith("roadpulse_"):
            for sample in family.samples:
                assert set(sample.labels) - {"le"} <= metrics.ALLOWED_LABELS, sample
    # base units and conventions as exposed
    text = metrics.metrics_text().decode()
    assert "roadpulse_pings_received_total " in text
    assert "# TYPE roadpulse_match_latency_seconds histogram" in text
    assert "roadpulse_pings_received_created" not in text  # _created series are disabled


def test_bounded_label_sets_exist_before_the_first_event():
    samples = scrape()
    rejected = {s.labels["reason"] for s in samples["roadpulse_pings_rejected"] if s.name.endswith("_total")}
    assert rejected == set(REJECT_REASONS)
    unmatched = {s.labels["reason"] for s in samples["roadpulse_pings_unmatched"] if s.name.endswith("_total")}
    assert unmatched == set(metrics.UNMATCHED_REASONS)
    published = {(s.labels["jam_level"], s.labels["frc"]) for s in samples["roadpulse_segments_published"]
                 if s.name.endswith("_total")}
    assert published == {(str(j), str(f)) for j in range(6) for f in range(8)}
    assert {s.labels["jam_level"] for s in samples["roadpulse_segments_by_jam_level"]} == {str(j) for j in range(6)}
    assert {s.labels["frc"] for s in samples["roadpulse_segment_speed_mean_kmh"]} == {str(f) for f in range(8)}
    metrics.init_label_values(topics=["roadpulse.pings", "roadpulse.traversals"])
    lag_topics = {s.labels["topic"] for s in scrape()["roadpulse_consumer_lag_messages"]}
    assert {"roadpulse.pings", "roadpulse.traversals"} <= lag_topics


def test_rejections_from_the_real_validator_land_under_their_reason():
    bad = [
        {"device": "d1", "ts": 1_715_670_000, "lat": 95.0, "lon": 24.9},
        {"device": "d1", "ts": "yesterday", "lat": 60.1, "lon": 24.9},
        {"device": "d1", "ts": 1_715_670_000, "lat": 60.1, "lon": 24.9, "speed_mps": -3},
    ]
    before = scrape()["roadpulse_pings_rejected"]
    reasons = []
    for raw in bad:
        metrics.PINGS_RECEIVED.inc()
        try:
            parse_ping(raw)
        except PingRejected as exc:
            metrics.PINGS_REJECTED.labels(reason=exc.reason).inc()
            reasons.append(exc.reason)
    after = scrape()["roadpulse_pings_rejected"]
    assert reasons == ["lat_out_of_range", "bad_timestamp", "bad_speed"]
    for reason in set(reasons):
        delta = value(after, "roadpulse_pings_rejected_total", reason=reason) - value(
            before, "roadpulse_pings_rejected_total", reason=reason)
        assert delta == reasons.count(reason)


def test_record_published_counts_ok_speeds_by_level_and_class(helsinki):
    rows = np.arange(0, 400, 7)
    now = 1_715_670_400.0
    ok = records_from_network(helsinki, rows, 0.3, window_end=now - 90.0)
    gone = records_from_network(helsinki, rows[:5], 1.0, window_end=now - 90.0, status="stale")
    before = scrape()
    n = metrics.record_published(ok + gone, now=now)
    after = scrape()
    assert n == len(ok) + len(gone)
    expected: dict[tuple[str, str], int] = {}
    for r in ok:
        key = (str(r.jam_level), str(r.frc))
        expected[key] = expected.get(key, 0) + 1
    assert len(expected) >= 2  # several classes: the test could see a wrong label
    for (level, frc), count in expected.items():
        delta = value(after["roadpulse_segments_published"], "roadpulse_segments_published_total",
                      jam_level=level, frc=frc) - value(before["roadpulse_segments_published"],
                                                        "roadpulse_segments_published_total", jam_level=level, frc=frc)
        assert delta == count
    lag = after["roadpulse_event_time_lag_seconds"]
    lag_before = before["roadpulse_event_time_lag_seconds"]
    assert value(lag, "roadpulse_event_time_lag_seconds_count") - value(
        lag_before, "roadpulse_event_time_lag_seconds_count") == len(ok) + len(gone)
    assert value(lag, "roadpulse_event_time_lag_seconds_sum") - value(
        lag_before, "roadpulse_event_time_lag_seconds_sum") == pytest.approx(90.0 * n)
    assert value(after["roadpulse_last_publication_timestamp_seconds"],
                 "roadpulse_last_publication_timestamp_seconds") == now


def test_observe_network_share_levels_and_space_mean_speed(helsinki):
    rows = np.arange(helsinki.n_segments)[:300]
    slow = records_from_network(helsinki, rows[:100], 0.25, window_end=1e9)
    fast = records_from_network(helsinki, rows[100:200], 0.9, window_end=1e9)
    none = records_from_network(helsinki, rows[200:], 1.0, window_end=1e9, status="no_data")
    records = slow + fast + none
    metrics.observe_network(records, helsinki.n_segments)
    s = scrape()
    assert value(s["roadpulse_network_fresh_ratio"], "roadpulse_network_fresh_ratio") == pytest.approx(
        200 / helsinki.n_segments)
    for level in range(6):
        want = sum(1 for r in slow + fast if r.jam_level == level)
        assert value(s["roadpulse_segments_by_jam_level"], "roadpulse_segments_by_jam_level",
                     jam_level=str(level)) == want
    for frc in range(8):
        mine = [r for r in slow + fast if r.frc == frc]
        got = value(s["roadpulse_segment_speed_mean_kmh"], "roadpulse_segment_speed_mean_kmh", frc=str(frc))
        if not mine:
            assert math.isnan(got)
            continue
        # space-mean speed: total length over total time, not the mean of the speeds
        want = sum(r.length_m for r in mine) / sum(r.length_m / r.speed_kmh for r in mine)
        assert got == pytest.approx(want)
    # the array form gives the same answer
    ok = np.array([r.status == "ok" for r in records])
    col = lambda name: np.array([np.nan if getattr(r, name) is None else getattr(r, name) for r in records], float)
    metrics.observe_network_arrays(ok, col("jam_level"), col("frc"), col("speed_kmh"), col("length_m"),
                                   helsinki.n_segments)
    again = [x.value for x in scrape()["roadpulse_segment_speed_mean_kmh"]]
    np.testing.assert_allclose(again, [x.value for x in s["roadpulse_segment_speed_mean_kmh"]])  # NaN == NaN here


def test_http_middleware_labels_routes_not_paths_and_serves_metrics():
    async def scenario() -> tuple[str, list[str]]:
        async def segment(request: web.Request) -> web.Response:
            if request.match_info["segment_id"] == "0":
                raise web.HTTPNotFound(text="no such segment")
            return web.json_response({"id": request.match_info["segment_id"]})

        app = web.Application(middlewares=[metrics.http_metrics_middleware()])
        app.router.add_get("/v1/segments/{segment_id}", segment, name="segment")
        app.router.add_get("/metrics", metrics.metrics_app_handler(), name="metrics")
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        statuses = []
        try:
            async with ClientSession() as http:
                for path in ("/v1/segments/4503599627370495", "/v1/segments/24.9384,60.1699",
                             "/v1/segments/0", "/wp-login.php?u=1234567"):
                    async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
                        statuses.append(str(resp.status))
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Type"].startswith("text/plain")
                    body = await resp.text()
        finally:
            await runner.cleanup()
        return body, statuses

    before = scrape()["roadpulse_http_requests"]
    body, statuses = asyncio.run(scenario())
    assert statuses == ["200", "200", "404", "404"]
    after = {f.name: f.samples for f in text_string_to_metric_families(body)}["roadpulse_http_requests"]

    def delta(handler: str, code: str) -> float:
        old = [s.value for s in before if s.labels == {"handler": handler, "code": code}]
        return value(after, "roadpulse_http_requests_total", handler=handler, code=code) - (old[0] if old else 0)

    assert delta("segment", "200") == 2
    assert delta("segment", "404") == 1
    assert delta("unmatched", "404") == 1
    assert "4503599627370495" not in body and "24.9384" not in body and "wp-login" not in body
    assert metrics.unbounded_label_values() == []


def test_worker_metrics_server_serves_the_registry():
    metrics.set_build_info("9.9.9", "/somewhere/private/liechtenstein-2024.osm.pbf")
    server = metrics.start_metrics_server(0, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        metrics.set_build_info()
    assert 'roadpulse_build_info{map="liechtenstein-2024",version="9.9.9"} 1.0' in text
    assert "/somewhere/private" not in text
    assert "roadpulse_pings_received_total" in text


def test_privacy_checker_flags_ids_and_coordinates_in_labels():
    assert metrics.unbounded_label_values() == []
    registry = CollectorRegistry()
    Counter("roadpulse_leaky_total", "per-device counter: forbidden", ["device"], registry=registry).labels(
        device="a1b2c3").inc()
    Gauge("roadpulse_leaky_speed_kmh", "per-segment gauge: forbidden", ["handler"], registry=registry).labels(
        handler="/v1/segments/4503599627370495").set(1)
    Histogram("roadpulse_leaky_seconds", "unknown reason", ["reason"], registry=registry).labels(
        reason="lat=60.17").observe(1)
    Counter("roadpulse_ok_total", "fine", ["reason", "frc"], registry=registry).labels(
        reason="no_candidate", frc="3").inc()
    problems = metrics.unbounded_label_values(registry)
    assert any("device" in p for p in problems)
    assert any("4503599627370495" in p for p in problems)
    assert any("lat=60.17" in p for p in problems)
    assert not any("roadpulse_ok_total" in p for p in problems)


def test_ingest_counters_equal_the_operator_ledger(kotka):
    """The operator adds its counts to the metrics once per batch; after each batch (and at the end of
    input) the metric deltas equal the ledger's, reason by reason."""
    import json

    from simulator.config import SimulationConfig
    from simulator.day import simulate_day
    from streams.operators import IngestMatch
    from streams.settings import Settings

    sim = simulate_day(kotka, SimulationConfig(hours=0.5, start_s=8 * 3600, seed=5, probe_share=0.2))
    messages = [(d.encode(), json.dumps({"device": d, "pings": [p.to_dict() for p in ps]}).encode())
                for d, ps in sim.ping_batches()]
    op = IngestMatch(kotka, Settings(map="kotka"), 0)

    def counts() -> dict:
        s = scrape()
        out = {"matched": value(s["roadpulse_pings_matched"], "roadpulse_pings_matched_total"),
               "traversals": value(s["roadpulse_traversals_emitted"], "roadpulse_traversals_emitted_total")}
        for r in metrics.UNMATCHED_REASONS:
            out[r] = value(s["roadpulse_pings_unmatched"], "roadpulse_pings_unmatched_total", reason=r)
        return out

    before = counts()
    for i in range(0, len(messages), 100):
        op.process_messages(messages[i:i + 100])
        after = counts()
        assert after["matched"] - before["matched"] == op.stats.matched
        assert after["traversals"] - before["traversals"] == op.stats.traversals
    op.finish()
    after = counts()
    assert op.stats.matched > 0 and op.stats.traversals > 0 and sum(op.stats.unmatched.values()) > 0
    assert after["traversals"] - before["traversals"] == op.stats.traversals
    for r in metrics.UNMATCHED_REASONS:
        assert after[r] - before[r] == op.stats.unmatched.get(r, 0), r
