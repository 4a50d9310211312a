"""Map-matcher benchmark: our throughput (batch and online) next to mappymatch and leuvenmapmatching.

Run: ``taskset -c 0 python -m bench.matcher [--map MAP] [--traces 40] [--peer-traces 4] [--runs 5]``

Inputs are seeded simulated traces with a known true path (``tests.matcher_traces``: a random
shortest route, 80 % of free-flow speed, Gaussian noise), the same traces for every contender.

* **batch**: :func:`geo.matcher.match_trace` on each whole trace;
* **online, streamed**: all traces as concurrent devices, pings in event-time order, cut into
  batches of ``--batch`` pings (as a stream operator's ``take()`` would), each batch grouped by
  device and fed through one :meth:`OnlineMatcher.push_many`, then every trip finished;
* **online, one ping per push**: the worst case, each ping its own ``push`` call;
* **peers**: mappymatch's LCSS matcher and leuvenmapmatching's ``DistanceMatcher`` on the first
  ``--peer-traces`` traces (they are slow), timed per ping, same graph (``RoadNetwork.to_networkx``).

Accuracy sits next to speed: the segment-level route accuracy (count-based LCS of the matched vs
true segment sequence, as in the tests) and the per-ping share matched to the true segment, both
on the traces each contender ran. Throughput is pings/s of wall time, median (min-max) over
``--runs`` runs after one warm-up; CPU-time figures are printed too since the machine is shared.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.matcher_traces

from geo.matcher import MatcherConfig, OnlineMatcher, match_trace  # noqa: E402
from geo.network import RoadNetwork, load_network  # noqa: E402
from tests.matcher_traces import SimTrace, random_route, segment_accuracy, simulate_trace  # noqa: E402

DEFAULT_MAP = REPO.parent / "shared" / "data" / "maps" / "liechtenstein-2024.osm.pbf"


def _timed(fn: Callable[[], object], runs: int) -> tuple[list[float], list[float]]:
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def _rate(n: int, secs: list[float]) -> tuple[float, float, float]:
    """Median, min, max pings/s."""
    rates = [n / s for s in secs]
    return statistics.median(rates), min(rates), max(rates)


def _fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:,.0f} ({r[1]:,.0f}–{r[2]:,.0f})"


def _ping_accuracy(net: RoadNetwork, trace: SimTrace, rows: np.ndarray) -> float:
    return float(np.mean(np.asarray(rows) == trace.true_segment))


def _route_accuracy_rows(net: RoadNetwork, trace: SimTrace, rows: list[int]) -> float:
    """Count-based segment accuracy of a matched sequence of segment rows (for peers without fractions)."""
    from geo.model import Traversal

    rows = [r for i, r in enumerate(rows) if r >= 0 and (i == 0 or r != rows[i - 1])]
    travs = [Traversal(int(net.segment_ids[r]), "x", 0.0, 0.0, 1.0) for r in rows]
    return segment_accuracy(net, trace, travs, by_length=False)


# ------------------------------------------------------------------ ours
def bench_ours(net: RoadNetwork, traces: list[SimTrace], runs: int, batch: int) -> dict:
    cfg = MatcherConfig(sigma_m=10.0)
    t0 = time.perf_counter()
    matcher = OnlineMatcher(net, cfg)
    table_s = time.perf_counter() - t0
    n = sum(len(t.pings) for t in traces)

    def batch_all():
        return [match_trace(net, t.pings, matcher=matcher) for t in traces]

    b_wall, b_cpu = _timed(batch_all, runs)
    results = batch_all()
    acc_route = [segment_accuracy(net, t, r.traversals, by_length=False) for t, r in zip(traces, results)]
    acc_len = [segment_accuracy(net, t, r.traversals) for t, r in zip(traces, results)]
    acc_ping = [_ping_accuracy(net, t, r.segment_index) for t, r in zip(traces, results)]

    stream = sorted(((p.ts, i, p) for i, t in enumerate(traces) for p in t.pings), key=lambda x: (x[0], x[1]))

    def online_streamed():
        states = {i: matcher.new_state() for i in range(len(traces))}
        out = 0
        for k in range(0, len(stream), batch):
            groups: dict[int, list] = {}
            for _, i, p in stream[k:k + batch]:
                groups.setdefault(i, []).append(p)
            keys = list(groups)
            res = matcher.push_many([(states[i], groups[i]) for i in keys])
            for i, r in zip(keys, res):
                states[i] = r.state
                out += len(r.traversals)
        for st in states.values():
            out += len(matcher.finish(st).traversals)
        return out

    def online_single():
        out = 0
        for t in traces:
            st = matcher.new_state()
            for p in t.pings:
                r = matcher.push(st, [p])
                st = r.state
                out += len(r.traversals)
            out += len(matcher.finish(st).traversals)
        return out

    o_wall, o_cpu = _timed(online_streamed, runs)
    s_wall, s_cpu = _timed(online_single, max(1, runs // 2))
    sizes = []
    for t in traces[:5]:
        st = matcher.new_state()
        for p in t.pings:
            st = matcher.push(st, [p]).state
            sizes.append(len(st.to_bytes()))
    return {
        "n": n, "table_s": table_s, "table_mb": matcher.table.nbytes / 1e6, "table_entries": len(matcher.table),
        "batch": _rate(n, b_wall), "batch_cpu": _rate(n, b_cpu),
        "online": _rate(n, o_wall), "online_cpu": _rate(n, o_cpu),
        "single": _rate(n, s_wall), "single_cpu": _rate(n, s_cpu),
        "acc_route": float(np.mean(acc_route)), "acc_len": float(np.mean(acc_len)), "acc_ping": float(np.mean(acc_ping)),
        "acc_route_list": acc_route, "acc_ping_list": acc_ping,
        "state_bytes": (int(np.median(sizes)), int(max(sizes))),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ----------------------------------------------------------------- peers
def _nx_graph_with_geometry(net: RoadNetwork):
    from shapely.geometry import LineString

    g = net.to_networkx()
    for _, _, d in g.edges(data=True):
        i = d["segment_index"]
        d["geometry"] = LineString(net.geometry_lonlat(i))
        d["maxspeed"] = str(int(round(net.free_flow_prior_kmh[i])))
    return g


def bench_mappymatch(net: RoadNetwork, traces: list[SimTrace], runs: int) -> dict:
    import pandas as pd
    from mappymatch.constructs.trace import Trace
    from mappymatch.maps.nx.nx_map import NetworkType, NxMap
    from mappymatch.maps.nx.readers.osm_readers import parse_osmnx_graph
    from mappymatch.matchers.lcss.lcss import LCSSMatcher

    g = parse_osmnx_graph(_nx_graph_with_geometry(net), NetworkType.DRIVE,
                          additional_metadata_keys={"segment_index"})
    matcher = LCSSMatcher(NxMap(g))
    mtraces = [Trace.from_dataframe(pd.DataFrame({"latitude": [p.lat for p in t.pings],
                                                  "longitude": [p.lon for p in t.pings]})) for t in traces]
    n = sum(len(t.pings) for t in traces)

    def run():
        return [matcher.match_trace(t) for t in mtraces]

    wall, cpu = _timed(run, runs)
    acc_route, acc_ping = [], []
    for t, res in zip(traces, run()):
        rows = np.array([int(m.road.metadata["segment_index"]) if m.road is not None else -1 for m in res.matches])
        acc_ping.append(_ping_accuracy(net, t, rows))
        path = [int(r.metadata["segment_index"]) for r in res.path] if res.path else rows.tolist()
        acc_route.append(_route_accuracy_rows(net, t, path))
    return {"n": n, "rate": _rate(n, wall), "rate_cpu": _rate(n, cpu),
            "acc_route": float(np.mean(acc_route)), "acc_ping": float(np.mean(acc_ping))}


def bench_leuven(net: RoadNetwork, traces: list[SimTrace], runs: int) -> dict:
    from leuvenmapmatching.map.inmem import InMemMap
    from leuvenmapmatching.matcher.distance import DistanceMatcher

    m = InMemMap("roadpulse", use_latlon=False, use_rtree=True, index_edges=True)
    edge_segment: dict[tuple, int] = {}
    extra = net.n_nodes  # integer ids (its R-tree needs them): nodes first, then inner vertices
    for i in range(net.n_segments):
        g = net.geometry_xy(i)
        inner = list(range(extra, extra + len(g) - 2))
        extra += len(inner)
        ids = [int(net.from_node[i])] + inner + [int(net.to_node[i])]
        for node, (x, y) in zip(ids, g):
            m.add_node(node, (float(y), float(x)))
        for a, b in zip(ids[:-1], ids[1:]):
            m.add_edge(a, b)
            edge_segment[(a, b)] = i
    paths = []
    for t in traces:
        xy = net.to_xy([p.lon for p in t.pings], [p.lat for p in t.pings])
        paths.append([(float(y), float(x)) for x, y in xy])
    n = sum(len(t.pings) for t in traces)

    def run():
        out = []
        for path in paths:
            # Non-emitting states let it pass several graph edges between two fixes: without them it
            # stops after a few pings here (segments are split at their inner vertices, so one
            # 5-s step crosses several edges) and "matches" only the first ~5 % of each trace.
            mt = DistanceMatcher(m, max_dist=50, max_dist_init=50, obs_noise=10, obs_noise_ne=20,
                                 dist_noise=10, non_emitting_states=True, only_edges=True, max_lattice_width=8)
            states, _ = mt.match(path)
            per_ping = {}
            for node in mt.lattice_best:
                if node.is_emitting:
                    per_ping[node.obs] = (node.edge_m.l1, node.edge_m.l2)
            out.append((states, per_ping))
        return out

    wall, cpu = _timed(run, runs)
    acc_route, acc_ping = [], []
    for t, (states, per_ping) in zip(traces, run()):
        rows = np.full(len(t.pings), -1)
        for k, edge in per_ping.items():
            rows[k] = edge_segment.get(tuple(edge), -1)
        acc_ping.append(_ping_accuracy(net, t, rows))
        acc_route.append(_route_accuracy_rows(net, t, [edge_segment.get(tuple(st), -1) for st in states]))
    return {"n": n, "rate": _rate(n, wall), "rate_cpu": _rate(n, cpu),
            "acc_route": float(np.mean(acc_route)), "acc_ping": float(np.mean(acc_ping))}


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--map", default=str(DEFAULT_MAP))
    ap.add_argument("--traces", type=int, default=40, help="traces for our matcher")
    ap.add_argument("--peer-traces", type=int, default=4, help="of those, how many the peers run")
    ap.add_argument("--route-m", type=float, default=5000.0, help="minimum route length, metres")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=500, help="pings per streamed online batch")
    ap.add_argument("--seed", type=int, default=20261128)
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args(argv)

    net = load_network(args.map)
    rng = np.random.default_rng(args.seed)
    traces = [simulate_trace(net, random_route(net, rng, args.route_m), rng, sigma_m=10.0, interval_s=5.0,
                             device=f"dev{i}") for i in range(args.traces)]
    ours = bench_ours(net, traces, args.runs, args.batch)
    peer_set = traces[:args.peer_traces]
    ours_on_peer = [(a, p) for a, p in zip(ours["acc_route_list"][:args.peer_traces], ours["acc_ping_list"][:args.peer_traces])]
    peers = {}
    if not args.no_peers:
        for name, fn in (("leuvenmapmatching DistanceMatcher", bench_leuven), ("mappymatch LCSS", bench_mappymatch)):
            try:
                peers[name] = fn(net, peer_set, args.runs)
            except Exception as exc:  # a peer failing must not hide our figures
                print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    rss_total = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"

    print(f"\nmap {Path(args.map).name}: {net.n_segments} segments; traces: {args.traces} x >= {args.route_m:.0f} m, "
          f"sigma 10 m, every 5 s, {ours['n']} pings; seed {args.seed}; runs {args.runs}; commit {commit}")
    print(f"route table: {ours['table_entries']:,} pairs, {ours['table_mb']:.1f} MB, built in {ours['table_s']:.2f} s; "
          f"state bytes median {ours['state_bytes'][0]}, max {ours['state_bytes'][1]}; "
          f"peak RSS ours {ours['rss_mb']:.0f} MB, whole run {rss_total:.0f} MB\n")
    print("| contender | traces (pings) | pings/s wall, median (min–max) | pings/s CPU | route acc. | ping acc. |")
    print("|---|---|---|---|---|---|")
    acc_r_sub = float(np.mean([a for a, _ in ours_on_peer])) if ours_on_peer else float("nan")
    acc_p_sub = float(np.mean([p for _, p in ours_on_peer])) if ours_on_peer else float("nan")
    print(f"| roadpulse batch (`match_trace`) | {args.traces} ({ours['n']}) | {_fmt(ours['batch'])} | {_fmt(ours['batch_cpu'])} "
          f"| {ours['acc_route']:.3f} (length-weighted {ours['acc_len']:.3f}) | {ours['acc_ping']:.3f} |")
    print(f"| roadpulse online, streamed (`push_many`, {args.batch}-ping batches) | {args.traces} ({ours['n']}) | "
          f"{_fmt(ours['online'])} | {_fmt(ours['online_cpu'])} | = batch where converged | |")
    print(f"| roadpulse online, one ping per `push` | {args.traces} ({ours['n']}) | {_fmt(ours['single'])} | "
          f"{_fmt(ours['single_cpu'])} | | |")
    if peers:
        print(f"| roadpulse batch, on the peers' {args.peer_traces} traces | {args.peer_traces} | | | {acc_r_sub:.3f} | {acc_p_sub:.3f} |")
    for name, r in peers.items():
        ratio = ours["batch"][0] / r["rate"][0]
        ratio_cpu = ours["batch_cpu"][0] / r["rate_cpu"][0]
        print(f"| {name} | {args.peer_traces} ({r['n']}) | {_fmt(r['rate'])} | {_fmt(r['rate_cpu'])} | "
              f"{r['acc_route']:.3f} | {r['acc_ping']:.3f} |  ours batch / peer = {ratio:,.0f}× wall, "
              f"{ratio_cpu:,.0f}× CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
