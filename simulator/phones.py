"""Probe phones: where a probe vehicle's phone says it is, when, and when it uploads.

The truth is the vehicle's position on its route at a time (uniform speed along each segment
passage). The phone samples every ``interval_s`` with jitter, loses single fixes (dropouts) and
whole stretches (gaps), adds Gaussian error per axis, a spatially smooth urban-canyon bias and
occasional outliers, stamps fixes with its own slightly skewed clock, and uploads its buffer every
``upload_interval_s`` (and at trip end) as one batch. Each trip gets a fresh opaque device id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geo.network import RoadNetwork
from simulator.config import PhoneModel
from simulator.traffic import TrafficRun, _ragged_arange

#: Side of the urban-canyon bias grid cells, metres.
CANYON_CELL_M = 250.0
#: Upload latency range (network round trip, app scheduling), seconds.
UPLOAD_LATENCY_S = (0.3, 3.0)


@dataclass
class PingTable:
    """Probe pings as columns, in upload order (batch by batch, fixes in time order within one).

    Attributes
    ----------
    devices
        Device id of each probe trip (index ``device``).
    trip
        Trip index (into the :class:`~simulator.traffic.TrafficRun`) of each ping.
    device
        Index into ``devices`` of each ping.
    batch
        Upload batch number of each ping, increasing in file order.
    ts
        Event time as the phone stamps it (true time plus the device's clock skew), epoch s.
    lat, lon
        Reported position, WGS84 degrees.
    accuracy_m, speed_mps, heading_deg
        What the phone reports alongside (NaN when the model does not report them).
    upload_s
        When the batch carrying the ping was uploaded, epoch seconds.
    true_t, true_lat, true_lon
        True time and position of the fix.
    segment, offset_m
        Segment row the vehicle was on and its distance from the segment's start, metres.
    """

    devices: list[str]
    trip: np.ndarray
    device: np.ndarray
    batch: np.ndarray
    ts: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    accuracy_m: np.ndarray
    speed_mps: np.ndarray
    heading_deg: np.ndarray
    upload_s: np.ndarray
    true_t: np.ndarray
    true_lat: np.ndarray
    true_lon: np.ndarray
    segment: np.ndarray
    offset_m: np.ndarray

    def __len__(self) -> int:
        return int(len(self.ts))


def device_ids(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` opaque device ids (16 hex digits), unique within the list."""
    ids: list[str] = []
    seen: set[str] = set()
    raw = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
    for v in raw.tolist():
        s = f"{v:016x}"
        while s in seen:  # vanishingly rare; keeps ids unique per run
            s = f"{int(rng.integers(0, 2**63 - 1)):016x}"
        seen.add(s)
        ids.append(s)
    return ids


class _Geometry:
    """Vectorised point-at-offset and direction on segment polylines."""

    def __init__(self, network: RoadNetwork) -> None:
        xy = network.geom_xy
        ptr = network.geom_ptr
        n_vert = np.diff(ptr)
        seg_of_vertex = np.repeat(np.arange(network.n_segments), n_vert)
        step = np.zeros(len(xy))
        step[1:] = np.hypot(*np.diff(xy, axis=0).T)
        step[ptr[:-1]] = 0.0  # the first vertex of each segment starts at offset 0
        cum = np.cumsum(step)
        within = cum - cum[ptr[:-1]][seg_of_vertex]
        # Each segment's offsets live in their own band so one searchsorted serves all.
        self.base = np.concatenate([[0.0], np.cumsum(network.length_m + 1.0)[:-1]])
        self.key = self.base[seg_of_vertex] + within
        self.xy = xy
        self.ptr = ptr
        self.length = network.length_m

    def locate(self, segment: np.ndarray, offset_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Point (N, 2) metres and heading (degrees clockwise from north) at offsets."""
        off = np.clip(offset_m, 0.0, self.length[segment])
        j = np.searchsorted(self.key, self.base[segment] + off, side="right") - 1
        j = np.clip(j, self.ptr[segment], self.ptr[segment + 1] - 2)
        a, b = self.xy[j], self.xy[j + 1]
        piece = np.maximum(self.key[j + 1] - self.key[j], 1e-9)
        f = np.clip((self.base[segment] + off - self.key[j]) / piece, 0.0, 1.0)[:, None]
        d = b - a
        heading = np.degrees(np.arctan2(d[:, 0], d[:, 1])) % 360.0
        return a + f * d, heading


def _canyon_field(network: RoadNetwork, model: PhoneModel, rng: np.random.Generator):
    """A function xy -> (N, 2) bias, metres: bilinear over a grid of random vectors, zero in
    the cells without canyons."""
    lo = network.node_xy.min(axis=0) - CANYON_CELL_M
    hi = network.node_xy.max(axis=0) + CANYON_CELL_M
    shape = (np.ceil((hi - lo) / CANYON_CELL_M).astype(int) + 2)
    angle = rng.uniform(0.0, 2 * np.pi, shape)
    magnitude = model.canyon_bias_m * rng.uniform(0.3, 1.0, shape) * (rng.random(shape) < model.canyon_share)
    field = np.stack([magnitude * np.cos(angle), magnitude * np.sin(angle)], axis=-1)

    def bias(xy: np.ndarray) -> np.ndarray:
        g = (xy - lo) / CANYON_CELL_M
        i = np.clip(np.floor(g).astype(int), 0, shape - 2)
        f = np.clip(g - i, 0.0, 1.0)
        fx, fy = f[:, 0:1], f[:, 1:2]
        ix, iy = i[:, 0], i[:, 1]
        return ((1 - fx) * (1 - fy) * field[ix, iy] + fx * (1 - fy) * field[ix + 1, iy]
                + (1 - fx) * fy * field[ix, iy + 1] + fx * fy * field[ix + 1, iy + 1])

    return bias


def probe_pings(
    network: RoadNetwork,
    traffic: TrafficRun,
    probe_trips: np.ndarray,
    model: PhoneModel,
    rng: np.random.Generator,
) -> PingTable:
    """The pings the phones of ``probe_trips`` upload, with their truth.

    Parameters
    ----------
    probe_trips
        Sorted trip indices carrying a phone.
    """
    probe_trips = np.asarray(probe_trips, dtype=np.int64)
    n_probe = len(probe_trips)
    devices = device_ids(n_probe, rng)
    depart = traffic.depart_s[probe_trips]
    arrive = traffic.arrive_s[probe_trips]
    duration = arrive - depart
    # Sampling times: a random phase, then jittered intervals, while the trip lasts.
    n_draw = np.ceil(duration / model.interval_s * 1.25).astype(np.int64) + 3
    owner = np.repeat(np.arange(n_probe), n_draw)
    gaps = np.maximum(rng.normal(model.interval_s, model.jitter_s, len(owner)), 0.2 * model.interval_s)
    first = np.cumsum(n_draw) - n_draw
    gaps[first] = rng.uniform(0.0, model.interval_s, n_probe)
    csum = np.cumsum(gaps)
    rel = csum - np.repeat(csum[first] - gaps[first], n_draw)
    keep = rel < duration[owner]
    # Lost fixes: single dropouts and longer gaps.
    keep &= rng.random(len(owner)) >= model.dropout_rate
    n_gaps = rng.poisson(duration / 3600.0 * model.gaps_per_hour)
    gap_owner = np.repeat(np.arange(n_probe), n_gaps)
    gap_start = rng.random(len(gap_owner)) * duration[gap_owner]
    gap_end = gap_start + rng.uniform(model.gap_s[0], model.gap_s[1], len(gap_owner))
    if len(gap_owner):
        # Sorted composite keys (owner, time) make gap membership one searchsorted pair.
        span = float(duration.max()) + 1e3 if n_probe else 1.0
        key = owner * span + rel
        lo = np.searchsorted(key, gap_owner * span + gap_start)
        hi = np.searchsorted(key, gap_owner * span + np.minimum(gap_end, duration[gap_owner]))
        mark = np.zeros(len(key) + 1, dtype=np.int64)
        np.add.at(mark, lo, 1)
        np.add.at(mark, hi, -1)
        keep &= np.cumsum(mark)[:-1] == 0
    owner, rel = owner[keep], rel[keep]
    true_t = depart[owner] + rel
    trip = probe_trips[owner]

    # Where the vehicle truly was: the passage containing the time, uniform speed within it.
    ptr = traffic.route_ptr
    passage_counts = ptr[probe_trips + 1] - ptr[probe_trips]
    passage = np.repeat(ptr[probe_trips], passage_counts) + _ragged_arange(passage_counts)
    p_owner = np.repeat(np.arange(n_probe), passage_counts)
    span = float(duration.max()) + 1e3 if n_probe else 1.0
    p_key = p_owner * span + (traffic.t_enter[passage] - depart[p_owner])
    idx = np.searchsorted(p_key, owner * span + rel, side="right") - 1
    idx = np.clip(idx, 0, len(passage) - 1)
    pas = passage[idx]
    seg = traffic.route_segment[pas].astype(np.int64)
    t_in, t_out = traffic.t_enter[pas], traffic.t_exit[pas]
    frac = np.clip((true_t - t_in) / np.maximum(t_out - t_in, 1e-9), 0.0, 1.0)
    offset = frac * network.length_m[seg]
    geometry = _Geometry(network)
    true_xy, heading = geometry.locate(seg, offset)
    true_speed = network.length_m[seg] / np.maximum(t_out - t_in, 1e-9)

    # What the phone reports.
    n = len(true_t)
    noise = rng.normal(0.0, model.sigma_m, (n, 2))
    noise += _canyon_field(network, model, rng)(true_xy)
    outlier = rng.random(n) < model.outlier_rate
    n_out = int(outlier.sum())
    if n_out:
        r = rng.uniform(model.outlier_m[0], model.outlier_m[1], n_out)
        a = rng.uniform(0.0, 2 * np.pi, n_out)
        noise[outlier] += np.column_stack([r * np.cos(a), r * np.sin(a)])
    # Rounded like the ping files (7 decimals, ~1 cm), so in-memory and written pings are equal.
    lonlat = np.round(network.to_lonlat(true_xy + noise), 7)
    true_lonlat = np.round(network.to_lonlat(true_xy), 7)
    skew = rng.normal(0.0, model.clock_skew_sd_s, n_probe)
    ts = np.round(true_t + skew[owner], 3)
    if model.accuracy_report:
        # Phones report a ~68 % radius: about 1.5 sigma for a 2-D Gaussian, noisy itself.
        accuracy = np.round(np.maximum(1.5 * model.sigma_m, 1.0) * np.exp(rng.normal(0.0, 0.25, n)), 1)
        speed = np.round(np.maximum(true_speed * (1.0 + rng.normal(0.0, 0.05, n)), 0.0), 2)
        hdg = np.round((heading + rng.normal(0.0, 4.0, n)) % 360.0, 1)
        hdg[hdg >= 360.0] = 0.0
    else:
        accuracy = speed = hdg = np.full(n, np.nan)

    # Uploads: every upload_interval_s from a per-device phase, and the rest at trip end.
    phase = rng.uniform(0.0, model.upload_interval_s, n_probe)
    k = np.floor((rel + phase[owner]) / model.upload_interval_s)
    upload = depart[owner] - phase[owner] + (k + 1) * model.upload_interval_s
    upload = np.minimum(upload, arrive[owner])
    latency = rng.uniform(UPLOAD_LATENCY_S[0], UPLOAD_LATENCY_S[1], len(owner))
    # One latency per batch: the one drawn for the batch's first fix.
    batch_key = owner * (10 ** 7) + k.astype(np.int64)
    first_of_batch = np.concatenate([[True], batch_key[1:] != batch_key[:-1]]) if n else np.zeros(0, bool)
    batch_no_in_order = np.cumsum(first_of_batch) - 1
    upload = np.round(upload + latency[first_of_batch][batch_no_in_order], 3)
    order = np.lexsort((true_t, owner, upload))
    batch_sorted = batch_no_in_order[order]
    new_batch = np.concatenate([[True], batch_sorted[1:] != batch_sorted[:-1]]) if n else np.zeros(0, bool)
    return PingTable(
        devices=devices,
        trip=trip[order],
        device=owner[order],
        batch=np.cumsum(new_batch) - 1,
        ts=ts[order],
        lat=lonlat[order, 1],
        lon=lonlat[order, 0],
        accuracy_m=accuracy[order],
        speed_mps=speed[order],
        heading_deg=hdg[order],
        upload_s=upload[order],
        true_t=true_t[order],
        true_lat=true_lonlat[order, 1],
        true_lon=true_lonlat[order, 0],
        segment=seg[order],
        offset_m=offset[order],
    )
