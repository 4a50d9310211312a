"""``roadpulse evaluate --speeds FILE --truth FILE [--plots DIR] [--json]``: estimates vs ground truth."""

from __future__ import annotations

import argparse
import json

from congestion.evaluation import EvaluationInputError, evaluate, plot, read_speeds, read_truth


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare published segment speeds with the simulator's ground truth (MAE, bias, coverage)",
        description=(
            "MAE, bias and coverage of estimated segment speeds against truth_segments.csv.gz, overall and per "
            "true-speed band (0-30, 30-50, 50-80, 80+ km/h). Coverage = share of truth segment-windows with at "
            "least one probe vehicle that got a published speed."
        ),
    )
    p.add_argument("--speeds", required=True, help="JSONL file of SegmentSpeed records (one dict per line)")
    p.add_argument("--truth", required=True, help="the simulator's truth_segments.csv(.gz)")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots (scatter, congested segments) into DIR")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def run(args: argparse.Namespace) -> int:
    from streams.cli import CommandError

    try:
        records, problems = read_speeds(args.speeds)
        truth = read_truth(args.truth)
        report = evaluate(records, truth)
        report["speeds_file_problems"] = len(problems)
        paths = plot(records, truth, args.plots) if args.plots else []
    except EvaluationInputError as exc:
        raise CommandError(str(exc)) from None
    report["plots"] = [str(p) for p in paths]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    o = report["overall"]
    print(f"truth windows ({'/'.join(f'{w:g}' for w in report['window_s'])} s)  {report['truth_windows']:,}"
          f"  with a probe: {report['truth_windows_with_probe']:,}  published & matched: {report['published_windows_matched']:,}")
    print(f"{'band km/h':<10}{'pairs':>8}{'MAE':>8}{'bias':>8}{'RMSE':>8}{'coverage':>10}")
    for row in [{"band_kmh": "all", **o}, *report["bands"]]:
        print(f"{row['band_kmh']:<10}{row['pairs']:>8,}{_fmt(row['mae_kmh'], '.2f'):>8}{_fmt(row['bias_kmh'], '+.2f'):>8}"
              f"{_fmt(row['rmse_kmh'], '.2f'):>8}{_fmt(row['coverage'], '.1%'):>10}")
    if problems:
        print(f"{len(problems)} malformed line(s) in {args.speeds} were not evaluated; first: {problems[0]}")
    for p in paths:
        print(f"wrote {p}")
    return 0
