"""Hostile input and broker outages against a real ``roadpulse worker`` on the test broker (tansu).

* Every hostile message of :func:`tests.test_hostile_input.hostile_messages`, sent between two halves of a
  simulated half hour, lands on the rejected topic with its original key and bytes and its reasons, is
  counted under that reason in the worker's ``/metrics``, and the worker goes on to publish exactly the
  speeds the embedded pipeline publishes for the good pings alone. No device id, pseudonym or raw
  coordinate appears in the worker's INFO log or in a metric label.
* A worker started while the broker is unreachable says so and retries with backoff; when the broker
  comes, it starts; when the broker goes away mid-run and comes back, it resumes without loss. The
  outage is made by a TCP proxy that the broker advertises (so every client goes through it): cutting
  the proxy cuts every connection while the broker -- memory storage -- keeps its data.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.embedded import EmbeddedPipeline
from streams.ingest import Pseudonymiser
from streams.metrics import unbounded_label_values
from streams.settings import Settings
from tests.kafka_support import TansuBroker, free_port, worker_command
from tests.test_hostile_input import hostile_messages, recent_uploads
from tests.test_pipeline_kafka import GRACE_S, PARTS, Run, _by_window, _diff, _partition, same_speeds

pytestmark = pytest.mark.broker

SETTINGS = Settings(map="kotka", partitions=PARTS, grace_s=GRACE_S)


def expected_speeds(network, messages, now: float | None) -> dict:
    """What the embedded pipeline publishes for ``messages``, for the windows a worker's watermark closes."""
    published = []
    pipe = EmbeddedPipeline(network, SETTINGS, on_publish=published.extend)
    for i in range(0, len(messages), 100):
        pipe.process_messages(messages[i:i + 100], now=now)
    newest = [0.0] * PARTS
    for key, value in messages:
        p = _partition(key)
        newest[p] = max(newest[p], max(x["ts"] for x in json.loads(value)["pings"]))
    closed_until = min(newest) - GRACE_S - 1.0
    expected = _by_window(s.to_dict() for s in published if s.window_end <= closed_until)
    assert sum(1 for r in expected.values() if r["status"] == "ok") >= 20, "the input must publish real speeds"
    return {"messages": messages, "expected": expected, "closed_until": closed_until}


class WorkerRun(Run):
    """:class:`tests.test_pipeline_kafka.Run` with extra ``roadpulse worker`` flags."""

    def __init__(self, bootstrap: str, tmp_path: Path, *worker_args: str) -> None:
        super().__init__(bootstrap, tmp_path)
        self.worker_args = worker_args

    def start_worker(self) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"worker-{len(self.workers)}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                worker_command("--datadir", str(self.tmp / f"data-{len(self.workers)}"), *self.worker_args),
                env=self.env, stdout=fh, stderr=subprocess.STDOUT)
        self.workers.append((proc, log))
        return proc, log

    def send(self, key: bytes | None, value: bytes) -> None:
        self.producer.send(self.topics["pings"], key=key, value=value, partition=_partition(key) if key else 0)


def scrape(port: int) -> list:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return list(text_string_to_metric_families(resp.read().decode()))


def private_strings(messages) -> set[str]:
    """Device ids, their pseudonyms and the raw coordinates (as sent) of ``messages``."""
    pseudo = Pseudonymiser(SETTINGS.pseudonym_key, SETTINGS.pseudonym_rotation_s)
    out: set[str] = set()
    for key, value in messages:
        doc = json.loads(value)
        out.add(doc["device"])
        for p in doc["pings"]:
            out.add(pseudo.pseudonym(doc["device"], p["ts"]))
            out.update((repr(p["lat"]), repr(p["lon"])))
    return out


def test_hostile_messages_are_dead_lettered_counted_and_the_worker_keeps_going(kafka_bootstrap, tmp_path, kotka) -> None:
    messages, t_mid = recent_uploads(kotka)
    now = time.time()
    hour = expected_speeds(kotka, messages, now)
    hostile = hostile_messages(t_mid)
    metrics_port = free_port()
    run = WorkerRun(kafka_bootstrap, tmp_path, "--live", "--metrics-port", str(metrics_port))
    try:
        proc, log = run.start_worker()
        run.wait_log(proc, log, "Ready")
        half = len(messages) // 2
        run.produce(messages[:half])
        for h in hostile:
            run.send(h.key, h.value)
        run.producer.flush(timeout=60)
        run.produce(messages[half:])
        got = run.wait_speeds(hour)
        assert same_speeds(got, hour["expected"]), _diff(got, hour["expected"])
        assert proc.poll() is None, "the worker must survive every hostile message"

        # dead letters: original key and bytes, every reason, once each
        dead = run.read("rejected")
        got_dead = Counter((m.key, m.value, tuple(r["reason"] for r in json.loads(dict(m.headers)["rejections"])))
                           for m in dead)
        want_dead = Counter((h.key, h.value, h.reasons) for h in hostile if h.reasons)
        assert got_dead == want_dead, f"missing {want_dead - got_dead}, extra {got_dead - want_dead}"
        assert all(dict(m.headers)["reason"].decode() == json.loads(dict(m.headers)["rejections"])[0]["reason"]
                   for m in dead)

        # counted in the worker's metrics, by reason, one per rejected ping
        families = scrape(metrics_port)
        rejected = {s.labels["reason"]: s.value for f in families if f.name == "roadpulse_pings_rejected"
                    for s in f.samples if s.name == "roadpulse_pings_rejected_total" and s.value}
        want = Counter()
        for h in hostile:
            if h.reasons:
                want[h.reasons[0]] += h.pings
        assert rejected == dict(want)
        assert unbounded_label_values(families) == []
    finally:
        run.close()
    # privacy: nothing identifying in the INFO log (the worker ran at INFO)
    text = log.read_text(errors="replace")
    assert "INFO" in text
    leaked = [s for s in private_strings(messages) if s in text]
    assert not leaked, f"{len(leaked)} device ids / pseudonyms / coordinates in the worker log, e.g. {leaked[:3]}"


# ------------------------------------------------------------------ broker down at start, and gone mid-run


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target``; :meth:`stop` cuts every connection (test-only)."""

    def __init__(self, target: int) -> None:
        self.port = free_port()
        self.target = target
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        srv.settimeout(0.1)
        self._listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while self._listener is srv:
            try:
                client, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        srv, self._listener = self._listener, None
        if srv is not None:
            srv.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_worker_waits_for_the_broker_and_rides_out_an_outage(tmp_path, kotka) -> None:
    proxy = TcpProxy(target=free_port())
    broker = TansuBroker(port=proxy.target, advertised_port=proxy.port, log_dir=tmp_path)
    broker.start()
    run = None
    try:
        proxy.start()
        messages, _ = recent_uploads(kotka, hours=0.5, probe_share=0.2, seed=9)
        hour = expected_speeds(kotka, messages, None)
        run = WorkerRun(proxy.bootstrap, tmp_path)
        proxy.stop()  # to every client, the broker is down
        proc, log = run.start_worker()
        run.wait_log(proc, log, "is not reachable", count=2)  # it said so, and is retrying
        assert "retrying in 0.5 s" in log.read_text() and "retrying in 1.0 s" in log.read_text()  # with backoff
        proxy.start()
        run.wait_log(proc, log, "Ready")
        half = len(messages) // 2
        run.produce(messages[:half])
        run.wait_committed(half // 2)
        proxy.stop()  # the broker goes away mid-run...
        time.sleep(8.0)  # ... longer than the group session timeout (6 s)
        assert proc.poll() is None, "the worker must wait for the broker, not exit"
        proxy.start()
        run.produce(messages[half:])
        got = run.wait_speeds(hour, timeout_s=150.0)
        assert same_speeds(got, hour["expected"]), _diff(got, hour["expected"])
        assert proc.poll() is None
    finally:
        if run is not None:
            run.close()
        proxy.stop()
        broker.stop()
