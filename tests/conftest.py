"""Shared fixtures: maps (bundled and from ../shared), temporary caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from geo import bundled_map, load_network

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SHARED_MAPS = SHARED / "data" / "maps"
SHARED_TRACES = SHARED / "data" / "traces" / "graphhopper"

BUNDLED = ["helsinki", "kotka"]
SHARED_MAP_FILES = [
    "monaco-2021.osm.pbf",
    "andorra-2021.osm.pbf",
    "liechtenstein-2024.osm.pbf",
    "kaiserslautern-2013.osm.gz",
    "baltimore-2015.osm.pbf",
    "harrisburg-2015.osm.pbf",
    "helsinki-2019.osm.pbf",
    "kotka-karhula.osm.pbf",
]


def shared_map(name: str) -> Path:
    """Path of a map in ../shared/data/maps, skipping the test when it is absent."""
    path = SHARED_MAPS / name
    if not path.is_file():
        pytest.skip(f"{path} not present (../shared is not beside this checkout)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Network caches of the test run go to a temp dir, never the user's home."""
    import os

    os.environ["ROADPULSE_CACHE_DIR"] = str(tmp_path_factory.mktemp("network-cache"))


@pytest.fixture(scope="session")
def helsinki():
    return load_network(bundled_map("helsinki"))


@pytest.fixture(scope="session")
def kotka():
    return load_network(bundled_map("kotka"))
