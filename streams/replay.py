"""Replay a ping file into the pings topic, at N x real time or as fast as possible.

A file's pings are regrouped into the uploads a phone SDK would make (:func:`iter_batches`:
consecutive pings of one device), paced on event time (:class:`Pacer`), and handed to a
:class:`BatchSink`. The Kafka sink (:class:`KafkaBatchSink`, kafka-python) sends one message per
upload — key = device id, value = ``{"device": ..., "pings": [...]}``, message timestamp = the
upload's last event time — and survives broker outages: kafka-python retries within its
delivery timeout, and a batch that still fails is sent again until ``timeout_s`` has passed
without progress, after which :class:`ReplayError` says what to do. Delivery is at-least-once: a
batch resent after an outage may arrive twice (ingest drops duplicate pings).

Other sinks (e.g. an in-process pipeline) implement the same three methods.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from geo.model import Ping
from simulator.formats import batch_to_json

log = logging.getLogger(__name__)

#: Largest upload a replay forms from consecutive pings of one device.
MAX_BATCH_PINGS = 100
#: Largest event-time span of one replayed upload, seconds.
MAX_BATCH_SPAN_S = 120.0


class ReplayError(RuntimeError):
    """The sink could not deliver (broker unreachable past the timeout); the message says why."""


@dataclass
class ReplayStats:
    """Counts of a replay. ``acked`` grows from the producer's I/O thread."""

    batches: int = 0
    pings: int = 0
    acked_batches: int = 0
    acked_pings: int = 0
    resent_batches: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def pings_per_s(self) -> float:
        return self.pings / max(self.elapsed_s, 1e-9)


def iter_batches(
    pings: Iterable[Ping], max_pings: int = MAX_BATCH_PINGS, max_span_s: float = MAX_BATCH_SPAN_S
) -> Iterator[tuple[str, list[Ping]]]:
    """Group consecutive pings of the same device into uploads ``(device, pings)``.

    Simulator files list pings upload by upload, so this restores the uploads; any other file
    gives one batch per run of a device's consecutive pings (capped at ``max_pings`` and
    ``max_span_s`` of event time).
    """
    device: str | None = None
    batch: list[Ping] = []
    for p in pings:
        if batch and (p.device != device or len(batch) >= max_pings or p.ts - batch[0].ts > max_span_s):
            yield device, batch  # type: ignore[misc]
            batch = []
        device = p.device
        batch.append(p)
    if batch:
        yield device, batch  # type: ignore[misc]


class Pacer:
    """Releases events at ``speed`` x real time of their event times; ``speed`` 0 = no waiting.

    The first event sets the origin; an event earlier than one already released goes at once.
    """

    def __init__(self, speed: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0 (0 = as fast as possible)")
        self.speed = speed
        self.clock = clock
        self.sleep = sleep
        self._origin: tuple[float, float] | None = None

    def wait_for(self, event_ts: float) -> None:
        """Block until the wall-clock moment of ``event_ts``."""
        if self.speed == 0:
            return
        if self._origin is None:
            self._origin = (event_ts, self.clock())
            return
        due = self._origin[1] + (event_ts - self._origin[0]) / self.speed
        delay = due - self.clock()
        if delay > 0:
            self.sleep(delay)


class BatchSink(Protocol):
    """Where replayed uploads go."""

    def send(self, device: str, pings: Sequence[Ping]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def batch_message(device: str, pings: Sequence[Ping]) -> tuple[bytes, bytes, int]:
    """``(key, value, timestamp_ms)`` of one upload's Kafka message."""
    return device.encode(), batch_to_json(device, pings).encode(), int(round(pings[-1].ts * 1000.0))


class KafkaBatchSink:
    """Produces uploads to a Kafka topic with kafka-python, resending after broker outages.

    Parameters
    ----------
    bootstrap
        ``host:port[,host:port]``.
    topic
        The pings topic (``Settings.topic_pings``).
    timeout_s
        How long a replay may go without the broker acknowledging anything before giving up.
    partitions
        Partition count used when the topic does not exist yet (``Settings.partitions``).
    stats
        Counters to update (acknowledgements arrive on the producer's thread).
    producer_options
        Extra ``KafkaProducer`` options (tests, tuning).
    """

    def __init__(self, bootstrap: str, topic: str, *, timeout_s: float = 60.0, partitions: int | None = None,
                 stats: ReplayStats | None = None, producer_options: dict | None = None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout_s = timeout_s
        self.stats = stats if stats is not None else ReplayStats()
        self._failed: deque[tuple[bytes, bytes, int, int]] = deque()
        self._lock = threading.Lock()
        self._pending = 0
        self._last_progress = time.monotonic()
        options = dict(
            bootstrap_servers=bootstrap.split(","),
            acks="all",
            linger_ms=20,
            # A restarted broker may have forgotten idempotent producer ids (tansu with memory
            # storage does); plain retries plus resends give at-least-once either way.
            enable_idempotence=False,
            max_in_flight_requests_per_connection=1,  # keeps a device's uploads in order on retries
            retries=2**31 - 1,
            retry_backoff_ms=200,
            reconnect_backoff_max_ms=2000,
            request_timeout_ms=int(min(max(timeout_s / 2, 1.0), 30.0) * 1000),
            delivery_timeout_ms=int(max(timeout_s, 2.0) * 1000),
            max_block_ms=int(min(max(timeout_s / 2, 1.0), 30.0) * 1000),
            bootstrap_timeout_ms=int(max(timeout_s, 1.0) * 1000),
        )
        options.update(producer_options or {})
        self._producer = self._connect(options)
        if partitions:
            self._ensure_topic(options["bootstrap_servers"], partitions)

    def _connect(self, options: dict):
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return KafkaProducer(**options)
            except KafkaError as exc:
                if time.monotonic() >= deadline:
                    raise ReplayError(
                        f"cannot reach Kafka at {self.bootstrap} within {self.timeout_s:.0f} s ({type(exc).__name__}); "
                        "is the broker running? set --kafka or ROADPULSE_KAFKA") from None
                time.sleep(0.5)

    def _ensure_topic(self, servers: list[str], partitions: int) -> None:
        """Create the topic with ``partitions`` when missing; leave an existing one alone."""
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import KafkaError, TopicAlreadyExistsError

        try:
            admin = KafkaAdminClient(bootstrap_servers=servers, request_timeout_ms=10_000)
        except KafkaError:
            return  # auto-creation on first send still works
        try:
            if self.topic not in admin.list_topics():
                admin.create_topics([NewTopic(self.topic, num_partitions=partitions, replication_factor=1)])
        except TopicAlreadyExistsError:
            pass
        except KafkaError as exc:
            log.warning("could not create topic %s (%s); relying on auto-creation", self.topic, type(exc).__name__)
        finally:
            admin.close()

    # ------------------------------------------------------------------ sending
    def send(self, device: str, pings: Sequence[Ping]) -> None:
        key, value, ts_ms = batch_message(device, pings)
        self._send((key, value, ts_ms, len(pings)), fresh=True)
        self._resend_failed()

    def _send(self, record: tuple[bytes, bytes, int, int], fresh: bool) -> None:
        from kafka.errors import KafkaError

        key, value, ts_ms, n_pings = record
        with self._lock:
            if fresh and self._pending == 0 and not self._failed:
                self._last_progress = time.monotonic()  # idle time with nothing in flight is no outage
        while True:
            try:
                future = self._producer.send(self.topic, key=key, value=value, timestamp_ms=ts_ms)
                break
            except KafkaError:
                # Metadata unavailable (broker down): wait within the timeout and try again.
                self._check_timeout()
                time.sleep(0.2)
        with self._lock:
            self._pending += 1
        future.add_callback(self._on_ack, n_pings)
        future.add_errback(self._on_error, record)

    def _on_ack(self, n_pings: int, _metadata: object) -> None:
        with self._lock:
            self._pending -= 1
            self._last_progress = time.monotonic()
            self.stats.acked_batches += 1
            self.stats.acked_pings += n_pings

    def _on_error(self, record: tuple[bytes, bytes, int, int], exc: BaseException) -> None:
        with self._lock:
            self._pending -= 1
            self._failed.append(record)
        log.debug("upload failed (%s); will resend", type(exc).__name__)

    def _resend_failed(self) -> None:
        while True:
            with self._lock:
                if not self._failed:
                    return
                record = self._failed.popleft()
            self._check_timeout()
            self.stats.resent_batches += 1
            self._send(record, fresh=False)

    def _check_timeout(self) -> None:
        with self._lock:
            idle = time.monotonic() - self._last_progress
        if idle > self.timeout_s:
            raise ReplayError(
                f"Kafka at {self.bootstrap} acknowledged nothing for {idle:.0f} s "
                f"({self.stats.batches - self.stats.acked_batches} uploads unconfirmed); "
                "check that the broker is up and the topic writable, then replay again "
                "(ingest drops duplicate pings)")

    def flush(self) -> None:
        """Wait until every upload is acknowledged, resending failures; raises :class:`ReplayError`."""
        while True:
            self._producer.flush(timeout=1.0)
            self._resend_failed()
            with self._lock:
                done = self._pending == 0 and not self._failed
            if done:
                return
            self._check_timeout()

    def close(self) -> None:
        self._producer.close(timeout=5.0)


def replay(
    batches: Iterable[tuple[str, Sequence[Ping]]],
    sink: BatchSink,
    speed: float = 0.0,
    *,
    stats: ReplayStats | None = None,
    on_batch: Callable[[ReplayStats], None] | None = None,
) -> ReplayStats:
    """Send every upload to ``sink``, paced at ``speed`` x real time (0: as fast as possible).

    Uploads are released at their last ping's event time; the sink is flushed at the end.
    """
    stats = stats if stats is not None else ReplayStats()
    pacer = Pacer(speed)
    for device, pings in batches:
        pacer.wait_for(pings[-1].ts)
        sink.send(device, pings)
        stats.batches += 1
        stats.pings += len(pings)
        if on_batch is not None:
            on_batch(stats)
    sink.flush()
    stats.finished = time.monotonic()
    return stats
