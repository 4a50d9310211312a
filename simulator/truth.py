"""Ground truth: per segment and time window, what ALL vehicles did (not just the probes).

For a window ``[w, w + W)`` and a segment of length ``L``, with every passage driven at uniform
speed, the space-mean speed is Edie's generalised definition: total distance driven on the
segment inside the window over total time spent there, ``sum(d_i) / sum(t_i)`` — the harmonic
mean of passage speeds weighted by their length covered in the window. The travel time is
``L`` over that speed; ``vehicles`` counts distinct vehicles present on the segment in the window,
``probe_vehicles`` those among them that carry a phone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geo.network import RoadNetwork
from simulator.traffic import TrafficRun, _ragged_arange

#: Columns of ``truth_segments.csv.gz`` (a contract with the evaluator).
TRUTH_SEGMENT_COLUMNS = ("segment_id", "window_start", "window_s", "speed_kmh", "travel_time_s", "vehicles",
                         "probe_vehicles")
#: Columns of ``truth_paths.csv.gz``.
TRUTH_PATH_COLUMNS = ("device", "trip_id", "seq", "segment_id", "t_enter", "t_exit")


@dataclass
class SegmentTruth:
    """Rows of the segment ground truth, sorted by window size, window start, then segment row."""

    segment: np.ndarray  # segment row
    segment_id: np.ndarray
    window_start: np.ndarray  # epoch s, int64
    window_s: np.ndarray  # int64
    speed_kmh: np.ndarray
    travel_time_s: np.ndarray
    vehicles: np.ndarray
    probe_vehicles: np.ndarray

    def __len__(self) -> int:
        return int(len(self.segment))


def segment_truth(
    network: RoadNetwork,
    traffic: TrafficRun,
    is_probe_trip: np.ndarray,
    windows_s: tuple[int, ...],
    t_from: float,
) -> SegmentTruth:
    """Aggregate every passage into per-segment windows of each size in ``windows_s``.

    Parameters
    ----------
    is_probe_trip
        Boolean per trip.
    t_from
        Windows starting before the one containing this epoch time are left out (warm-up).
    """
    seg = traffic.route_segment.astype(np.int64)
    trip = traffic.passage_trip().astype(np.int64)
    t_in, t_out = traffic.t_enter, traffic.t_exit
    speed = network.length_m[seg] / np.maximum(t_out - t_in, 1e-9)
    parts = []
    for window in sorted(int(w) for w in windows_s):
        w0 = np.floor(t_in / window).astype(np.int64)
        w1 = np.floor(np.nextafter(t_out, -np.inf) / window).astype(np.int64)
        count = np.maximum(w1 - w0 + 1, 1)
        row = np.repeat(np.arange(len(seg)), count)
        win = w0[row] + _ragged_arange(count)
        overlap = np.minimum(t_out[row], (win + 1) * window) - np.maximum(t_in[row], win * window)
        ok = (overlap > 0) & (win >= np.floor(t_from / window))
        row, win, overlap = row[ok], win[ok], overlap[ok]
        wmin = int(win.min()) if len(win) else 0
        # One integer key per (window, segment) cell, window-major so rows come out time-ordered.
        cell = (win - wmin) * network.n_segments + seg[row]
        order = np.argsort(cell, kind="stable")
        cell, row, overlap = cell[order], row[order], overlap[order]
        starts = np.flatnonzero(np.concatenate([[True], cell[1:] != cell[:-1]]))
        time_s = np.add.reduceat(overlap, starts) if len(starts) else np.zeros(0)
        dist_m = np.add.reduceat(overlap * speed[row], starts) if len(starts) else np.zeros(0)
        # Distinct vehicles per cell (a vehicle may pass a segment twice in a window).
        pair = np.unique(cell * np.int64(traffic.n_trips + 1) + trip[row])
        pair_cell = pair // (traffic.n_trips + 1)
        pair_trip = pair % (traffic.n_trips + 1)
        cells = cell[starts]
        vehicles = np.bincount(np.searchsorted(cells, pair_cell), minlength=len(cells))
        probes = np.bincount(np.searchsorted(cells, pair_cell), weights=is_probe_trip[pair_trip],
                             minlength=len(cells)).astype(np.int64)
        s = cells % network.n_segments
        mean_speed = dist_m / np.maximum(time_s, 1e-12)
        parts.append(SegmentTruth(
            segment=s,
            segment_id=network.segment_ids[s],
            window_start=((cells // network.n_segments) + wmin) * window,
            window_s=np.full(len(cells), window, dtype=np.int64),
            speed_kmh=mean_speed * 3.6,
            travel_time_s=network.length_m[s] / np.maximum(mean_speed, 1e-9),
            vehicles=vehicles.astype(np.int64),
            probe_vehicles=probes,
        ))
    return SegmentTruth(*(np.concatenate([getattr(p, f) for p in parts])
                          for f in SegmentTruth.__dataclass_fields__))
