"""Soak: a sustained replay at a fixed ping rate through ``roadpulse worker`` on a real broker.

    python -m bench.soak [--map kotka] [--rate 1000] [--duration 660] [--workers 1] [--sample-s 10]

Input: a seeded simulated morning (``simulate_day``, probe share 1.0) as device batches, as the replay
sends them. The morning is replayed in cycles, each shifted later in event time by the morning's span
plus 15 min (so every trip of a cycle has ended before the next one starts) and with fresh device ids,
for as long as ``--duration`` lasts. Messages are paced on the *ping count*, not on event time: message
``i`` leaves at ``t0 + pings_before_i / rate``, a constant load whatever the morning's demand profile.

Every ``--sample-s`` seconds the bench records, per worker, the resident set size (``VmRSS``) and CPU
time (and the broker's CPU and the machine's 1-minute load average, to tell other work on the machine
from the pipeline's own slow-downs), and the end-to-end latency of the segment-windows published during that interval. Latency, as in
``bench.pipeline``: the broker timestamp of a segment-speed record minus the send time of the ping
message that moved the pipeline's watermark (minimum over ping partitions of the newest event time
sent) past the window's close (``window_end + grace_s``) -- the time from a ping's arrival to its effect
in the published speeds. At the end it writes ``bench/plots/soak.png`` (RSS and p50/p99 latency over
time) and ``bench/plots/soak.json`` (the samples), and prints the summary table for RESULTS.md.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections import defaultdict
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from geo import bundled_map, load_network
from simulator.config import SimulationConfig
from simulator.day import simulate_day
from streams.settings import Settings
from tests.kafka_support import TansuBroker, worker_command, worker_env

PARTS = 4
PLOTS = Path(__file__).resolve().parent / "plots"


def _part(key: bytes) -> int:
    return zlib.crc32(key) % PARTS


def morning(map_name: str, hours: float, seed: int) -> tuple[list[tuple[str, list[dict]]], float, float]:
    """Uploads ``(device, [ping dicts])`` of a simulated morning, its first event time and span (s)."""
    net = load_network(bundled_map(map_name))
    sim = simulate_day(net, SimulationConfig(hours=hours, start_s=7 * 3600, seed=seed, probe_share=1.0))
    uploads = [(d, [p.to_dict() for p in ps]) for d, ps in sim.ping_batches()]
    first = min(p["ts"] for _, ps in uploads for p in ps)
    last = max(p["ts"] for _, ps in uploads for p in ps)
    return uploads, first, last - first


def proc_sample(pid: int) -> tuple[float, float]:
    """``(VmRSS MB, CPU seconds)`` of a process."""
    with open(f"/proc/{pid}/status") as fh:
        rss = next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS"))
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return rss, cpu


class Watermarks:
    """Send times of the ping messages and the pipeline watermark they imply, to time window closes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[int, list[float]] = defaultdict(list)  # non-decreasing newest event time
        self.sent_at: dict[int, list[float]] = defaultdict(list)

    def sent(self, partition: int, event_ts: float, wall: float) -> None:
        with self.lock:
            r = self.running[partition]
            r.append(max(event_ts, r[-1]) if r else event_ts)
            self.sent_at[partition].append(wall)

    def close_time(self, need_ts: float) -> float | None:
        """Wall time the last partition's newest sent event time reached ``need_ts``; ``None`` if not yet."""
        with self.lock:
            out = []
            for p in range(PARTS):
                r = self.running.get(p, [])
                i = bisect.bisect_left(r, need_ts)
                if i >= len(r):
                    return None
                out.append(self.sent_at[p][i])
            return max(out)


class SpeedReader(threading.Thread):
    """Follows the segment-speeds topic; keeps ``(broker time s, window_end)`` of every record."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.topic = topic
        self.records: list[tuple[float, float, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        tps = [TopicPartition(self.topic, p) for p in range(PARTS)]
        while not self.stop.is_set():
            try:
                self.consumer.assign(tps)
                self.consumer.seek_to_beginning()
                break
            except Exception:  # topic not created yet
                time.sleep(0.5)
        while not self.stop.is_set():
            for recs in self.consumer.poll(timeout_ms=500).values():
                with self.lock:
                    for m in recs:
                        r = json.loads(m.value)
                        self.records.append((m.timestamp / 1000.0, float(r["window_end"]), r["status"]))
        self.consumer.close()

    def take(self) -> list[tuple[float, float, str]]:
        with self.lock:
            out, self.records = self.records, []
        return out


def wait_ready(bootstrap: str, topics: dict, procs, logs, timeout_s: float = 180.0) -> None:
    """A probe message per pings partition comes back on the rejected topic: every partition is owned."""
    prod = KafkaProducer(bootstrap_servers=bootstrap)
    for p in range(PARTS):
        prod.send(topics["pings"], key=b"probe", value=b"{}", partition=p)
    prod.flush()
    prod.close()
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(topics["rejected"], p) for p in range(PARTS)]
    deadline = time.monotonic() + timeout_s
    seen = 0
    while seen < PARTS:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(Path(log).read_text()[-3000:])
        if time.monotonic() > deadline:
            raise RuntimeError("workers not ready")
        try:
            c.assign(tps)
            c.seek_to_beginning()
            seen = sum(len(v) for v in c.poll(timeout_ms=1000).values())
        except Exception:
            time.sleep(0.5)
    c.close()


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--map", default="kotka")
    ap.add_argument("--hours", type=float, default=2.0, help="simulated morning per cycle")
    ap.add_argument("--rate", type=float, default=1000.0, help="pings per second sent")
    ap.add_argument("--duration", type=float, default=660.0, help="seconds of sustained replay")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=20261128)
    ap.add_argument("--out", default=str(PLOTS / "soak"))
    args = ap.parse_args()

    uploads, first_ts, span = morning(args.map, args.hours, args.seed)
    n_cycle = sum(len(ps) for _, ps in uploads)
    cycle_shift = span + 900.0
    settings = Settings(map=args.map, partitions=PARTS)
    print(f"input: {args.map}, {args.hours} h morning, {n_cycle:,} pings in {len(uploads):,} uploads per cycle; "
          f"rate {args.rate:,.0f} pings/s for {args.duration:.0f} s, {args.workers} worker(s)", flush=True)

    broker = TansuBroker()
    broker.start()
    tmp = Path(f"/tmp/bench-soak-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    topics = {k: f"soak-{tag}.{k}" for k in ("pings", "rejected", "traversals", "speeds")}
    env = worker_env(broker.bootstrap, map=args.map, partitions=PARTS,
                     topic_pings=topics["pings"], topic_rejected=topics["rejected"],
                     topic_traversals=topics["traversals"], topic_segment_speeds=topics["speeds"],
                     log_level="WARNING", extra={"app_id": f"soak-{tag}"})
    procs, logs = [], []
    for i in range(args.workers):
        log = tmp / f"worker-{i}.log"
        logs.append(log)
        procs.append(subprocess.Popen(worker_command("--datadir", str(tmp / f"data-{i}")), env=env,
                                      stdout=open(log, "w"), stderr=subprocess.STDOUT))
    samples: list[dict] = []
    all_lat: list[float] = []
    reader = SpeedReader(broker.bootstrap, topics["speeds"])
    try:
        wait_ready(broker.bootstrap, topics, procs, logs)
        time.sleep(2.0)
        reader.start()
        marks = Watermarks()
        prod = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5, batch_size=256 * 1024)
        t0 = time.time()
        next_sample = t0 + args.sample_s
        sent_pings = 0
        pending: list[tuple[float, float]] = []  # (broker time, window_end) not yet closable
        start_stats = [proc_sample(p.pid) for p in procs]
        last_cpu = [c for _, c in start_stats]
        last_broker_cpu = proc_sample(broker.proc.pid)[1]
        cycle = 0

        def sample(now: float) -> None:
            nonlocal pending, last_cpu, last_broker_cpu
            recs = [(t, we) for t, we, _ in reader.take()] + pending
            pending = []
            lat = []
            for t_pub, window_end in recs:
                close = marks.close_time(window_end + settings.grace_s)
                if close is None:
                    pending.append((t_pub, window_end))  # its close message is not sent yet (re-publication)
                    continue
                lat.append(max(0.0, t_pub - close))
            all_lat.extend(lat)
            stats = [proc_sample(p.pid) for p in procs]
            cpu = [c for _, c in stats]
            broker_cpu = proc_sample(broker.proc.pid)[1]
            row = {
                "t_s": round(now - t0, 1), "sent_pings": sent_pings,
                "rss_mb": [round(r, 1) for r, _ in stats],
                "cpu_share": [round((c - lc) / args.sample_s, 3) for c, lc in zip(cpu, last_cpu)],
                "broker_cpu_share": round((broker_cpu - last_broker_cpu) / args.sample_s, 3),
                "load1": round(os.getloadavg()[0], 2),
                "published": len(lat),
                "p50_ms": round(quantile(lat, 0.50) * 1000, 1), "p99_ms": round(quantile(lat, 0.99) * 1000, 1),
                "max_ms": round(max(lat) * 1000, 1) if lat else float("nan"),
            }
            last_cpu, last_broker_cpu = cpu, broker_cpu
            samples.append(row)
            print(json.dumps(row), flush=True)

        while time.time() - t0 < args.duration:
            shift = cycle * cycle_shift
            for dev, ps in uploads:
                if time.time() - t0 >= args.duration:
                    break
                device = f"{dev}-c{cycle}"
                key = device.encode()
                value = json.dumps({"device": device, "pings": [{**p, "ts": p["ts"] + shift} for p in ps]},
                                   separators=(",", ":")).encode()
                due = t0 + sent_pings / args.rate
                now = time.time()
                while now < due:
                    if now >= next_sample:
                        sample(now)
                        next_sample += args.sample_s
                    time.sleep(min(due - now, 0.05))
                    now = time.time()
                if now >= next_sample:
                    sample(now)
                    next_sample += args.sample_s
                p = _part(key)
                marks.sent(p, max(x["ts"] for x in ps) + shift, time.time())
                prod.send(topics["pings"], key=key, value=value, partition=p)
                sent_pings += len(ps)
            cycle += 1
        prod.flush()
        elapsed = time.time() - t0
        time.sleep(args.sample_s)
        sample(time.time())
        prod.close()
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"worker died during the soak:\n{Path(log).read_text()[-3000:]}")
    finally:
        reader.stop.set()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "map": args.map, "rate_pings_s": args.rate, "duration_s": round(elapsed, 1), "workers": args.workers,
        "sent_pings": sent_pings, "achieved_rate": round(sent_pings / elapsed, 1), "cycles": cycle,
        "rss_start_mb": samples[0]["rss_mb"], "rss_end_mb": samples[-1]["rss_mb"],
        "rss_max_mb": [max(s["rss_mb"][i] for s in samples) for i in range(args.workers)],
        "latency_p50_ms": round(quantile(all_lat, 0.50) * 1000, 1),
        "latency_p99_ms": round(quantile(all_lat, 0.99) * 1000, 1), "windows": len(all_lat),
        "samples": samples,
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(samples, out.with_suffix(".png"), summary)
    print(f"\nsoak: {summary['duration_s']:.0f} s at {summary['achieved_rate']:,.0f} pings/s "
          f"({sent_pings:,} pings, {cycle} cycles); RSS start {summary['rss_start_mb']} MB, end "
          f"{summary['rss_end_mb']} MB, max {summary['rss_max_mb']} MB; latency p50 "
          f"{summary['latency_p50_ms']:.0f} ms, p99 {summary['latency_p99_ms']:.0f} ms over {len(all_lat):,} windows")
    sys.stdout.flush()


def plot(samples: list[dict], path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for i in range(len(samples[0]["rss_mb"])):
        ax1.plot(t, [s["rss_mb"][i] for s in samples], label=f"worker {i} RSS")
    ax1.set_ylabel("RSS, MB")
    ax1.set_ylim(bottom=0)
    ax1.legend(loc="lower right")
    ax1.set_title(f"soak: {summary['map']}, {summary['achieved_rate']:,.0f} pings/s, {summary['workers']} worker(s)")
    ax2.plot(t, [s["p50_ms"] / 1000 for s in samples], label="p50")
    ax2.plot(t, [s["p99_ms"] / 1000 for s in samples], label="p99")
    ax2.set_ylabel("ping → published speed, s")
    ax2.set_xlabel("minutes")
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
