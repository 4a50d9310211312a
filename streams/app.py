"""The Faust app: roadpulse on Kafka (faust-streaming, aiokafka transport).

Topics (names and partition count from :class:`streams.settings.Settings`)::

    roadpulse.pings            ping batches, key = device id (as sent)          -> agent ingest-match
    roadpulse.pings.rejected   dead letters: original key/value, reasons in headers
    roadpulse.traversals       column batches of traversals + the source watermark, partitioned by segment
                                                                                 -> agent aggregate
    roadpulse.segment-speeds   compacted, key = segment id, value = SegmentSpeed JSON

Agents are thin: they move bytes between topics and tables and call :mod:`streams.operators`.

* **ingest-match** (``ingest`` + ``match`` fused: both are keyed by device and live on the same
  partition, so a hop through Kafka between them would only cost a second serialisation of every
  ping). Batches of messages come from ``stream.take_events()``; per source partition it runs
  :class:`~streams.operators.IngestMatch`, dead-letters rejects, sends the traversals in one message
  per traversals partition (with the source partition's watermark, also sent alone when there are
  no traversals so windows keep closing), waits for delivery, then writes the changed per-device
  states to the ``devices`` table. Order matters for at-least-once: a crash before the table write
  replays the input and re-emits traversals, which the estimator deduplicates by
  ``(device, segment, t_enter)``; a crash after it replays pings the device state has already seen,
  which ingest rejects as duplicates.
* **aggregate**: per traversals partition, a :class:`~streams.operators.Aggregate` (the estimator's
  windows) whose watermark is the minimum over the ping partitions' watermarks; it publishes every
  closed window's speeds. Its state is persisted in the ``aggregate`` table as a chunked snapshot
  (every ``checkpoint_interval_s`` of wall time) plus the raw input batches since (deltas), so each
  batch writes only what it read.

Tables use the memory store (recovered from their changelog topics on start and on rebalance); every
key's value names its partition. Rebalances drop the in-memory operators, which are rebuilt from the
tables on the next batch of a partition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import struct
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faust

from geo.matcher import OnlineMatcher
from geo.network import RoadNetwork
from streams import metrics
from streams.operators import (
    Aggregate,
    DeviceState,
    IngestMatch,
    PipelineStats,
    decode_traversals,
    encode_speed,
    encode_traversals,
    matcher_config,
    segment_partition,
    split_by_partition,
)
from streams.settings import Settings

log = logging.getLogger(__name__)

#: Largest table value the aggregate snapshot writes (Kafka's default message limit is 1 MB).
SNAPSHOT_CHUNK_BYTES: int = 512 * 1024
#: Largest message the worker produces, bytes: Kafka's default broker limit (``message.max.bytes``),
#: so that a dead letter carries its original bytes even when they came close to that limit.
MAX_PRODUCE_BYTES: int = 1_048_576
#: Room for a dead letter's key, headers and record framing within :data:`MAX_PRODUCE_BYTES`.
_DEAD_LETTER_OVERHEAD: int = 8_192
#: Largest record batch the producer builds per partition, bytes (see the producer options in PipelineApp).
PRODUCER_BATCH_BYTES: int = 512 * 1024
_WM = struct.Struct("<d")
#: Wall seconds between updates of ``CONSUMER_LAG{topic}`` (cheap: in-memory offsets, no broker request).
CONSUMER_LAG_INTERVAL_S: float = 1.0


@dataclass(frozen=True)
class WorkerOptions:
    """Tuning of the worker (not part of the settings file: defaults suit every deployment).

    Attributes
    ----------
    batch_messages
        Most messages one ``take_events`` batch holds.
    batch_within_s
        Longest wait for a batch to fill, seconds (bounds the latency added by batching).
    checkpoint_interval_s
        Wall seconds between snapshots of a partition's aggregate state.
    idle_source_s
        Wall seconds after which a ping partition that sends nothing stops holding windows back;
        ``None`` (default) waits for every partition. A wall-clock timeout is only safe when partitions
        are consumed evenly: a partition whose backlog is read late would be declared idle and its
        traversals arrive behind closed windows (measured: wrong speeds when replaying a backlog).
    wall_clock_checks
        Validate event times against the wall clock (live feeds); off for replays of recorded days.
    """

    batch_messages: int = 1000
    batch_within_s: float = 0.2
    checkpoint_interval_s: float = 30.0
    idle_source_s: float | None = None
    wall_clock_checks: bool = False


def broker_urls(settings: Settings) -> list[str]:
    """``settings.kafka`` (``host:port[,host:port]``) as Faust broker URLs."""
    hosts = [h.strip() for h in settings.kafka.split(",") if h.strip()]
    if not hosts:
        raise ValueError("settings.kafka is empty; set ROADPULSE_KAFKA=host:9092")
    return [h if "://" in h else f"kafka://{h}" for h in hosts]


def broker_credentials(settings: Settings) -> Any:
    """Faust credentials for ``kafka_security_protocol`` (``None`` for ``PLAINTEXT``)."""
    proto = getattr(settings, "kafka_security_protocol", "PLAINTEXT").upper()
    if proto == "PLAINTEXT":
        return None
    cafile = getattr(settings, "kafka_ssl_cafile", "") or None
    context = ssl.create_default_context(cafile=cafile) if proto.endswith("SSL") else None
    if proto == "SSL":
        return faust.SSLCredentials(context)
    if proto in ("SASL_PLAINTEXT", "SASL_SSL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username, password=settings.kafka_sasl_password,
            mechanism=settings.kafka_sasl_mechanism or "PLAIN", ssl_context=context,
        )
    raise ValueError(f"unknown kafka_security_protocol {proto!r}")


class PipelineApp:
    """The roadpulse Faust app for one network and settings.

    Parameters
    ----------
    network
        Road network (every worker loads the same map).
    settings
        Kafka address, topic names, partitions, pipeline parameters. ``settings.extra["faust"]``
        (a dict) is passed to :class:`faust.App` as extra options (e.g. ``broker_session_timeout``);
        ``settings.extra["app_id"]`` names the app / consumer group (default ``roadpulse``).
    options
        Worker tuning.

    Attributes
    ----------
    app
        The :class:`faust.App`.
    ingest_agent, aggregate_agent
        The two agents.
    pings_topic, rejected_topic, traversals_topic, speeds_topic
        The topics.
    devices_table, aggregate_table
        Per-device state (key ``d/<pseudonym>``, plus ``w/<partition>`` watermarks and ``c/<partition>``
        ingest counters, :meth:`PipelineStats.to_dict` JSON) and aggregate snapshots and deltas
        (key ``a/<partition>/...``).
    """

    def __init__(self, network: RoadNetwork, settings: Settings, options: WorkerOptions = WorkerOptions()) -> None:
        self.network = network
        self.settings = settings
        self.options = options
        self.partitions = int(settings.partitions)
        self.stats = PipelineStats()
        self.matcher = OnlineMatcher(network, matcher_config(settings))
        extra = dict(settings.extra or {})
        faust_options: dict[str, Any] = {
            "broker_session_timeout": 30.0,
            "broker_heartbeat_interval": 3.0,
            "topic_replication_factor": 1,
            "web_enabled": False,
            "store": "memory://",
            "processing_guarantee": "at_least_once",
            # our batches can take a while on a big map; don't let faust think the agent hangs
            "stream_processing_timeout": 300.0,
            # Faust's default (1,000,000) is below what the pings topic accepts: a dead letter of a
            # near-limit message would not fit, crash the agent and stall its partition
            "producer_max_request_size": MAX_PRODUCE_BYTES,
            # aiokafka blocks a send when its partition's batch is full until the batch is on its way, and
            # sends one request per broker at a time: with the default 16 KiB batches, publishing a
            # window's speeds waited for a broker round trip every ~50 records (measured: ~350 us per
            # record, the tail of every replay). A batch may be as large as a request.
            "producer_max_batch_size": PRODUCER_BATCH_BYTES,
        }
        faust_options.update(extra.get("faust", {}))
        credentials = broker_credentials(settings)
        if credentials is not None:
            faust_options["broker_credentials"] = credentials
        self.app = faust.App(
            str(extra.get("app_id", "roadpulse")),
            broker=broker_urls(settings),
            topic_partitions=self.partitions,
            **faust_options,
        )
        raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
        n = self.partitions
        self.pings_topic = self.app.topic(settings.topic_pings, partitions=n, **raw)
        self.rejected_topic = self.app.topic(settings.topic_rejected, partitions=n, **raw)
        self.traversals_topic = self.app.topic(settings.topic_traversals, partitions=n, **raw)
        self.speeds_topic = self.app.topic(settings.topic_segment_speeds, partitions=n, compacting=True, **raw)
        # bytes key/value types make the tables' changelogs use the raw codec
        self.devices_table = self.app.Table("devices", partitions=n, key_type=bytes, value_type=bytes)
        self.aggregate_table = self.app.Table("aggregate", partitions=n, key_type=bytes, value_type=bytes)
        self._sources: dict[int, IngestMatch] = {}
        self._sent_wm: dict[tuple[int, int], float] = {}
        self._aggregates: dict[int, _AggregatePartition] = {}
        self.ingest_agent = self.app.agent(self.pings_topic, name="roadpulse.ingest-match")(self._ingest_match)
        self.aggregate_agent = self.app.agent(self.traversals_topic, name="roadpulse.aggregate")(self._aggregate)
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.lag_topics = (settings.topic_pings, settings.topic_traversals)
        self._next_offset: dict[tuple[str, int], int] = {}  # (topic, partition) -> first offset not yet processed
        self.app.timer(interval=CONSUMER_LAG_INTERVAL_S, name="roadpulse.consumer-lag")(self.report_consumer_lag)

    # ------------------------------------------------------------------ rebalances
    async def _on_revoked(self, sender: Any = None, revoked: Any = None, **kwargs: Any) -> None:
        """Forget in-memory operators; they are rebuilt from the (recovered) tables."""
        self._sources.clear()
        self._aggregates.clear()
        self._sent_wm.clear()
        self._next_offset.clear()

    # ------------------------------------------------------------------ consumer lag
    async def report_consumer_lag(self) -> dict[str, int] | None:
        """Set ``CONSUMER_LAG{topic}``: messages behind the high-water mark, summed over this worker's partitions.

        Per assigned partition: high-water mark minus the offset after the last message processed (the
        consumer's fetch position until the partition's first batch: fetching runs ahead of processing,
        so the position alone would hide a backlog already fetched but not yet processed). Runs every
        :data:`CONSUMER_LAG_INTERVAL_S` seconds. A topic with no partition assigned here reports 0.
        Metrics must never stop the pipeline: any failure (no consumer yet, a rebalance in progress, a
        partition not fetched yet) is logged at DEBUG and the gauges keep their last value.

        Returns
        -------
        dict or None
            Messages behind per topic, or ``None`` when they could not be read this time.
        """
        try:
            consumer = self.app.consumer
            lag = dict.fromkeys(self.lag_topics, 0)
            for tp in consumer.assignment():
                if tp.topic not in lag:
                    continue  # table changelogs: recovery, not consumption
                highwater = consumer.highwater(tp)  # None until the first fetch response of the partition
                position = self._next_offset.get((tp.topic, tp.partition))
                if position is None:
                    position = await asyncio.wait_for(consumer.position(tp), 5.0)
                if highwater is not None and position is not None:
                    lag[tp.topic] += max(0, int(highwater) - int(position))
        except Exception as exc:  # noqa: BLE001 - a metric must never crash the worker
            log.debug("consumer lag not measured this time: %r", exc)
            return None
        for topic, messages in lag.items():
            metrics.CONSUMER_LAG.labels(topic=topic).set(messages)
        return lag

    def _processed(self, message: Any) -> None:
        """Note that every message of ``message``'s partition up to and including it is processed."""
        self._next_offset[(message.topic, message.partition)] = int(message.offset) + 1

    # ------------------------------------------------------------------ ingest + match
    def source(self, partition: int) -> IngestMatch:
        """The ingest/match operator of a pings partition, rebuilt from the ``devices`` table if needed."""
        op = self._sources.get(partition)
        if op is None:
            data = self.devices_table.data
            # per-partition ingest counters live in the table beside the device states they describe,
            # so that after a crash they resume from the same point as the states (see _persist_devices)
            counts = data.get(b"c/%d" % partition)
            stats = PipelineStats.from_dict(json.loads(counts)) if counts else PipelineStats()
            op = IngestMatch(self.network, self.settings, partition, stats, self.matcher)
            states = []
            for key, value in list(data.items()):
                if key.startswith(b"d/") and value and DeviceState.source_of(value) == partition:
                    states.append((key[2:].decode(), value))
            wm_raw = data.get(b"w/%d" % partition)
            op.load(states, _WM.unpack(wm_raw)[0] if wm_raw else None)
            if states:
                log.info("pings partition %d: restored %d device states", partition, len(states))
            self._sources[partition] = op
        return op

    async def _ingest_match(self, stream: Any) -> None:
        opts = self.options
        async for events in stream.take_events(opts.batch_messages, within=opts.batch_within_s):
            by_partition: dict[int, list[Any]] = defaultdict(list)
            for ev in events:
                by_partition[ev.message.partition].append(ev)
            await self.process_ping_batches({p: [(ev.key, ev.value) for ev in evs] for p, evs in by_partition.items()})
            for evs in by_partition.values():
                self._processed(evs[-1].message)

    async def process_ping_batches(self, batches: dict[int, Sequence[tuple[bytes | None, bytes]]]) -> None:
        """One batch per pings partition: ingest and match each, send, wait for delivery, then persist the
        device states of all of them and wait until they are on the broker (one round trip each, not one per
        partition)."""
        pending: list[Any] = []
        done = []
        for partition, messages in batches.items():
            done.append((partition, await self._ingest_and_send(partition, messages, pending)))
        await _delivered(pending)
        written: list[Any] = []
        for partition, op in done:
            await self._persist_devices(partition, op, written)
        await self._persisted(written)

    async def _ingest_and_send(self, partition: int, messages: Sequence[tuple[bytes | None, bytes]],
                               pending: list[Any]) -> IngestMatch:
        """Ingest and match one partition's batch; send its dead letters and traversals (futures to ``pending``)."""
        op = self.source(partition)
        now = time.time() if self.options.wall_clock_checks else None
        out = op.process_messages(messages, now=now)
        for dl in out.dead_letters:
            value, headers = dl.original, dl.headers()
            room = MAX_PRODUCE_BYTES - _DEAD_LETTER_OVERHEAD - len(dl.key or b"")
            if len(value) > room:  # only possible when the broker accepts messages above its default limit
                headers.append(("truncated_from_bytes", str(len(value)).encode()))
                value = value[:room]
            pending.append(await self.rejected_topic.send(key=dl.key, value=value, headers=headers))
        by_target = split_by_partition(out.traversals, self.partitions)
        wm = op.watermark
        for q in range(self.partitions):
            batch = by_target.get(q, [])
            last = self._sent_wm.get((partition, q))
            if not batch and (wm is None or (last is not None and wm - last < 1.0)):
                continue
            pending.append(await self.traversals_topic.send(value=encode_traversals(partition, wm, batch), partition=q))
            if wm is not None:
                self._sent_wm[(partition, q)] = wm
        return op

    async def _persist_devices(self, partition: int, op: IngestMatch, written: list[Any]) -> None:
        """Write a partition's changed device states, watermark and ledger to the ``devices`` table."""
        wm = op.watermark
        changed, deleted = op.take_changes()
        table = self.devices_table
        for dev, value in changed.items():
            await self.write_table(table, partition, b"d/" + dev.encode(), value, written)
        for dev in deleted:
            key = b"d/" + dev.encode()
            if key in table.data:
                await self.write_table(table, partition, key, None, written)
        if wm is not None:
            await self.write_table(table, partition, b"w/%d" % partition, _WM.pack(wm), written)
        # last, after the states: the partition's ledger (received = rejected + matched + unmatched + held)
        ledger = json.dumps(op.stats.to_dict(), separators=(",", ":")).encode()
        await self.write_table(table, partition, b"c/%d" % partition, ledger, written)

    async def write_table(self, table: Any, partition: int, key: bytes, value: bytes | None,
                          written: list[Any]) -> None:
        """Set (``value``) or delete (``None``) ``table[key]`` here and on its changelog; the delivery
        future goes to ``written``.

        Straight to the producer, as :meth:`Table.send_changelog` would write it (same topic, key, value,
        partition) minus its per-record futures, callbacks and buffer: one record per changed device and
        batch made that path ≈ 10 % of a worker's time. The memory store keeps no persisted offsets, so
        the changelog callback has nothing to record.
        """
        if value is None:
            table.data.pop(key, None)
        else:
            table.data[key] = value
        written.append(await self.app.producer.send(table.changelog_topic_name, key, value, partition, None, None))

    async def _persisted(self, written: list[Any]) -> None:
        """Wait until the batch's table writes are on the broker, before its input is acked.

        Faust commits the offsets of acked events on its own schedule; a changelog write still in the
        producer's buffer when a worker is SIGKILLed would otherwise be lost while its input counts as
        done, and the worker taking over would resume from a state that misses it.
        """
        await _delivered(written)

    # ------------------------------------------------------------------ aggregate
    def aggregate_partition(self, partition: int) -> "_AggregatePartition":
        """The aggregate operator of a traversals partition, rebuilt from the ``aggregate`` table if needed."""
        part = self._aggregates.get(partition)
        if part is None:
            part = _AggregatePartition(self, partition)
            self._aggregates[partition] = part
        return part

    async def _aggregate(self, stream: Any) -> None:
        opts = self.options
        await self.speeds_topic.maybe_declare()  # speeds bypass Topic.send, which would declare it
        async for events in stream.take_events(opts.batch_messages, within=opts.batch_within_s):
            by_partition: dict[int, list[bytes]] = defaultdict(list)
            last: dict[int, Any] = {}
            for ev in events:
                by_partition[ev.message.partition].append(ev.value)
                last[ev.message.partition] = ev.message
            await self.process_traversal_batches(by_partition)
            for partition in by_partition:
                self._processed(last[partition])

    async def process_traversal_batches(self, batches: dict[int, Sequence[bytes]]) -> None:
        """One batch per traversals partition: add, advance and publish each; wait until the speeds are
        delivered; then persist each partition's input and wait until that is on the broker."""
        pending = []
        producer, topic, n = self.app.producer, self.settings.topic_segment_speeds, self.partitions
        for partition, values in batches.items():
            for s in self.aggregate_partition(partition).apply(values):
                key, value = encode_speed(s)
                # straight to the producer: Faust's Topic.send wraps every record in futures, callbacks and
                # sensor calls, several times the cost of the send itself for a window's thousands of records
                pending.append(await producer.send(topic, key, value, segment_partition(s.segment_id, n), None, None))
        await _delivered(pending)
        written: list[Any] = []
        for partition, values in batches.items():
            await self.aggregate_partition(partition).persist(values, written)
        await self._persisted(written)


class _AggregatePartition:
    """One traversals partition's :class:`Aggregate` and its snapshot + delta persistence."""

    def __init__(self, owner: PipelineApp, partition: int) -> None:
        self.owner = owner
        self.partition = partition
        self.prefix = b"a/%d/" % partition
        self.aggregate = Aggregate(owner.network, owner.settings, sources=range(owner.partitions),
                                   stats=owner.stats, idle_source_s=owner.options.idle_source_s)
        self.next_delta = 0
        self.delta_keys: list[bytes] = []
        self.snapshot_chunks = 0
        self.last_snapshot = time.monotonic()
        self._restore()

    def _restore(self) -> None:
        data = self.owner.aggregate_table.data
        meta_raw = data.get(self.prefix + b"snapshot")
        first_delta = 0
        if meta_raw:
            meta = json.loads(meta_raw)
            blob = b"".join(data[self.prefix + b"chunk/%d" % i] for i in range(meta["chunks"]))
            self.aggregate.load_state(blob)
            self.snapshot_chunks = meta["chunks"]
            first_delta = meta["next_delta"]
        deltas = sorted(k for k in data if k.startswith(self.prefix + b"delta/"))
        replayed = 0
        for key in deltas:
            seq = int(key.rsplit(b"/", 1)[1])
            if seq < first_delta:
                continue
            self._apply_quietly(json.loads(data[key]))
            self.delta_keys.append(key)
            self.next_delta = seq + 1
            replayed += 1
        self.next_delta = max(self.next_delta, first_delta)
        if meta_raw or replayed:
            log.info("traversals partition %d: restored snapshot=%s, %d deltas", self.partition, bool(meta_raw), replayed)

    def _apply_quietly(self, values: list[str]) -> None:
        for v in values:
            self._add(v.encode())

    def _add(self, value: bytes) -> None:
        try:
            b = decode_traversals(value)
        except ValueError:
            log.warning("traversals partition %d: skipped a message that is not a traversal batch", self.partition)
            return
        # watermark first: the traversals are behind it (see Aggregate.add_arrays)
        self.aggregate.set_source_watermark(b.source, b.watermark)
        self.aggregate.add_arrays(b.segment_id, b.device, b.t_enter, b.t_exit, b.fraction)

    def apply(self, values: Sequence[bytes]) -> list:
        for v in values:
            self._add(v)
        return self.aggregate.advance()

    async def persist(self, values: Sequence[bytes], written: list[Any]) -> None:
        """Write the batch's input as the next delta (and a snapshot when one is due)."""
        key = self.prefix + b"delta/%012d" % self.next_delta
        value = json.dumps([v.decode() for v in values]).encode()
        await self._write(key, value, written)
        self.delta_keys.append(key)
        self.next_delta += 1
        if time.monotonic() - self.last_snapshot >= self.owner.options.checkpoint_interval_s:
            await self.snapshot(written)

    async def snapshot(self, written: list[Any]) -> None:
        """Write the whole state in chunks, then drop the deltas it covers."""
        blob = self.aggregate.state_bytes()
        chunks = [blob[i:i + SNAPSHOT_CHUNK_BYTES] for i in range(0, len(blob), SNAPSHOT_CHUNK_BYTES)] or [b""]
        for i, chunk in enumerate(chunks):
            await self._write(self.prefix + b"chunk/%d" % i, chunk, written)
        for i in range(len(chunks), self.snapshot_chunks):
            await self._write(self.prefix + b"chunk/%d" % i, None, written)
        self.snapshot_chunks = len(chunks)
        meta = json.dumps({"chunks": len(chunks), "next_delta": self.next_delta}).encode()
        await self._write(self.prefix + b"snapshot", meta, written)
        for key in self.delta_keys:
            await self._write(key, None, written)
        self.delta_keys.clear()
        self.last_snapshot = time.monotonic()

    async def _write(self, key: bytes, value: bytes | None, written: list[Any]) -> None:
        await self.owner.write_table(self.owner.aggregate_table, self.partition, key, value, written)


async def _delivered(pending: list[Any]) -> None:
    """Wait until every sent message is acknowledged by the broker."""
    futures = [f for f in pending if asyncio.isfuture(f) or asyncio.iscoroutine(f)]
    if futures:
        await asyncio.gather(*futures)


def create_app(network: RoadNetwork, settings: Settings, options: WorkerOptions = WorkerOptions()) -> PipelineApp:
    """Build the roadpulse Faust app (see :class:`PipelineApp`)."""
    metrics.init_label_values([settings.topic_pings, settings.topic_traversals])
    return PipelineApp(network, settings, options)
