"""Scaling: matcher, estimator and end-to-end throughput as the map grows and as active devices grow.

    python -m bench.scale [--runs 5] [--axes maps,devices] [--devices 1000,10000,100000]

Every case runs in a fresh process pinned to core 0 (``taskset -c 0``), so its peak RSS is its own;
each measurement is warmed up once and then repeated ``--runs`` times (median, min–max). Rates are
quoted per CPU second of the pinned process (the steady per-core figure on a shared machine), with the
wall-clock medians beside them.

**Map axis** (``helsinki`` bundled → ``monaco-2021`` → ``liechtenstein-2024`` from ``../shared/data/maps``):
a seeded simulated morning hour (07:00, every vehicle carries a phone) on each map, as device uploads.

* *matcher*: :class:`geo.matcher.OnlineMatcher` alone, ``push_many`` over the uploads (one upload per
  device per call, as the ingest operator does), then ``finish`` every device; pings/s. Next to it the
  share of pings it matched and the route-table build time (built once per process, as in a worker).
* *estimator*: :class:`congestion.estimator.SpeedEstimator` ``add_arrays`` + ``advance_arrays`` over the
  matcher's traversals, replicated under other device names to ≥ 200,000, in exit-time order, batches of
  20,000; traversals/s.
* *end-to-end*: :class:`streams.embedded.EmbeddedPipeline` over the raw upload messages (decode,
  validate, pseudonymise, trim, match, aggregate, publish) including ``finish``; pings/s.

**Device axis** (Liechtenstein): N devices active at once, cloned from the simulated probes of a
morning hour (renamed, a fraction of a second apart). Every device first uploads once (30 s, ~6 pings:
its trip-trim and matcher state now exist; not timed), then the next ``--slice`` uploads in round-robin
order are timed, with all N devices' state in memory:

* *ingest+match*: :class:`streams.operators.IngestMatch` (the worker's hot path), restored from the
  serialised device states for each run, as a worker restores them from its table; pings/s, and the
  serialised state per device;
* *estimator*: ``bench.estimator.make_workload`` (500,000 traversals, 1 h, Liechtenstein) from N devices;
  traversals/s;
* *end-to-end*: the embedded pipeline restored the same way, over the same slice; pings/s.

Writes ``bench/plots/scale_maps.png``, ``bench/plots/scale_devices.png`` and ``bench/plots/scale.json``,
and prints the tables for RESULTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MAPS = REPO.parent / "shared" / "data" / "maps"
PLOTS = Path(__file__).resolve().parent / "plots"
SEED = 20261128
MAP_CASES = ["helsinki", "monaco-2021.osm.pbf", "liechtenstein-2024.osm.pbf"]
DEVICE_MAP = "liechtenstein-2024.osm.pbf"


def _map_path(name: str):
    from geo import bundled_map

    return bundled_map(name) if "." not in name else MAPS / name


def _timed(fn, runs: int) -> tuple[list[float], list[float], object]:
    """Warm up once, then ``runs`` timings of ``fn()``: wall seconds, CPU seconds, the last result."""
    out = fn()
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu, out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vm_rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS"))


def _messages(uploads) -> list[tuple[bytes, bytes]]:
    return [(d.encode(), json.dumps({"device": d, "pings": [p.to_dict() for p in ps]}).encode()) for d, ps in uploads]


def _rounds(uploads):
    """Split uploads (in order) into calls with at most one upload per device, as IngestMatch does."""
    batch, seen = [], set()
    for dev, ps in uploads:
        if dev in seen or len(batch) >= 500:
            yield batch
            batch, seen = [], set()
        batch.append((dev, ps))
        seen.add(dev)
    if batch:
        yield batch


def estimator_rate(net, seg, dev, t_enter, t_exit, frac, settings) -> tuple[float, float]:
    """Traversals per wall second and per CPU second of add_arrays + advance_arrays in exit-time batches
    of 20,000 (one timing)."""
    from congestion.estimator import EstimatorConfig, SpeedEstimator

    est = SpeedEstimator(net, EstimatorConfig.from_settings(settings))
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(seg), 20_000):
        j = slice(i, i + 20_000)
        est.add_arrays(seg[j], dev[j], t_enter[j], t_exit[j], frac[j])
        est.advance_arrays(float(t_exit[j][-1]) - 30.0)
    est.advance_arrays(float(t_exit[-1]) + 3600.0)
    return len(seg) / (time.perf_counter() - t0), len(seg) / (time.process_time() - c0)


def case_map(name: str, runs: int) -> dict:
    from geo.matcher import OnlineMatcher, route_table
    from geo.network import load_network
    from simulator.config import SimulationConfig
    from simulator.day import simulate_day
    from streams.embedded import EmbeddedPipeline
    from streams.operators import matcher_config
    from streams.settings import Settings

    settings = Settings(map=name)
    net = load_network(_map_path(name))
    t0 = time.perf_counter()
    route_table(net)
    table_s = time.perf_counter() - t0
    sim = simulate_day(net, SimulationConfig(hours=1.0, start_s=7 * 3600, seed=SEED, probe_share=1.0))
    uploads = list(sim.ping_batches())
    n_pings = sum(len(ps) for _, ps in uploads)
    matcher = OnlineMatcher(net, matcher_config(settings))

    def run_matcher():
        states, traversals, matched = {}, [], 0
        for batch in _rounds(uploads):
            items = [(states.get(d) or matcher.new_state(), ps) for d, ps in batch]
            for (d, _), res in zip(batch, matcher.push_many(items)):
                states[d] = res.state
                traversals += res.traversals
                matched += res.matched
        for st in states.values():
            traversals += matcher.finish(st).traversals
        return traversals, matched

    m_times, m_cpu, (traversals, matched) = _timed(run_matcher, runs)
    # estimator input: the matcher's traversals, replicated under other device names, exit-time order
    reps = max(1, math.ceil(200_000 / max(len(traversals), 1)))
    order = np.argsort([t.t_exit for t in traversals] * reps, kind="stable")
    seg = np.array([t.segment_id for t in traversals] * reps, dtype=np.int64)[order]
    dev = np.array([f"{t.device}~{r}" for r in range(reps) for t in traversals], dtype=object)[order]
    t_in = np.array([t.t_enter for t in traversals] * reps)[order]
    t_out = np.array([t.t_exit for t in traversals] * reps)[order]
    frac = np.array([t.fraction for t in traversals] * reps)[order]
    est = [estimator_rate(net, seg, list(dev), t_in, t_out, frac, settings) for _ in range(runs + 1)][1:]
    messages = _messages(uploads)

    def run_e2e():
        published = []
        pipe = EmbeddedPipeline(net, settings, on_publish=published.extend)
        for i in range(0, len(messages), 200):
            pipe.process_messages(messages[i:i + 200])
        pipe.finish()
        return sum(1 for s in published if s.status == "ok")

    e_times, e_cpu, ok = _timed(run_e2e, runs)
    return {
        "case": "map", "map": name, "segments": net.n_segments, "route_table_s": table_s, "pings": n_pings,
        "uploads": len(uploads), "matched_share": matched / n_pings, "traversals": len(traversals),
        "matcher_rates": [n_pings / t for t in m_times], "matcher_cpu_rates": [n_pings / t for t in m_cpu],
        "estimator_traversals": len(seg), "estimator_rates": [w for w, _ in est], "estimator_cpu_rates": [c for _, c in est],
        "e2e_rates": [n_pings / t for t in e_times], "e2e_cpu_rates": [n_pings / t for t in e_cpu], "published_ok": ok,
        "rss_mb": _rss_mb(),
    }


def case_devices(n_devices: int, runs: int, slice_uploads: int) -> dict:
    from bench.estimator import make_workload
    from geo.matcher import route_table
    from geo.model import Ping
    from geo.network import load_network
    from simulator.config import SimulationConfig
    from simulator.day import simulate_day
    from streams.embedded import EmbeddedPipeline
    from streams.operators import IngestMatch
    from streams.settings import Settings

    settings = Settings(map=DEVICE_MAP)
    net = load_network(_map_path(DEVICE_MAP))
    sim = simulate_day(net, SimulationConfig(hours=1.0, start_s=7 * 3600, seed=SEED, probe_share=1.0))
    per_device: dict[str, list] = {}
    for d, ps in sim.ping_batches():
        per_device.setdefault(d, []).append(ps)
    need = 1 + math.ceil(slice_uploads / n_devices)
    base = [ups for ups in per_device.values() if len(ups) >= need + 2]
    t_ref = 7.5 * 3600 + min(p.ts for ups in base for p in ups[0])  # every clone drives at the same time

    def upload(i: int, k: int) -> tuple[bytes, bytes]:
        """Upload k of clone i: its base trace's upload k+1 (mid-trip), renamed, moved in time so that every
        clone's trace starts at the same moment (all N devices are active together)."""
        trace = base[i % len(base)]
        ps = trace[k + 1]
        dt = t_ref - trace[1][0].ts + (i // len(base)) * 0.013
        dev = f"d{i:06d}"
        return dev.encode(), json.dumps({"device": dev, "pings": [
            Ping(dev, p.ts + dt, p.lat, p.lon, p.accuracy_m, p.speed_mps, p.heading_deg).to_dict() for p in ps]}).encode()

    warm = [upload(i, 0) for i in range(n_devices)]
    timed = [upload(j % n_devices, 1 + j // n_devices) for j in range(slice_uploads)]
    n_pings = sum(len(json.loads(v)["pings"]) for _, v in timed)
    n_base = len(base)
    del sim, per_device, base
    gc.collect()
    route_table(net)  # built once per process (as in a worker), before the devices' memory is measured
    rss_before = _vm_rss_mb()
    ingest = IngestMatch(net, settings)
    for i in range(0, len(warm), 1000):
        ingest.process_messages(warm[i:i + 1000])
    rss_held = _vm_rss_mb()  # all N devices' live state (and the matcher's route table, built by now)
    states, _ = ingest.take_changes()
    watermark = ingest.watermark
    state_bytes = sum(len(v) for v in states.values())
    matcher = ingest.matcher
    del warm

    def run_ingest():
        op = IngestMatch(net, settings, matcher=matcher)
        op.load(states.items(), watermark)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(timed), 1000):
            op.process_messages(timed[i:i + 1000])
        return time.perf_counter() - t0, time.process_time() - c0, len(op.devices)

    def run_e2e():
        pipe = EmbeddedPipeline(net, settings)
        pipe.ingest = IngestMatch(net, settings, stats=pipe.stats, matcher=matcher)
        pipe.ingest.load(states.items(), watermark)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(timed), 1000):
            pipe.process_messages(timed[i:i + 1000])
        return time.perf_counter() - t0, time.process_time() - c0

    ingest_runs = [run_ingest() for _ in range(runs + 1)][1:]
    e2e_times = [run_e2e() for _ in range(runs + 1)][1:]
    w = make_workload(net, 500_000, 1.0, n_devices)
    frac = np.ones(len(w["t_exit"]))
    devs = [f"p{d}" for d in w["device"].tolist()]
    est = [estimator_rate(net, w["segment_ids"], devs, w["t_enter"], w["t_exit"], frac, settings)
           for _ in range(runs + 1)][1:]
    return {
        "case": "devices", "devices": n_devices, "active_after_warmup": len(states), "base_traces": n_base,
        "slice_uploads": slice_uploads, "slice_pings": n_pings, "state_bytes_per_device": state_bytes / max(len(states), 1),
        "ingest_rates": [n_pings / t for t, _, _ in ingest_runs], "ingest_cpu_rates": [n_pings / c for _, c, _ in ingest_runs],
        "devices_held": ingest_runs[-1][2],
        "estimator_rates": [w for w, _ in est], "estimator_cpu_rates": [c for _, c in est],
        "e2e_rates": [n_pings / t for t, _ in e2e_times], "e2e_cpu_rates": [n_pings / c for _, c in e2e_times],
        "rss_before_warmup_mb": rss_before, "rss_devices_held_mb": rss_held, "rss_mb": _rss_mb(),
    }


# ------------------------------------------------------------------ driver


def _spawn(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.scale", *args]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", "0", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _med(rates: list[float]) -> str:
    return f"{statistics.median(rates):,.0f}"


def _fmt(rates: list[float]) -> str:
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--axes", default="maps,devices")
    ap.add_argument("--devices", default="1000,10000,100000")
    ap.add_argument("--slice", type=int, default=5000, help="uploads timed on the device axis")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # child process: one case, JSON on stdout
    args = ap.parse_args()
    if args.case:
        kind, value = args.case.split(":", 1)
        out = case_map(value, args.runs) if kind == "map" else case_devices(int(value), args.runs, args.slice)
        print(json.dumps(out))
        return
    results: dict[str, list[dict]] = {"maps": [], "devices": []}
    axes = args.axes.split(",")
    if "maps" in axes:
        for name in MAP_CASES:
            if "." in name and not (MAPS / name).is_file():
                print(f"skip {name}: not in {MAPS}", flush=True)
                continue
            results["maps"].append(_spawn(["--case", f"map:{name}", "--runs", str(args.runs)]))
            print(json.dumps({k: v for k, v in results["maps"][-1].items() if not k.endswith("rates")}), flush=True)
    if "devices" in axes:
        for n in [int(x) for x in args.devices.split(",")]:
            results["devices"].append(_spawn(["--case", f"devices:{n}", "--runs", str(args.runs),
                                              "--slice", str(args.slice)]))
            print(json.dumps({k: v for k, v in results["devices"][-1].items() if not k.endswith("rates")}), flush=True)
    PLOTS.mkdir(parents=True, exist_ok=True)
    (PLOTS / "scale.json").write_text(json.dumps(results, indent=1))
    report(results)
    plot(results)


def report(results: dict) -> None:
    if results["maps"]:
        print("\n| map | segments | pings | matched | matcher pings/CPU-s | estimator traversals/CPU-s | "
              "end-to-end pings/CPU-s | wall medians (matcher / estimator / e2e) | route table s | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in results["maps"]:
            print(f"| {r['map']} | {r['segments']:,} | {r['pings']:,} | {r['matched_share']:.1%} | "
                  f"{_fmt(r['matcher_cpu_rates'])} | {_fmt(r['estimator_cpu_rates'])} | {_fmt(r['e2e_cpu_rates'])} | "
                  f"{_med(r['matcher_rates'])} / {_med(r['estimator_rates'])} / {_med(r['e2e_rates'])} | "
                  f"{r['route_table_s']:.1f} | {r['rss_mb']:.0f} |")
    if results["devices"]:
        base = results["devices"][0]
        print("\n| active devices | held after warm-up | state B/device (serialised) | RSS growth with the devices MB | "
              "ingest+match pings/CPU-s | estimator traversals/CPU-s | end-to-end pings/CPU-s | "
              f"e2e vs {base['devices']:,} | wall medians (ingest / estimator / e2e) | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in results["devices"]:
            ratio = statistics.median(r["e2e_cpu_rates"]) / statistics.median(base["e2e_cpu_rates"])
            print(f"| {r['devices']:,} | {r['active_after_warmup']:,} | {r['state_bytes_per_device']:.0f} | "
                  f"{r['rss_devices_held_mb'] - r['rss_before_warmup_mb']:.0f} | {_fmt(r['ingest_cpu_rates'])} | "
                  f"{_fmt(r['estimator_cpu_rates'])} | {_fmt(r['e2e_cpu_rates'])} | {ratio:.2f}× | "
                  f"{_med(r['ingest_rates'])} / {_med(r['estimator_rates'])} / {_med(r['e2e_rates'])} | {r['rss_mb']:.0f} |")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = statistics.median
    if results["maps"]:
        rows = results["maps"]
        x = [r["segments"] for r in rows]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, label in (("matcher_cpu_rates", "matcher, pings/CPU-s"),
                           ("e2e_cpu_rates", "end-to-end (embedded), pings/CPU-s"),
                           ("estimator_cpu_rates", "estimator, traversals/CPU-s")):
            ax.plot(x, [med(r[key]) for r in rows], marker="o", label=label)
        for r in rows:
            ax.annotate(r["map"].split(".")[0], (r["segments"], med(r["matcher_cpu_rates"])), textcoords="offset points",
                        xytext=(4, 6), fontsize=8)
        ax.set_xlabel("directed segments in the map")
        ax.set_ylabel("per CPU second (pinned to one core)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title("throughput as the map grows")
        fig.tight_layout()
        fig.savefig(PLOTS / "scale_maps.png", dpi=100)
        plt.close(fig)
    if results["devices"]:
        rows = results["devices"]
        x = [r["devices"] for r in rows]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
        for key, label in (("ingest_cpu_rates", "ingest+match, pings/CPU-s"),
                           ("e2e_cpu_rates", "end-to-end, pings/CPU-s"),
                           ("estimator_cpu_rates", "estimator, traversals/CPU-s")):
            ax.plot(x, [med(r[key]) for r in rows], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("active devices")
        ax.set_ylabel("per CPU second (pinned to one core)")
        ax.legend()
        ax.set_title("throughput as active devices grow (Liechtenstein)")
        ax2.plot(x, [r["rss_devices_held_mb"] - r["rss_before_warmup_mb"] for r in rows], marker="o")
        ax2.set_xscale("log")
        ax2.set_xlabel("active devices")
        ax2.set_ylabel("RSS growth holding the devices, MB")
        ax2.set_title("memory")
        fig.tight_layout()
        fig.savefig(PLOTS / "scale_devices.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
