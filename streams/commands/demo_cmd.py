"""``roadpulse demo``: the whole system in one process, on the bundled Helsinki map, no broker.

Simulates a morning of traffic with probe phones and an incident on the busiest main road,
replays the pings through the embedded pipeline (ingest -> match -> aggregate) on an accelerated
clock, and serves the live feed and map on http://127.0.0.1:8080. When the simulated span ends,
it starts again, later in event time, so the demo runs until ``--duration`` or Ctrl-C.

Start-up is kept short: the map loads from its cache and the simulated morning takes about a
second; the server listens before the simulation starts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np


if TYPE_CHECKING:  # pragma: no cover
    from geo.model import Ping
    from geo.network import RoadNetwork
    from simulator import SimulationConfig
    from streams.feed_store import FeedStore
    from streams.settings import Settings

log = logging.getLogger("roadpulse.demo")

#: Start of the simulated span, seconds after midnight (06:45: free flow before the peak).
DEMO_START_S = 6.75 * 3600
#: Length of the simulated span, hours (departures; trips then drive to their end).
DEMO_HOURS = 2.0
#: The incident: from, to (seconds after midnight) and the speed/capacity factor.
INCIDENT_FROM_S, INCIDENT_TO_S, INCIDENT_FACTOR = 7.25 * 3600, 8.1 * 3600, 0.25
#: Car trips per day per directed km: a busy city centre, dense enough that most main roads pass
#: the k-anonymity gate every window with ``DEMO_PROBE_SHARE`` of cars carrying the app.
DEMO_TRIPS_PER_KM = 1300.0
DEMO_PROBE_SHARE = 0.3
#: Wall seconds of the replay loop's tick.
TICK_S = 0.25


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="simulated traffic with an incident, embedded pipeline, live map on :8080")
    p.add_argument("--map", help="bundled name or OSM file (default: helsinki)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8080)")
    p.add_argument("--speed", type=float, default=60.0,
                   help="simulated seconds per wall second (default 60: a 2-hour morning in ~2.5 minutes)")
    p.add_argument("--duration", type=float, help="stop after this many wall seconds (default: until Ctrl-C)")
    p.add_argument("--seed", type=int, default=1, help="seed of the simulated traffic (default 1)")
    p.set_defaults(run=run)


def demo_incident(network: "RoadNetwork") -> tuple[str, tuple[int, ...]]:
    """The road the demo's incident closes: the longest named road of the most important class.

    Returns
    -------
    (name, segment ids)
        Both directions of every segment with that name.
    """
    named = network.names[network.name_index] != ""
    if not named.any():
        rows = np.flatnonzero(network.frc == network.frc.min())[:20]
        return "(unnamed road)", tuple(int(s) for s in network.segment_ids[rows])
    top = int(network.frc[named].min())
    # Main roads (frc <= 2) if the map has them, else the best class present.
    classes = network.frc <= max(top, 2)
    cand = named & classes
    lengths = np.bincount(network.name_index[cand], weights=network.length_m[cand], minlength=len(network.names))
    name_idx = int(np.argmax(lengths))
    rows = np.flatnonzero(network.name_index == name_idx)
    return str(network.names[name_idx]), tuple(int(s) for s in network.segment_ids[rows])


def demo_config(network: "RoadNetwork", seed: int = 1) -> "SimulationConfig":
    """The demo's simulated morning: 06:45-08:45, an incident 07:15-08:06 on :func:`demo_incident`."""
    from simulator import Incident, SimulationConfig

    _, ids = demo_incident(network)
    km = float(network.length_m.sum()) / 1000.0
    return SimulationConfig(
        hours=DEMO_HOURS, start_s=DEMO_START_S, seed=seed,
        trips_per_day=int(DEMO_TRIPS_PER_KM * km), probe_share=DEMO_PROBE_SHARE,
        incidents=(Incident(ids, INCIDENT_FROM_S, INCIDENT_TO_S, INCIDENT_FACTOR),),
    )


def run(args: argparse.Namespace) -> int:
    from streams.cli import CommandError, load_configured_map
    from streams.settings import load_settings

    settings = load_settings(args.config, overrides={"map": args.map, "http_host": args.host, "http_port": args.port})
    if not args.speed > 0:
        raise CommandError("--speed must be > 0 (simulated seconds per wall second)")
    if args.duration is not None and args.duration <= 0:
        raise CommandError("--duration must be > 0 seconds")
    network = load_configured_map(settings)
    return asyncio.run(_demo(network, settings, args.speed, args.duration, args.seed))


class DemoReplay(threading.Thread):
    """Simulates the morning, then feeds its pings to the embedded pipeline on an accelerated clock.

    Runs in its own thread so matching never blocks the HTTP server; segment speeds go to the
    store through :meth:`FeedStore.publish_threadsafe`.
    """

    def __init__(self, network: "RoadNetwork", settings: "Settings", store: "FeedStore", speed: float,
                 seed: int, on_error: Callable[[BaseException], None], say: Callable[[str], None] = print) -> None:
        super().__init__(name="demo-replay", daemon=True)
        self.network, self.settings, self.store = network, settings, store
        self.speed = float(speed)
        self.seed = seed
        self.on_error = on_error
        self.say = say
        self.stop_event = threading.Event()
        self.pings_fed = 0
        self.sim_now: float | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported to the main loop, which stops the demo
            self.on_error(exc)

    def _run(self) -> None:
        from simulator import simulate_day
        from streams import metrics
        from streams.embedded import EmbeddedPipeline

        t0 = time.perf_counter()
        config = demo_config(self.network, self.seed)
        result = simulate_day(self.network, config)
        order = np.argsort(result.pings.ts, kind="stable")
        pings = list(result.iter_pings())
        pings = [pings[i] for i in order.tolist()] if len(order) == len(pings) else sorted(pings, key=lambda p: p.ts)
        ts = np.array([p.ts for p in pings])
        name, ids = demo_incident(self.network)
        self.say(f"roadpulse demo: simulated {config.hours:g} h of traffic from 06:45 ({len(pings):,} pings from "
                 f"{int(result.is_probe.sum()):,} probe cars) in {time.perf_counter() - t0:.1f} s; incident on "
                 f"{name} ({len(ids)} segments) 07:15-08:06 at {INCIDENT_FACTOR:.0%} speed; replaying at {self.speed:g}x")
        if not pings:
            raise RuntimeError("the simulation produced no pings; try another --map or --seed")
        pipeline = EmbeddedPipeline(self.network, self.settings, on_publish=self.store.publish_threadsafe)
        # The replay stands in for the pings topic: its lag is the pings due on the accelerated clock
        # (event time <= now) that the pipeline has not processed yet.
        lag = metrics.CONSUMER_LAG.labels(topic=self.settings.topic_pings)
        # Start a minute before the first ping, on the minute grid; each loop shifts event time on.
        start = float(np.floor(ts[0] / 60.0) * 60.0 - 60.0)
        loop_span = float(np.ceil((ts[-1] - start) / 60.0) * 60.0 + 60.0)
        wall0 = time.monotonic()
        offset, i, loops, last_say = 0.0, 0, 0, time.monotonic()
        while not self.stop_event.is_set():
            now = start + (time.monotonic() - wall0) * self.speed
            self.sim_now = now
            j = int(np.searchsorted(ts, now - offset, side="right"))
            lag.set(j - i)
            if j > i:
                batch = pings[i:j] if offset == 0 else [dataclasses.replace(p, ts=p.ts + offset) for p in pings[i:j]]
                pipeline.process_pings(batch)
                self.pings_fed += j - i
                i = j
                # what fell due while matching: > 0 when the pipeline cannot keep up with --speed
                due = start + (time.monotonic() - wall0) * self.speed - offset
                lag.set(max(0, int(np.searchsorted(ts, due, side="right")) - i))
            pipeline.advance(now)
            if now - offset >= start + loop_span:  # the morning is over: once more, later in event time
                loops += 1
                offset += loop_span
                i = 0
                self.say(f"roadpulse demo: replaying the morning again (loop {loops + 1})")
            if time.monotonic() - last_say >= 10.0:
                last_say = time.monotonic()
                self.say(self._progress(now, offset))
            self.stop_event.wait(TICK_S)

    def _progress(self, now: float, offset: float) -> str:
        store = self.store
        jammed = int((store._jam >= 3).sum())
        clock = time.strftime("%H:%M", time.gmtime(now))
        return (f"roadpulse demo: sim {clock} · {self.pings_fed:,} pings in · "
                f"{store.n_with_data:,} segments with speeds · {jammed} at jam level 3+")


async def _demo(network: "RoadNetwork", settings: "Settings", speed: float, duration_s: float | None, seed: int) -> int:
    from streams import metrics
    from streams.feed import FeedServer, stop_on_signals

    metrics.set_build_info(map_name=settings.map)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop_on_signals(stop)
    errors: list[BaseException] = []

    def on_error(exc: BaseException) -> None:
        errors.append(exc)
        loop.call_soon_threadsafe(stop.set)

    # Publications come every window step of event time, i.e. window_step_s / speed wall seconds.
    server = FeedServer(network, settings, publish_interval_s=settings.window_step_s / speed)
    url = await server.start()
    print(f"roadpulse demo: live map at {url}  (feed {url}/v1/segments, {url}/v1/stream; Ctrl-C to stop)", flush=True)
    replay = DemoReplay(network, settings, server.store, speed, seed, on_error,
                        say=lambda text: print(text, flush=True))
    replay.start()
    try:
        await asyncio.wait_for(stop.wait(), duration_s)
    except asyncio.TimeoutError:
        pass
    finally:
        replay.stop_event.set()
        await loop.run_in_executor(None, replay.join, 30.0)
        await server.stop()
    if errors:
        raise errors[0]
    print("roadpulse demo: stopped", flush=True)
    return 0
