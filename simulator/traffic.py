"""Mesoscopic traffic: vehicles routed on the network, travel times from load and incidents.

Every ``step_s`` each segment's travel time is recomputed from its smoothed inflow with a BPR
volume-delay function, ``t = t0 * (1 + alpha * (q / c) ** beta)``, where ``t0`` is the free-flow
time and ``c`` the class capacity, both scaled down by active incidents. A vehicle entering a
segment takes that segment's current travel time, scaled by its driver's speed preference and a
per-passage random factor (signals, turns). Vehicles are advanced in vectorised batches: per step,
all vehicles whose current segment ends before the step's end move on, repeatedly, until none
does. Departures of each ``reroute_s`` period are routed (Dijkstra, scipy.sparse.csgraph) on the
travel times current at the period's start, so traffic diverts around lasting congestion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from geo.network import RoadNetwork
from simulator.config import CAPACITY_VPH, SimulationConfig


@dataclass
class TrafficRun:
    """Every vehicle's trip and every segment passage.

    Attributes
    ----------
    depart_s, arrive_s
        Per trip: departure and arrival, epoch seconds.
    origin_node, dest_node
        Per trip: node rows.
    route_ptr
        CSR offsets: trip ``i``'s passages are ``route_ptr[i]:route_ptr[i + 1]``.
    route_segment
        Segment row of each passage, int32.
    t_enter, t_exit
        Event times of each passage, epoch seconds; ``t_exit`` of one passage is ``t_enter`` of the
        next, and a trip's first ``t_enter`` is its departure, its last ``t_exit`` its arrival.
    """

    depart_s: np.ndarray
    arrive_s: np.ndarray
    origin_node: np.ndarray
    dest_node: np.ndarray
    route_ptr: np.ndarray
    route_segment: np.ndarray
    t_enter: np.ndarray
    t_exit: np.ndarray

    @property
    def n_trips(self) -> int:
        return int(len(self.depart_s))

    def passage_trip(self) -> np.ndarray:
        """Trip index of each passage, int32."""
        return np.repeat(np.arange(self.n_trips, dtype=np.int32), np.diff(self.route_ptr))


def segment_capacity_vph(network: RoadNetwork) -> np.ndarray:
    """Capacity of each segment from its road class, vehicles per hour."""
    table = np.array([CAPACITY_VPH.get(h, 500.0) for h in _highway_classes()])
    return table[network.highway_code]


def _highway_classes() -> tuple[str, ...]:
    from geo.roads import HIGHWAY_CLASSES

    return HIGHWAY_CLASSES


class Router:
    """Shortest paths by current travel time between node rows, as segment sequences."""

    def __init__(self, network: RoadNetwork) -> None:
        self.network = network
        self.n = network.n_nodes
        self.key = network.from_node.astype(np.int64) * self.n + network.to_node

    def routes(self, weight_s: np.ndarray, origin: np.ndarray, dest: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Routes minimising the sum of ``weight_s`` from each ``origin`` to each ``dest`` node.

        Returns
        -------
        lengths, segments
            Number of segments per trip and their rows, concatenated in trip order.
        """
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import dijkstra

        # Between two nodes only the currently fastest parallel segment is a candidate.
        order = np.lexsort((weight_s, self.key))
        first = np.ones(len(order), dtype=bool)
        first[1:] = self.key[order][1:] != self.key[order][:-1]
        best = order[first]
        best_key = self.key[best]
        w = np.maximum(weight_s[best], 1e-3)
        graph = csr_matrix((w, (self.network.from_node[best], self.network.to_node[best])), shape=(self.n, self.n))
        sources, row = np.unique(origin, return_inverse=True)
        _, pred = dijkstra(graph, directed=True, indices=sources, return_predecessors=True)
        # Walk all trips back from their destinations at once.
        cur = dest.astype(np.int64).copy()
        steps = [cur.copy()]
        alive = cur != origin
        while alive.any():
            nxt = pred[row, cur]
            if (nxt[alive] < 0).any():
                raise ValueError("a trip has no route (origin and destination not connected)")
            cur = np.where(alive, nxt, cur)
            steps.append(np.where(alive, cur, -1))
            alive &= cur != origin
        nodes = np.stack(steps, axis=1)  # (trips, K): dest, ..., origin, -1 padding
        n_seg = (nodes >= 0).sum(axis=1) - 1
        # Segment between consecutive nodes, read backwards from the origin.
        trip = np.repeat(np.arange(len(dest)), n_seg)
        within = _ragged_arange(n_seg)
        col = n_seg[trip] - within  # column of the segment's from-node
        keys = nodes[trip, col] * self.n + nodes[trip, col - 1]
        pos = np.searchsorted(best_key, keys)
        return n_seg, best[pos].astype(np.int32)


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)


class _Growable:
    """A numpy buffer that doubles when full."""

    def __init__(self, dtype: type, capacity: int = 1 << 16) -> None:
        self.data = np.empty(capacity, dtype=dtype)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.size + len(values)
        if need > len(self.data):
            grown = np.empty(max(need, 2 * len(self.data)), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.data[self.size:need] = values
        self.size = need

    def resize(self, n: int) -> None:
        """Make room for ``n`` items, keeping the current ones; new items are uninitialised."""
        if n > len(self.data):
            grown = np.empty(max(n, 2 * len(self.data)), dtype=self.data.dtype)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        self.size = n


def run_traffic(
    network: RoadNetwork,
    config: SimulationConfig,
    depart_s: np.ndarray,
    origin_node: np.ndarray,
    dest_node: np.ndarray,
    rng: np.random.Generator,
    progress: Callable[[float], None] | None = None,
) -> TrafficRun:
    """Drive every trip to its destination.

    Parameters
    ----------
    depart_s
        Sorted departure times, epoch seconds.
    origin_node, dest_node
        Node rows, one per trip, never equal and connected.
    progress
        Called with the share (0..1) of the departure span simulated so far.
    """
    n_trips = len(depart_s)
    n_seg = network.n_segments
    day0 = config.day_start_epoch_s
    free_speed = np.maximum(network.free_flow_prior_kmh * config.free_flow_share, 5.0) / 3.6
    length = np.maximum(network.length_m, 0.1)
    capacity = segment_capacity_vph(network)
    incident_rows = [(network.index_of(list(inc.segment_ids)), day0 + inc.start_s, day0 + inc.end_s, inc.factor)
                     for inc in config.incidents]
    for rows, *_ in incident_rows:
        if (rows < 0).any():
            raise ValueError("an incident names a segment id that is not on this map")
    max_tt = length / (config.min_speed_kmh / 3.6)
    router = Router(network)

    driver = np.clip(rng.normal(1.0, config.driver_sd, n_trips), 0.75, 1.3)
    route_ptr = np.zeros(n_trips + 1, dtype=np.int64)
    seg_buf = _Growable(np.int32)
    enter_buf = _Growable(np.float64)
    exit_buf = _Growable(np.float64)
    arrive = np.full(n_trips, np.nan)

    flow_vph = np.zeros(n_seg)
    step = config.step_s
    smoothing = 1.0 - np.exp(-step / config.flow_tau_s)
    t_begin = float(depart_s[0]) if n_trips else config.start_epoch_s
    t_last_departure = float(depart_s[-1]) if n_trips else t_begin
    span = max(t_last_departure - t_begin, 1.0)
    routed = 0  # trips [0, routed) have routes
    next_dep = 0  # trips [0, next_dep) have departed
    act_trip = np.zeros(0, dtype=np.int64)
    act_pos = np.zeros(0, dtype=np.int64)
    act_end = np.zeros(0, dtype=np.int64)
    act_exit = np.zeros(0)
    t0 = np.floor(t_begin / step) * step
    next_progress = 0.0
    # Vehicles always progress (travel times are finite), so this ends; the cap is a safeguard.
    hard_stop = t_last_departure + 48 * 3600.0

    def travel_time(t: float) -> np.ndarray:
        speed_factor = np.ones(n_seg)
        for rows, a, b, f in incident_rows:
            if a <= t < b:
                speed_factor[rows] = np.minimum(speed_factor[rows], f)
        tt0 = length / (free_speed * speed_factor)
        ratio = flow_vph / (capacity * speed_factor)
        return np.minimum(tt0 * (1.0 + config.bpr_alpha * ratio ** config.bpr_beta), max_tt)

    while next_dep < n_trips or len(act_trip):
        t1 = t0 + step
        if t0 > hard_stop:
            raise RuntimeError("traffic did not drain 48 h after the last departure")
        tt = travel_time(t0)
        # Route the next period's departures on the travel times of now.
        if routed < n_trips and depart_s[routed] < t1:
            hi = int(np.searchsorted(depart_s, t0 + config.reroute_s, side="left"))
            hi = max(hi, int(np.searchsorted(depart_s, t1, side="left")))
            lens, segs = router.routes(tt, origin_node[routed:hi], dest_node[routed:hi])
            route_ptr[routed + 1:hi + 1] = route_ptr[routed] + np.cumsum(lens)
            seg_buf.extend(segs)
            enter_buf.resize(seg_buf.size)
            exit_buf.resize(seg_buf.size)
            routed = hi
        entries = np.zeros(n_seg)
        # Departures in this step enter their first segment.
        hi = int(np.searchsorted(depart_s, t1, side="left"))
        if hi > next_dep:
            new = np.arange(next_dep, hi)
            pos = route_ptr[new]
            s = seg_buf.data[pos]
            enter_buf.data[pos] = depart_s[new]
            ex = depart_s[new] + tt[s] * _passage_factor(driver[new], config.traversal_sd, rng)
            act_trip = np.concatenate([act_trip, new])
            act_pos = np.concatenate([act_pos, pos])
            act_end = np.concatenate([act_end, route_ptr[new + 1]])
            act_exit = np.concatenate([act_exit, ex])
            entries += np.bincount(s, minlength=n_seg)
            next_dep = hi
        # Move everyone whose segment ends within this step, until nobody's does.
        while True:
            moving = np.flatnonzero(act_exit < t1)
            if not len(moving):
                break
            t_out = act_exit[moving]
            pos = act_pos[moving]
            exit_buf.data[pos] = t_out
            pos = pos + 1
            done = pos >= act_end[moving]
            if done.any():
                arrive[act_trip[moving[done]]] = t_out[done]
            go = ~done
            movers, pos, t_in = moving[go], pos[go], t_out[go]
            s = seg_buf.data[pos]
            enter_buf.data[pos] = t_in
            act_pos[movers] = pos
            act_exit[movers] = t_in + tt[s] * _passage_factor(driver[act_trip[movers]], config.traversal_sd, rng)
            entries += np.bincount(s, minlength=n_seg)
            if done.any():
                keep = np.ones(len(act_trip), dtype=bool)
                keep[moving[done]] = False
                act_trip, act_pos, act_end, act_exit = act_trip[keep], act_pos[keep], act_end[keep], act_exit[keep]
        flow_vph += (entries * (3600.0 / step) - flow_vph) * smoothing
        t0 = t1
        if progress is not None and (t0 - t_begin) / span >= next_progress:
            progress(min(1.0, (t0 - t_begin) / span))
            next_progress += 0.01
    if progress is not None:
        progress(1.0)
    n = seg_buf.size
    return TrafficRun(
        depart_s=depart_s, arrive_s=arrive, origin_node=origin_node, dest_node=dest_node,
        route_ptr=route_ptr, route_segment=seg_buf.data[:n].copy(),
        t_enter=enter_buf.data[:n].copy(), t_exit=exit_buf.data[:n].copy(),
    )


def _passage_factor(driver: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplier of a segment's travel time for one passage: the driver's pace times a
    lognormal per-passage factor (mean 1)."""
    if sd <= 0:
        return 1.0 / driver
    return np.exp(rng.normal(-0.5 * sd * sd, sd, len(driver))) / driver
