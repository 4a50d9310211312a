"""The domain nouns shared by every part of roadpulse.

Small frozen dataclasses, in the spirit of mappymatch: a :class:`Ping` comes in, the matcher
turns pings into :class:`Traversal` records on :class:`Segment` s of the road network, and
``congestion`` turns traversals into segment speeds.

Units live in field names (``_m``, ``_s``, ``_kmh``, ``_mps``, ``_deg``); times are event times in
epoch seconds (UTC) as floats.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Ping:
    """One GPS fix from one device.

    Parameters
    ----------
    device
        Opaque device id. After ingest this is a pseudonym, never the raw id.
    ts
        Event time, epoch seconds (UTC).
    lat, lon
        WGS84 degrees.
    accuracy_m
        Reported horizontal accuracy (1 sigma), metres, if the phone gave one.
    speed_mps
        Reported speed over ground, metres per second, if given.
    heading_deg
        Reported course over ground, degrees clockwise from north, if given.
    """

    device: str
    ts: float
    lat: float
    lon: float
    accuracy_m: float | None = None
    speed_mps: float | None = None
    heading_deg: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with ``None`` fields left out (the JSON wire form)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, slots=True)
class Segment:
    """A directed road piece between two OSM intersections.

    ``segment_id`` is a stable 53-bit integer derived from ``(osm_way_id, osm_start_node_id,
    osm_end_node_id)`` (see :func:`geo.network.segment_id_for`), so ids survive restarts and
    re-imports of the same map, and are exact in JSON/JavaScript numbers.
    """

    segment_id: int
    osm_way_id: int
    osm_start_node_id: int
    osm_end_node_id: int
    highway: str
    frc: int
    name: str
    length_m: float
    free_flow_prior_kmh: float
    geometry_lonlat: tuple[tuple[float, float], ...]


@dataclass(frozen=True, slots=True)
class Traversal:
    """One device's passage over (part of) one segment, as decided by the map matcher.

    Parameters
    ----------
    segment_id
        The segment driven.
    device
        Device pseudonym (never a raw id).
    t_enter, t_exit
        Event times, epoch seconds, at which the device entered and left the covered part.
    fraction
        Share of the segment's length covered by this traversal, in (0, 1]. Partial traversals
        happen where a trip starts or ends on the segment.
    """

    segment_id: int
    device: str
    t_enter: float
    t_exit: float
    fraction: float = 1.0

    @property
    def travel_time_s(self) -> float:
        """Time spent on the covered part, seconds."""
        return self.t_exit - self.t_enter

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["travel_time_s"] = self.travel_time_s
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Traversal":
        return cls(
            segment_id=int(d["segment_id"]),
            device=str(d["device"]),
            t_enter=float(d["t_enter"]),
            t_exit=float(d["t_exit"]),
            fraction=float(d.get("fraction", 1.0)),
        )
