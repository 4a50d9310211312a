"""Road classes, one-way rules and free-flow priors: what OSM tags mean for a car.

Everything here is a pure function of OSM tags, so loading and tests share one reading of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: Drivable ``highway`` values, most important first. Index in this tuple is the stored class code.
HIGHWAY_CLASSES: tuple[str, ...] = (
    "motorway",
    "motorway_link",
    "trunk",
    "trunk_link",
    "primary",
    "primary_link",
    "secondary",
    "secondary_link",
    "tertiary",
    "tertiary_link",
    "unclassified",
    "residential",
    "living_street",
    "road",
    "service",
)
HIGHWAY_CODE: dict[str, int] = {h: i for i, h in enumerate(HIGHWAY_CLASSES)}

#: Functional road class (0 = most important ... 7 = least), as in TomTom/OpenLR ``frc``.
FRC_BY_HIGHWAY: dict[str, int] = {
    "motorway": 0, "motorway_link": 0,
    "trunk": 1, "trunk_link": 1,
    "primary": 2, "primary_link": 2,
    "secondary": 3, "secondary_link": 3,
    "tertiary": 4, "tertiary_link": 4,
    "unclassified": 5, "residential": 5, "road": 5,
    "living_street": 6,
    "service": 7,
}

#: Free-flow prior by class when a way has no usable ``maxspeed``, km/h.
#: Typical European urban/rural limits; links are slower than their parent roads.
DEFAULT_FREE_FLOW_KMH: dict[str, float] = {
    "motorway": 110.0, "motorway_link": 60.0,
    "trunk": 90.0, "trunk_link": 50.0,
    "primary": 60.0, "primary_link": 40.0,
    "secondary": 50.0, "secondary_link": 40.0,
    "tertiary": 40.0, "tertiary_link": 30.0,
    "unclassified": 40.0, "residential": 30.0, "road": 30.0,
    "living_street": 10.0,
    "service": 15.0,
}

#: Implicit limits for country-coded maxspeed values such as ``FI:urban`` or ``DE:rural``, km/h.
_ZONE_KMH: dict[str, float] = {
    "urban": 50.0, "rural": 80.0, "motorway": 120.0, "trunk": 100.0,
    "living_street": 20.0, "bicycle_road": 30.0, "walk": 7.0, "zone30": 30.0, "zone20": 20.0,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(mph|km/h|kmh|kph|knots)?\s*$")

_NOT_FOR_CARS = {"no", "private", "agricultural", "forestry", "delivery", "emergency"}


def is_drivable(tags: Mapping[str, str], include_service: bool = False) -> bool:
    """Whether a way with these tags is a public road for cars.

    Parameters
    ----------
    tags
        OSM tags of the way.
    include_service
        Keep ``highway=service`` (parking aisles, driveways). Off by default: probes on service
        roads are rarely traffic.
    """
    hw = tags.get("highway")
    if hw not in HIGHWAY_CODE or (hw == "service" and not include_service):
        return False
    if tags.get("area") == "yes":
        return False
    car_access = tags.get("motorcar") or tags.get("motor_vehicle") or tags.get("vehicle")
    if car_access is not None:
        return car_access not in _NOT_FOR_CARS
    return tags.get("access") not in _NOT_FOR_CARS


def oneway_direction(tags: Mapping[str, str]) -> int:
    """Driving directions allowed along a way's node order.

    Returns
    -------
    int
        ``1`` forward only, ``-1`` backward only, ``0`` both ways.
        ``oneway=yes|true|1``, roundabouts and motorways (implied) are forward only;
        ``oneway=-1|reverse`` is backward only; ``oneway=no`` overrides implications.
    """
    ow = (tags.get("oneway") or "").strip().lower()
    if ow in ("yes", "true", "1"):
        return 1
    if ow in ("-1", "reverse"):
        return -1
    if ow in ("no", "false", "0", "reversible", "alternating"):
        return 0
    if tags.get("junction") in ("roundabout", "circular"):
        return 1
    if tags.get("highway") in ("motorway", "motorway_link"):
        return 1
    return 0


def parse_maxspeed_kmh(value: str | None) -> float | None:
    """A ``maxspeed`` tag value in km/h, or ``None`` when it gives no number.

    Handles plain numbers (km/h), ``mph`` and ``knots`` units, zone codes (``FI:urban``,
    ``DE:rural``, ``RU:living_street``), ``walk``, and lists (``50;30``: the lowest).
    ``none``, ``signals`` and ``variable`` give ``None`` (no fixed limit to learn from).
    """
    if not value:
        return None
    speeds = []
    for part in value.split(";"):
        part = part.strip().lower()
        m = _NUMBER_UNIT.match(part)
        if m:
            v = float(m.group(1))
            unit = m.group(2)
            if unit == "mph":
                v *= 1.609344
            elif unit == "knots":
                v *= 1.852
            if 0 < v <= 200:
                speeds.append(v)
            continue
        if part == "walk":
            speeds.append(7.0)
            continue
        zone = part.split(":", 1)[-1]
        if zone in _ZONE_KMH:
            speeds.append(_ZONE_KMH[zone])
    return min(speeds) if speeds else None


def free_flow_prior_kmh(tags: Mapping[str, str], forward: bool) -> float:
    """Free-flow speed prior for one driving direction of a way, km/h.

    Uses ``maxspeed:forward`` / ``maxspeed:backward`` when present, then ``maxspeed``, then the
    class default in :data:`DEFAULT_FREE_FLOW_KMH`.
    """
    directional = tags.get("maxspeed:forward" if forward else "maxspeed:backward")
    v = parse_maxspeed_kmh(directional) or parse_maxspeed_kmh(tags.get("maxspeed"))
    if v is not None:
        return v
    return DEFAULT_FREE_FLOW_KMH.get(tags.get("highway", ""), 30.0)
