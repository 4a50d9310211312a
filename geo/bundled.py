"""The small OSM maps shipped inside the package (demo and test defaults)."""

from __future__ import annotations

from pathlib import Path

_DATA = Path(__file__).resolve().parent / "data"

#: Name -> file of each bundled map.
BUNDLED_MAPS: dict[str, str] = {
    "helsinki": "helsinki-2019.osm.pbf",
    "kotka": "kotka-karhula.osm.pbf",
}

#: The attribution every display or redistribution of map data must carry.
OSM_ATTRIBUTION = "© OpenStreetMap contributors (ODbL 1.0)"


def bundled_map(name: str = "helsinki") -> Path:
    """Path of a bundled map: ``"helsinki"`` (default) or ``"kotka"``.

    Raises
    ------
    KeyError
        For an unknown name.
    """
    try:
        return _DATA / BUNDLED_MAPS[name]
    except KeyError:
        raise KeyError(f"unknown bundled map {name!r}; choose from {sorted(BUNDLED_MAPS)}") from None


def resolve_map(path_or_name: str) -> Path:
    """A bundled map's name (``helsinki``, ``kotka``) or a file path, as a path."""
    if path_or_name in BUNDLED_MAPS:
        return bundled_map(path_or_name)
    return Path(path_or_name)
