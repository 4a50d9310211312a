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
_WM = struct.Struct("<d")


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
        Wall seconds after which a ping partition that sends nothing stops holding windows back.
    wall_clock_checks
        Validate event times against the wall clock (live feeds); off for replays of recorded days.
    """

    batch_messages: int = 1000
    batch_within_s: float = 0.2
    checkpoint_interval_s: float = 30.0
    idle_source_s: float = 60.0
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
        Per-device state (key ``d/<pseudonym>``, plus ``w/<partition>`` watermarks) and aggregate
        snapshots and deltas (key ``a/<partition>/...``).
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

    # ------------------------------------------------------------------ rebalances
    async def _on_revoked(self, sender: Any = None, revoked: Any = None, **kwargs: Any) -> None:
        """Forget in-memory operators; they are rebuilt from the (recovered) tables."""
        self._sources.clear()
        self._aggregates.clear()
        self._sent_wm.clear()

    # ------------------------------------------------------------------ ingest + match
    def source(self, partition: int) -> IngestMatch:
        """The ingest/match operator of a pings partition, rebuilt from the ``devices`` table if needed."""
        op = self._sources.get(partition)
        if op is None:
            op = IngestMatch(self.network, self.settings, partition, self.stats, self.matcher)
            data = self.devices_table.data
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
            for partition, evs in by_partition.items():
                await self.process_ping_batch(partition, [(ev.key, ev.value) for ev in evs])

    async def process_ping_batch(self, partition: int, messages: Sequence[tuple[bytes | None, bytes]]) -> None:
        """One batch of one pings partition: ingest, match, send, then persist device states."""
        op = self.source(partition)
        now = time.time() if self.options.wall_clock_checks else None
        out = op.process_messages(messages, now=now)
        pending = []
        for dl in out.dead_letters:
            pending.append(await self.rejected_topic.send(key=dl.key, value=dl.original, headers=dl.headers()))
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
        await _delivered(pending)
        changed, deleted = op.take_changes()
        table = self.devices_table
        for dev, value in changed.items():
            key = b"d/" + dev.encode()
            table.data[key] = value
            table.send_changelog(partition, key, value)
        for dev in deleted:
            key = b"d/" + dev.encode()
            if table.data.pop(key, None) is not None:
                table.send_changelog(partition, key, None)
        if wm is not None:
            key = b"w/%d" % partition
            table.data[key] = _WM.pack(wm)
            table.send_changelog(partition, key, table.data[key])

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
        async for events in stream.take_events(opts.batch_messages, within=opts.batch_within_s):
            by_partition: dict[int, list[bytes]] = defaultdict(list)
            for ev in events:
                by_partition[ev.message.partition].append(ev.value)
            for partition, values in by_partition.items():
                await self.process_traversal_batch(partition, values)

    async def process_traversal_batch(self, partition: int, values: Sequence[bytes]) -> None:
        """One batch of one traversals partition: add, advance, publish, persist."""
        part = self.aggregate_partition(partition)
        speeds = part.apply(values)
        pending = []
        for s in speeds:
            key, value = encode_speed(s)
            pending.append(await self.speeds_topic.send(key=key, value=value,
                                                        partition=segment_partition(s.segment_id, self.partitions)))
        await _delivered(pending)
        part.persist(values)


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
        self.aggregate.add_arrays(b.segment_id, b.device, b.t_enter, b.t_exit, b.fraction)
        self.aggregate.set_source_watermark(b.source, b.watermark)

    def apply(self, values: Sequence[bytes]) -> list:
        for v in values:
            self._add(v)
        return self.aggregate.advance()

    def persist(self, values: Sequence[bytes]) -> None:
        table = self.owner.aggregate_table
        p = self.partition
        key = self.prefix + b"delta/%012d" % self.next_delta
        value = json.dumps([v.decode() for v in values]).encode()
        table.data[key] = value
        table.send_changelog(p, key, value)
        self.delta_keys.append(key)
        self.next_delta += 1
        if time.monotonic() - self.last_snapshot >= self.owner.options.checkpoint_interval_s:
            self.snapshot()

    def snapshot(self) -> None:
        """Write the whole state in chunks, then drop the deltas it covers."""
        table = self.owner.aggregate_table
        p = self.partition
        blob = self.aggregate.state_bytes()
        chunks = [blob[i:i + SNAPSHOT_CHUNK_BYTES] for i in range(0, len(blob), SNAPSHOT_CHUNK_BYTES)] or [b""]
        for i, chunk in enumerate(chunks):
            key = self.prefix + b"chunk/%d" % i
            table.data[key] = chunk
            table.send_changelog(p, key, chunk)
        for i in range(len(chunks), self.snapshot_chunks):
            key = self.prefix + b"chunk/%d" % i
            table.data.pop(key, None)
            table.send_changelog(p, key, None)
        self.snapshot_chunks = len(chunks)
        meta = json.dumps({"chunks": len(chunks), "next_delta": self.next_delta}).encode()
        table.data[self.prefix + b"snapshot"] = meta
        table.send_changelog(p, self.prefix + b"snapshot", meta)
        for key in self.delta_keys:
            table.data.pop(key, None)
            table.send_changelog(p, key, None)
        self.delta_keys.clear()
        self.last_snapshot = time.monotonic()


async def _delivered(pending: list[Any]) -> None:
    """Wait until every sent message is acknowledged by the broker."""
    futures = [f for f in pending if asyncio.isfuture(f) or asyncio.iscoroutine(f)]
    if futures:
        await asyncio.gather(*futures)


def create_app(network: RoadNetwork, settings: Settings, options: WorkerOptions = WorkerOptions()) -> PipelineApp:
    """Build the roadpulse Faust app (see :class:`PipelineApp`)."""
    metrics.init_label_values([settings.topic_pings, settings.topic_traversals])
    return PipelineApp(network, settings, options)
