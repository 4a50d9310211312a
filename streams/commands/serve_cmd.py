"""``roadpulse serve``: the feed server alone, reading segment speeds from Kafka.

Reads the compacted ``roadpulse.segment-speeds`` topic from its start (the latest speed of every
segment), then follows it live, and serves the feed (GeoJSON, SSE, DATEX II, the live map) over
HTTP. Set ``ROADPULSE_FEED_TOKEN`` to require a bearer token on ``/v1/*``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging


log = logging.getLogger("roadpulse.serve")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the live feed and map from the Kafka segment-speeds topic")
    p.add_argument("--map", help="OSM file or bundled name the pipeline runs on (default: settings, helsinki)")
    p.add_argument("--kafka", help="bootstrap servers host:port[,host:port] (default: settings)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="HTTP port (default 8080)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from streams.cli import CommandError, load_configured_map
    from streams.settings import load_settings

    settings = load_settings(args.config, overrides={
        "map": args.map, "kafka": args.kafka, "http_host": args.host, "http_port": args.port,
    })
    if args.duration is not None and args.duration <= 0:
        raise CommandError("--duration must be > 0 seconds")
    network = load_configured_map(settings)
    return asyncio.run(_serve(network, settings, args.duration))


async def _serve(network, settings, duration_s: float | None) -> int:
    from streams import metrics
    from streams.feed import FeedServer, TopicSource, stop_on_signals

    metrics.set_build_info(map_name=settings.map)
    stop = asyncio.Event()
    stop_on_signals(stop)
    server = FeedServer(network, settings)
    source = TopicSource(server.store, settings)
    server.ready_check = source.readiness
    url = await server.start()
    print(f"roadpulse feed: {url}  (map {network.n_segments:,} segments; reading {settings.topic_segment_speeds} "
          f"from {settings.kafka}; Ctrl-C to stop)", flush=True)
    consumer = asyncio.create_task(source.run(stop))
    try:
        waiters = [asyncio.create_task(stop.wait()), consumer]
        done, _ = await asyncio.wait(waiters, timeout=duration_s, return_when=asyncio.FIRST_COMPLETED)
        waiters[0].cancel()
        if consumer in done and not consumer.cancelled() and consumer.exception() is not None:
            raise consumer.exception()  # type: ignore[misc]
    finally:
        stop.set()
        for task in (consumer,):
            if not task.done():
                try:
                    await asyncio.wait_for(task, 10)
                except (asyncio.TimeoutError, asyncio.CancelledError):
                    task.cancel()
        await server.stop()
        print(f"roadpulse feed: stopped ({source.consumed:,} records read, {source.rejected:,} rejected)", flush=True)
    return 0
