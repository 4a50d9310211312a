"""Simulator speed: a whole day on Liechtenstein with 5 % probes, against the 300x real-time target.

    taskset -c 0 .venv/bin/python -m bench.simulator --runs 5

Per run (same seed, so the same input every run): ``simulate_day`` split into its stages
(demand + traffic, probe pings, ground truth) and writing the files (``pings.csv.gz``,
``truth_segments.csv.gz``, ``truth_paths.csv.gz``, ``truth_pings.csv.gz``). One warm-up run of one
hour first. Prints a markdown table row with the median (min-max) and peak RSS of the process.

Demand: 150,000 car trips per day. Liechtenstein has ~40k residents (~100k car trips a day at
~2.5 trips per resident, 70 % by car) and ~20k cross-border commuters (~40k trips), so 150k is
the realistic upper end.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from geo import load_network
from simulator import SimulationConfig, simulate_day

DEFAULT_MAP = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "maps" / "liechtenstein-2024.osm.pbf"


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--map", default=str(DEFAULT_MAP))
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--trips", type=int, default=150_000, help="car trips per day")
    ap.add_argument("--probe-share", type=float, default=0.05)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    network = load_network(args.map)
    cfg = SimulationConfig(hours=args.hours, trips_per_day=args.trips, probe_share=args.probe_share, seed=args.seed)
    simulate_day(network, SimulationConfig(hours=1.0, start_s=7 * 3600, trips_per_day=args.trips, seed=args.seed))
    rows: dict[str, list[float]] = {k: [] for k in ("traffic", "pings", "truth", "simulate", "write", "total")}
    summary = None
    for run in range(args.runs):
        marks: dict[str, float] = {}
        t0 = time.perf_counter()
        result = simulate_day(network, cfg, progress=lambda stage, share: marks.setdefault(stage, time.perf_counter()))
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            result.write(out)
        t2 = time.perf_counter()
        rows["traffic"].append(marks["pings"] - t0)
        rows["pings"].append(marks["truth"] - marks["pings"])
        rows["truth"].append(t1 - marks["truth"])
        rows["simulate"].append(t1 - t0)
        rows["write"].append(t2 - t1)
        rows["total"].append(t2 - t0)
        summary = result.summary()
        print(f"run {run + 1}: simulate {t1 - t0:.1f} s, write {t2 - t1:.1f} s", flush=True)
        del result
    assert summary is not None
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sim_s = args.hours * 3600.0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\ncommit {commit}; map {Path(args.map).name}; {summary['vehicles']:,} vehicles, "
          f"{summary['probe_vehicles']:,} probes, {summary['pings']:,} pings, {summary['km_driven']:,.0f} km, "
          f"{summary['truth_rows']:,} truth rows; mean speed {summary['mean_speed_kmh']} km/h")
    print("by hour:", summary["mean_speed_kmh_by_hour"])
    print("\n| map | hours | trips/day | traffic s | pings s | truth s | simulate s | write s | total s "
          "| × real time (total) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {Path(args.map).name} | {args.hours:g} | {args.trips:,} | {_fmt(rows['traffic'])} | {_fmt(rows['pings'])} "
          f"| {_fmt(rows['truth'])} | {_fmt(rows['simulate'])} | {_fmt(rows['write'])} | {_fmt(rows['total'])} "
          f"| {sim_s / statistics.median(rows['total']):.0f}× | {rss_mb:.0f} |")


if __name__ == "__main__":
    main()
