"""Travel demand: where trips start and end, and when they depart.

Trips run between *zones*: up to ``max_zones`` nodes of the network's largest strongly connected
component (so every trip has a route), each standing for the road length around it. A zone's
"home" weight is the residential road length nearest to it, its "work" weight the length of
bigger roads; in the morning trips run mostly home -> work, in the afternoon back. Destinations
follow a gravity model (``exp(-distance / trip_scale_m)``), departures a 24-hour profile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geo.network import RoadNetwork
from simulator.config import DEFAULT_TRIPS_PER_KM, SimulationConfig

_HOME_CLASSES = ("residential", "living_street", "unclassified", "road")
_NO_ZONE_CLASSES = ("motorway", "motorway_link", "trunk", "trunk_link")


@dataclass(frozen=True)
class Zones:
    """Origin/destination nodes with their weights.

    Attributes
    ----------
    node
        Node rows of the zones, int64.
    xy
        Their metric coordinates, metres, shape (Z, 2).
    home, work
        Weights (road metres) of residential and other land use around each zone.
    """

    node: np.ndarray
    xy: np.ndarray
    home: np.ndarray
    work: np.ndarray


def largest_strong_component(network: RoadNetwork) -> np.ndarray:
    """Boolean mask of nodes in the largest strongly connected component."""
    from scipy.sparse.csgraph import connected_components

    _, labels = connected_components(network.node_graph, directed=True, connection="strong")
    return labels == np.argmax(np.bincount(labels))


def choose_zones(network: RoadNetwork, max_zones: int, rng: np.random.Generator,
                 through_share: float = 0.0) -> Zones:
    """Pick up to ``max_zones`` zone nodes, spread like the road network, and weigh them.

    ``through_share`` of all trip ends go to *gateways*: bigger roads leaving the map's extract,
    standing for traffic from and to the world outside it.
    """
    from scipy.spatial import cKDTree

    hw = network.highway
    home_seg = np.isin(hw, _HOME_CLASSES)
    zone_seg = ~np.isin(hw, _NO_ZONE_CLASSES)
    n = network.n_nodes
    # Each node stands for half the length of the segments touching it.
    half = network.length_m / 2.0
    home_w = np.bincount(network.from_node, half * home_seg, n) + np.bincount(network.to_node, half * home_seg, n)
    work_w = np.bincount(network.from_node, half * ~home_seg, n) + np.bincount(network.to_node, half * ~home_seg, n)
    touches_zone_road = np.zeros(n, dtype=bool)
    touches_zone_road[network.from_node[zone_seg]] = True
    touches_zone_road[network.to_node[zone_seg]] = True
    connected = largest_strong_component(network)
    candidates = np.flatnonzero(connected & touches_zone_road)
    if len(candidates) < 2:
        raise ValueError("the map has fewer than two connected places to drive between")
    gates = _gateways(network, connected)[: max(max_zones // 8, 1)] if through_share > 0 else np.zeros(0, np.int64)
    inner = np.setdiff1d(candidates, gates)
    weight = home_w[inner] + work_w[inner]
    n_inner = max(max_zones - len(gates), 2)
    if len(inner) > n_inner:
        pick = rng.choice(len(inner), size=n_inner, replace=False, p=weight / weight.sum())
        inner = np.sort(inner[pick])
    zone_nodes = np.concatenate([inner, gates]).astype(np.int64)
    zxy = network.node_xy[zone_nodes]
    # Every node's weight goes to its nearest inner zone (a Voronoi partition of the map).
    _, nearest = cKDTree(network.node_xy[inner]).query(network.node_xy)
    home = np.concatenate([np.bincount(nearest, home_w, len(inner)), np.zeros(len(gates))])
    work = np.concatenate([np.bincount(nearest, work_w, len(inner)), np.zeros(len(gates))])
    if len(gates):
        # Gateways stand for the world outside the extract: they get ``through_share`` of all
        # trip ends, split evenly, half as homes (in-commuters) and half as workplaces.
        outside = through_share / (1.0 - through_share) * (home.sum() + work.sum()) / len(gates)
        home[len(inner):] = outside / 2.0
        work[len(inner):] = outside / 2.0
    return Zones(zone_nodes, zxy, home, work)


def _gateways(network: RoadNetwork, connected: np.ndarray) -> np.ndarray:
    """Nodes where a bigger road (tertiary or above) leaves the map: near the edge of the map's
    bounding box, with a single neighbour. Sorted by road class (most important first)."""
    n = network.n_nodes
    big = network.frc <= 4
    neighbours = np.unique(np.concatenate([
        network.from_node * n + network.to_node, network.to_node * n + network.from_node]))
    degree = np.bincount(neighbours // n, minlength=n)
    lo, hi = network.node_xy.min(axis=0), network.node_xy.max(axis=0)
    margin = np.maximum(0.03 * (hi - lo), 50.0)
    near_edge = ((network.node_xy < lo + margin) | (network.node_xy > hi - margin)).any(axis=1)
    best_frc = np.full(n, 99)
    np.minimum.at(best_frc, network.from_node[big], network.frc[big])
    np.minimum.at(best_frc, network.to_node[big], network.frc[big])
    gate = np.flatnonzero(connected & near_edge & (degree == 1) & (best_frc < 99))
    return gate[np.argsort(best_frc[gate], kind="stable")]


def trips_per_day(network: RoadNetwork, config: SimulationConfig) -> int:
    """The configured daily trip count, or the default scaled to the network's directed km."""
    if config.trips_per_day is not None:
        return int(config.trips_per_day)
    return int(round(DEFAULT_TRIPS_PER_KM * float(network.length_m.sum()) / 1000.0))


def departure_rate(config: SimulationConfig, daily_trips: float, t_local_s: np.ndarray) -> np.ndarray:
    """Departures per second at local times of day ``t_local_s`` (seconds after midnight).

    The hourly weights are interpolated linearly between hour midpoints (cyclic over the day)
    and scaled so that a whole day yields ``daily_trips``.
    """
    w = np.asarray(config.demand_profile, dtype=float)
    w = w / w.sum()
    hours = (np.asarray(t_local_s, dtype=float) / 3600.0) % 24.0
    centres = np.arange(24) + 0.5
    share_per_hour = np.interp(hours, np.concatenate([[-0.5], centres, [24.5]]),
                               np.concatenate([[w[-1]], w, [w[0]]]))
    return daily_trips * share_per_hour / 3600.0


def departure_times(config: SimulationConfig, daily_trips: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted departure times, seconds after local midnight, from ``start_s - warmup_s`` to the end.

    A Poisson process per minute with the rate of :func:`departure_rate`.
    """
    t0 = config.start_s - config.warmup_s
    t1 = config.start_s + config.hours * 3600.0
    edges = np.arange(t0, t1 + 60.0, 60.0)
    edges[-1] = t1
    edges = edges[np.concatenate([[True], np.diff(edges) > 0])]
    mids = (edges[:-1] + edges[1:]) / 2.0
    counts = rng.poisson(departure_rate(config, daily_trips, mids) * np.diff(edges))
    starts = np.repeat(edges[:-1], counts)
    widths = np.repeat(np.diff(edges), counts)
    return np.sort(starts + rng.random(len(starts)) * widths)


def _home_share(t_local_s: np.ndarray) -> np.ndarray:
    """Share of origins weighted by "home" (vs "work") at local times of day."""
    h = (np.asarray(t_local_s) / 3600.0) % 24.0
    return np.select([(h >= 5) & (h < 11), (h >= 14) & (h < 20)], [0.8, 0.2], 0.5)


def draw_od(zones: Zones, t_local_s: np.ndarray, config: SimulationConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Origin and destination zone index of each trip departing at ``t_local_s``.

    Returns
    -------
    origin, destination
        Indices into ``zones``, int64; never equal.
    """
    n = len(t_local_s)
    z = len(zones.node)
    d = np.hypot(*(zones.xy[:, None, :] - zones.xy[None, :, :]).transpose(2, 0, 1))
    decay = np.exp(-d / max(config.trip_scale_m, 1.0))
    far_enough = d >= config.min_trip_m
    np.fill_diagonal(far_enough, False)
    home_share = _home_share(t_local_s)
    origin = np.empty(n, dtype=np.int64)
    dest = np.empty(n, dtype=np.int64)
    for share in np.unique(home_share):
        sel = np.flatnonzero(home_share == share)
        ow = share * zones.home + (1.0 - share) * zones.work
        dw = (1.0 - share) * zones.home + share * zones.work
        ow = np.maximum(ow, 1e-9)
        origin[sel] = rng.choice(z, size=len(sel), p=ow / ow.sum())
        p = np.maximum(dw, 1e-9)[None, :] * decay * far_enough
        # A zone with nothing far enough (tiny maps) may go anywhere but to itself.
        empty = p.sum(axis=1) <= 0
        if empty.any():
            p[empty] = np.maximum(dw, 1e-9)[None, :] * (1.0 - np.eye(z)[empty])
        cdf = np.cumsum(p, axis=1)
        cdf /= cdf[:, -1:]
        # One searchsorted for all trips: row r's CDF is shifted into [r, r + 1].
        flat = (cdf + np.arange(z)[:, None]).ravel()
        u = rng.random(len(sel))
        pos = np.searchsorted(flat, origin[sel] + np.minimum(u, 1.0 - 1e-12), side="right")
        dest[sel] = np.minimum(pos - origin[sel] * z, z - 1)
    same = origin == dest
    if same.any():  # only possible through float round-off at a CDF edge
        dest[same] = (dest[same] + 1) % z
    return origin, dest
