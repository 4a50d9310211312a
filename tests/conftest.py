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


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory):
    """The real Kafka-protocol broker (tansu, memory storage) for this test session; see tests/kafka_support.py.

    Yields the :class:`tests.kafka_support.TansuBroker` (``.bootstrap``, ``.restart()``); stopped by PID at
    session end, also when tests fail.
    """
    from tests.kafka_support import TansuBroker

    broker = TansuBroker(log_dir=tmp_path_factory.mktemp("tansu"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker) -> str:
    """``"127.0.0.1:PORT"`` of the session's test broker."""
    return kafka_broker.bootstrap
