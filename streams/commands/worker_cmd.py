"""``roadpulse worker``: one Faust worker of the Kafka pipeline (see :mod:`streams.app`).

Configuration comes from the settings (``ROADPULSE_KAFKA=host:9092``, topic names, partitions,
pseudonym key...). Start as many workers as you like with the same settings: they share the
partitions (one consumer group) and take over each other's partitions when one stops.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import tempfile
import time
from typing import Any

log = logging.getLogger("roadpulse.worker")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a Faust worker of the Kafka pipeline (pings -> segment speeds)")
    p.add_argument("--map", help="OSM file or bundled name (default: settings, helsinki)")
    p.add_argument("--kafka", help="bootstrap servers host:port[,host:port] (default: settings / ROADPULSE_KAFKA)")
    p.add_argument("--partitions", type=int, help="partitions of the roadpulse topics (default: settings, 4)")
    p.add_argument("--live", action="store_true",
                   help="check event times against the wall clock (reject pings days old or in the future); "
                        "leave off when replaying recorded or simulated days")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    p.add_argument("--datadir", help="Faust data directory (default: a temporary directory)")
    p.add_argument("--broker-wait", type=float, default=600.0, metavar="SECONDS",
                   help="how long to wait for an unreachable broker at start, retrying with backoff (default 600)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from streams import metrics
    from streams.app import WorkerOptions, create_app
    from streams.cli import CommandError, load_configured_map
    from streams.operators import warm_up_matcher
    from streams.settings import load_settings

    settings = load_settings(args.config, overrides={
        "map": args.map, "kafka": args.kafka, "partitions": args.partitions,
    })
    if settings.partitions < 1:
        raise CommandError("partitions must be >= 1")
    network = load_configured_map(settings)
    metrics.set_build_info(map_name=settings.map)
    if args.metrics_port is not None:
        metrics.start_metrics_server(args.metrics_port)
    wait_for_broker(settings, args.broker_wait)
    pipeline = create_app(network, settings, WorkerOptions(wall_clock_checks=args.live))
    warm_up_matcher(pipeline.matcher)  # load compiled kernels now, not with the first batch waiting
    tune_garbage_collector()
    datadir = args.datadir or tempfile.mkdtemp(prefix="roadpulse-worker-")
    os.makedirs(datadir, exist_ok=True)  # the Faust worker runs inside it
    pipeline.app.conf.datadir = datadir
    log.info("worker: map %s (%d segments), kafka %s, %d partitions, topics %s -> %s",
             os.path.basename(str(settings.map)), network.n_segments, settings.kafka, settings.partitions,
             settings.topic_pings, settings.topic_segment_speeds)
    from faust import Worker

    worker = Worker(pipeline.app, loglevel=settings.log_level.lower(), quiet=True, workdir=datadir)
    # Faust's terminal spinner (loglevel WARNING and up) sets the root logger to DEBUG so that it spins on
    # every record: every debug call of faust and aiokafka then builds a record (measured: 8 % of a
    # worker's CPU at WARNING). A service has no terminal to spin on.
    worker.spinner = None
    worker.execute_from_commandline()  # returns by SystemExit when the worker stops
    return 0


#: Container allocations (net of frees) between young-generation collections; CPython's default is 700.
GC_YOUNG_THRESHOLD: int = 10_000


def tune_garbage_collector() -> None:
    """Make the cyclic garbage collector cheap for a long-running worker.

    Everything alive after start-up (map, route table, Faust app, modules) lives as long as the process:
    :func:`gc.freeze` moves it out of the collector's scans. The hot path allocates and frees millions of
    short-lived objects per minute (pings, events, futures); with the default threshold of 700 the young
    generation was collected ≈ 600 times in an 8 s replay, 0.54–0.65 s of a worker's ≈ 6 s of CPU (measured
    with ``gc.callbacks``); with :data:`GC_YOUNG_THRESHOLD` and the frozen start-up objects, 10 collections,
    0.04 s. Reference cycles are still collected, only in fewer, larger sweeps.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


#: Backoff between broker probes at start, seconds: doubles from the first to the last.
BROKER_BACKOFF_S: tuple[float, float] = (0.5, 30.0)


def wait_for_broker(settings: Any, timeout_s: float) -> None:
    """Return once a Kafka broker answers at ``settings.kafka``; retry with exponential backoff.

    A worker started before its broker (a fresh deployment, a broker restart) waits instead of
    crashing with a traceback; once the broker is up, Faust's own clients reconnect on later outages.

    Parameters
    ----------
    settings
        Bootstrap servers and security settings.
    timeout_s
        Give up after this many seconds without an answer.

    Raises
    ------
    streams.cli.CommandError
        No broker answered within ``timeout_s``; the message says where it looked and what to do.
    """
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    from streams.cli import CommandError
    from streams.feed import kafka_security_kwargs

    async def probe() -> None:
        client = AIOKafkaClient(bootstrap_servers=settings.kafka.split(","), request_timeout_ms=10_000,
                                **kafka_security_kwargs(settings))
        try:
            await client.bootstrap()
        finally:
            await client.close()

    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    deadline = time.monotonic() + timeout_s
    delay = BROKER_BACKOFF_S[0]
    while True:
        quiet.setLevel(logging.CRITICAL)  # aiokafka logs every refused connection at ERROR
        try:
            asyncio.run(probe())
            return
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
        finally:
            quiet.setLevel(level)
        left = deadline - time.monotonic()
        if left <= 0:
            raise CommandError(f"no Kafka broker answered at {settings.kafka} within {timeout_s:.0f} s ({error}); "
                               "start the broker, or point the worker at it with --kafka / ROADPULSE_KAFKA")
        log.warning("Kafka at %s is not reachable (%s); retrying in %.1f s", settings.kafka, error, min(delay, left))
        time.sleep(min(delay, left))
        delay = min(delay * 2, BROKER_BACKOFF_S[1])
