"""Speed-estimator benchmark: traversals/s per core, peak RSS, and accuracy on the same input.

Run: ``python -m bench.estimator [--map NAME] [--traversals N] [--runs 5] [--batch 20000]``

Input (seeded, the same for every contender): ``N`` probe traversals over ``--hours`` hours on the
real segments of a map; each segment gets a true speed profile (free flow with a rush-hour dip),
each traversal a lognormal speed around it, ``--devices`` pseudonymous devices, exit-time order
with a little jitter (so some data arrives late), 1 % replayed duplicates. Traversals are fed in
batches of ``--batch`` with the watermark at the newest exit time minus 30 s after each batch.

Contenders, each in a fresh process pinned to core 0 (``taskset -c 0``):

- ``arrays``: :meth:`SpeedEstimator.add_arrays` + :meth:`SpeedEstimator.advance_arrays` (the batch
  path: columnar output);
- ``records``: the same with :meth:`SpeedEstimator.advance` (one ``SegmentSpeed`` object per
  published segment-window, what the feed consumes);
- ``pandas``: a straightforward pandas implementation of the same windows (explode each traversal
  to its 5 windows, ``groupby(segment, window)`` sums and ``nunique(device)``), as a peer.

Accuracy: MAE / bias of the published speeds against the true space-mean speed of the traversals
of the same segment-window (all of them, computed directly), on windows with >= k devices.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MAPS = REPO.parent / "shared" / "data" / "maps"
T0 = 1_715_670_000.0  # 2024-05-14 07:00 UTC, a whole number of steps


def make_workload(network, n: int, hours: float, devices: int, seed: int = 20261128) -> dict[str, np.ndarray]:
    """Seeded probe traversals on ``network`` (see the module docstring), sorted by arrival."""
    rng = np.random.default_rng(seed)
    n_seg = network.n_segments
    # Popular roads carry most probes: Zipf-like weights over a random order of segments.
    weights = 1.0 / np.arange(1, n_seg + 1) ** 0.8
    seg_rows = rng.permutation(n_seg)[rng.choice(n_seg, size=n, p=weights / weights.sum())]
    t_exit = T0 + np.sort(rng.uniform(0, hours * 3600.0, n))
    ff = network.free_flow_prior_kmh[seg_rows]
    # Rush-hour dip: down to 45 % of free flow around the middle of the span, per-segment depth.
    depth = 0.55 * rng.uniform(0.2, 1.0, n_seg)[seg_rows]
    phase = (t_exit - T0) / (hours * 3600.0)
    true_kmh = ff * (1.0 - depth * np.exp(-(((phase - 0.5) / 0.15) ** 2)))
    speed_kmh = true_kmh * rng.lognormal(0.0, 0.15, n)
    length = np.maximum(network.length_m[seg_rows], 1.0)
    tt = length / (speed_kmh / 3.6)
    t_enter = t_exit - tt
    dev = rng.integers(0, devices, n).astype(np.int64)
    # Arrival order: exit time plus up to 20 s of delivery jitter; 1 % replayed duplicates.
    arrival = t_exit + rng.exponential(5.0, n)
    dup = rng.choice(n, size=n // 100, replace=False)
    idx = np.concatenate([np.arange(n), dup])
    arrival = np.concatenate([arrival, arrival[dup] + rng.uniform(1, 60, len(dup))])
    order = idx[np.argsort(arrival, kind="stable")]
    return {
        "segment_ids": network.segment_ids[seg_rows][order],
        "rows": seg_rows[order],
        "device": dev[order],
        "t_enter": t_enter[order],
        "t_exit": t_exit[order],
        "arrival": np.sort(arrival),
    }


def true_window_speeds(network, w: dict[str, np.ndarray], step: float, span: float):
    """Space-mean speed of all (distinct) traversals per (segment row, window end index)."""
    key = np.unique(np.column_stack([w["device"], w["segment_ids"], np.round(w["t_enter"] * 1000)]), axis=0,
                    return_index=True)[1]
    rows, t_exit, tt = w["rows"][key], w["t_exit"][key], (w["t_exit"] - w["t_enter"])[key]
    n_panes = int(round(span / step))
    pane = np.floor(t_exit / step).astype(np.int64)
    rep = np.repeat(np.arange(len(rows)), n_panes)
    m = pane[rep] + 1 + np.tile(np.arange(n_panes), len(rows))
    cell = rows[rep].astype(np.int64) * (1 << 32) + (m - int(pane.min()))
    length = np.maximum(network.length_m[rows[rep]], 0)
    u, inv = np.unique(cell, return_inverse=True)
    dist = np.bincount(inv, weights=length)
    time_s = np.bincount(inv, weights=tt[rep])
    seg = u >> 32
    end = ((u & ((1 << 32) - 1)) + int(pane.min())) * step
    return {(int(s), float(e)): d / t * 3.6 for s, e, d, t in zip(seg.tolist(), end.tolist(), dist, time_s)}


_RUN = r"""
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {repo!r})
from bench.estimator import make_workload, true_window_speeds
from geo import load_network, resolve_map
net = load_network(resolve_map({map!r}))
w = make_workload(net, {n}, {hours}, {devices})
mode = {mode!r}
batch = {batch}
n = len(w["segment_ids"])
if mode in ("arrays", "records"):
    from congestion.estimator import SpeedEstimator, EstimatorConfig
    # Warm-up on a copy of the first batch (imports, numpy first-call costs); then a fresh estimator.
    SpeedEstimator(net).add_arrays(w["segment_ids"][:batch], w["device"][:batch], w["t_enter"][:batch], w["t_exit"][:batch])
    est = SpeedEstimator(net)
    out = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    for a in range(0, n, batch):
        b = min(n, a + batch)
        est.add_arrays(w["segment_ids"][a:b], w["device"][a:b], w["t_enter"][a:b], w["t_exit"][a:b])
        wm = float(w["arrival"][b - 1]) - 30.0
        out.append(est.advance_arrays(wm) if mode == "arrays" else est.advance(wm))
    last = est.advance_arrays(float(w["t_exit"].max()) + 3600) if mode == "arrays" else est.advance(float(w["t_exit"].max()) + 3600)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    out.append(last)
    if mode == "arrays":
        pub = {{(int(r), float(e)): float(s) for o in out for r, e, s, st in
               zip(o.rows.tolist(), o.window_end.tolist(), o.speed_kmh.tolist(), o.status.tolist()) if st == 0}}
    else:
        rows = {{int(s): int(i) for i, s in enumerate(net.segment_ids.tolist())}}
        pub = {{(rows[r.segment_id], r.window_end): r.speed_kmh for o in out for r in o if r.status == "ok"}}
    counts = dict(est.counts)
else:
    import pandas as pd
    pd.DataFrame({{"a": [1]}}).groupby("a").sum()
    c0 = time.process_time()
    t0 = time.perf_counter()
    df = pd.DataFrame({{"row": w["rows"], "dev": w["device"], "t_enter": w["t_enter"], "t_exit": w["t_exit"]}})
    df = df.drop_duplicates(["dev", "row", "t_enter"])
    df["len"] = net.length_m[df["row"].to_numpy()]
    df["tt"] = df["t_exit"] - df["t_enter"]
    pane = np.floor(df["t_exit"].to_numpy() / 60.0).astype(np.int64)
    parts = []
    for k in range(5):
        parts.append(df.assign(end=(pane + 1 + k) * 60.0))
    x = pd.concat(parts, ignore_index=True)
    g = x.groupby(["row", "end"]).agg(len=("len", "sum"), tt=("tt", "sum"), n_dev=("dev", "nunique"))
    g = g[g["n_dev"] >= 3]
    speed = g["len"] / g["tt"] * 3.6
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    pub = {{(int(r), float(e)): float(s) for (r, e), s in speed.items()}}
    counts = {{}}
truth = true_window_speeds(net, w, 60.0, 300.0)
err = np.array([pub[k] - truth[k] for k in pub if k in truth])
print(json.dumps({{"s": dt, "traversals": n, "rate": n / dt, "cpu_rate": n / cpu,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "published": len(pub), "mae": float(np.mean(np.abs(err))) if len(err) else None,
                  "bias": float(np.mean(err)) if len(err) else None, "segments": net.n_segments,
                  "counts": counts}}))
"""


def run_one(mode: str, args: argparse.Namespace) -> dict:
    code = _RUN.format(repo=str(REPO), map=args.map, n=args.traversals, hours=args.hours, devices=args.devices,
                       mode=mode, batch=args.batch)
    cmd = [sys.executable, "-c", code]
    if shutil.which("taskset") and not args.no_pin:
        cmd = ["taskset", "-c", "0", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if res.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_map = str(MAPS / "liechtenstein-2024.osm.pbf") if (MAPS / "liechtenstein-2024.osm.pbf").is_file() else "helsinki"
    p.add_argument("--map", default=default_map, help="map file or bundled name (default Liechtenstein if present)")
    p.add_argument("--traversals", type=int, default=1_000_000)
    p.add_argument("--hours", type=float, default=2.0)
    p.add_argument("--devices", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=["arrays", "records", "pandas"])
    p.add_argument("--no-pin", action="store_true", help="do not pin to core 0")
    args = p.parse_args(argv)
    results: dict[str, list[dict]] = {}
    for mode in args.modes:
        results[mode] = [run_one(mode, args) for _ in range(args.runs)]
        rates = [r["rate"] for r in results[mode]]
        cpu_rates = [r["cpu_rate"] for r in results[mode]]
        r0 = results[mode][0]
        print(f"{mode:<8} {statistics.median(rates):>12,.0f} traversals/s wall (min {min(rates):,.0f}, max {max(rates):,.0f}),"
              f" {statistics.median(cpu_rates):,.0f} per CPU-second"
              f"  RSS {max(r['rss_mb'] for r in results[mode]):.0f} MB  published {r0['published']:,}"
              f"  MAE {r0['mae']:.2f} km/h  bias {r0['bias']:+.2f} km/h", flush=True)
    base = statistics.median(r["rate"] for r in results[args.modes[0]])
    print("\n| contender | traversals/s wall, median (min–max) | traversals per CPU-s, median (min–max) | vs first (wall) "
          "| peak RSS MB | published windows | MAE km/h | bias km/h |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, rs in results.items():
        rates = [r["rate"] for r in rs]
        cpu = [r["cpu_rate"] for r in rs]
        med = statistics.median(rates)
        print(f"| {mode} | {med:,.0f} ({min(rates):,.0f}–{max(rates):,.0f}) | {statistics.median(cpu):,.0f} "
              f"({min(cpu):,.0f}–{max(cpu):,.0f}) | {med / base:.2f}× | "
              f"{max(r['rss_mb'] for r in rs):.0f} | {rs[0]['published']:,} | {rs[0]['mae']:.2f} | {rs[0]['bias']:+.2f} |")
    first = results[args.modes[0]][0]
    print(f"\nmap {Path(args.map).name}: {first['segments']:,} segments; {first['traversals']:,} traversals "
          f"(incl. 1 % duplicates) over {args.hours:g} h; batches of {args.batch:,}")
    if first.get("counts"):
        print("estimator counts (first run):", json.dumps(first["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
