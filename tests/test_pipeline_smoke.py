"""Smoke test of the session's Kafka-protocol broker: one message produced and consumed with kafka-python."""

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition


@pytest.mark.broker
def test_broker_round_trip(kafka_bootstrap: str) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send("smoke", key=b"k", value=b"hello").get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False, consumer_timeout_ms=15_000)
    consumer.assign([TopicPartition("smoke", 0)])
    consumer.seek_to_beginning()
    first = next(iter(consumer))
    consumer.close()
    assert (first.key, first.value) == (b"k", b"hello")
