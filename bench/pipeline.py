"""End-to-end pipeline throughput and latency: embedded runner vs ``roadpulse worker`` on a real broker.

    python -m bench.pipeline [--map kotka] [--hours 1] [--probe-share 1.0] [--runs 5] [--speedup 100]

Input: a seeded simulated morning (``simulate_day``) sent as device batches, as the replay does.
For each run:

* **embedded**: the same messages through :class:`streams.embedded.EmbeddedPipeline` in this process
  (pinned to core 0), pings/s over the whole run including ``finish()``;
* **kafka, 1 worker / 2 workers**: tansu (the test broker) on a free port, fresh topics and consumer
  group per run, ``roadpulse worker`` processes (1 pinned to core 0; 2 use both cores) started and
  joined *before* the clock starts; the messages are then produced as fast as kafka-python goes, and
  the clock stops at the broker timestamp of the last segment speed the final watermark closes.
  pings/s = pings / (that time - first send). The published speeds are checked against the embedded
  run (same records for every closed window) so a fast-but-wrong run shows.
* **latency** (1 worker): the messages paced at ``--speedup`` x real time; for every published
  segment-window, its broker timestamp minus the send time of the ping message that moved the
  pipeline's watermark (minimum over ping partitions) past the window's close (``window_end +
  grace``): the time from a ping's arrival to its effect in the published speeds. p50 / p99.

Peak RSS: the bench process for embedded; each worker's ``VmHWM`` for Kafka.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
import zlib
from collections import defaultdict

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from geo import bundled_map, load_network
from geo.matcher import route_table
from simulator.config import SimulationConfig
from simulator.day import simulate_day
from streams.embedded import EmbeddedPipeline
from streams.settings import Settings
from tests.kafka_support import TansuBroker, worker_command, worker_env
from tests.test_pipeline_kafka import same_record

PARTS = 4


def _part(key: bytes) -> int:
    return zlib.crc32(key) % PARTS


def make_input(args) -> tuple[list[tuple[bytes, bytes, float]], int]:
    net = load_network(bundled_map(args.map))
    sim = simulate_day(net, SimulationConfig(hours=args.hours, start_s=8 * 3600, seed=20261128,
                                             probe_share=args.probe_share))
    msgs = []
    n = 0
    for d, ps in sim.ping_batches():
        msgs.append((d.encode(), json.dumps({"device": d, "pings": [p.to_dict() for p in ps]}).encode(),
                     max(p.ts for p in ps)))
        n += len(ps)
    return msgs, n


def run_embedded(net, settings, msgs) -> tuple[float, list]:
    out: list = []
    pipe = EmbeddedPipeline(net, settings, on_publish=out.extend)
    t0 = time.perf_counter()
    for i in range(0, len(msgs), 200):
        pipe.process_messages([(k, v) for k, v, _ in msgs[i:i + 200]])
    pipe.finish()
    return time.perf_counter() - t0, out


def _key(r: dict) -> tuple:
    return (r["segment_id"], r["window_start"])


def _strip(r: dict) -> dict:
    r = dict(r)
    r.pop("published_at")
    return r


class KafkaRun:
    def __init__(self, broker: TansuBroker, settings: Settings, n_workers: int, tmp: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.topics = {k: f"bench-{tag}.{k}" for k in ("pings", "rejected", "traversals", "speeds")}
        self.bootstrap = broker.bootstrap
        env = worker_env(broker.bootstrap, map=settings.map, partitions=PARTS, grace_s=settings.grace_s,
                         topic_pings=self.topics["pings"], topic_rejected=self.topics["rejected"],
                         topic_traversals=self.topics["traversals"], topic_segment_speeds=self.topics["speeds"],
                         log_level="WARNING", extra={"app_id": f"bench-{tag}"})
        self.procs = []
        self.logs = []
        for i in range(n_workers):
            log = os.path.join(tmp, f"{tag}-w{i}.log")
            self.logs.append(log)
            cmd = worker_command("--datadir", os.path.join(tmp, f"{tag}-d{i}"))
            if n_workers == 1:
                cmd = ["taskset", "-c", "0", *cmd]
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT))
        self.consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        # WARNING level: readiness shows as the consumer group having assigned every partition, which we
        # detect by a probe message per partition coming back as a watermark on the traversals topic.
        prod = KafkaProducer(bootstrap_servers=self.bootstrap)
        for p in range(PARTS):
            prod.send(self.topics["pings"], key=b"probe", value=b"{}", partition=p)
        prod.flush()
        prod.close()
        c = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        tps = [TopicPartition(self.topics["rejected"], p) for p in range(PARTS)]
        deadline = time.monotonic() + timeout_s
        seen = 0
        while seen < PARTS:
            for proc, log in zip(self.procs, self.logs):
                if proc.poll() is not None:
                    raise RuntimeError(open(log).read()[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError("workers not ready")
            try:
                c.assign(tps)
                c.seek_to_beginning()
                seen = sum(len(v) for v in c.poll(timeout_ms=1000).values())
            except Exception:  # topic not created yet
                time.sleep(0.5)
        c.close()
        time.sleep(1.0)

    def produce(self, msgs, speedup: float | None) -> list[tuple[int, float, float]]:
        """Send; returns (partition, send wall time, event time) per message."""
        prod = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, batch_size=256 * 1024)
        sent = []
        futures = []
        t_start = time.time()
        ts0 = msgs[0][2]
        for k, v, ts in msgs:
            if speedup:
                delay = t_start + (ts - ts0) / speedup - time.time()
                if delay > 0:
                    time.sleep(delay)
            p = _part(k)
            sent.append((p, time.time(), ts))
            futures.append(prod.send(self.topics["pings"], key=k, value=v, partition=p))
        prod.flush()
        prod.close()
        # a lost upload would show as "not equal" with the pipeline blameless: say so instead
        failed = [f for f in futures if f.failed()]
        if failed:
            print(f"  PRODUCER: {len(failed)} of {len(futures)} uploads not delivered, e.g. {failed[0].exception!r}",
                  flush=True)
        return sent

    def collect(self, expected: dict, timeout_s: float = 120.0) -> dict:
        """Read speeds until every expected window has its expected value; returns key -> (record, broker
        time in s at which the key got its current value)."""
        tps = [TopicPartition(self.topics["speeds"], p) for p in range(PARTS)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning()
        got: dict = {}
        deadline = time.monotonic() + timeout_s
        while not all(k in got and same_record(got[k][0], expected[k]) for k in expected):
            if time.monotonic() > deadline:
                break
            for recs in self.consumer.poll(timeout_ms=500).values():
                for m in recs:
                    r = json.loads(m.value)
                    k = _key(r)
                    rec = _strip(r)
                    # when the window got its final value: a republication of the same value keeps the
                    # earlier time, a changed value (at-least-once replay of a partial state) moves it
                    same = k in got and same_record(got[k][0], rec)
                    got[k] = (rec, got[k][1] if same else m.timestamp / 1000.0)
        return got

    def close(self) -> list[float]:
        rss = []
        for proc in self.procs:
            try:
                with open(f"/proc/{proc.pid}/status") as fh:
                    rss += [int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM")]
            except OSError:
                pass
            proc.terminate()
        for proc in self.procs:
            proc.wait(60)
        self.consumer.close()
        return rss


def closed_windows(published, sent_ts_by_part: dict, grace_s: float) -> tuple[dict, float]:
    closed_until = min(sent_ts_by_part.values()) - grace_s - 1.0
    return {_key(s.to_dict()): _strip(s.to_dict()) for s in published if s.window_end <= closed_until}, closed_until


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--map", default="kotka")
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--probe-share", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--speedup", type=float, default=100.0, help="pacing of the latency run (x real time)")
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    os.sched_setaffinity(0, {0})
    msgs, n_pings = make_input(args)
    settings = Settings(map=args.map, partitions=PARTS, grace_s=600.0)  # as the differential test: no lateness
    net = load_network(bundled_map(args.map))
    route_table(net)  # warm-up: built once per process, as in a worker
    newest: dict[int, float] = defaultdict(float)
    for k, _, ts in msgs:
        newest[_part(k)] = max(newest[_part(k)], ts)
    print(f"input: {args.map}, {args.hours} h, probe share {args.probe_share}: {n_pings:,} pings in {len(msgs):,} messages",
          flush=True)
    run_embedded(net, settings, msgs[: len(msgs) // 10])  # warm-up
    emb_times, published = [], []
    for _ in range(args.runs):
        dt, published = run_embedded(net, settings, msgs)
        emb_times.append(dt)
    emb_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    expected, closed_until = closed_windows(published, newest, settings.grace_s)
    rows = [("embedded (in process, core 0)", [n_pings / t for t in emb_times], emb_rss, "—")]
    os.sched_setaffinity(0, {1})  # leave core 0 to the worker
    broker = TansuBroker()
    broker.start()
    tmp = f"/tmp/bench-pipeline-{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    latencies: list[float] = []
    try:
        for n_workers in [int(w) for w in args.workers.split(",")]:
            rates, rss_all, equal = [], [], True
            for _ in range(args.runs):
                run = KafkaRun(broker, settings, n_workers, tmp)
                try:
                    run.wait_ready()
                    sent = run.produce(msgs, None)
                    got = run.collect(expected)
                finally:
                    rss_all += run.close()
                missing = [k for k in expected if k not in got]
                differ = [k for k in expected if k in got and not same_record(got[k][0], expected[k])]
                equal &= not missing and not differ
                if missing or differ:  # say what differs: a wrong run must be diagnosable, not just counted
                    print(f"  NOT EQUAL: {len(missing)} missing, {len(differ)} different of {len(expected)} "
                          f"closed windows; e.g. {[(k, expected[k], got.get(k, (None,))[0]) for k in (missing + differ)[:2]]}",
                          flush=True)
                t_end = max(got[k][1] for k in expected if k in got)
                rates.append(n_pings / (t_end - sent[0][1]))
                print(f"  {n_workers} worker(s): {rates[-1]:,.0f} pings/s, equal to embedded: {equal}", flush=True)
            rows.append((f"kafka, {n_workers} worker{'s' if n_workers > 1 else ''}"
                         f"{' (core 0)' if n_workers == 1 else ' (both cores)'}", rates, max(rss_all), str(equal)))
        # latency, 1 worker, paced
        run = KafkaRun(broker, settings, 1, tmp)
        try:
            run.wait_ready()
            sent = run.produce(msgs, args.speedup)
            got = run.collect(expected)
        finally:
            run.close()
        by_part: dict[int, list[tuple[float, float]]] = defaultdict(list)
        running: dict[int, float] = defaultdict(lambda: float("-inf"))
        for p, t_send, ts in sent:
            running[p] = max(running[p], ts)
            by_part[p].append((running[p], t_send))
        for k, (rec, t_pub) in got.items():
            if k not in expected:
                continue
            need = rec["window_end"] + settings.grace_s
            closes = []
            for p in range(PARTS):
                t = next((t_send for mx, t_send in by_part[p] if mx >= need), None)
                closes.append(t)
            if None in closes:
                continue
            latencies.append(t_pub - max(closes))
    finally:
        broker.stop()
    print()
    print(f"| runner | pings/s median (min–max) | peak RSS MB | speeds equal to embedded |")
    print("|---|---|---|---|")
    for name, rates, rss, eq in rows:
        print(f"| {name} | {statistics.median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f}) | {rss:.0f} | {eq} |")
    if latencies:
        q = statistics.quantiles(latencies, n=100)
        print(f"\nlatency (1 worker, {args.speedup:g}x real time, {len(latencies)} segment-windows): "
              f"p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
