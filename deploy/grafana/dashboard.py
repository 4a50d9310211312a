"""The roadpulse Grafana dashboard, as code.

``python deploy/grafana/dashboard.py`` writes ``deploy/grafana/dashboards/roadpulse.json`` (the file
Grafana provisions); ``tests/test_deploy.py`` checks that the committed JSON is exactly what this
script generates, that it is a valid dashboard model, and ``tests/test_prometheus.py`` runs every
PromQL expression in it against a real Prometheus scraping a running roadpulse.

Plain Python and the standard library only: the model is small and stable (schemaVersion 39,
Grafana 10/11), so no generator library is needed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: uid of the Prometheus data source in ``provisioning/datasources/prometheus.yml``.
DATASOURCE_UID = "roadpulse-prometheus"
DASHBOARD_UID = "roadpulse-overview"
OUTPUT = Path(__file__).resolve().parent / "dashboards" / "roadpulse.json"

_DS = {"type": "prometheus", "uid": "${datasource}"}
_RATE = "$__rate_interval"
_JAM_COLOURS = {"0": "green", "1": "#b5d334", "2": "yellow", "3": "orange", "4": "red", "5": "dark-red"}


def _target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    return {
        "datasource": _DS,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "refId": ref,
        "range": not instant,
        "instant": instant,
    }


class _Layout:
    """Places panels left to right on Grafana's 24-column grid, and hands out panel ids."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {"type": "row", "id": self._id(), "title": title, "collapsed": False, "panels": [],
             "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}}
        )
        self.y += 1

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        self.y += self.row_height
        self.x = 0
        self.row_height = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def _timeseries(
    title: str,
    targets: list[dict[str, Any]],
    unit: str,
    description: str,
    stacking: str = "none",
    overrides: list[dict[str, Any]] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 60 if stacking != "none" else 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": stacking, "group": "A"},
        },
    }
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": _DS,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def _stat(title: str, target: dict[str, Any], unit: str, description: str,
          thresholds: list[tuple[float | None, str]], decimals: int | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "thresholds": {"mode": "absolute",
                       "steps": [{"color": colour, "value": value} for value, colour in thresholds]},
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": _DS,
        "targets": [target],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "area", "textMode": "auto"},
    }


def _jam_colour_overrides() -> list[dict[str, Any]]:
    return [
        {"matcher": {"id": "byName", "options": level},
         "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": colour}}]}
        for level, colour in _JAM_COLOURS.items()
    ]


def build_dashboard() -> dict[str, Any]:
    """The dashboard model (a dict ready for ``json.dump``)."""
    g = _Layout()

    g.row("Network congestion overview")
    g.add(_timeseries(
        "Share of segments by jam level",
        [_target("sum by (jam_level) (roadpulse_segments_by_jam_level)"
                 " / scalar(sum(roadpulse_segments_by_jam_level))", "{{jam_level}}")],
        "percentunit",
        "Of the segments with a fresh speed, the share at each jam level (0 free flow ... 5 standstill).",
        stacking="normal", overrides=_jam_colour_overrides(), minimum=0, maximum=1,
    ), w=12, h=9)
    g.add(_timeseries(
        "Mean speed by road class",
        [_target("max by (frc) (roadpulse_segment_speed_mean_kmh)", "frc {{frc}}")],
        "velocitykmh",
        "Space-mean speed over the fresh segments of each functional road class "
        "(0 motorway ... 7 service), length-weighted harmonic mean.",
        minimum=0,
    ), w=12, h=9)
    g.add(_stat(
        "Network with fresh data",
        _target("max(roadpulse_network_fresh_ratio)", "fresh"),
        "percentunit", "Share of all directed segments that have a fresh (status ok) speed right now.",
        [(None, "red"), (0.05, "orange"), (0.2, "green")],
    ), w=6, h=5)
    g.add(_stat(
        "Segments jammed (level 4-5)",
        _target('sum(roadpulse_segments_by_jam_level{jam_level=~"4|5"})', "jammed"),
        "short", "Fresh segments at jam level 4 (heavy) or 5 (standstill).",
        [(None, "green"), (10, "orange"), (50, "red")], decimals=0,
    ), w=6, h=5)
    g.add(_stat(
        "Age of the latest publication",
        _target("time() - max(roadpulse_last_publication_timestamp_seconds)", "age"),
        "s", "Seconds since segment speeds were last published (huge: never published yet).",
        [(None, "green"), (120, "orange"), (300, "red")], decimals=0,
    ), w=6, h=5)
    g.add(_timeseries(
        "Segment speeds published by jam level",
        [_target(f"sum by (jam_level) (rate(roadpulse_segments_published_total[{_RATE}]))", "{{jam_level}}")],
        "ops", "Segment speeds with status ok published per second, by jam level.",
        stacking="normal", overrides=_jam_colour_overrides(),
    ), w=6, h=5)

    g.row("Data health")
    g.add(_timeseries(
        "Pings per second",
        [_target(f"sum(rate(roadpulse_pings_received_total[{_RATE}]))", "received", "A"),
         _target(f"sum(rate(roadpulse_pings_rejected_total[{_RATE}]))", "rejected", "B"),
         _target(f"sum(rate(roadpulse_pings_matched_total[{_RATE}]))", "matched", "C")],
        "ops", "Pings received at ingest, rejected by validation, and placed on a road by the matcher.",
    ), w=8, h=8)
    g.add(_timeseries(
        "Rejections by reason",
        [_target(f"sum by (reason) (rate(roadpulse_pings_rejected_total[{_RATE}]))", "{{reason}}")],
        "ops", "Rejected pings per second by reason (dead-lettered to roadpulse.pings.rejected).",
        stacking="normal",
    ), w=8, h=8)
    g.add(_timeseries(
        "Rejection rate and match rate",
        [_target(f"sum(rate(roadpulse_pings_rejected_total[{_RATE}]))"
                 f" / sum(rate(roadpulse_pings_received_total[{_RATE}]))", "rejected / received", "A"),
         _target(f"sum(rate(roadpulse_pings_matched_total[{_RATE}]))"
                 f" / (sum(rate(roadpulse_pings_matched_total[{_RATE}]))"
                 f" + sum(rate(roadpulse_pings_unmatched_total[{_RATE}])))", "matched / valid", "B")],
        "percentunit", "Share of received pings rejected; share of valid pings the matcher used.",
        minimum=0, maximum=1,
    ), w=8, h=8)
    g.add(_timeseries(
        "Unmatched pings by reason",
        [_target(f"sum by (reason) (rate(roadpulse_pings_unmatched_total[{_RATE}]))", "{{reason}}")],
        "ops", "Valid pings the matcher did not use, per second, by reason.",
        stacking="normal",
    ), w=8, h=8)
    g.add(_timeseries(
        "Event-time lag and watermark lag",
        [_target(f"histogram_quantile(0.5, sum by (le) (rate(roadpulse_event_time_lag_seconds_bucket[{_RATE}])))",
                 "event-time lag p50", "A"),
         _target(f"histogram_quantile(0.95, sum by (le) (rate(roadpulse_event_time_lag_seconds_bucket[{_RATE}])))",
                 "event-time lag p95", "B"),
         _target("max(roadpulse_watermark_lag_seconds)", "watermark lag", "C")],
        "s", "Event-time lag: wall clock at publication minus the window end of each published speed. "
        "Watermark lag: newest event time seen minus the watermark that closes windows.",
    ), w=8, h=8)
    g.add(_timeseries(
        "Coverage",
        [_target("max(roadpulse_network_fresh_ratio)", "segments with fresh data")],
        "percentunit", "Share of the network's segments with a fresh speed over time.",
        minimum=0,
    ), w=8, h=8)

    g.row("Pipeline health")
    g.add(_timeseries(
        "Throughput",
        [_target(f"sum(rate(roadpulse_pings_matched_total[{_RATE}]))"
                 f" + sum(rate(roadpulse_pings_unmatched_total[{_RATE}]))", "pings through the matcher", "A"),
         _target(f"sum(rate(roadpulse_traversals_emitted_total[{_RATE}]))", "traversals emitted", "B"),
         _target(f"sum(rate(roadpulse_segments_published_total[{_RATE}]))", "segment speeds published", "C")],
        "ops", "Records per second through each stage.",
    ), w=8, h=8)
    g.add(_timeseries(
        "Match latency per batch",
        [_target(f"histogram_quantile(0.5, sum by (le) (rate(roadpulse_match_latency_seconds_bucket[{_RATE}])))",
                 "p50", "A"),
         _target(f"histogram_quantile(0.99, sum by (le) (rate(roadpulse_match_latency_seconds_bucket[{_RATE}])))",
                 "p99", "B")],
        "s", "Wall time to map-match one batch of pings.",
    ), w=8, h=8)
    g.add(_timeseries(
        "Consumer lag by topic",
        [_target("sum by (topic) (roadpulse_consumer_lag_messages)", "{{topic}}")],
        "short", "Messages waiting to be consumed, summed over all workers, per topic.",
    ), w=8, h=8)
    g.add(_timeseries(
        "HTTP requests by handler and code",
        [_target(f"sum by (handler, code) (rate(roadpulse_http_requests_total[{_RATE}]))", "{{handler}} {{code}}")],
        "reqps", "Feed server requests per second, by route and status code.",
    ), w=8, h=8)
    g.add(_timeseries(
        "HTTP latency p95 by handler",
        [_target("histogram_quantile(0.95, sum by (le, handler) "
                 f"(rate(roadpulse_http_request_duration_seconds_bucket[{_RATE}])))", "{{handler}}")],
        "s", "95th percentile time to serve a request (for /v1/stream: the connection's lifetime).",
    ), w=8, h=8)
    g.add(_timeseries(
        "Live feed clients",
        [_target("sum(roadpulse_feed_clients)", "SSE clients")],
        "short", "Clients connected to the Server-Sent Events stream.", minimum=0,
    ), w=8, h=8)
    g.add(_stat(
        "Workers up",
        _target('count(up{job="roadpulse-worker"} == 1)', "workers"),
        "short", "roadpulse worker processes Prometheus scrapes successfully.",
        [(None, "red"), (1, "green")], decimals=0,
    ), w=6, h=6)
    g.add(_timeseries(
        "Resident memory by process",
        [_target('process_resident_memory_bytes{job=~"roadpulse-.*"}', "{{job}} {{instance}}")],
        "bytes", "Resident set size of each roadpulse process.", minimum=0,
    ), w=9, h=6)
    g.add({
        "type": "table",
        "title": "Build info",
        "description": "Version and map of every roadpulse process.",
        "datasource": _DS,
        "targets": [_target("max by (job, instance, version, map) (roadpulse_build_info)", instant=True)],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
        "transformations": [{"id": "labelsToFields", "options": {}},
                            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}],
    }, w=9, h=6)

    return {
        "uid": DASHBOARD_UID,
        "title": "roadpulse",
        "description": "Live road-network congestion, data health and pipeline health of roadpulse.",
        "tags": ["roadpulse", "traffic"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [{
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {"selected": True, "text": "Prometheus", "value": DATASOURCE_UID},
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "options": [],
        }]},
        "panels": g.panels,
    }


def render() -> str:
    """The dashboard as the JSON text committed in ``dashboards/roadpulse.json``."""
    return json.dumps(build_dashboard(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0]) if argv else OUTPUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
