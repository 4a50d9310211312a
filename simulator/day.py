"""A simulated traffic day: demand -> traffic -> probe pings + ground truth, and its files.

>>> from geo import bundled_map, load_network
>>> from simulator import SimulationConfig, simulate_day
>>> net = load_network(bundled_map("kotka"))
>>> result = simulate_day(net, SimulationConfig(hours=1, start_s=7 * 3600, trips_per_day=5000, seed=1))
>>> paths = result.write("out/")          # pings.csv.gz, truth_segments.csv.gz, truth_paths.csv.gz, ...

Random draws come from one ``numpy`` generator per concern, each seeded from ``(seed, concern)``,
so changing e.g. the phone model does not change the traffic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geo.model import Ping
from geo.network import RoadNetwork
from simulator.config import SimulationConfig
from simulator.demand import choose_zones, departure_times, draw_od, trips_per_day
from simulator.formats import open_text, write_ping_batches
from simulator.phones import PingTable, probe_pings
from simulator.traffic import TrafficRun, run_traffic
from simulator.truth import TRUTH_PATH_COLUMNS, TRUTH_SEGMENT_COLUMNS, SegmentTruth, segment_truth

#: File names written by :meth:`SimulationResult.write` (pings name depends on the format).
TRUTH_SEGMENTS_FILE = "truth_segments.csv.gz"
TRUTH_PATHS_FILE = "truth_paths.csv.gz"
TRUTH_PINGS_FILE = "truth_pings.csv.gz"
SUMMARY_FILE = "summary.json"
#: Columns of ``truth_pings.csv.gz``: each ping's true time, position, segment and offset, in
#: the same order as the pings file.
TRUTH_PING_COLUMNS = ("device", "ts", "true_t", "true_lat", "true_lon", "segment_id", "offset_m")

_STREAMS = {"demand": 1, "traffic": 2, "probes": 3, "phones": 4}


def _rng(seed: int, concern: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), _STREAMS[concern]])


@dataclass
class SimulationResult:
    """Everything a simulated day produced, in memory.

    Attributes
    ----------
    network, config
        What was simulated.
    traffic
        Every trip and segment passage (warm-up trips included).
    in_span
        Boolean per trip: departed within the configured span (not warm-up).
    is_probe
        Boolean per trip: carries a phone (never for warm-up trips).
    pings
        The probes' pings with their truth.
    truth
        Per-segment windowed ground truth of all vehicles.
    """

    network: RoadNetwork
    config: SimulationConfig
    traffic: TrafficRun
    in_span: np.ndarray
    is_probe: np.ndarray
    pings: PingTable
    truth: SegmentTruth

    # ------------------------------------------------------------------ views
    def ping_batches(self) -> Iterator[tuple[str, list[Ping]]]:
        """Uploads in order: ``(device id, pings of the batch)``."""
        t = self.pings
        if not len(t):
            return
        cols = [t.ts.tolist(), t.lat.tolist(), t.lon.tolist(), _nones(t.accuracy_m), _nones(t.speed_mps),
                _nones(t.heading_deg)]
        bounds = np.flatnonzero(np.diff(t.batch)) + 1
        starts = np.concatenate([[0], bounds]).tolist()
        ends = np.concatenate([bounds, [len(t)]]).tolist()
        device = t.device.tolist()
        for a, b in zip(starts, ends):
            dev = t.devices[device[a]]
            yield dev, [Ping(dev, *(c[i] for c in cols)) for i in range(a, b)]

    def iter_pings(self) -> Iterator[Ping]:
        """All pings, in upload order."""
        for _, batch in self.ping_batches():
            yield from batch

    def trip_devices(self) -> dict[int, str]:
        """Device id of each probe trip (trip index -> id)."""
        probes = np.flatnonzero(self.is_probe)
        return dict(zip(probes.tolist(), self.pings.devices))

    def summary(self) -> dict[str, Any]:
        """Vehicles, probes, pings, km driven and mean speed by local hour (span trips only)."""
        tr = self.traffic
        trip = tr.passage_trip()
        span = self.in_span[trip]
        length = self.network.length_m[tr.route_segment]
        dt = tr.t_exit - tr.t_enter
        hour = np.floor((tr.t_enter - self.config.day_start_epoch_s) / 3600.0).astype(np.int64)
        by_hour: dict[str, float] = {}
        for h in np.unique(hour[span]).tolist():
            m = span & (hour == h)
            by_hour[f"{h % 24:02d}" if h < 24 else f"{h // 24}d{h % 24:02d}"] = round(
                float(length[m].sum() / dt[m].sum() * 3.6), 2)
        trips = int(self.in_span.sum())
        dur = (tr.arrive_s - tr.depart_s)[self.in_span]
        return {
            "map": Path(self.network.source).name,
            "seed": self.config.seed,
            "start_epoch_s": self.config.start_epoch_s,
            "hours": self.config.hours,
            "vehicles": trips,
            "warmup_vehicles": int((~self.in_span).sum()),
            "probe_vehicles": int(self.is_probe.sum()),
            "pings": len(self.pings),
            "km_driven": round(float(length[span].sum()) / 1000.0, 1),
            "mean_trip_min": round(float(dur.mean()) / 60.0, 2) if trips else None,
            "mean_speed_kmh": round(float(length[span].sum() / dt[span].sum() * 3.6), 2) if trips else None,
            "mean_speed_kmh_by_hour": by_hour,
            "truth_rows": len(self.truth),
            "incidents": [asdict(i) for i in self.config.incidents],
        }

    # ------------------------------------------------------------------ files
    def write(self, out_dir: str | os.PathLike[str], *, ping_format: str = "csv",
              compress: bool = True) -> dict[str, Path]:
        """Write pings, ground truth and a summary into ``out_dir``; returns name -> path.

        Files: ``pings.csv[.gz]`` (or ``pings.jsonl[.gz]``, one upload batch per line),
        ``truth_segments.csv.gz``, ``truth_paths.csv.gz``, ``truth_pings.csv.gz``, ``summary.json``.
        Output is byte-identical for the same map, configuration and seed.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if ping_format not in ("csv", "jsonl"):
            raise ValueError("ping_format must be 'csv' or 'jsonl'")
        paths = {
            "pings": out / f"pings.{ping_format}{'.gz' if compress else ''}",
            "truth_segments": out / TRUTH_SEGMENTS_FILE,
            "truth_paths": out / TRUTH_PATHS_FILE,
            "truth_pings": out / TRUTH_PINGS_FILE,
            "summary": out / SUMMARY_FILE,
        }
        write_ping_batches(paths["pings"], self.ping_batches(), fmt=ping_format)
        self.write_truth_segments(paths["truth_segments"])
        self.write_truth_paths(paths["truth_paths"])
        self.write_truth_pings(paths["truth_pings"])
        paths["summary"].write_text(json.dumps(self.summary(), indent=2) + "\n")
        return paths

    def write_truth_segments(self, path: str | os.PathLike[str]) -> int:
        t = self.truth
        rows = zip(t.segment_id.tolist(), t.window_start.tolist(), t.window_s.tolist(), t.speed_kmh.tolist(),
                   t.travel_time_s.tolist(), t.vehicles.tolist(), t.probe_vehicles.tolist())
        lines = (f"{s},{w},{ws},{v:.2f},{tt:.2f},{n},{p}\n" for s, w, ws, v, tt, n, p in rows)
        return _write_csv(path, TRUTH_SEGMENT_COLUMNS, lines)

    def write_truth_paths(self, path: str | os.PathLike[str]) -> int:
        tr = self.traffic
        probes = np.flatnonzero(self.is_probe)
        counts = tr.route_ptr[probes + 1] - tr.route_ptr[probes]
        owner = np.repeat(np.arange(len(probes)), counts)
        seq = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        passage = tr.route_ptr[probes][owner] + seq
        devices = self.pings.devices
        rows = zip(owner.tolist(), probes[owner].tolist(), seq.tolist(),
                   self.network.segment_ids[tr.route_segment[passage]].tolist(),
                   tr.t_enter[passage].tolist(), tr.t_exit[passage].tolist())
        lines = (f"{devices[o]},{trip},{q},{s},{a:.3f},{b:.3f}\n" for o, trip, q, s, a, b in rows)
        return _write_csv(path, TRUTH_PATH_COLUMNS, lines)

    def write_truth_pings(self, path: str | os.PathLike[str]) -> int:
        t = self.pings
        devices = t.devices
        rows = zip(t.device.tolist(), t.ts.tolist(), t.true_t.tolist(), t.true_lat.tolist(), t.true_lon.tolist(),
                   self.network.segment_ids[t.segment].tolist(), t.offset_m.tolist())
        lines = (f"{devices[d]},{ts!r},{tt:.3f},{la:.7f},{lo:.7f},{s},{o:.2f}\n"
                 for d, ts, tt, la, lo, s, o in rows)
        return _write_csv(path, TRUTH_PING_COLUMNS, lines)


def _nones(values: np.ndarray) -> list[float | None]:
    return [None if v != v else v for v in values.tolist()]


def _write_csv(path: str | os.PathLike[str], header: tuple[str, ...], lines: Iterator[str]) -> int:
    n = 0
    with open_text(path, "wt") as fh:
        fh.write(",".join(header) + "\n")
        chunk: list[str] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) >= 65536:
                fh.write("".join(chunk))
                n += len(chunk)
                chunk = []
        fh.write("".join(chunk))
        n += len(chunk)
    return n


def simulate_day(
    network: RoadNetwork,
    config: SimulationConfig | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> SimulationResult:
    """Simulate traffic on ``network`` and the pings of its probe vehicles, with ground truth.

    Parameters
    ----------
    network
        Any map :func:`geo.load_network` reads.
    config
        What to simulate; defaults to a whole weekday with 5 % probes.
    progress
        Called as ``progress(stage, share)`` with stage ``"traffic"`` (share 0..1 of the
        departure span simulated) and ``"pings"`` / ``"truth"`` (0 then 1).

    Returns
    -------
    SimulationResult
        Deterministic for a given network, configuration and seed.
    """
    config = config or SimulationConfig()
    say = progress or (lambda stage, share: None)
    demand_rng = _rng(config.seed, "demand")
    zones = choose_zones(network, config.max_zones, demand_rng, config.through_share)
    local = departure_times(config, trips_per_day(network, config), demand_rng)
    origin, dest = draw_od(zones, local, config, demand_rng)
    depart = config.day_start_epoch_s + local
    traffic = run_traffic(network, config, depart, zones.node[origin], zones.node[dest], _rng(config.seed, "traffic"),
                          progress=lambda share: say("traffic", share))
    in_span = depart >= config.start_epoch_s
    is_probe = in_span & (_rng(config.seed, "probes").random(len(depart)) < config.probe_share)
    say("pings", 0.0)
    pings = probe_pings(network, traffic, np.flatnonzero(is_probe), config.phones, _rng(config.seed, "phones"))
    say("pings", 1.0)
    say("truth", 0.0)
    truth = segment_truth(network, traffic, is_probe, config.windows_s, config.start_epoch_s)
    say("truth", 1.0)
    return SimulationResult(network, config, traffic, in_span, is_probe, pings, truth)
