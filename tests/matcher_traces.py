"""Simulated GPS traces with a known true path, for the map-matcher tests and benchmark.

Deliberately independent of the ``simulator`` package: a random shortest route on the road graph,
driven at 80 % of each segment's free-flow prior, sampled every ``interval_s`` seconds, with
isotropic Gaussian noise of ``sigma_m`` metres per axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geo.matcher import points_at_offsets, route_table
from geo.model import Ping, Traversal
from geo.network import RoadNetwork

T0 = 1_700_000_000.0


@dataclass
class SimTrace:
    """A simulated trace: pings, the true segment rows driven (in order) and per-ping truth."""

    pings: list[Ping]
    route: list[int]
    true_segment: np.ndarray  # network row under each ping
    true_offset: np.ndarray   # metres from that segment's start
    true_xy: np.ndarray       # noiseless position of each ping, metres


def random_route(network: RoadNetwork, rng: np.random.Generator, min_length_m: float = 2000.0) -> list[int]:
    """Segment rows of the shortest route between a random segment and a node 1-2x ``min_length_m`` away."""
    table = route_table(network)
    while True:
        first = int(rng.integers(network.n_segments))
        gap, pred = table.distances_from(np.array([first]), 2.0 * min_length_m)
        far = np.flatnonzero((gap[0] >= min_length_m) & np.isfinite(gap[0]))
        if len(far) == 0:
            continue
        target = int(rng.choice(far))
        route = [first] + table.path_between(first, target, pred_row=pred[0]) + [target]
        # No U-turns (dead-end turnarounds): a driver's trip would not contain them.
        if not set(network.reverse_of[route].tolist()) & set(route):
            return route


def simulate_trace(network: RoadNetwork, route: list[int], rng: np.random.Generator, *, sigma_m: float,
                   interval_s: float, device: str = "sim", speed_factor: float = 0.8,
                   accuracy: bool = False) -> SimTrace:
    """Drive ``route`` and sample noisy pings every ``interval_s`` seconds from inside its first to inside its last segment."""
    seg = np.asarray(route, dtype=np.int64)
    length = network.length_m[seg]
    speed = np.maximum(network.free_flow_prior_kmh[seg] * speed_factor / 3.6, 2.0)
    t_end = np.cumsum(length / speed)
    t_start = t_end - length / speed
    # Start and end somewhere inside the first and last segments, as real trips do.
    t_first = float(t_start[0] + rng.uniform(0.2, 0.8) * (t_end[0] - t_start[0]))
    t_last = float(t_start[-1] + rng.uniform(0.2, 0.8) * (t_end[-1] - t_start[-1]))
    times = np.arange(t_first, t_last + 1e-9, interval_s)
    k = np.minimum(np.searchsorted(t_end, times, side="right"), len(seg) - 1)
    offset = np.clip((times - t_start[k]) * speed[k], 0.0, length[k])
    xy = points_at_offsets(network, seg[k], offset)
    noisy = xy + rng.normal(0.0, sigma_m, size=xy.shape)
    lonlat = network.to_lonlat(noisy)
    acc = float(sigma_m) if accuracy else None
    pings = [Ping(device, T0 + float(t - t_first), float(lat), float(lon), acc) for t, (lon, lat) in zip(times, lonlat)]
    return SimTrace(pings, [int(s) for s in seg], seg[k], offset, xy)


def lcs_weight(a: list, b: list, wa: list[float], wb: list[float]) -> float:
    """Largest total ``min(wa[i], wb[j])`` over the matched pairs of a common subsequence."""
    if not a or not b:
        return 0.0
    prev = [0.0] * (len(b) + 1)
    for x, w in zip(a, wa):
        cur = [0.0]
        for j, y in enumerate(b):
            cur.append(prev[j] + min(w, wb[j]) if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def segment_accuracy(network: RoadNetwork, trace: SimTrace, traversals: list[Traversal], by_length: bool = True) -> float:
    """Segment-level accuracy of matched traversals against the true route.

    ``common / max(total true, total matched)``, where the true sequence is the route from the
    first ping to the last, the matched one the traversals in order, and ``common`` the best
    common subsequence. With ``by_length`` each element weighs the metres covered (partial first
    and last segments count their covered part, so this is 1 - Newson & Krumm's route mismatch
    fraction, bounded below by 0); otherwise each segment counts 1. Missing and extra segments
    both count against it.
    """
    rows = trace.route
    first = rows.index(int(trace.true_segment[0]))
    last = len(rows) - 1 - rows[::-1].index(int(trace.true_segment[-1]))
    true = [int(network.segment_ids[r]) for r in rows[first:last + 1]]
    matched = [t.segment_id for t in traversals]
    if by_length:
        w_true = network.length_m[rows[first:last + 1]].tolist()
        if len(true) == 1:
            w_true[0] = float(trace.true_offset[-1] - trace.true_offset[0])
        else:
            w_true[0] -= float(trace.true_offset[0])
            w_true[-1] = float(trace.true_offset[-1])
        idx = network.index_of(matched) if matched else np.zeros(0, dtype=np.int64)
        w_matched = (network.length_m[idx] * np.array([t.fraction for t in traversals])).tolist()
    else:
        w_true = [1.0] * len(true)
        w_matched = [1.0] * len(matched)
    common = lcs_weight(true, matched, w_true, w_matched)
    return common / max(sum(w_true), sum(w_matched), 1e-9)
