"""The embedded runner: the pipeline's operators in one process, no broker.

The same :class:`~streams.operators.IngestMatch` and :class:`~streams.operators.Aggregate` the Faust
worker runs (:mod:`streams.app`), wired directly: messages or pings in, segment speeds out through a
callback. It is the default way to run roadpulse (``roadpulse demo``, ``roadpulse replay --embedded``)
and the reference the Kafka pipeline is tested against.

One source: the watermark is the newest valid event time seen, so windows close as event time
advances through the input; :meth:`EmbeddedPipeline.finish` ends every trip and closes every window.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from congestion.record import SegmentSpeed
from geo.model import Ping
from geo.network import RoadNetwork
from simulator.formats import ReadReport, read_pings
from streams.ingest import DeadLetter
from streams.operators import Aggregate, IngestMatch, PipelineStats
from streams.settings import Settings

log = logging.getLogger(__name__)

#: Pings per batch when a file or the simulator feeds the pipeline.
FILE_BATCH_PINGS: int = 2_000


class EmbeddedPipeline:
    """ingest -> match -> aggregate -> publish, in process.

    Parameters
    ----------
    network
        Road network.
    settings
        Pseudonym key, trimming, windows, k-anonymity, match lag.
    on_publish
        Called with every non-empty list of segment speeds the pipeline publishes.
    on_reject
        Called with every dead letter (rejected message, original bytes and reasons).

    Attributes
    ----------
    stats
        :class:`~streams.operators.PipelineStats`: received, rejected by reason, trimmed, matched,
        unmatched by reason, traversals, dropped traversals by reason, published.
    """

    def __init__(
        self,
        network: RoadNetwork,
        settings: Settings,
        on_publish: Callable[[list[SegmentSpeed]], None] | None = None,
        on_reject: Callable[[DeadLetter], None] | None = None,
    ) -> None:
        self.network = network
        self.settings = settings
        self.on_publish = on_publish
        self.on_reject = on_reject
        self.stats = PipelineStats()
        self.ingest = IngestMatch(network, settings, source=0, stats=self.stats)
        self.aggregate = Aggregate(network, settings, sources=[0], stats=self.stats)

    # ------------------------------------------------------------------ input
    def process_messages(self, messages: Iterable[tuple[bytes | None, bytes]], now: float | None = None) -> None:
        """Raw ``(key, value)`` messages as on Kafka (one ping or a batch of one device per message).

        Parameters
        ----------
        messages
            Processed as one batch; pass an iterator of chunks through repeated calls for big inputs.
        now
            Wall clock for the validator's age checks; ``None`` for replays of recorded data.
        """
        out = self.ingest.process_messages(list(messages), now=now)
        if self.on_reject is not None:
            for dl in out.dead_letters:
                self.on_reject(dl)
        self._after(out.traversals)

    def process_pings(self, pings: Iterable[Ping]) -> None:
        """Already-validated pings with raw device ids (simulator, ping files), in event-time order."""
        self._after(self.ingest.process_pings(list(pings)))

    def _after(self, traversals: list) -> None:
        self.aggregate.set_source_watermark(0, self.ingest.watermark)
        self.aggregate.add(traversals)
        self._publish(self.aggregate.advance())

    def _publish(self, speeds: list[SegmentSpeed]) -> list[SegmentSpeed]:
        if speeds and self.on_publish is not None:
            self.on_publish(speeds)
        return speeds

    # ------------------------------------------------------------------ output
    def advance(self, watermark_s: float) -> list[SegmentSpeed]:
        """Close the windows that end at least ``grace_s`` before ``watermark_s`` (event time, epoch s).

        Returns the speeds published (also passed to ``on_publish``).
        """
        return self._publish(self.aggregate.advance(watermark_s))

    def finish(self) -> list[SegmentSpeed]:
        """End of input: end every trip (flush the matcher, discard held trip tails), close all windows."""
        self.aggregate.add(self.ingest.finish())
        return self._publish(self.aggregate.flush())


def _batches(pings: Iterable[Ping], size: int) -> Iterator[list[Ping]]:
    batch: list[Ping] = []
    for p in pings:
        batch.append(p)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_speeds(fh: IO[str], speeds: Iterable[SegmentSpeed]) -> int:
    """Write segment speeds as JSON lines (the wire form); returns the count."""
    n = 0
    for s in speeds:
        fh.write(json.dumps(s.to_dict(), separators=(",", ":")) + "\n")
        n += 1
    return n


def run_file(
    path: str | os.PathLike[str],
    network: RoadNetwork,
    settings: Settings,
    out_path: str | os.PathLike[str],
    progress: Callable[[int], None] | None = None,
) -> PipelineStats:
    """Run the embedded pipeline over a ping file and write the published speeds as JSON lines.

    Parameters
    ----------
    path
        Ping file (CSV, JSONL, GPX, SUMO FCD; see :func:`simulator.formats.read_pings`), in event-time order.
    network, settings
        As for :class:`EmbeddedPipeline`.
    out_path
        Output ``.jsonl``: every published :class:`~congestion.record.SegmentSpeed`, in publication order.
    progress
        Called with the number of pings read so far after each batch.

    Returns
    -------
    PipelineStats
        Counters; rows the file reader rejected are included in ``rejected`` by reason.
    """
    report = ReadReport()
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as fh:
        pipeline = EmbeddedPipeline(network, settings, on_publish=lambda speeds: write_speeds(fh, speeds))
        seen = 0
        for batch in _batches(read_pings(path, report), FILE_BATCH_PINGS):
            pipeline.process_pings(batch)
            seen += len(batch)
            if progress is not None:
                progress(seen)
        pipeline.finish()
    stats = pipeline.stats
    stats.received += report.n_rejected
    stats.rejected.update(report.rejected)
    log.info("embedded run: %d pings read, %d rejected, %d traversals, %d speeds published",
             report.rows, sum(stats.rejected.values()), stats.traversals, stats.published)
    return stats


def replay_command(args) -> int:
    """``roadpulse replay --pings FILE --embedded --out speeds.jsonl``: :func:`run_file` with progress."""
    import sys
    import time

    from tqdm import tqdm

    from streams.cli import CommandError, load_configured_map
    from streams.settings import load_settings

    if not args.embedded or not args.out:
        raise CommandError("--embedded and --out go together: roadpulse replay --pings FILE --embedded --out speeds.jsonl")
    if not Path(args.pings).is_file():
        raise CommandError(f"{args.pings}: no such ping file")
    settings = load_settings(getattr(args, "config", None), {"map": getattr(args, "map", None)})
    network = load_configured_map(settings)
    bar = tqdm(unit=" pings", unit_scale=True, disable=args.no_progress, desc="embedded", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        stats = run_file(args.pings, network, settings, args.out, progress=lambda n: bar.update(n - bar.n))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    rejected = sum(stats.rejected.values())
    print(f"embedded pipeline: {stats.received:,} pings in {seconds:.1f} s ({stats.received / max(seconds, 1e-9):,.0f}/s); "
          f"{rejected:,} rejected, {stats.trimmed:,} trimmed, {stats.matched:,} matched, "
          f"{stats.traversals:,} traversals; {stats.published:,} segment speeds "
          f"({stats.published_ok:,} ok) written to {args.out}")
    if rejected:
        reasons = ", ".join(f"{r}: {n}" for r, n in stats.rejected.most_common())
        print(f"rejected pings by reason: {reasons}", file=sys.stderr)
    return 0
