"""``roadpulse match --map MAP --pings FILE --out FILE``: batch map matching of trace files.

Reads CSV/JSONL/GPX pings with :func:`simulator.formats.read_pings`, matches each device's trace
with :func:`geo.matcher.match_trace`, and writes one CSV row per ping (matched segment with its
OSM way and node ids, offset, snapped position, or the reason it was dropped) plus one CSV row per
traversal (to ``--traversals``, default ``<out>.traversals.csv``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from collections import Counter
from pathlib import Path

from geo.bundled import resolve_map
from geo.matcher import MatcherConfig, OnlineMatcher, match_trace
from geo.model import Ping
from geo.network import MapLoadError, RoadNetwork, load_network
from simulator.formats import ReadReport, open_text, read_pings

log = logging.getLogger(__name__)

PING_COLUMNS = ("device", "ts", "lat", "lon", "trip", "segment_id", "osm_way_id", "osm_start_node_id",
                "osm_end_node_id", "offset_m", "snapped_lat", "snapped_lon", "reason")
TRAVERSAL_COLUMNS = ("device", "trip", "segment_id", "osm_way_id", "osm_start_node_id", "osm_end_node_id",
                     "name", "length_m", "fraction", "t_enter", "t_exit", "travel_time_s")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("match", help="map-match trace files (CSV/JSONL/GPX) onto a road network")
    p.add_argument("--map", required=True, help="OSM file (.osm, .osm.gz, .osm.bz2, .osm.pbf), cache .npz or bundled name")
    p.add_argument("--pings", required=True, help="ping file: .csv, .jsonl, .gpx (optionally .gz)")
    p.add_argument("--out", required=True, help="per-ping result CSV to write")
    p.add_argument("--traversals", help="per-traversal CSV to write (default: <out stem>.traversals.csv)")
    p.add_argument("--sigma", type=float, default=None, help="GPS error in metres for pings without accuracy_m (default 10)")
    p.add_argument("--service", action="store_true", help="include highway=service roads in the network")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from streams.cli import CommandError

    t0 = time.perf_counter()
    try:
        network = load_network(resolve_map(args.map), include_service=args.service)
    except MapLoadError as exc:
        raise CommandError(str(exc)) from None
    pings_path = Path(args.pings)
    if not pings_path.is_file():
        raise CommandError(f"{pings_path}: no such ping file")
    report = ReadReport()
    by_device: dict[str, list[Ping]] = {}
    for p in read_pings(pings_path, report):
        by_device.setdefault(p.device, []).append(p)
    if report.n_rejected:
        log.warning("%d rows rejected while reading: %s", report.n_rejected, dict(report.rejected))
    if not by_device:
        raise CommandError(f"{pings_path}: no valid pings to match ({report.rows} rows read)")
    config = MatcherConfig() if args.sigma is None else MatcherConfig(sigma_m=args.sigma)
    matcher = OnlineMatcher(network, config)
    out = Path(args.out)
    trav_path = Path(args.traversals) if args.traversals else out.with_name(out.name.split(".")[0] + ".traversals.csv")
    total = sum(len(v) for v in by_device.values())
    dropped: Counter[str] = Counter()
    n_trav = 0
    from tqdm import tqdm

    with open_text(out, "wt") as fp, open_text(trav_path, "wt") as ft, \
            tqdm(total=total, unit="ping", disable=args.no_progress or total < 5000) as bar:
        wp, wt = csv.writer(fp), csv.writer(ft)
        wp.writerow(PING_COLUMNS)
        wt.writerow(TRAVERSAL_COLUMNS)
        for device, pings in by_device.items():
            res = match_trace(network, pings, matcher=matcher)
            dropped.update(res.dropped)
            _write_pings(wp, network, pings, res)
            n_trav += _write_traversals(wt, network, pings, res)
            bar.update(len(pings))
    matched = total - sum(v for k, v in dropped.items() if k not in ("gap_split", "break_split"))
    print(f"matched {matched:,} of {total:,} pings from {len(by_device):,} device(s), {n_trav:,} traversals "
          f"in {time.perf_counter() - t0:.1f} s -> {out}, {trav_path}")
    if dropped:
        print("dropped / split: " + ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())))
    if report.n_rejected:
        print("rejected while reading: " + ", ".join(f"{k}={v}" for k, v in sorted(report.rejected.items())))
    return 0


def _write_pings(w, network: RoadNetwork, pings: list[Ping], res) -> None:
    for i, p in enumerate(pings):
        seg = int(res.segment_index[i])
        if seg < 0:
            w.writerow([p.device, p.ts, p.lat, p.lon, "", "", "", "", "", "", "", "", res.reason[i]])
            continue
        w.writerow([
            p.device, p.ts, p.lat, p.lon, int(res.trip[i]), int(network.segment_ids[seg]), int(network.way_ids[seg]),
            int(network.start_node_ids[seg]), int(network.end_node_ids[seg]), round(float(res.offset_m[i]), 2),
            round(float(res.snapped_lonlat[i, 1]), 7), round(float(res.snapped_lonlat[i, 0]), 7), "",
        ])


def _write_traversals(w, network: RoadNetwork, pings: list[Ping], res) -> int:
    import numpy as np

    ok = res.trip >= 0
    starts = {}
    for trip, ts in zip(res.trip[ok].tolist(), np.asarray([p.ts for p in pings])[ok].tolist()):
        starts.setdefault(trip, ts)
    trip_ids = sorted(starts)
    trip_starts = np.array([starts[t] for t in trip_ids])
    for t in res.traversals:
        seg = int(network.index_of(t.segment_id)[0])
        trip = trip_ids[max(int(np.searchsorted(trip_starts, t.t_enter, side="right")) - 1, 0)] if trip_ids else 0
        w.writerow([
            t.device, trip, t.segment_id, int(network.way_ids[seg]), int(network.start_node_ids[seg]),
            int(network.end_node_ids[seg]), str(network.names[network.name_index[seg]]),
            round(float(network.length_m[seg]), 2), round(t.fraction, 4), t.t_enter, t.t_exit,
            round(t.travel_time_s, 3),
        ])
    return len(res.traversals)
