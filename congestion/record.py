"""The feed record: one segment's speed for one window, as published to the control room.

:class:`SegmentSpeed` is the contract of DESIGN.md. Its wire form (Kafka
``roadpulse.segment-speeds``, the feed server, JSONL files) is :meth:`SegmentSpeed.to_dict` /
:meth:`SegmentSpeed.from_dict`: a flat JSON object with exactly the fields below, no more.

Conventions
-----------
- **Times** (``window_start``, ``window_end``, ``published_at``) are **epoch seconds, UTC**, as
  JSON numbers (floats; whole seconds for the default 60 s grid). One representation everywhere in
  roadpulse (pings, traversals and windows are all epoch seconds); encoders that need text
  (DATEX II) format RFC 3339 UTC at the edge with :func:`rfc3339`.
- **Units** live in field names (``_kmh``, ``_s``, ``_m``).
- **No data is null**: for ``status`` ``no_data`` and ``stale`` the fields ``speed_kmh``,
  ``speed_stddev_kmh``, ``travel_time_s``, ``jam_level`` and ``sample_count`` are ``None``
  (JSON ``null``) and ``confidence`` is 0 — never a sentinel number, never "free flow".
- **Sample counts leave only as bands** (:data:`SAMPLE_BANDS`), never as exact numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

#: ``ok``: a fresh, k-anonymous estimate for this window. ``stale``: the segment had an ``ok``
#: estimate recently but this window has none that may be published. ``no_data``: nothing
#: publishable for longer than the stale horizon.
STATUSES: tuple[str, ...] = ("ok", "no_data", "stale")

#: Lower edges of the traversal-count bands: ``n`` falls in the band of the last edge <= n.
SAMPLE_BAND_EDGES: tuple[int, ...] = (1, 3, 5, 10, 20, 50, 100)
#: Every label :func:`sample_band` can return.
SAMPLE_BANDS: tuple[str, ...] = tuple(
    f"{lo}-{hi - 1}" for lo, hi in zip(SAMPLE_BAND_EDGES[:-1], SAMPLE_BAND_EDGES[1:])
) + (f"{SAMPLE_BAND_EDGES[-1]}+",)


def sample_band(n: int) -> str:
    """The published band of a sample count, e.g. ``7 -> "5-9"``, ``250 -> "100+"``.

    Raises
    ------
    ValueError
        ``n < 1`` (a record without samples has ``sample_count = None``).
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"sample count {n} has no band; records without samples carry None")
    label = SAMPLE_BANDS[0]
    for edge, name in zip(SAMPLE_BAND_EDGES, SAMPLE_BANDS):
        if n >= edge:
            label = name
    return label


def band_lower_bound(band: str) -> int:
    """Smallest count a band label stands for (``"5-9" -> 5``, ``"100+" -> 100``)."""
    if band not in SAMPLE_BANDS:
        raise ValueError(f"unknown sample band {band!r}; expected one of {SAMPLE_BANDS}")
    return int(band.rstrip("+").split("-")[0])


def rfc3339(epoch_s: float) -> str:
    """Epoch seconds to RFC 3339 UTC text, ``2024-05-14T07:05:00Z`` (milliseconds when fractional)."""
    dt = datetime.fromtimestamp(float(epoch_s), tz=timezone.utc)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> float:
    """Epoch seconds from a number or an RFC 3339 / ISO 8601 string (naive means UTC)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a time")
    if isinstance(value, (int, float)):
        t = float(value)
    else:
        text = str(value).strip()
        try:
            t = float(text)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
            except ValueError:
                raise ValueError(f"{value!r} is neither epoch seconds nor an RFC 3339 time") from None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            t = dt.timestamp()
    if not math.isfinite(t):
        raise ValueError(f"{value!r} is not a finite time")
    return t


@dataclass(frozen=True, slots=True)
class SegmentSpeed:
    """Speed of one directed segment over one event-time window.

    Parameters
    ----------
    segment_id, osm_way_id, osm_start_node_id, osm_end_node_id
        Stable segment id and the OSM way / node ids it derives from.
    frc
        Functional road class, 0 (motorway) ... 7 (service).
    length_m
        Segment length, metres.
    speed_kmh
        Space-mean speed (total covered length / total travel time, i.e. the length-weighted
        harmonic mean of traversal speeds), km/h; ``None`` unless ``status == "ok"``.
    speed_stddev_kmh
        Length-weighted standard deviation of the traversal speeds, km/h; ``None`` unless ok.
    free_flow_speed_kmh
        Free-flow speed of the segment (learned, else the map prior), km/h; always set.
    travel_time_s
        ``length_m / speed``, seconds; ``None`` unless ok.
    free_flow_travel_time_s
        ``length_m / free_flow_speed``, seconds; always set.
    jam_level
        0 (free flow) ... 5 (standstill) from ``speed / free_flow`` (see
        :data:`congestion.quality.JAM_THRESHOLDS`); ``None`` unless ok.
    confidence
        0..1 from sample size, spread and age (see :func:`congestion.quality.confidence`); 0
        unless ok.
    sample_count
        Band of the number of traversals used (:data:`SAMPLE_BANDS`); ``None`` unless ok.
    status
        ``ok`` | ``no_data`` | ``stale`` (:data:`STATUSES`).
    window_start, window_end
        The event-time window ``[window_start, window_end)``, epoch seconds UTC.
    published_at
        When the record was produced, epoch seconds UTC.
    """

    segment_id: int
    osm_way_id: int
    osm_start_node_id: int
    osm_end_node_id: int
    frc: int
    length_m: float
    speed_kmh: float | None
    speed_stddev_kmh: float | None
    free_flow_speed_kmh: float
    travel_time_s: float | None
    free_flow_travel_time_s: float
    jam_level: int | None
    confidence: float
    sample_count: str | None
    status: str
    window_start: float
    window_end: float
    published_at: float

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")
        if self.status == "ok":
            if self.speed_kmh is None or self.jam_level is None or self.sample_count is None:
                raise ValueError("an ok record needs speed_kmh, jam_level and sample_count")
        elif any(
            v is not None
            for v in (self.speed_kmh, self.speed_stddev_kmh, self.travel_time_s, self.jam_level, self.sample_count)
        ):
            raise ValueError(f"a {self.status} record carries no speed: speed, jam level and sample count must be None")
        if self.jam_level is not None and not 0 <= self.jam_level <= 5:
            raise ValueError(f"jam_level {self.jam_level} outside 0..5")
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence {self.confidence} outside 0..1")
        if self.sample_count is not None and self.sample_count not in SAMPLE_BANDS:
            raise ValueError(f"sample_count {self.sample_count!r} is not a band {SAMPLE_BANDS}")
        if not self.window_end > self.window_start:
            raise ValueError("window_end must be after window_start")

    def to_dict(self) -> dict[str, Any]:
        """The wire form: a flat dict of exactly the contract fields (JSON-ready)."""
        # Field by field: dataclasses.asdict deep-copies and costs ~10x more on the feed's hot path.
        return {name: getattr(self, name) for name in FIELD_NAMES}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegmentSpeed":
        """Parse the wire form; unknown or missing fields are an error (closed schema).

        Raises
        ------
        ValueError
            Missing or unknown fields, wrong types, or values breaking the record's rules.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a SegmentSpeed is a JSON object, got {type(d).__name__}")
        names = FIELD_NAMES
        missing = [n for n in names if n not in d]
        unknown = sorted(set(d) - set(names))
        if missing or unknown:
            raise ValueError(f"SegmentSpeed fields: missing {missing}, unknown {unknown}")

        def opt(conv, v):
            return None if v is None else conv(v)

        try:
            return cls(
                segment_id=_int(d["segment_id"]),
                osm_way_id=_int(d["osm_way_id"]),
                osm_start_node_id=_int(d["osm_start_node_id"]),
                osm_end_node_id=_int(d["osm_end_node_id"]),
                frc=_int(d["frc"]),
                length_m=float(d["length_m"]),
                speed_kmh=opt(float, d["speed_kmh"]),
                speed_stddev_kmh=opt(float, d["speed_stddev_kmh"]),
                free_flow_speed_kmh=float(d["free_flow_speed_kmh"]),
                travel_time_s=opt(float, d["travel_time_s"]),
                free_flow_travel_time_s=float(d["free_flow_travel_time_s"]),
                jam_level=opt(_int, d["jam_level"]),
                confidence=float(d["confidence"]),
                sample_count=opt(str, d["sample_count"]),
                status=str(d["status"]),
                window_start=parse_time(d["window_start"]),
                window_end=parse_time(d["window_end"]),
                published_at=parse_time(d["published_at"]),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad SegmentSpeed record: {exc}") from None


def _int(v: Any) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"{v!r} is not an integer")
    return int(v)


#: The contract fields, in order.
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(SegmentSpeed))

_SETTERS = tuple(SegmentSpeed.__dict__[name].__set__ for name in FIELD_NAMES)
_new = object.__new__


def unchecked_record(values: tuple[Any, ...]) -> SegmentSpeed:
    """A record from field values in :data:`FIELD_NAMES` order, without the per-record checks.

    For producers that build many records from arrays they validated in bulk (the estimator);
    everything else should call :class:`SegmentSpeed` itself.
    """
    obj = _new(SegmentSpeed)
    for setter, value in zip(_SETTERS, values):
        setter(obj, value)
    return obj
