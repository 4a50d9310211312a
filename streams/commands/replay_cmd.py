"""``roadpulse replay --pings FILE --kafka BOOTSTRAP [--speed N]``: a ping file into the pings topic.

The command is three parts so other destinations slot in beside Kafka: :func:`read_batches`
(file -> uploads, with a read report), :func:`make_sink` (flags -> a
:class:`streams.replay.BatchSink`; add a branch for a new destination, e.g. ``--embedded``), and
:func:`streams.replay.replay` (pacing + progress), run by :func:`run`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator

from geo.model import Ping
from simulator.formats import ReadReport, read_pings

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay",
        help="replay a ping file into Kafka at N x real time, keeping event times",
        description="Send a ping file (CSV/JSONL/GPX/SUMO FCD, optionally .gz) to the pings topic: one JSON "
                    "message per device upload, keyed by device, with the event time as message timestamp.",
    )
    p.add_argument("--pings", required=True, help="ping file (e.g. pings.csv.gz from `roadpulse simulate`)")
    p.add_argument("--kafka", default=None, help="bootstrap servers host:port (default: settings / ROADPULSE_KAFKA)")
    p.add_argument("--topic", default=None, help="topic (default: settings topic_pings)")
    p.add_argument("--speed", default="0", help="N x real time, or 0 / max for as fast as possible (default)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="give up after this many seconds without the broker acknowledging anything (default 60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--embedded", action="store_true",
                   help="no Kafka: run the embedded pipeline over the file (needs --out)")
    p.add_argument("--out", help="with --embedded: write the published segment speeds to this .jsonl file")
    p.add_argument("--map", help="with --embedded: OSM file or bundled name (default: settings, helsinki)")
    p.set_defaults(run=run)


def parse_speed(text: str) -> float:
    """``max`` or a number >= 0 (0 = as fast as possible)."""
    if text.strip().lower() in ("max", "inf", "0"):
        return 0.0
    try:
        speed = float(text)
    except ValueError:
        raise ValueError(f"--speed {text!r}: give a factor like 10 or 'max'") from None
    if speed < 0 or speed != speed:
        raise ValueError(f"--speed {text!r}: must be >= 0")
    return speed


def read_batches(path: str, report: ReadReport) -> Iterator[tuple[str, list[Ping]]]:
    """Uploads from a ping file (see :func:`streams.replay.iter_batches`); bad rows go to ``report``."""
    from streams.replay import iter_batches

    return iter_batches(read_pings(path, report))


def make_sink(args: argparse.Namespace, settings, stats):
    """The destination the flags ask for."""
    from streams.replay import KafkaBatchSink

    return KafkaBatchSink(settings.kafka, args.topic or settings.topic_pings, timeout_s=args.timeout,
                          partitions=settings.partitions, stats=stats)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "embedded", False) or getattr(args, "out", None):
        from streams.embedded import replay_command

        return replay_command(args)
    from pathlib import Path

    from tqdm import tqdm

    from streams.cli import CommandError
    from streams.replay import ReplayError, ReplayStats, replay
    from streams.settings import load_settings

    try:
        speed = parse_speed(args.speed)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if not Path(args.pings).is_file():
        raise CommandError(f"{args.pings}: no such ping file")
    settings = load_settings(getattr(args, "config", None), {"kafka": args.kafka})
    report = ReadReport()
    stats = ReplayStats()
    bar = tqdm(unit=" pings", unit_scale=True, disable=args.no_progress, desc="replay", file=sys.stderr)

    def on_batch(s: ReplayStats) -> None:
        bar.update(s.pings - bar.n)

    try:
        sink = make_sink(args, settings, stats)
    except ReplayError as exc:
        bar.close()
        raise CommandError(str(exc)) from None
    try:
        replay(read_batches(args.pings, report), sink, speed, stats=stats, on_batch=on_batch)
    except ReplayError as exc:
        raise CommandError(f"{exc} ({stats.acked_pings:,} of {stats.pings:,} pings confirmed)") from None
    finally:
        bar.close()
        sink.close()
    where = args.topic or settings.topic_pings
    print(f"replayed {stats.pings:,} pings in {stats.batches:,} uploads to {where} in {stats.elapsed_s:.1f} s "
          f"({stats.pings_per_s:,.0f} pings/s; {stats.resent_batches:,} uploads resent after errors)")
    if report.n_rejected:
        reasons = ", ".join(f"{r}: {n}" for r, n in report.rejected.most_common())
        print(f"skipped {report.n_rejected:,} bad rows of {report.rows:,} ({reasons})", file=sys.stderr)
    return 0
