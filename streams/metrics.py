"""Prometheus metrics of roadpulse: one module-level object per metric, and the helpers to serve them.

Every process (Faust worker, embedded pipeline, feed server) imports this module and updates the
objects below from its real code paths; ``/metrics`` serves them in the Prometheus text format.

Naming follows Prometheus conventions: ``roadpulse_`` prefix, base units in the name (seconds,
km/h, messages), ``_total`` for counters, histograms for latencies. Labels come only from bounded
enums -- reject reason, unmatched reason, road class (``frc`` 0-7), jam level (0-5), Kafka topic,
HTTP handler (the route pattern, never the concrete path) and HTTP status code -- so a city-sized
network or a million devices never becomes a million series, and no device id, segment id or
coordinate ever reaches a label (privacy). :func:`unbounded_label_values` checks that.

Which process sets what
-----------------------
=================================  ===========================================================
ingest / match (worker)             ``PINGS_RECEIVED``, ``PINGS_REJECTED{reason}``, ``PINGS_MATCHED``,
                                    ``PINGS_UNMATCHED{reason}``, ``TRAVERSALS_EMITTED``,
                                    ``MATCH_LATENCY``, ``CONSUMER_LAG{topic}``
aggregate (worker)                  ``WATERMARK_LAG``; :func:`record_published` for every batch of
                                    segment speeds published (``SEGMENTS_PUBLISHED``,
                                    ``EVENT_TIME_LAG``, ``LAST_PUBLICATION``)
feed server                         :func:`observe_network` (or ``observe_network_arrays``) on its state
                                    (``NETWORK_FRESH_RATIO``, ``SEGMENTS_BY_JAM_LEVEL``,
                                    ``SEGMENT_SPEED_MEAN``); ``FEED_CLIENTS``;
                                    :func:`http_metrics_middleware` (``HTTP_REQUESTS``,
                                    ``HTTP_LATENCY``); :func:`metrics_app_handler` at ``/metrics``
every process                       :func:`set_build_info` once at start
=================================  ===========================================================

The embedded pipeline is all of these in one process; there, ``CONSUMER_LAG{topic}`` is the
backlog of the in-process queue that stands in for that topic.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import numpy as np
import prometheus_client
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from geo.pings import REJECT_REASONS

# ``_created`` samples double every counter/histogram series and no dashboard or alert uses them.
prometheus_client.disable_created_metrics()

#: Why a valid ping did not become part of a traversal. Bounded: used as a metric label.
#: (The pipeline maps :data:`geo.matcher.DROP_REASONS` onto these; trip splits are not pings.)
UNMATCHED_REASONS: tuple[str, ...] = (
    "no_candidate",  # no road segment within the search radius
    "no_route",  # no feasible path from the previous match (HMM break)
    "trip_trim",  # inside the privacy-trimmed start/end stretch of a trip
    "stationary",  # repeats the previous ping: adds no information
    "late",  # older than the newest ping already matched for its device, or than the trip-expiry horizon
)
#: Jam levels of a segment speed: 0 free flow ... 5 standstill.
JAM_LEVELS: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
#: Functional road classes: 0 motorway ... 7 service (see :data:`geo.roads.FRC_BY_HIGHWAY`).
FRCS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)

#: Every label name a roadpulse metric may carry.
ALLOWED_LABELS: frozenset[str] = frozenset(
    {"reason", "frc", "jam_level", "topic", "handler", "code", "version", "map"}
)

# Buckets sized so that labels x buckets stays well under 50 series per metric.
_MATCH_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_EVENT_LAG_BUCKETS_S = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 21600, 86400)
_HTTP_BUCKETS_S = (0.005, 0.025, 0.1, 0.5, 2.5, 10.0)

PINGS_RECEIVED = Counter(
    "roadpulse_pings_received_total", "Pings received at ingest, valid or not (one per ping, not per batch)."
)
PINGS_REJECTED = Counter(
    "roadpulse_pings_rejected_total", "Pings rejected by validation and dead-lettered, by reason.", ["reason"]
)
PINGS_MATCHED = Counter(
    "roadpulse_pings_matched_total", "Valid pings the map matcher placed on a road segment."
)
PINGS_UNMATCHED = Counter(
    "roadpulse_pings_unmatched_total", "Valid pings the map matcher did not use, by reason.", ["reason"]
)
TRAVERSALS_EMITTED = Counter(
    "roadpulse_traversals_emitted_total", "Segment traversals emitted by the map matcher."
)
MATCH_LATENCY = Histogram(
    "roadpulse_match_latency_seconds",
    "Wall time to map-match one batch of pings, seconds.",
    buckets=_MATCH_BUCKETS_S,
)
EVENT_TIME_LAG = Histogram(
    "roadpulse_event_time_lag_seconds",
    "Wall clock at publication minus the event time (window end) of each segment speed, seconds.",
    buckets=_EVENT_LAG_BUCKETS_S,
)
WATERMARK_LAG = Gauge(
    "roadpulse_watermark_lag_seconds",
    "Newest event time seen minus the event-time watermark that closes windows, seconds.",
)
SEGMENTS_PUBLISHED = Counter(
    "roadpulse_segments_published_total",
    "Segment speeds published with status ok, by jam level and functional road class.",
    ["jam_level", "frc"],
)
LAST_PUBLICATION = Gauge(
    "roadpulse_last_publication_timestamp_seconds",
    "Wall clock (Unix time) of the latest publication of segment speeds, seconds; 0 before the first.",
)
NETWORK_FRESH_RATIO = Gauge(
    "roadpulse_network_fresh_ratio",
    "Share of the network's segments that have a fresh speed (status ok), 0-1.",
)
SEGMENTS_BY_JAM_LEVEL = Gauge(
    "roadpulse_segments_by_jam_level",
    "Segments whose current fresh speed has this jam level.",
    ["jam_level"],
)
SEGMENT_SPEED_MEAN = Gauge(
    "roadpulse_segment_speed_mean_kmh",
    "Space-mean speed over all fresh segments of a road class (length-weighted harmonic mean), km/h; "
    "NaN when the class has no fresh segment.",
    ["frc"],
)
FEED_CLIENTS = Gauge("roadpulse_feed_clients", "Clients connected to the live feed (Server-Sent Events).")
HTTP_REQUESTS = Counter(
    "roadpulse_http_requests_total", "HTTP requests served, by route and status code.", ["handler", "code"]
)
HTTP_LATENCY = Histogram(
    "roadpulse_http_request_duration_seconds",
    "Time to serve an HTTP request (for streams: the connection's lifetime), seconds.",
    ["handler"],
    buckets=_HTTP_BUCKETS_S,
)
CONSUMER_LAG = Gauge(
    "roadpulse_consumer_lag_messages",
    "Messages waiting to be consumed, summed over this process's partitions, by topic.",
    ["topic"],
)
BUILD_INFO = Info("roadpulse_build", "roadpulse version and the map this process serves (value is 1).")


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("roadpulse")
    except Exception:  # not installed (source checkout on sys.path)
        return "0+unknown"


def map_label(map_name: str | os.PathLike[str]) -> str:
    """The ``map`` label for a bundled map name or an OSM file path: the file name without suffixes.

    A path's directories are left out so that no local file layout ends up in metrics.
    """
    name = os.path.basename(os.fspath(map_name)) or "unknown"
    for suffix in (".bz2", ".gz", ".pbf", ".osm", ".npz"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def set_build_info(version: str | None = None, map_name: str | os.PathLike[str] = "unknown") -> None:
    """Set ``roadpulse_build_info{version, map} 1``.

    Parameters
    ----------
    version
        Version string; ``None`` takes the installed package's version.
    map_name
        Bundled map name or OSM file path (reduced with :func:`map_label`).
    """
    BUILD_INFO.info({"version": version or _package_version(), "map": map_label(map_name)})


def init_label_values(topics: Iterable[str] = ()) -> None:
    """Create every series of the bounded label sets, so PromQL has data before the first event.

    Counters start at 0 for every reject/unmatched reason and every (jam level, frc) pair, the
    jam-level gauge at 0 (the mean speed per class starts at NaN, no data, at import). Called at
    import for the static enums; safe to call again: it never changes a value that is set.

    Parameters
    ----------
    topics
        Kafka topics whose consumer lag this process reports (``CONSUMER_LAG{topic}``); a topic
        seen for the first time starts at 0.
    """
    for reason in REJECT_REASONS:
        PINGS_REJECTED.labels(reason=reason)
    for reason in UNMATCHED_REASONS:
        PINGS_UNMATCHED.labels(reason=reason)
    for level in JAM_LEVELS:
        SEGMENTS_BY_JAM_LEVEL.labels(jam_level=str(level))
        for frc in FRCS:
            SEGMENTS_PUBLISHED.labels(jam_level=str(level), frc=str(frc))
    for topic in topics:
        CONSUMER_LAG.labels(topic=topic)


def _field(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def record_published(records: Iterable[Any], now: float | None = None) -> int:
    """Count one publication of segment speeds.

    Increments ``SEGMENTS_PUBLISHED{jam_level, frc}`` for each record with status ``ok``,
    observes ``EVENT_TIME_LAG`` (``now - window_end``) for every record, and sets
    ``LAST_PUBLICATION`` to ``now``.

    Parameters
    ----------
    records
        Segment-speed records (mappings or objects) with ``status``, ``jam_level``, ``frc`` and
        ``window_end`` (event time, epoch seconds) as in the feed contract.
    now
        Wall clock, epoch seconds (default: ``time.time()``).

    Returns
    -------
    int
        Number of records seen.
    """
    now = time.time() if now is None else now
    counts: dict[tuple[str, str], int] = {}
    n = 0
    for rec in records:
        n += 1
        window_end = _field(rec, "window_end")
        if window_end is not None:
            EVENT_TIME_LAG.observe(max(0.0, now - float(window_end)))
        level, frc = _field(rec, "jam_level"), _field(rec, "frc")
        if _field(rec, "status") == "ok" and level is not None and frc is not None:
            key = (str(int(level)), str(int(frc)))
            counts[key] = counts.get(key, 0) + 1
    for (level_s, frc_s), count in counts.items():
        SEGMENTS_PUBLISHED.labels(jam_level=level_s, frc=frc_s).inc(count)
    LAST_PUBLICATION.set(now)
    return n


def observe_network(records: Iterable[Any], total_segments: int) -> None:
    """Set the network-state gauges from the latest speed record of every segment the feed holds.

    Record-at-a-time form of :func:`observe_network_arrays` (which see for the definitions).

    Parameters
    ----------
    records
        The latest segment-speed record per segment (mappings or objects with ``status``,
        ``jam_level``, ``frc``, ``speed_kmh``, ``length_m``).
    total_segments
        Number of directed segments in the network (the denominator of the fresh ratio).
    """
    fresh = [r for r in records if _field(r, "status") == "ok"]

    def column(name: str, default: float) -> np.ndarray:
        values = (_field(r, name) for r in fresh)
        return np.fromiter((default if v is None else v for v in values), dtype=float, count=len(fresh))

    observe_network_arrays(
        fresh=np.ones(len(fresh), dtype=bool),
        jam_level=column("jam_level", -1.0),
        frc=column("frc", -1.0),
        speed_kmh=column("speed_kmh", math.nan),
        length_m=column("length_m", math.nan),
        total_segments=total_segments,
    )


def observe_network_arrays(
    fresh: np.ndarray,
    jam_level: np.ndarray,
    frc: np.ndarray,
    speed_kmh: np.ndarray,
    length_m: np.ndarray,
    total_segments: int,
) -> None:
    """Set the network-state gauges from aligned per-segment arrays (one row per segment held).

    - ``NETWORK_FRESH_RATIO`` = ``fresh.sum() / total_segments``;
    - ``SEGMENTS_BY_JAM_LEVEL{jam_level}`` = fresh segments at that level;
    - ``SEGMENT_SPEED_MEAN{frc}`` = space-mean speed over the fresh segments of that class,
      ``sum(length_m) / sum(length_m / speed_kmh)`` in km/h; NaN for a class with none.

    Parameters
    ----------
    fresh
        Boolean, True where the segment's current speed has status ``ok``.
    jam_level
        Jam level 0-5 (any value for rows that are not fresh).
    frc
        Functional road class 0-7.
    speed_kmh
        Space-mean speed, km/h (NaN/None rows are left out of the means).
    length_m
        Segment length, metres (NaN: the row weighs as much as a 1 m segment).
    total_segments
        Number of directed segments in the network, the denominator of the fresh ratio.
    """
    fresh = np.asarray(fresh, dtype=bool)
    levels = np.asarray(jam_level, dtype=float)[fresh]
    classes = np.asarray(frc, dtype=float)[fresh]
    speed = np.asarray(speed_kmh, dtype=float)[fresh]
    length = np.nan_to_num(np.asarray(length_m, dtype=float)[fresh], nan=1.0)
    NETWORK_FRESH_RATIO.set(int(fresh.sum()) / total_segments if total_segments > 0 else 0.0)
    for level in JAM_LEVELS:
        SEGMENTS_BY_JAM_LEVEL.labels(jam_level=str(level)).set(int(np.count_nonzero(levels == level)))
    usable = np.isfinite(speed) & (speed > 0)
    for c in FRCS:
        rows = usable & (classes == c)
        hours = float(np.sum(length[rows] / speed[rows]))
        mean = float(np.sum(length[rows])) / hours if hours > 0 else math.nan
        SEGMENT_SPEED_MEAN.labels(frc=str(c)).set(mean)


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve ``/metrics`` from a background thread (for Faust workers and other non-aiohttp processes).

    Parameters
    ----------
    port
        TCP port; 0 picks a free one (read it from ``server.server_port``).
    addr
        Address to bind.

    Returns
    -------
    wsgiref.simple_server.WSGIServer
        Call ``server.shutdown()`` to stop it.
    """
    server, _thread = prometheus_client.start_http_server(port, addr=addr)
    return server


def metrics_text(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The registry in the Prometheus text exposition format (what ``/metrics`` returns)."""
    return generate_latest(registry)


def metrics_app_handler(registry: CollectorRegistry = REGISTRY) -> Callable[[Any], Awaitable[Any]]:
    """An aiohttp handler serving ``/metrics``: ``app.router.add_get("/metrics", metrics_app_handler())``."""
    from aiohttp import web

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics


def _route_label(request: Any) -> str:
    # The route's name or pattern ("/segments/{segment_id}"), never the concrete path: bounded.
    route = getattr(request.match_info, "route", None)
    if route is None:
        return "unmatched"
    if route.name:
        return str(route.name)
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


def http_metrics_middleware() -> Any:
    """aiohttp middleware counting ``HTTP_REQUESTS{handler, code}`` and timing ``HTTP_LATENCY{handler}``.

    Use as ``web.Application(middlewares=[http_metrics_middleware()])``. ``handler`` is the route's
    name if it has one, else its pattern; requests that match no route count as ``unmatched``.
    """
    from aiohttp import web

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        start = time.perf_counter()
        code = 500
        try:
            response = await handler(request)
            code = response.status
            return response
        except web.HTTPException as exc:
            code = exc.status
            raise
        finally:
            label = _route_label(request)
            HTTP_REQUESTS.labels(handler=label, code=str(code) if 100 <= code <= 599 else "500").inc()
            HTTP_LATENCY.labels(handler=label).observe(time.perf_counter() - start)

    return middleware


_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_CODE_RE = re.compile(r"^[1-5][0-9][0-9]$")
_LONG_NUMBER_RE = re.compile(r"[0-9]{4,}")
_HANDLER_RE = re.compile(r"^[A-Za-z0-9_./{}\-:]{1,80}$")


def _label_value_ok(label: str, value: str) -> bool:
    if label == "reason":
        return value in REJECT_REASONS or value in UNMATCHED_REASONS
    if label == "jam_level":
        return value in {str(x) for x in JAM_LEVELS}
    if label == "frc":
        return value in {str(x) for x in FRCS}
    if label == "code":
        return bool(_CODE_RE.match(value))
    if label == "topic":
        return bool(_TOPIC_RE.match(value)) and not _LONG_NUMBER_RE.search(value)
    if label == "handler":
        # route names/patterns; a run of 4+ digits would be an id or a coordinate
        return bool(_HANDLER_RE.match(value)) and not _LONG_NUMBER_RE.search(value)
    if label in ("version", "map"):
        return "/" not in value and len(value) <= 80
    return False


def _families(source: CollectorRegistry | Iterable[Any]) -> Iterable[Any]:
    return source.collect() if hasattr(source, "collect") else source


def unbounded_label_values(source: CollectorRegistry | Iterable[Any] = REGISTRY) -> list[str]:
    """Every ``roadpulse_*`` sample whose label name or value is not from a bounded enum.

    Parameters
    ----------
    source
        A registry, or metric families parsed from a scrape
        (``prometheus_client.parser.text_string_to_metric_families``).

    Returns
    -------
    list of str
        ``"metric{label="value"}"`` descriptions; empty when every label is allowed. Label values
        are reported as they are, so only print this in tests.
    """
    problems: list[str] = []
    for family in _families(source):
        if not family.name.startswith("roadpulse_"):
            continue
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label == "le" and sample.name.endswith("_bucket"):
                    continue
                if label not in ALLOWED_LABELS or not _label_value_ok(label, value):
                    problems.append(f'{sample.name}{{{label}="{value}"}}')
    return problems


def series_per_metric(source: CollectorRegistry | Iterable[Any] = REGISTRY) -> dict[str, int]:
    """Number of series per exposed ``roadpulse_*`` sample name (``_bucket``, ``_sum`` counted apart).

    ``source`` is a registry or metric families parsed from a scrape.
    """
    counts: dict[str, int] = {}
    for family in _families(source):
        if not family.name.startswith("roadpulse_"):
            continue
        for sample in family.samples:
            counts[sample.name] = counts.get(sample.name, 0) + 1
    return counts


set_build_info()
init_label_values()
for _frc in FRCS:
    SEGMENT_SPEED_MEAN.labels(frc=str(_frc)).set(math.nan)
