"""What the feed server serves: the latest speed of every segment, recent history, SSE events.

A :class:`FeedStore` is fed segment speeds by whoever produces them — the embedded pipeline's
``on_publish`` callback (``roadpulse demo``) or a Kafka consumer of the compacted
``roadpulse.segment-speeds`` topic (``roadpulse serve``) — through one method, :meth:`FeedStore.publish`.
It keeps:

- the latest :class:`~congestion.record.SegmentSpeed` per segment, in arrays aligned with the
  network's rows so that ``bbox`` / ``frc`` / ``min_jam_level`` filters are one numpy mask;
- per segment, the last hour (event time) of values as run-length entries: consecutive windows
  with the same values are one entry spanning their windows, so a quiet road costs one entry;
- a bounded buffer of Server-Sent-Events, each one publication's *changed* segments, serialised
  once and fanned out to every subscriber; a reconnecting client that is further behind than
  the buffer gets a full snapshot event instead.

All methods run on the event loop thread; producers on other threads use
:meth:`FeedStore.publish_threadsafe`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from congestion.record import SegmentSpeed
    from geo.network import RoadNetwork

log = logging.getLogger(__name__)

#: Fields whose change makes a segment part of an SSE delta; a record that only moves its window
#: forward with the same values updates the snapshot but is not re-sent to every client.
VALUE_FIELDS: tuple[str, ...] = (
    "speed_kmh", "speed_stddev_kmh", "free_flow_speed_kmh", "travel_time_s", "jam_level",
    "confidence", "sample_count", "status",
)
#: Fields kept per history entry (plus ``window_start`` / ``window_end``).
HISTORY_FIELDS: tuple[str, ...] = VALUE_FIELDS
#: Highest jam level of the contract (0 free flow ... 5 standstill).
MAX_JAM_LEVEL = 5
#: Highest functional road class.
MAX_FRC = 7


class FeedQueryError(ValueError):
    """A query parameter is malformed or out of range (the server answers 400)."""


@dataclass(frozen=True, slots=True)
class FeedQuery:
    """Filters of a snapshot request.

    Parameters
    ----------
    bbox
        ``(min_lon, min_lat, max_lon, max_lat)`` in WGS84 degrees; a segment is kept when its
        bounding box intersects this one.
    frc
        Functional road classes to keep (0 most important ... 7 least); ``None`` keeps all.
    min_jam_level
        Keep segments whose jam level is at least this (0-5); segments without a jam level
        (``no_data``) are dropped when this is set.
    """

    bbox: tuple[float, float, float, float] | None = None
    frc: frozenset[int] | None = None
    min_jam_level: int | None = None

    @property
    def key(self) -> str:
        """Canonical text of the filters, for cache keys and ETags."""
        bbox = ",".join(f"{v:.7f}" for v in self.bbox) if self.bbox else ""
        frc = ",".join(str(v) for v in sorted(self.frc)) if self.frc is not None else ""
        jam = "" if self.min_jam_level is None else str(self.min_jam_level)
        return f"b={bbox};f={frc};j={jam}"


def parse_query(params: dict[str, str] | Any, allowed_extra: Iterable[str] = ()) -> FeedQuery:
    """Validate ``bbox``, ``frc`` and ``min_jam_level`` query parameters.

    Parameters
    ----------
    params
        Mapping of query parameter -> value (the last value wins for repeated keys).
    allowed_extra
        Other parameter names the endpoint accepts (ignored here). Any other name is an error,
        so a typo like ``min_jam=3`` is reported instead of silently returning everything.

    Raises
    ------
    FeedQueryError
        With a message naming the parameter and what is expected.
    """
    allowed = {"bbox", "frc", "min_jam_level", *allowed_extra}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise FeedQueryError(f"unknown query parameter(s) {unknown}; accepted: {sorted(allowed)}")
    bbox = None
    if "bbox" in params:
        parts = str(params["bbox"]).split(",")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 4 or not all(np.isfinite(values)):
            raise FeedQueryError("bbox must be four finite numbers: min_lon,min_lat,max_lon,max_lat (degrees)")
        lo_lon, lo_lat, hi_lon, hi_lat = values
        if not (-180 <= lo_lon <= 180 and -180 <= hi_lon <= 180 and -90 <= lo_lat <= 90 and -90 <= hi_lat <= 90):
            raise FeedQueryError("bbox out of range: longitudes within [-180, 180], latitudes within [-90, 90]")
        if lo_lon > hi_lon or lo_lat > hi_lat:
            raise FeedQueryError("bbox must be min_lon,min_lat,max_lon,max_lat with min <= max")
        bbox = (lo_lon, lo_lat, hi_lon, hi_lat)
    frc = None
    if "frc" in params:
        try:
            frc = frozenset(int(p) for p in str(params["frc"]).split(","))
        except ValueError:
            raise FeedQueryError(f"frc must be comma-separated integers 0-{MAX_FRC}, e.g. frc=0,1,2") from None
        if not frc or min(frc) < 0 or max(frc) > MAX_FRC:
            raise FeedQueryError(f"frc values must lie in 0-{MAX_FRC}")
    jam = None
    if "min_jam_level" in params:
        try:
            jam = int(params["min_jam_level"])
        except ValueError:
            raise FeedQueryError(f"min_jam_level must be an integer 0-{MAX_JAM_LEVEL}") from None
        if not 0 <= jam <= MAX_JAM_LEVEL:
            raise FeedQueryError(f"min_jam_level must lie in 0-{MAX_JAM_LEVEL}")
    return FeedQuery(bbox=bbox, frc=frc, min_jam_level=jam)


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One SSE event: the segments one publication changed, serialised once for every client."""

    event_id: str
    seq: int
    n_segments: int
    frame: bytes


class Subscription:
    """One SSE client's queue of frames. A client too slow to keep up is cut off (``overflowed``)
    and, when its EventSource reconnects with ``Last-Event-ID``, catches up from the buffer."""

    def __init__(self, max_pending: int) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(max_pending)
        self.overflowed = False

    def offer(self, frame: bytes) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.overflowed = True
            # Make room for the end marker so the writer wakes up and closes the stream.
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


def _sse_frame(event: str, event_id: str, data: Any) -> bytes:
    body = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"id: {event_id}\nevent: {event}\ndata: {body}\n\n".encode()


def record_dict(record: "SegmentSpeed") -> dict[str, Any]:
    """The contract dict of a record, equal to its ``to_dict()``, with NaN never leaking into JSON.

    Built field by field: ``dataclasses.asdict`` deep-copies and is ~15x slower, which matters
    when a publication changes every segment of a city and the SSE frame is built on the loop.
    """
    from congestion.record import FIELD_NAMES

    d = {name: getattr(record, name) for name in FIELD_NAMES}
    for k, v in d.items():
        if v != v or v in _INFINITIES:  # NaN or +-inf: not valid JSON, and not data
            d[k] = None
    return d


_INFINITIES = (float("inf"), float("-inf"))


class FeedStore:
    """Latest segment speeds, last-hour history and the SSE event buffer of one feed server.

    Parameters
    ----------
    network
        The road network the records refer to; records of unknown segments are counted and
        dropped (``rejected_unknown_segment``).
    history_s
        Event-time span of per-segment history kept, seconds (default one hour).
    buffer_events
        SSE events kept for clients that reconnect with ``Last-Event-ID``.
    max_pending
        Frames an SSE client may have queued before it is cut off as too slow.
    clock
        Wall clock, seconds (``time.monotonic``); used for readiness ("is data flowing").
    """

    def __init__(
        self,
        network: "RoadNetwork",
        history_s: float = 3600.0,
        buffer_events: int = 256,
        max_pending: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.network = network
        self.history_s = float(history_s)
        self.max_pending = int(max_pending)
        self._clock = clock
        n = network.n_segments
        self._records: list[SegmentSpeed | None] = [None] * n
        self._values: list[tuple | None] = [None] * n
        self._jam = np.full(n, -1, dtype=np.int8)  # -1: no jam level (no data)
        self._has = np.zeros(n, dtype=bool)
        self._history: list[deque[dict[str, Any]] | None] = [None] * n
        self._events: deque[FeedEvent] = deque(maxlen=int(buffer_events))
        self._subscribers: set[Subscription] = set()
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Incremented on every publication that changes anything (ETag of snapshots).
        self.version = 0
        #: Sequence number of the last SSE event.
        self.seq = 0
        #: Event ids carry a per-process token so ids from a previous server run never match.
        self.boot = secrets.token_hex(3)
        self.newest_window_end: float | None = None
        self.last_publish_wall: float | None = None
        self.published_total = 0
        self.rejected_unknown_segment = 0
        # Per-segment bounding boxes, degrees, for bbox filters.
        ptr = network.geom_ptr
        lonlat = network.geom_lonlat
        self._seg_lo = np.column_stack([np.minimum.reduceat(lonlat[:, 0], ptr[:-1]), np.minimum.reduceat(lonlat[:, 1], ptr[:-1])])
        self._seg_hi = np.column_stack([np.maximum.reduceat(lonlat[:, 0], ptr[:-1]), np.maximum.reduceat(lonlat[:, 1], ptr[:-1])])

    # ------------------------------------------------------------ producing
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop that owns this store (set by the feed server on start)."""
        self._loop = loop

    def publish_threadsafe(self, records: Iterable["SegmentSpeed"]) -> None:
        """:meth:`publish` from another thread (e.g. the embedded pipeline's worker thread)."""
        if self._loop is None:
            raise RuntimeError("FeedStore.publish_threadsafe before the feed server started")
        batch = list(records)
        self._loop.call_soon_threadsafe(self.publish, batch)

    def publish(self, records: Iterable["SegmentSpeed"]) -> int:
        """Take in one publication of segment speeds; returns how many segments changed value.

        Records replace the segment's latest record (any field may have moved, e.g. the
        window); segments whose *values* changed become one SSE event for every client.
        """
        records = list(records)
        if not records:
            return 0
        rows = self.network.index_of([r.segment_id for r in records])
        changed: list[SegmentSpeed] = []
        any_update = False
        for record, row in zip(records, rows):
            if row < 0:
                self.rejected_unknown_segment += 1
                continue
            row = int(row)
            old = self._records[row]
            if old is not None and _newer(old, record) is old:
                continue  # an older window arriving late (e.g. replayed topic): keep the newer one
            values = tuple(getattr(record, f) for f in VALUE_FIELDS)
            self._records[row] = record
            self._has[row] = True
            jam = record.jam_level
            self._jam[row] = -1 if jam is None else int(jam)
            any_update = True
            if values != self._values[row]:
                changed.append(record)
            self._values[row] = values
            self._add_history(row, record, values)
        if not any_update:
            return 0
        self.published_total += len(records)
        self.version += 1
        self.last_publish_wall = self._clock()
        self._cache.clear()
        if changed:
            self.seq += 1
            event_id = f"{self.boot}-{self.seq}"
            frame = _sse_frame("speeds", event_id, {"segments": [record_dict(r) for r in changed]})
            self._events.append(FeedEvent(event_id, self.seq, len(changed), frame))
            for sub in list(self._subscribers):
                sub.offer(frame)
        return len(changed)

    def _add_history(self, row: int, record: "SegmentSpeed", values: tuple) -> None:
        ws, we = record.window_start, record.window_end
        if we is not None and (self.newest_window_end is None or we > self.newest_window_end):
            self.newest_window_end = float(we)
        hist = self._history[row]
        if hist is None:
            hist = self._history[row] = deque()
        last = hist[-1] if hist else None
        # Same values in the next (adjacent or overlapping) window extend the run; a gap does not.
        if last is not None and last["_values"] == values and last["window_end"] is not None and ws is not None and ws <= last["window_end"]:
            last["window_end"] = max(last["window_end"], we) if we is not None else last["window_end"]
        else:
            entry = {"window_start": ws, "window_end": we, "_values": values}
            hist.append(entry)
        self._prune_history(hist)

    def _prune_history(self, hist: deque[dict[str, Any]]) -> None:
        if self.newest_window_end is None:
            return
        horizon = self.newest_window_end - self.history_s
        while hist and hist[0]["window_end"] is not None and hist[0]["window_end"] < horizon:
            hist.popleft()

    # ------------------------------------------------------------ reading
    @property
    def n_with_data(self) -> int:
        """Segments with at least one record."""
        return int(self._has.sum())

    def seconds_since_publish(self) -> float | None:
        """Wall seconds since the last publication, ``None`` before the first."""
        return None if self.last_publish_wall is None else self._clock() - self.last_publish_wall

    @property
    def last_event_id(self) -> str:
        """Id of the newest SSE event (the snapshot's position in the event stream)."""
        return f"{self.boot}-{self.seq}"

    def select(self, query: FeedQuery = FeedQuery()) -> list["SegmentSpeed"]:
        """Latest records matching ``query``, in network row order."""
        mask = self._has.copy()
        if query.bbox is not None:
            lo_lon, lo_lat, hi_lon, hi_lat = query.bbox
            mask &= (self._seg_hi[:, 0] >= lo_lon) & (self._seg_lo[:, 0] <= hi_lon)
            mask &= (self._seg_hi[:, 1] >= lo_lat) & (self._seg_lo[:, 1] <= hi_lat)
        if query.frc is not None:
            mask &= np.isin(self.network.frc, np.fromiter(query.frc, dtype=np.int64))
        if query.min_jam_level is not None:
            mask &= self._jam >= query.min_jam_level
        return [self._records[i] for i in np.flatnonzero(mask)]  # type: ignore[misc]

    def latest(self, segment_id: int) -> "SegmentSpeed | None":
        """Latest record of one segment (``None`` when it has none or is not in the network)."""
        row = int(self.network.index_of(segment_id)[0])
        return None if row < 0 else self._records[row]

    def history(self, segment_id: int) -> list[dict[str, Any]]:
        """The last ``history_s`` (event time) of one segment's values, oldest first.

        Each entry spans ``window_start`` .. ``window_end`` during which the values (the
        :data:`HISTORY_FIELDS`) stayed the same.
        """
        row = int(self.network.index_of(segment_id)[0])
        hist = None if row < 0 else self._history[row]
        if not hist:
            return []
        self._prune_history(hist)
        out = []
        for entry in hist:
            d = {"window_start": entry["window_start"], "window_end": entry["window_end"]}
            for name, value in zip(HISTORY_FIELDS, entry["_values"]):
                d[name] = None if isinstance(value, float) and not np.isfinite(value) else value
            out.append(d)
        return out

    def cache_get(self, key: tuple) -> Any:
        """A value memoised under ``key`` since the last publication, or ``None``."""
        value = self._cache.get(key)
        if value is not None:
            self._cache.move_to_end(key)
        return value

    def cache_put(self, key: tuple, value: Any) -> None:
        self._cache[key] = value
        while len(self._cache) > 64:
            self._cache.popitem(last=False)

    def cache_drop(self, key: tuple, value: Any) -> None:
        if self._cache.get(key) is value:
            del self._cache[key]

    def cached(self, key: tuple, build: Callable[[], Any]) -> Any:
        """Memoise ``build()`` under ``key`` until the next publication (small LRU)."""
        try:
            self._cache.move_to_end(key)
            return self._cache[key]
        except KeyError:
            value = build()
            self._cache[key] = value
            while len(self._cache) > 64:
                self._cache.popitem(last=False)
            return value

    # ------------------------------------------------------------ SSE
    def subscribe(self) -> Subscription:
        """A new SSE subscriber that receives every event published from now on."""
        sub = Subscription(self.max_pending)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @property
    def n_subscribers(self) -> int:
        return len(self._subscribers)

    def snapshot_frame(self) -> bytes:
        """An SSE ``snapshot`` event with every segment's latest record (cached per version)."""
        return self.cached(("sse-snapshot",), lambda: _sse_frame(
            "snapshot", self.last_event_id, {"segments": [record_dict(r) for r in self.select()]}))

    def catch_up(self, last_event_id: str | None) -> list[bytes]:
        """Frames a client that last saw ``last_event_id`` must get before live events.

        - no id: a ``snapshot`` event (the full state);
        - an id still in the buffer: the events after it (possibly none);
        - an id too old, from another server run, or malformed: a ``snapshot`` event.
        """
        if last_event_id:
            boot, _, seq_text = last_event_id.strip().partition("-")
            if boot == self.boot and seq_text.isdigit():
                seq = int(seq_text)
                if seq == self.seq:
                    return []
                oldest = self._events[0].seq if self._events else self.seq + 1
                if oldest - 1 <= seq < self.seq:
                    return [e.frame for e in self._events if e.seq > seq]
        return [self.snapshot_frame()]


def _newer(a: "SegmentSpeed", b: "SegmentSpeed") -> "SegmentSpeed":
    """The record of the later window (ties: the later publication, else ``b``)."""
    ka = (a.window_end or 0.0, a.published_at or 0.0)
    kb = (b.window_end or 0.0, b.published_at or 0.0)
    return a if ka > kb else b


def summarise(records: Sequence["SegmentSpeed"]) -> dict[str, int]:
    """Counts of records by status and jam level (for logs and progress lines: no ids)."""
    counts: dict[str, int] = {}
    for r in records:
        key = r.status if r.jam_level is None else f"jam{r.jam_level}"
        counts[key] = counts.get(key, 0) + 1
    return counts
