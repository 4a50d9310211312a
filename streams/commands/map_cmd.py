"""``roadpulse map info MAP`` and ``roadpulse map build MAP -o CACHE``."""

from __future__ import annotations

import argparse
import json
import time

from geo.bundled import resolve_map
from geo.network import MapLoadError, load_network


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("map", help="inspect or pre-build a road network")
    msub = p.add_subparsers(dest="map_command", required=True, metavar="ACTION")
    info = msub.add_parser("info", help="summary of a map: nodes, segments, km by class, bbox, load time")
    info.add_argument("map", help="OSM file (.osm, .osm.gz, .osm.bz2, .osm.pbf) or bundled name")
    info.add_argument("--service", action="store_true", help="include highway=service roads")
    info.add_argument("--no-cache", action="store_true", help="parse the OSM file even if a cache exists")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(run=run_info)
    build = msub.add_parser("build", help="parse a map and write its network cache file")
    build.add_argument("map", help="OSM file or bundled name")
    build.add_argument("-o", "--output", required=True, help="cache file to write (.npz)")
    build.add_argument("--service", action="store_true", help="include highway=service roads")
    build.set_defaults(run=run_build)


def _load(args: argparse.Namespace, cache: bool) -> tuple[object, float]:
    from streams.cli import CommandError

    t0 = time.perf_counter()
    try:
        network = load_network(resolve_map(args.map), include_service=args.service, cache=cache)
    except MapLoadError as exc:
        raise CommandError(str(exc)) from None
    return network, time.perf_counter() - t0


def run_info(args: argparse.Namespace) -> int:
    network, seconds = _load(args, cache=not args.no_cache)
    summary = network.summary()
    summary["load_s"] = round(seconds, 3)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"map               {summary['source']}")
    print(f"nodes             {summary['nodes']:,}")
    print(f"directed segments {summary['directed_segments']:,}")
    print(f"total km          {summary['total_km']:,.1f} (both directions of two-way roads)")
    for cls, km in summary["km_by_class"].items():
        print(f"  {cls:<16}{km:>10,.1f} km")
    lo_lon, lo_lat, hi_lon, hi_lat = summary["bbox"]
    print(f"bbox              {lo_lon:.5f},{lo_lat:.5f},{hi_lon:.5f},{hi_lat:.5f} (lon/lat)")
    print(f"load time         {seconds:.3f} s")
    return 0


def run_build(args: argparse.Namespace) -> int:
    network, seconds = _load(args, cache=False)
    path = network.save(args.output)
    print(f"wrote {path} ({network.n_segments:,} segments) in {seconds:.2f} s")
    return 0
