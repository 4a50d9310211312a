"""The Faust agents without a broker: ``agent.test_context()`` feeds events through an in-memory channel.

Outputs to Kafka topics are captured by replacing each output topic's ``send`` (and the producer's, which
the segment speeds use directly) with an in-memory collector (there is no broker to deliver to); table
writes land in the local store and the producer's buffer. Every ``put`` is bounded by a timeout: an agent that drops an event would otherwise hang it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import zlib
from collections.abc import Iterator

import pytest

from simulator.config import SimulationConfig
from simulator.day import simulate_day
from streams.app import PipelineApp, WorkerOptions
from streams.operators import Aggregate, DeviceState, IngestMatch, decode_traversals, encode_traversals, segment_partition
from streams.settings import Settings

PUT_TIMEOUT_S = 30.0
PARTS = 4


@pytest.fixture(scope="module")
def settings() -> Settings:
    # nothing listens on port 1: proves the unit tests never need a broker
    return Settings(map="kotka", kafka="127.0.0.1:1", partitions=PARTS, grace_s=600.0,
                    extra={"app_id": "roadpulse-unit"})


@pytest.fixture(scope="module")
def messages(kotka) -> list[tuple[bytes, bytes]]:
    sim = simulate_day(kotka, SimulationConfig(hours=0.5, start_s=8 * 3600, seed=3, probe_share=0.2))
    return [(d.encode(), json.dumps({"device": d, "pings": [p.to_dict() for p in ps]}).encode())
            for d, ps in sim.ping_batches()]


@pytest.fixture(scope="module")
def pipeline(kotka, settings) -> Iterator[PipelineApp]:
    p = PipelineApp(kotka, settings, WorkerOptions(batch_messages=200, batch_within_s=0.05))
    p.app.finalize()
    p.app.flow_control.resume()
    yield p


class Sent:
    """In-memory stand-in for the broker side of the output topics."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pipeline: PipelineApp) -> None:
        self.by_topic: dict[str, list[dict]] = {}
        for topic in (pipeline.rejected_topic, pipeline.traversals_topic, pipeline.speeds_topic):
            monkeypatch.setattr(topic, "send", self._collector(topic.get_topic_name()))
            monkeypatch.setattr(topic, "maybe_declare", self._declared)
        # segment speeds go to the producer directly (see PipelineApp.process_traversal_batches)
        monkeypatch.setattr(pipeline.app.producer, "send", self._producer_send)

    def _collector(self, name: str):
        async def send(*, key=None, value=None, partition=None, headers=None, **kw):
            self.by_topic.setdefault(name, []).append(
                {"key": key, "value": value, "partition": partition, "headers": headers})
        return send

    async def _declared(self) -> None:
        return None

    async def _producer_send(self, topic, key, value, partition, timestamp, headers, **kw):
        self.by_topic.setdefault(topic, []).append(
            {"key": key, "value": value, "partition": partition, "headers": headers})

    def __getitem__(self, name: str) -> list[dict]:
        return self.by_topic.get(name, [])


def test_nothing_listens_on_the_configured_broker() -> None:
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", 1)) != 0


def test_ingest_match_agent(pipeline, settings, messages, kotka, monkeypatch) -> None:
    sent = Sent(monkeypatch, pipeline)
    part = lambda key: zlib.crc32(key) % PARTS  # noqa: E731
    bad = (b"broken-phone", b'{"device": "broken-phone", "pings": [{"ts": "yesterday", "lat": 1, "lon": 2}]}')

    async def run() -> None:
        async with pipeline.ingest_agent.test_context() as agent:
            for key, value in [*messages[:150], bad]:
                await asyncio.wait_for(agent.put(value=value, key=key, partition=part(key)), PUT_TIMEOUT_S)

    asyncio.run(run())
    # the same messages through the operator directly, per partition, give the same traversals
    expected = []
    for p in range(PARTS):
        op = IngestMatch(kotka, settings, p)
        mine = [m for m in [*messages[:150], bad] if part(m[0]) == p]
        expected += op.process_messages(mine).traversals
    got = []
    for msg in sent[settings.topic_traversals]:
        b = decode_traversals(msg["value"])
        assert all(segment_partition(s, PARTS) == msg["partition"] for s in b.segment_id.tolist())
        got += list(zip(b.segment_id.tolist(), b.device, b.t_enter.tolist(), b.t_exit.tolist()))
    assert sorted(got) == sorted((t.segment_id, t.device, t.t_enter, t.t_exit) for t in expected)
    assert got, "half an hour of pings gives traversals"
    raw_devices = {k.decode() for k, _ in messages}
    assert not raw_devices & {d for _, d, _, _ in got}  # pseudonyms only
    # the bad message is dead-lettered with its original bytes and a reason
    dead = [m for m in sent[settings.topic_rejected] if m["key"] == bad[0]]
    assert len(dead) == 1 and dead[0]["value"] == bad[1] and dict(dead[0]["headers"])["reason"] == b"bad_timestamp"
    # per-device state is in the table, under its pseudonym, tagged with its partition
    table = pipeline.devices_table.data
    states = {k: v for k, v in table.items() if k.startswith(b"d/")}
    assert states and not raw_devices & {k[2:].decode() for k in states}
    for key, value in list(states.items())[:20]:
        source, st = DeviceState.from_bytes(value, key[2:].decode())
        assert 0 <= source < PARTS and st.trim.in_trip
    assert {k for k in table if k.startswith(b"w/")} <= {b"w/%d" % p for p in range(PARTS)}
    # every table write also went to the changelog, to the partition of the state it describes, so a worker
    # that takes the partition over recovers the same values
    changelog = sent[pipeline.devices_table.changelog_topic_name]
    last = {m["key"]: m for m in changelog}
    assert {k for k in table if k.startswith(b"d/")} <= set(last)
    for key, value in states.items():
        assert last[key]["value"] == value and last[key]["partition"] == DeviceState.source_of(value)


def test_aggregate_agent(pipeline, settings, messages, kotka, monkeypatch) -> None:
    sent = Sent(monkeypatch, pipeline)
    op = IngestMatch(kotka, settings, 0)
    traversals = op.process_messages(messages).traversals + op.finish()
    assert traversals
    end = max(t.t_exit for t in traversals) + 3600.0
    mine = [t for t in traversals if segment_partition(t.segment_id, PARTS) == 1]
    values = [encode_traversals(0, None, mine[i:i + 50]) for i in range(0, len(mine), 50)]
    # every source partition reports a watermark past all windows, so they all close
    values += [encode_traversals(s, end, []) for s in range(PARTS)]

    async def run() -> None:
        async with pipeline.aggregate_agent.test_context() as agent:
            for v in values:
                await asyncio.wait_for(agent.put(value=v, key=None, partition=1), PUT_TIMEOUT_S)

    asyncio.run(run())
    reference = Aggregate(kotka, settings, sources=range(PARTS))
    reference.add(mine)
    for s in range(PARTS):
        reference.set_source_watermark(s, end)
    expected = reference.advance()
    got = [json.loads(m["value"]) for m in sent[settings.topic_segment_speeds]]
    assert [g["segment_id"] for g in got] == [e.segment_id for e in expected]
    assert got == [e.to_dict() for e in expected]
    assert any(g["status"] == "ok" for g in got)
    assert all(m["key"] == str(json.loads(m["value"])["segment_id"]).encode() for m in sent[settings.topic_segment_speeds])
    # the batch input was persisted as a delta of partition 1's aggregate state
    assert any(k.startswith(b"a/1/delta/") for k in pipeline.aggregate_table.data)
