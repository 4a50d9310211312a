"""``roadpulse simulate --map MAP --hours H --out DIR``: a synthetic traffic day with ground truth."""

from __future__ import annotations

import argparse
import dataclasses
import time



def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="simulate a traffic day on a map: probe pings + ground truth files",
        description="Simulate traffic on a map (demand profile, BPR congestion, incidents) and write the probe "
                    "phones' pings (pings.csv.gz) with ground truth (truth_segments.csv.gz, truth_paths.csv.gz, "
                    "truth_pings.csv.gz) and summary.json into --out.",
    )
    p.add_argument("--map", default=None, help="OSM file or bundled name (default: the settings' map)")
    p.add_argument("--hours", type=float, default=24.0, help="hours of departures to simulate (default 24)")
    p.add_argument("--start", default="00:00", help="local start time HH:MM (default 00:00)")
    p.add_argument("--date", default=None, help="simulated date YYYY-MM-DD (default a fixed weekday, 2024-05-14)")
    p.add_argument("--utc-offset", type=float, default=0.0, help="local time minus UTC, hours (default 0)")
    p.add_argument("--probe-share", type=float, default=0.05, help="share of vehicles with a phone (default 0.05)")
    p.add_argument("--trips", type=int, default=None,
                   help="car trips per whole day (default: 200 per km of directed road)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--incident", action="append", default=[], metavar="SEG[+SEG...]:HH:MM:HH:MM:FACTOR",
                   help="lane closure/slowdown: speed and capacity x FACTOR on the segments between the times; "
                        "repeatable")
    p.add_argument("--sigma", type=float, default=None, help="GPS error per axis, metres (default 8)")
    p.add_argument("--interval", type=float, default=None, help="phone sampling interval, seconds (default 5)")
    p.add_argument("--format", choices=("csv", "jsonl"), default="csv",
                   help="pings file format (jsonl: one upload batch per line)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def build_config(args: argparse.Namespace):
    """The :class:`simulator.SimulationConfig` the flags describe (raises ``CommandError``)."""
    from simulator import PhoneModel, SimulationConfig, parse_clock, parse_incident
    from streams.cli import CommandError

    try:
        phones = PhoneModel()
        changes = {k: v for k, v in (("sigma_m", args.sigma), ("interval_s", args.interval)) if v is not None}
        if changes:
            phones = dataclasses.replace(phones, **changes)
        kwargs = dict(
            hours=args.hours, start_s=parse_clock(args.start), utc_offset_h=args.utc_offset, seed=args.seed,
            trips_per_day=args.trips, probe_share=args.probe_share,
            incidents=tuple(parse_incident(s) for s in args.incident), phones=phones,
        )
        if args.date:
            kwargs["date"] = args.date
        return SimulationConfig(**kwargs)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from simulator import simulate_day
    from streams.cli import CommandError, load_configured_map
    from streams.settings import load_settings

    settings = load_settings(getattr(args, "config", None), {"map": args.map})
    config = build_config(args)
    t0 = time.perf_counter()
    network = load_configured_map(settings)
    bar = tqdm(total=100, unit="%", desc="traffic", disable=args.no_progress,
               bar_format="{desc:<8} {bar} {n:.0f}% [{elapsed}<{remaining}]")

    def progress(stage: str, share: float) -> None:
        bar.set_description_str(stage)
        target = 100.0 * share if stage == "traffic" else 100.0
        if target > bar.n:
            bar.update(target - bar.n)

    try:
        result = simulate_day(network, config, progress=progress)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    finally:
        bar.close()
    t_sim = time.perf_counter() - t0
    paths = result.write(args.out, ping_format=args.format)
    s = result.summary()
    print(f"map            {s['map']}  ({network.n_segments:,} segments)")
    print(f"span           {args.start} + {config.hours:g} h on {config.date} (seed {config.seed})")
    print(f"vehicles       {s['vehicles']:,} ({s['probe_vehicles']:,} with a phone, "
          f"{s['warmup_vehicles']:,} more in warm-up)")
    print(f"pings          {s['pings']:,}")
    print(f"km driven      {s['km_driven']:,.1f}")
    if s["mean_speed_kmh"] is not None:
        print(f"mean speed     {s['mean_speed_kmh']:.1f} km/h, trips {s['mean_trip_min']:.1f} min on average")
        hours = "  ".join(f"{h}:{v:.0f}" for h, v in s["mean_speed_kmh_by_hour"].items())
        print(f"by hour (km/h) {hours}")
    print(f"simulated in   {t_sim:.1f} s, files written in {time.perf_counter() - t0 - t_sim:.1f} s:")
    for path in paths.values():
        print(f"  {path}")
    return 0
