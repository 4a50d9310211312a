"""Feed-server benchmark: snapshot latency and SSE fan-out to 100 concurrent clients.

Run: ``python -m bench.feed [--map liechtenstein-2024.osm.pbf] [--runs 5] [--clients 100]``

The server (:class:`streams.feed.FeedServer`) runs in a child process pinned to core 0
(``taskset -c 0`` when available); the HTTP clients (aiohttp) run in this process on core 1. So the
server gets one core, and the client side (100 readers in one event loop) is part of every
latency figure: treat the fan-out numbers as upper bounds for the server.

Input (seeded): every segment of the map gets a record (speeds drawn from a seeded generator,
jam levels from ``congestion.quality``), built by ``tests.test_feed.make_records``.

Measured, each ``--runs`` times after one warm-up:

- snapshot ``GET /v1/segments`` (gzip): *cold* = the first request after a publication (GeoJSON
  encode + gzip), *warm* = a repeated request (served from the per-publication cache),
  *304* = revalidation with ``If-None-Match``, *bbox* = a cold filtered request (a quarter of the
  map), DATEX II cold. Peer in the same run: the cold/warm ratio (what the cache buys).
- SSE fan-out: ``--clients`` connected EventSource clients; the server publishes an update where
  1 % (a typical minute) or 100 % (worst case) of the segments changed; latency = arrival of the
  complete event at a client minus the wall time just before ``FeedStore.publish`` (same machine
  clock). Per run: median and max over clients; peer: the same update to 1 client.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MAPS = REPO.parent / "shared" / "data" / "maps"
T0 = 1_715_670_000.0


# ---------------------------------------------------------------- server child
def _child(map_path: str, conn: Any) -> None:
    import dataclasses

    import numpy as np

    from geo import load_network
    from streams.feed import FeedServer
    from streams.settings import load_settings
    from tests.test_feed import make_records

    network = load_network(map_path)
    rng = np.random.default_rng(20261128)
    all_rows = np.arange(network.n_segments)

    async def main() -> None:
        server = FeedServer(network, load_settings(environ={}), publish_interval_s=60.0)
        url = await server.start(port=0)
        server.store.publish(make_records(network, all_rows, rng.uniform(0.1, 1.0, len(all_rows)), T0))
        conn.send((url, network.n_segments, network.node_lonlat.min(axis=0).tolist(),
                   network.node_lonlat.max(axis=0).tolist()))
        loop = asyncio.get_running_loop()
        step = 1
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd[0] == "stop":
                await server.stop()
                conn.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
                return
            if cmd[0] == "publish":
                share = cmd[1]
                n = max(1, int(round(share * network.n_segments)))
                rows = np.sort(rng.choice(network.n_segments, n, replace=False))
                records = make_records(network, rows, rng.uniform(0.1, 1.0, n), T0 + 60 * step)
                step += 1
                t_pub = time.time()
                records = [dataclasses.replace(r, published_at=t_pub) for r in records]
                t_pub = time.time()
                changed = server.store.publish(records)
                conn.send((t_pub, changed, server.store.last_event_id))

    asyncio.run(main())


# ---------------------------------------------------------------- client side
class SSEReader:
    """Reads one SSE connection; records the arrival time of every complete event by id."""

    def __init__(self, session: Any, url: str) -> None:
        self.session, self.url = session, url
        self.arrivals: dict[str, float] = {}
        self.connected = asyncio.Event()

    async def run(self) -> None:
        async with self.session.get(self.url + "/v1/stream") as resp:
            # Only the frame boundaries matter: find them in the new bytes, never rescan (a full
            # update is megabytes; rescanning would make the client the bottleneck).
            buf = bytearray()
            frame_start = 0
            async for chunk in resp.content.iter_any():
                scan_from = max(len(buf) - 1, frame_start)
                buf += chunk
                while True:
                    end = buf.find(b"\n\n", scan_from)
                    if end < 0:
                        break
                    now = time.time()
                    if buf.startswith(b"id: ", frame_start):
                        event_id = bytes(buf[frame_start + 4:buf.index(b"\n", frame_start)]).decode()
                        self.arrivals[event_id] = now
                        self.connected.set()
                    frame_start = scan_from = end + 2
                if frame_start > 1 << 20 or frame_start == len(buf):
                    del buf[:frame_start]
                    frame_start = 0


async def _timed_get(session: Any, url: str, headers: dict[str, str] | None = None) -> tuple[float, int, int]:
    t = time.perf_counter()
    async with session.get(url, headers=headers or {}) as resp:
        body = await resp.read()
        return time.perf_counter() - t, resp.status, len(body)


def _publish(conn: Any, share: float) -> tuple[float, int, str]:
    conn.send(("publish", share))
    return conn.recv()


async def measure(conn: Any, url: str, bbox: str, runs: int, clients: int) -> dict[str, Any]:
    import aiohttp

    out: dict[str, Any] = {}
    loop = asyncio.get_running_loop()
    # The client's own decompression is not part of the server's latency.
    conn_kw = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn_kw, auto_decompress=False) as session:
        gz = {"Accept-Encoding": "gzip"}
        cold, warm, nm, box, dx, sizes = [], [], [], [], [], {}
        for run in range(runs + 1):  # run 0 is the warm-up
            await loop.run_in_executor(None, _publish, conn, 0.01)
            c = await _timed_get(session, url + "/v1/segments", gz)
            w = [await _timed_get(session, url + "/v1/segments", gz) for _ in range(20)]
            async with session.get(url + "/v1/segments", headers=gz) as resp:
                etag = resp.headers["ETag"]
                sizes["gzip"] = len(await resp.read())
            async with session.get(url + "/v1/segments", headers={"Accept-Encoding": "identity"}) as resp:
                sizes["identity"] = len(await resp.read())
            n = [await _timed_get(session, url + "/v1/segments", {**gz, "If-None-Match": etag}) for _ in range(20)]
            b = await _timed_get(session, url + f"/v1/segments?bbox={bbox}", gz)
            d = await _timed_get(session, url + "/v1/datex2", gz)
            assert c[1] == 200 and n[0][1] == 304 and b[1] == 200 and d[1] == 200
            if run:
                cold.append(c[0])
                warm.append(statistics.median(x[0] for x in w))
                nm.append(statistics.median(x[0] for x in n))
                box.append(b[0])
                dx.append(d[0])
                sizes["datex2_gzip"] = d[2]
        out["snapshot"] = {"cold": cold, "warm": warm, "not_modified": nm, "bbox_cold": box, "datex2_cold": dx,
                           "sizes": sizes}

        fan: dict[str, Any] = {}
        for n_clients in (1, clients):
            readers = [SSEReader(session, url) for _ in range(n_clients)]
            tasks = [asyncio.create_task(r.run()) for r in readers]
            await asyncio.wait_for(asyncio.gather(*(r.connected.wait() for r in readers)), 120)
            for share in (0.01, 1.0):
                per_run = []
                for run in range(runs + 1):
                    t_pub, changed, event_id = await loop.run_in_executor(None, _publish, conn, share)
                    deadline = time.monotonic() + 120
                    while any(event_id not in r.arrivals for r in readers):
                        if time.monotonic() > deadline:
                            raise TimeoutError("SSE event did not reach every client")
                        await asyncio.sleep(0.002)
                    lat = sorted(r.arrivals[event_id] - t_pub for r in readers)
                    if run:
                        per_run.append((statistics.median(lat), lat[-1], changed))
                    await asyncio.sleep(0.2)
                fan[f"{n_clients}/{share}"] = per_run
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        out["fanout"] = fan
    return out


def _fmt(values: list[float], scale: float = 1000.0, digits: int = 1) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--map", default="liechtenstein-2024.osm.pbf", help="map in ../shared/data/maps or a path")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--no-pin", action="store_true", help="do not pin the server to core 0")
    args = p.parse_args(argv)
    map_path = Path(args.map) if Path(args.map).exists() else MAPS / args.map
    if not map_path.exists():
        print(f"bench.feed: {map_path} not found (../shared/data/maps is not beside this checkout)", file=sys.stderr)
        return 2

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(str(map_path), child), daemon=True)
    proc.start()
    if shutil.which("taskset") and not args.no_pin and (os.cpu_count() or 1) > 1:
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(proc.pid)], check=False, capture_output=True)
        os.sched_setaffinity(0, {1})
    url, n_segments, lo, hi = parent.recv()
    bbox = f"{lo[0]:.5f},{lo[1]:.5f},{(lo[0] + hi[0]) / 2:.5f},{(lo[1] + hi[1]) / 2:.5f}"
    res = asyncio.run(measure(parent, url, bbox, args.runs, args.clients))
    parent.send(("stop",))
    server_rss = parent.recv()
    proc.join(10)
    client_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    s = res["snapshot"]
    print(f"Command: `python -m bench.feed --map {map_path.name} --runs {args.runs} --clients {args.clients}` · "
          f"commit `{commit}`+working tree · {time.strftime('%Y-%m-%d')} · nproc {os.cpu_count()}")
    print(f"Map {map_path.name}: {n_segments:,} segments, every one with a record. Server pinned to core 0, "
          f"clients on core 1. Peak RSS: server {server_rss:.0f} MB, clients {client_rss:.0f} MB.\n")
    print("| snapshot request | ms, median (min–max) of runs | body |")
    print("|---|---|---|")
    print(f"| `/v1/segments` cold (encode + gzip after a publication) | {_fmt(s['cold'])} | {s['sizes']['gzip'] / 1e3:,.0f} kB gzip ({s['sizes']['identity'] / 1e3:,.0f} kB raw) |")
    print(f"| `/v1/segments` warm (cached, gzip) | {_fmt(s['warm'], digits=2)} | same |")
    print(f"| `/v1/segments` + `If-None-Match` → 304 | {_fmt(s['not_modified'], digits=2)} | 0 |")
    print(f"| `/v1/segments?bbox=` (quarter of the map) cold | {_fmt(s['bbox_cold'])} | |")
    print(f"| `/v1/datex2` cold | {_fmt(s['datex2_cold'])} | {s['sizes']['datex2_gzip'] / 1e3:,.0f} kB gzip |")
    ratio = [c / w for c, w in zip(s["cold"], s["warm"])]
    print(f"\ncold / warm ratio (what the per-publication cache buys): {statistics.median(ratio):.0f}×\n")
    print("| SSE fan-out | changed segments | clients | latency median over clients, ms | latency max over clients, ms |")
    print("|---|---|---|---|---|")
    for key, rows in res["fanout"].items():
        n_clients, share = key.split("/")
        changed = rows[0][2]
        print(f"| {float(share):.0%} of segments | {changed:,} | {n_clients} | {_fmt([r[0] for r in rows])} | {_fmt([r[1] for r in rows])} |")
    one = {float(k.split('/')[1]): statistics.median(r[1] for r in v) for k, v in res["fanout"].items() if k.startswith("1/")}
    many = {float(k.split('/')[1]): statistics.median(r[1] for r in v) for k, v in res["fanout"].items() if not k.startswith("1/")}
    for share in sorted(one):
        print(f"\n{args.clients} clients / 1 client, max latency, {share:.0%} changed: {many[share] / one[share]:.1f}×", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
