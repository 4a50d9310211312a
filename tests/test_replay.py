"""Replay of ping files into Kafka, against the real Kafka-protocol broker the suite starts."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from geo.model import Ping
from simulator import SimulationConfig, simulate_day
from simulator.formats import read_pings
from streams.cli import main as cli_main
from streams.commands.replay_cmd import parse_speed
from streams.replay import KafkaBatchSink, Pacer, ReplayError, ReplayStats, iter_batches, replay


@pytest.fixture(scope="module")
def ping_file(kotka, tmp_path_factory):
    """Pings of a small simulated morning on Kotka (~1,500 pings in ~300 uploads)."""
    cfg = SimulationConfig(hours=0.5, start_s=7.5 * 3600, trips_per_day=20_000, seed=11, probe_share=0.08)
    paths = simulate_day(kotka, cfg).write(tmp_path_factory.mktemp("replay"))
    return paths["pings"]


def _consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    """Every record of ``topic``, polling until ``expected`` arrived or ``timeout_s`` passed."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    messages: list = []
    deadline = time.monotonic() + timeout_s
    try:
        partitions = None
        while not partitions and time.monotonic() < deadline:
            if topic in consumer.topics():  # topics() refreshes the metadata
                partitions = consumer.partitions_for_topic(topic)
            time.sleep(0.1)
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions or [])])
        consumer.seek_to_beginning()
        while len(messages) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                messages.extend(records)
    finally:
        consumer.close()
    return messages


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()


def test_iter_batches_groups_consecutive_pings_of_a_device():
    pings = [Ping("a", 1e9 + i, 60.0, 25.0) for i in range(5)] + [Ping("b", 1e9, 60.0, 25.0)] \
        + [Ping("a", 1e9 + 10, 60.0, 25.0)]
    assert [(d, len(b)) for d, b in iter_batches(pings)] == [("a", 5), ("b", 1), ("a", 1)]
    assert [len(b) for _, b in iter_batches(pings[:5], max_pings=2)] == [2, 2, 1]
    assert [len(b) for _, b in iter_batches(pings[:5], max_span_s=1.5)] == [2, 2, 1]


def test_pacer_waits_event_time_over_speed():
    now = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    pacer = Pacer(10.0, clock=lambda: now[0], sleep=sleep)
    for ts in (1000.0, 1010.0, 1030.0, 1020.0):  # the last one is late: sent at once
        pacer.wait_for(ts)
    assert slept == pytest.approx([1.0, 2.0])
    fast = Pacer(0.0, clock=lambda: now[0], sleep=sleep)
    fast.wait_for(0.0)
    fast.wait_for(1e6)
    assert len(slept) == 2
    assert parse_speed("max") == parse_speed("0") == 0.0 and parse_speed("60") == 60.0
    with pytest.raises(ValueError):
        parse_speed("-1")


@pytest.mark.broker
def test_replay_delivers_every_ping_keyed_by_device_with_event_time(kafka_bootstrap, ping_file, monkeypatch, capsys):
    topic = f"test.pings.{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("ROADPULSE_TOPIC_PINGS", topic)  # the topic comes from settings
    code = cli_main(["replay", "--pings", str(ping_file), "--kafka", kafka_bootstrap, "--speed", "max",
                     "--no-progress"])
    assert code == 0
    assert "pings/s" in capsys.readouterr().out
    sent = list(read_pings(ping_file))
    uploads = list(iter_batches(sent))
    messages = _consume(kafka_bootstrap, topic, len(uploads))
    assert len(messages) == len(uploads)
    got = []
    for m in messages:
        body = json.loads(m.value)
        assert m.key.decode() == body["device"]
        assert m.timestamp == int(round(body["pings"][-1]["ts"] * 1000))
        got.extend(Ping(body["device"], **p) for p in body["pings"])
    assert sorted(got, key=lambda p: (p.device, p.ts)) == sorted(sent, key=lambda p: (p.device, p.ts))
    # Keyed by device: all uploads of one device land on one partition.
    partitions: dict[bytes, set[int]] = {}
    for m in messages:
        partitions.setdefault(m.key, set()).add(m.partition)
    assert all(len(p) == 1 for p in partitions.values())


@pytest.mark.broker
def test_replay_survives_a_broker_restart(ping_file):
    """Kill the broker mid-replay and bring it back 2 s later: every upload the broker had not
    acknowledged before the crash arrives (tansu keeps data in memory, so acknowledged ones
    vanish with it; what a producer must survive is the outage)."""
    from tests.kafka_support import TansuBroker

    broker = TansuBroker()
    broker.start()
    try:
        uploads = list(iter_batches(read_pings(ping_file)))
        topic = "roadpulse.pings"
        stats = ReplayStats()
        sink = KafkaBatchSink(broker.bootstrap, topic, timeout_s=30.0, partitions=2, stats=stats)
        acked_ids: set[int] = set()
        sink_ack = sink._on_ack

        def on_ack(n_pings, metadata):  # noqa: ANN001 - records which uploads were confirmed
            acked_ids.add(metadata.timestamp)
            sink_ack(n_pings, metadata)

        sink._on_ack = on_ack  # type: ignore[method-assign]
        done = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                # Paced so the crash falls in the middle: ~300 uploads over a few seconds.
                replay(uploads, sink, speed=400.0, stats=stats)
            except BaseException as exc:  # surfaced below
                errors.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        while stats.acked_batches < len(uploads) // 4:
            assert not done.is_set(), errors
            time.sleep(0.01)
        broker.kill()
        time.sleep(0.5)
        confirmed_before_crash = set(acked_ids)
        sent_before_crash = stats.batches
        time.sleep(1.5)
        broker.start()
        # A persistent broker keeps its topics over a restart; tansu's memory storage does not,
        # so put the topic back at once (as it was: 2 partitions).
        _create_topic(broker.bootstrap, topic, 2)
        assert done.wait(60.0)
        sink.close()
        assert not errors, errors
        assert sent_before_crash < len(uploads)  # the outage really was mid-replay
        expected = {int(round(b[-1].ts * 1000)) for _, b in uploads} - confirmed_before_crash
        messages = _consume(broker.bootstrap, topic, len(expected))
        assert expected <= {m.timestamp for m in messages}
    finally:
        broker.stop()


def test_replay_to_a_missing_broker_fails_clearly(ping_file, capsys):
    from tests.kafka_support import free_port

    with pytest.raises(ReplayError, match="cannot reach Kafka"):
        KafkaBatchSink(f"127.0.0.1:{free_port()}", "roadpulse.pings", timeout_s=2.0)
    code = cli_main(["replay", "--pings", str(ping_file), "--kafka", f"127.0.0.1:{free_port()}", "--timeout", "2",
                     "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot reach Kafka" in err and "broker running" in err
    assert cli_main(["replay", "--pings", "/nonexistent.csv", "--kafka", "x:1"]) == 2
