"""The live feed for control rooms: an aiohttp server over a :class:`~streams.feed_store.FeedStore`.

Endpoints (all read-only, ``GET``/``HEAD``):

==========================  ===========================================================================
``/``                       the live map page (``streams/static``: plain JS + canvas, no CDN, no tiles)
``/v1/network``             GeoJSON of every segment's geometry and static attributes (long-cacheable)
``/v1/segments``            GeoJSON snapshot of the latest speeds; ``bbox``, ``frc``, ``min_jam_level``
``/v1/segments/{id}``       one segment with its latest record and its last hour of history
``/v1/stream``              Server-Sent Events of changed segments; resumes from ``Last-Event-ID``
``/v1/datex2``              DATEX II v3 snapshot (same filters as ``/v1/segments``)
``/healthz``, ``/readyz``   liveness; readiness = map loaded and data flowing
``/openapi.json``           OpenAPI 3.1 description of the above
``/metrics``                Prometheus text format
==========================  ===========================================================================

Snapshots are encoded once per publication and filter set, kept gzipped, and revalidated with a
weak ``ETag`` (``If-None-Match`` -> 304). When ``settings.feed_token`` is set, ``/v1/*`` needs
``Authorization: Bearer <token>`` (or ``?access_token=`` for EventSource, which cannot send
headers). Bad query parameters get a 400 with a JSON ``{"error": ...}``, never a 500.
"""

from __future__ import annotations

import asyncio
import gzip
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from streams import metrics
from streams.feed_store import FeedQuery, FeedQueryError, FeedStore, parse_query, record_dict

if TYPE_CHECKING:  # pragma: no cover
    from geo.network import RoadNetwork
    from streams.settings import Settings

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
#: SSE comment sent on an idle stream so proxies and clients see the connection is alive, seconds.
SSE_KEEPALIVE_S = 15.0
#: Milliseconds an EventSource waits before reconnecting (sent as ``retry:``).
SSE_RETRY_MS = 2000
#: Bodies smaller than this are not worth gzipping, bytes.
GZIP_MIN_BYTES = 1024
STORE_KEY = web.AppKey("feed_store", FeedStore)
SERVER_KEY: web.AppKey["FeedServer"] = web.AppKey("feed_server")


def static_dir() -> Path:
    """Folder of the map page's files, inside the installed package."""
    return Path(str(resources.files("streams") / "static"))


class FeedServer:
    """The feed's HTTP server over one store.

    Parameters
    ----------
    network
        The road network served.
    settings
        Uses ``http_host``, ``http_port``, ``feed_token``, ``window_step_s``.
    store
        The store fed by the producer; a new one is made when ``None``.
    publish_interval_s
        Wall seconds between publications (``window_step_s`` at real time, less on an accelerated
        clock); sets ``Cache-Control: max-age`` and the readiness staleness limit.
    stale_after_s
        ``/readyz`` fails when no publication arrived for this many wall seconds (default
        ``max(10, 3 * publish_interval_s)``).
    ready_check
        Extra readiness condition of the producer, returning ``(ready, reason)`` (e.g. the Kafka
        consumer has caught up).
    """

    def __init__(
        self,
        network: "RoadNetwork",
        settings: "Settings",
        store: FeedStore | None = None,
        publish_interval_s: float | None = None,
        stale_after_s: float | None = None,
        ready_check: Callable[[], tuple[bool, str]] | None = None,
    ) -> None:
        self.network = network
        self.settings = settings
        self.store = store if store is not None else FeedStore(network)
        self.publish_interval_s = float(settings.window_step_s if publish_interval_s is None else publish_interval_s)
        self.stale_after_s = float(stale_after_s if stale_after_s is not None else max(10.0, 3 * self.publish_interval_s))
        self.ready_check = ready_check
        self.token = settings.feed_token or ""
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task] = set()
        self.url = ""
        self.port = 0
        self._network_body: dict[str, bytes] | None = None
        self._index_html: bytes | None = None
        self._network_etag = f'W/"net-{(network.source_hash or "x")[:16]}-{network.n_segments}"'

    # ------------------------------------------------------------ lifecycle
    def make_app(self) -> web.Application:
        """The aiohttp application (routes, middlewares), for embedding or ``aiohttp.test_utils``."""
        app = web.Application(middlewares=[_error_middleware, metrics.http_metrics_middleware(), self._auth_middleware])
        app[STORE_KEY] = self.store
        app[SERVER_KEY] = self
        r = app.router
        r.add_get("/", self.index, name="index")
        r.add_static("/static/", static_dir(), name="static", append_version=False)
        r.add_get("/v1/network", self.network_geojson, name="network")
        r.add_get("/v1/segments", self.segments, name="segments")
        r.add_get("/v1/segments/{segment_id}", self.segment, name="segment")
        r.add_get("/v1/stream", self.stream, name="stream")
        r.add_get("/v1/datex2", self.datex2, name="datex2")
        r.add_get("/healthz", self.healthz, name="healthz")
        r.add_get("/readyz", self.readyz, name="readyz")
        r.add_get("/openapi.json", self.openapi, name="openapi")
        r.add_get("/metrics", self.metrics, name="metrics")
        app.on_shutdown.append(self._close_streams)
        return app

    async def start(self, host: str | None = None, port: int | None = None) -> str:
        """Bind and serve on the running loop; returns the base URL (port 0 picks a free one)."""
        host = host or self.settings.http_host
        port = self.settings.http_port if port is None else port
        self.store.bind_loop(asyncio.get_running_loop())
        self._runner = web.AppRunner(
            self.make_app(), access_log=None, shutdown_timeout=2.0,
            # A client that goes away cancels its handler: SSE streams are released at once,
            # not at the next keep-alive write.
            handler_cancellation=True,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.port = int(sock.getsockname()[1])
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        self.url = f"http://{shown}:{self.port}"
        return self.url

    async def stop(self) -> None:
        """Close every stream and the listening socket."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _close_streams(self, app: web.Application) -> None:
        for task in list(self._streams):
            task.cancel()

    # ------------------------------------------------------------ middleware
    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if self.token and request.path.startswith("/v1/"):
            given = ""
            auth = request.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            else:
                given = request.query.get("access_token", "")
            if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
                raise _json_error(web.HTTPUnauthorized, "missing or wrong bearer token",
                                  headers={"WWW-Authenticate": 'Bearer realm="roadpulse"'})
        return await handler(request)

    # ------------------------------------------------------------ helpers
    def _cache_control(self, max_age: float) -> str:
        scope = "private" if self.token else "public"
        age = int(max(0.0, max_age))
        return f"{scope}, max-age={age}, must-revalidate" if age > 0 else f"{scope}, no-cache"

    def _query(self, request: web.Request, extra: tuple[str, ...] = ()) -> FeedQuery:
        try:
            return parse_query(request.query, allowed_extra=("access_token", *extra))
        except FeedQueryError as exc:
            raise _json_error(web.HTTPBadRequest, str(exc)) from None

    def _respond(self, request: web.Request, etag: str, bodies: dict[str, bytes], content_type: str,
                 cache_control: str, extra_headers: dict[str, str] | None = None) -> web.Response:
        headers = {"ETag": etag, "Cache-Control": cache_control, "Vary": "Accept-Encoding, Authorization"}
        headers.update(extra_headers or {})
        if _etag_matches(request.headers.get("If-None-Match", ""), etag):
            return web.Response(status=304, headers=headers)
        if "gzip" in bodies and _accepts_gzip(request.headers.get("Accept-Encoding", "")):
            headers["Content-Encoding"] = "gzip"
            body = bodies["gzip"]
        else:
            body = bodies["identity"]
        return web.Response(body=body, headers=headers, content_type=content_type,
                            charset="utf-8" if content_type.endswith(("json", "xml")) else None)

    # ------------------------------------------------------------ handlers
    async def index(self, request: web.Request) -> web.StreamResponse:
        if self._index_html is None:
            import html

            from geo import OSM_ATTRIBUTION

            text = (static_dir() / "index.html").read_text(encoding="utf-8")
            self._index_html = text.replace("{{OSM_ATTRIBUTION}}", html.escape(OSM_ATTRIBUTION)).encode()
        return web.Response(body=self._index_html, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def network_geojson(self, request: web.Request) -> web.Response:
        self._query(request, extra=())  # only access_token is accepted
        if self._network_body is None:
            self._network_body = _bodies(json.dumps(network_feature_collection(self.network), separators=(",", ":")).encode())
        return self._respond(request, self._network_etag, self._network_body, "application/geo+json",
                             self._cache_control(86_400))

    async def _encoded(self, kind: str, query: FeedQuery, encode: Callable[[list[Any]], bytes]) -> dict[str, bytes]:
        """Bodies (identity + gzip) of one snapshot, encoded once per publication and filter set.

        The records are selected on the loop (a consistent cut); encoding runs in a worker thread
        so a big snapshot never stalls the SSE streams, and concurrent requests share one build.
        """
        key = (kind, query.key)
        fut = self.store.cache_get(key)
        if fut is None:
            records = self.store.select(query)
            fut = asyncio.get_running_loop().run_in_executor(None, lambda: _bodies(encode(records)))
            self.store.cache_put(key, fut)
        try:
            return await asyncio.shield(fut)
        except Exception:
            self.store.cache_drop(key, fut)
            raise

    async def segments(self, request: web.Request) -> web.Response:
        query = self._query(request)
        store = self.store
        # ETag and event id belong to the state the body is cut from: read them first.
        etag, event_id = _etag("seg", store, query), store.last_event_id

        def encode(records: list[Any]) -> bytes:
            from congestion.encoders import to_geojson

            return json.dumps(to_geojson(records, self.network), separators=(",", ":"), allow_nan=False).encode()

        bodies = await self._encoded("geojson", query, encode)
        return self._respond(request, etag, bodies, "application/geo+json",
                             self._cache_control(self.publish_interval_s / 2), {"X-Feed-Event-Id": event_id})

    async def datex2(self, request: web.Request) -> web.Response:
        query = self._query(request)
        etag = _etag("dx2", self.store, query)

        def encode(records: list[Any]) -> bytes:
            from congestion.encoders import to_datex2

            xml = to_datex2(records, self.network)
            return xml.encode("utf-8") if isinstance(xml, str) else bytes(xml)

        bodies = await self._encoded("datex2", query, encode)
        return self._respond(request, etag, bodies, "application/xml", self._cache_control(self.publish_interval_s / 2))

    async def segment(self, request: web.Request) -> web.Response:
        self._query(request)  # reject unknown parameters
        text = request.match_info["segment_id"]
        if not text.isdigit() or len(text) > 16:
            raise _json_error(web.HTTPBadRequest, "segment id must be a non-negative integer (below 2**53)")
        segment_id = int(text)
        row = int(self.network.index_of(segment_id)[0])
        if row < 0:
            raise _json_error(web.HTTPNotFound, f"no segment {segment_id} in this network")
        latest = self.store.latest(segment_id)
        body = {
            **segment_properties(self.network, row),
            "geometry": {"type": "LineString", "coordinates": _coords(self.network.geometry_lonlat(row))},
            "latest": None if latest is None else record_dict(latest),
            "history_s": self.store.history_s,
            "history": self.store.history(segment_id),
        }
        return web.json_response(body, headers={"Cache-Control": self._cache_control(self.publish_interval_s / 2)},
                                 dumps=_dumps)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        if self._query(request, extra=("last_event_id",)) != FeedQuery():
            # One frame is serialised for all clients; per-client filtering would undo that.
            raise _json_error(web.HTTPBadRequest, "the stream carries every changed segment: bbox, frc and "
                                                  "min_jam_level filter the snapshots (/v1/segments), not /v1/stream")
        last_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        store = self.store
        # Subscribe and compute the catch-up in one step (no await between): nothing is missed.
        sub = store.subscribe()
        backlog = store.catch_up(last_id)
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        metrics.FEED_CLIENTS.inc()
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })
        try:
            await resp.prepare(request)
            await resp.write(f"retry: {SSE_RETRY_MS}\n\n".encode() + b"".join(backlog))
            while True:
                try:
                    frame = await asyncio.wait_for(sub.queue.get(), SSE_KEEPALIVE_S)
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if frame is None:  # too slow: cut off; the client resumes from Last-Event-ID
                    break
                # Send whatever else is queued in the same write (fewer syscalls under fan-out).
                chunks = [frame]
                while not sub.queue.empty():
                    nxt = sub.queue.get_nowait()
                    if nxt is None:
                        break
                    chunks.append(nxt)
                await resp.write(b"".join(chunks))
        except ConnectionResetError:
            pass
        finally:
            store.unsubscribe(sub)
            metrics.FEED_CLIENTS.dec()
            if task is not None:
                self._streams.discard(task)
        return resp

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"}, headers={"Cache-Control": "no-store"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, reason = self.readiness()
        body = {"ready": ready, "reason": reason, "segments": self.network.n_segments,
                "segments_with_data": self.store.n_with_data}
        return web.json_response(body, status=200 if ready else 503, headers={"Cache-Control": "no-store"})

    def readiness(self) -> tuple[bool, str]:
        """``(ready, reason)``: the map is loaded (always, once serving) and data is flowing."""
        if self.ready_check is not None:
            ok, why = self.ready_check()
            if not ok:
                return False, why
        age = self.store.seconds_since_publish()
        if age is None:
            return False, "no segment speeds received yet"
        if age > self.stale_after_s:
            return False, f"no segment speeds for {age:.0f} s (limit {self.stale_after_s:.0f} s)"
        return True, "map loaded, data flowing"

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document(), headers={"Cache-Control": "public, max-age=3600"})

    async def metrics(self, request: web.Request) -> web.Response:
        # Network-state gauges are computed at scrape time, not on every publication.
        metrics.observe_network(self.store.select(), self.network.n_segments)
        return web.Response(body=metrics.metrics_text(), headers={"Content-Type": metrics.CONTENT_TYPE_LATEST})


# ---------------------------------------------------------------- encoding helpers
def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _bodies(raw: bytes) -> dict[str, bytes]:
    out = {"identity": raw}
    if len(raw) >= GZIP_MIN_BYTES:
        out["gzip"] = gzip.compress(raw, compresslevel=5, mtime=0)
    return out


def _etag(kind: str, store: FeedStore, query: FeedQuery) -> str:
    import zlib

    return f'W/"{kind}-{store.boot}-{store.version}-{zlib.crc32(query.key.encode()):08x}"'


def _etag_matches(header: str, etag: str) -> bool:
    """Weak comparison (RFC 9110 §13.1.2) against an ``If-None-Match`` list."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    ours = etag[2:] if etag.startswith("W/") else etag
    for tag in header.split(","):
        tag = tag.strip()
        if (tag[2:] if tag.startswith("W/") else tag) == ours:
            return True
    return False


def _accepts_gzip(header: str) -> bool:
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip()
            if q.startswith("q="):
                try:
                    return float(q[2:]) > 0
                except ValueError:
                    return False
            return True
    return False


def _json_error(cls: type[web.HTTPException], message: str, headers: dict[str, str] | None = None) -> web.HTTPException:
    return cls(text=json.dumps({"error": message, "status": cls.status_code}),
               content_type="application/json", headers=headers)


@web.middleware
async def _error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error is JSON; an unexpected exception is logged and answered 500, never a dropped connection."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        keep = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        return web.json_response({"error": exc.reason, "status": exc.status}, status=exc.status, headers=keep)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("feed: unhandled error serving %s", request.path)
        raise _json_error(web.HTTPInternalServerError, "internal error; see the server log") from None


def _coords(lonlat: np.ndarray) -> list[list[float]]:
    # 6 decimals of a degree: ~0.1 m, plenty for drawing, a third fewer bytes than repr().
    return np.round(lonlat, 6).tolist()


def segment_properties(network: "RoadNetwork", row: int) -> dict[str, Any]:
    """Static attributes of the segment at ``row`` (ids, class, name, length, free-flow prior)."""
    from geo.roads import HIGHWAY_CLASSES

    return {
        "segment_id": int(network.segment_ids[row]),
        "osm_way_id": int(network.way_ids[row]),
        "osm_start_node_id": int(network.start_node_ids[row]),
        "osm_end_node_id": int(network.end_node_ids[row]),
        "highway": HIGHWAY_CLASSES[int(network.highway_code[row])],
        "frc": int(network.frc[row]),
        "name": str(network.names[network.name_index[row]]),
        "length_m": round(float(network.length_m[row]), 2),
        "free_flow_prior_kmh": float(network.free_flow_prior_kmh[row]),
        "two_way": bool(network.reverse_of[row] >= 0),
    }


def network_feature_collection(network: "RoadNetwork") -> dict[str, Any]:
    """GeoJSON FeatureCollection of every directed segment's geometry and static attributes.

    The static layer of the map page: sent once and cached; speeds come separately.
    """
    from geo import OSM_ATTRIBUTION
    from geo.roads import HIGHWAY_CLASSES

    coords = np.round(network.geom_lonlat, 6).tolist()
    ptr = network.geom_ptr.tolist()
    names = network.names.tolist()
    lo = network.node_lonlat.min(axis=0)
    hi = network.node_lonlat.max(axis=0)
    features = []
    for row in range(network.n_segments):
        features.append({
            "type": "Feature",
            "id": int(network.segment_ids[row]),
            "geometry": {"type": "LineString", "coordinates": coords[ptr[row]:ptr[row + 1]]},
            "properties": {
                "segment_id": int(network.segment_ids[row]),
                "highway": HIGHWAY_CLASSES[int(network.highway_code[row])],
                "frc": int(network.frc[row]),
                "name": names[int(network.name_index[row])],
                "length_m": round(float(network.length_m[row]), 1),
                "free_flow_prior_kmh": float(network.free_flow_prior_kmh[row]),
                "two_way": bool(network.reverse_of[row] >= 0),
            },
        })
    return {
        "type": "FeatureCollection",
        "bbox": [round(float(v), 6) for v in (lo[0], lo[1], hi[0], hi[1])],
        "attribution": OSM_ATTRIBUTION,
        "features": features,
    }


# ---------------------------------------------------------------- OpenAPI
def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 description of the feed's endpoints."""
    filters = [
        {"name": "bbox", "in": "query", "required": False, "description":
         "min_lon,min_lat,max_lon,max_lat (WGS84 degrees); segments whose bounding box intersects it",
         "schema": {"type": "string", "pattern": r"^-?[0-9.]+,-?[0-9.]+,-?[0-9.]+,-?[0-9.]+$"}, "example": "24.93,60.16,24.96,60.18"},
        {"name": "frc", "in": "query", "required": False, "description":
         "comma-separated functional road classes 0 (motorway) ... 7 (service)",
         "schema": {"type": "string", "pattern": "^[0-7](,[0-7])*$"}, "example": "2,3"},
        {"name": "min_jam_level", "in": "query", "required": False, "description":
         "only segments at this jam level or worse (0 free flow ... 5 standstill); drops segments without data",
         "schema": {"type": "integer", "minimum": 0, "maximum": 5}},
    ]
    error = {"description": "bad request: a query parameter is malformed or unknown",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    unauthorized = {"description": "feed token required (Authorization: Bearer <token>, or ?access_token=)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    not_modified = {"description": "not modified since the ETag given in If-None-Match"}
    number_or_null = {"type": ["number", "null"]}
    record = {
        "type": "object",
        "description": "One segment's speed in one publication. Units live in field names; no data is null + status.",
        "properties": {
            "segment_id": {"type": "integer", "description": "stable id from (osm_way_id, start node, end node), < 2**53"},
            "osm_way_id": {"type": "integer"}, "osm_start_node_id": {"type": "integer"}, "osm_end_node_id": {"type": "integer"},
            "frc": {"type": "integer", "minimum": 0, "maximum": 7},
            "length_m": {"type": "number"},
            "speed_kmh": {**number_or_null, "description": "space-mean (harmonic) speed"},
            "speed_stddev_kmh": number_or_null,
            "free_flow_speed_kmh": number_or_null,
            "travel_time_s": number_or_null,
            "free_flow_travel_time_s": number_or_null,
            "jam_level": {"type": ["integer", "null"], "minimum": 0, "maximum": 5, "description": "0 free flow ... 5 standstill"},
            "confidence": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            "sample_count": {"type": ["string", "null"], "description": "number of contributing devices, as a band"},
            "status": {"type": "string", "enum": ["ok", "no_data", "stale"]},
            "window_start": {"type": "number", "description": "event time, epoch seconds"},
            "window_end": {"type": "number", "description": "event time, epoch seconds"},
            "published_at": {"type": "number", "description": "epoch seconds"},
        },
        "required": ["segment_id", "status"],
    }
    snapshot_headers = {
        "ETag": {"schema": {"type": "string"}},
        "Cache-Control": {"schema": {"type": "string"}},
        "X-Feed-Event-Id": {"schema": {"type": "string"}, "description":
                            "the SSE event id this snapshot includes; pass it as last_event_id to /v1/stream"},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "roadpulse live feed",
            "version": API_VERSION,
            "description": "Real-time road-segment speeds from crowdsourced, anonymised phone pings. "
                           "Map data © OpenStreetMap contributors (ODbL 1.0).",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "only when the server is configured with a feed token"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
                          "required": ["error"]},
                "SegmentSpeed": record,
            },
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            "/v1/network": {"get": {
                "summary": "geometry and static attributes of every directed segment (GeoJSON, long-cacheable)",
                "responses": {"200": {"description": "GeoJSON FeatureCollection of LineStrings",
                                      "content": {"application/geo+json": {}}},
                              "304": not_modified, "401": unauthorized}}},
            "/v1/segments": {"get": {
                "summary": "snapshot of the latest segment speeds (GeoJSON)",
                "parameters": filters,
                "responses": {"200": {"description": "GeoJSON FeatureCollection; properties are SegmentSpeed fields",
                                      "headers": snapshot_headers, "content": {"application/geo+json": {}}},
                              "304": not_modified, "400": error, "401": unauthorized}}},
            "/v1/segments/{segment_id}": {"get": {
                "summary": "one segment: static attributes, latest speed and the last hour of history",
                "parameters": [{"name": "segment_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                "responses": {"200": {"description": "the segment", "content": {"application/json": {}}},
                              "400": error, "401": unauthorized,
                              "404": {"description": "no such segment in this network"}}}},
            "/v1/stream": {"get": {
                "summary": "Server-Sent Events: `speeds` events carry the segments a publication changed; "
                           "`snapshot` events the full state (first event without Last-Event-ID, or when "
                           "the client is further behind than the server's buffer)",
                "parameters": [
                    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string"}},
                    {"name": "last_event_id", "in": "query", "required": False, "schema": {"type": "string"},
                     "description": "same as the header, for a first connection after fetching /v1/segments"},
                ],
                "responses": {"200": {"description": "event stream; data is JSON {\"segments\": [SegmentSpeed]}",
                                      "content": {"text/event-stream": {}}},
                              "400": error, "401": unauthorized}}},
            "/v1/datex2": {"get": {
                "summary": "DATEX II v3 snapshot of the latest segment speeds",
                "parameters": filters,
                "responses": {"200": {"description": "DATEX II v3 XML", "content": {"application/xml": {}}},
                              "304": not_modified, "400": error, "401": unauthorized}}},
            "/healthz": {"get": {"summary": "liveness", "security": [{}],
                                 "responses": {"200": {"description": "the process serves"}}}},
            "/readyz": {"get": {"summary": "readiness: map loaded and segment speeds flowing", "security": [{}],
                                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready, with reason"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [{}],
                                 "responses": {"200": {"description": "text exposition format"}}}},
        },
    }


# ---------------------------------------------------------------- Kafka source (roadpulse serve)
class TopicSource:
    """Feeds a store from the compacted ``roadpulse.segment-speeds`` topic: from the start, then live.

    Every partition is assigned (no consumer group, no committed offsets): each feed server
    rebuilds the full picture from the compacted topic on start. Messages that are not a valid
    :class:`~congestion.record.SegmentSpeed` are counted (``rejected``) and skipped; tombstones
    (null values) are counted apart.

    Parameters
    ----------
    store
        Where records go, one :meth:`FeedStore.publish` per fetched batch.
    settings
        Uses ``kafka`` (bootstrap servers) and ``topic_segment_speeds``.
    max_records
        Largest batch per fetch.
    """

    def __init__(self, store: FeedStore, settings: "Settings", max_records: int = 20_000) -> None:
        self.store = store
        self.settings = settings
        self.topic = settings.topic_segment_speeds
        self.max_records = int(max_records)
        self.caught_up = False
        self.consumed = 0
        self.rejected = 0
        self.tombstones = 0
        self.error = ""
        self._consumer: Any = None

    def readiness(self) -> tuple[bool, str]:
        """Ready once the backlog of the topic has been read."""
        if self.error:
            return False, self.error
        if not self.caught_up:
            return False, f"reading {self.topic} from the start ({self.consumed:,} records so far)"
        return True, "caught up"

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set (or the task is cancelled)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.errors import KafkaError

        from congestion.record import SegmentSpeed

        stop = stop or asyncio.Event()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", client_id="roadpulse-feed", **kafka_security_kwargs(self.settings),
        )
        self._consumer = consumer
        try:
            while not stop.is_set():
                try:
                    await consumer.start()
                    break
                except KafkaError as exc:
                    self.error = f"cannot reach Kafka at {self.settings.kafka}: {exc}; retrying"
                    log.warning("feed: %s", self.error)
                    await _sleep_or_stop(stop, 2.0)
            partitions: set[int] | None = None
            while not stop.is_set():
                await consumer.topics()  # refreshes the cluster metadata
                partitions = consumer.partitions_for_topic(self.topic)
                if partitions:
                    break
                self.error = f"topic {self.topic} does not exist yet; waiting for the pipeline to create it"
                await _sleep_or_stop(stop, 2.0)
            if stop.is_set():
                return
            self.error = ""
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions or ())]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            log.info("feed: reading %s (%d partitions) from the start", self.topic, len(tps))
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=500, max_records=self.max_records)
                records = []
                for messages in batches.values():
                    for msg in messages:
                        if msg.value is None:
                            self.tombstones += 1
                            continue
                        try:
                            records.append(SegmentSpeed.from_dict(json.loads(msg.value)))
                        except (ValueError, TypeError) as exc:
                            self.rejected += 1
                            if self.rejected <= 10 or self.rejected % 1000 == 0:
                                log.warning("feed: skipped a bad segment-speed message (%d so far): %s",
                                            self.rejected, str(exc)[:200])
                self.consumed += len(records)
                if records:
                    self.store.publish(records)
                lag = 0
                for tp in tps:
                    hw = consumer.highwater(tp)
                    if hw is not None:
                        lag += max(0, hw - await consumer.position(tp))
                metrics.CONSUMER_LAG.labels(topic=self.topic).set(lag)
                if not batches and not self.caught_up:
                    self.caught_up = True
                    log.info("feed: caught up with %s: %d records, %d segments with data",
                             self.topic, self.consumed, self.store.n_with_data)
        finally:
            await consumer.stop()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


def kafka_security_kwargs(settings: "Settings") -> dict[str, Any]:
    """aiokafka client arguments for the configured security protocol (TLS / SASL)."""
    protocol = getattr(settings, "kafka_security_protocol", "PLAINTEXT") or "PLAINTEXT"
    kwargs: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        cafile = getattr(settings, "kafka_ssl_cafile", "") or None
        kwargs["ssl_context"] = create_ssl_context(cafile=cafile)
    if protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = getattr(settings, "kafka_sasl_mechanism", "") or "PLAIN"
        kwargs["sasl_plain_username"] = getattr(settings, "kafka_sasl_username", "")
        kwargs["sasl_plain_password"] = getattr(settings, "kafka_sasl_password", "")
    return kwargs


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGINT (Ctrl-C) and SIGTERM, so a command shuts down cleanly."""
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / platform
            pass


# ---------------------------------------------------------------- background running
class BackgroundFeedServer:
    """A :class:`FeedServer` on its own event loop in a daemon thread (tests, benchmarks, notebooks).

    ``with BackgroundFeedServer(network, settings) as srv:`` then ``srv.url``; feed it with
    ``srv.publish(records)`` from any thread.
    """

    def __init__(self, network: "RoadNetwork", settings: "Settings", port: int = 0, **kwargs: Any) -> None:
        self.server = FeedServer(network, settings, **kwargs)
        self.store = self.server.store
        self._port = port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="feed-server", daemon=True)
        self.url = ""

    def __enter__(self) -> "BackgroundFeedServer":
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.server.start(port=self._port), self.loop).result(30)
        return self

    def publish(self, records: Any) -> int:
        """Publish on the server's loop and wait until the store has taken the records in."""
        return self.call(self.store.publish, list(records))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the server's loop thread and return its result."""
        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def __exit__(self, *exc: Any) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

