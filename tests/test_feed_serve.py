"""``roadpulse serve`` against the real Kafka-protocol broker: it reads the segment-speeds topic
from the start, serves the snapshot, streams live records over SSE, skips bad messages, and stops
cleanly on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from streams.operators import encode_speed
from tests.test_feed import SSEClient, T0, get_json, make_records
from tests.test_demo import free_port

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.broker
def test_serve_reads_topic_from_start_then_live(kafka_bootstrap, helsinki):
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    topic = f"roadpulse.segment-speeds.test-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    admin.close()
    rows = np.arange(0, helsinki.n_segments, 3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    old = make_records(helsinki, rows, 0.9, T0)
    new = make_records(helsinki, rows, np.linspace(0.1, 1.0, len(rows)), T0 + 60)
    for rec in old + new:  # two windows per segment: the feed must end up with the newer one
        key, value = encode_speed(rec)
        producer.send(topic, key=key, value=value, partition=rec.segment_id % 3)
    producer.send(topic, key=b"junk", value=b'{"not": "a segment speed"}', partition=0)
    producer.send(topic, key=b"gone", value=None, partition=1)
    producer.flush(30)

    port = free_port()
    env = {**os.environ, "ROADPULSE_KAFKA": kafka_bootstrap, "ROADPULSE_TOPIC_SEGMENT_SPEEDS": topic}
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "serve", "--port", str(port)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in proc.stdout), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, _, ready = get_json(url, "/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert ready and ready["ready"], f"{ready}\n" + "\n".join(lines)
        status, _, doc = get_json(url, "/v1/segments")
        assert status == 200 and len(doc["features"]) == len(rows)
        by_id = {r.segment_id: r for r in new}
        for f in doc["features"]:
            assert f["properties"]["window_end"] == T0 + 60
            assert f["properties"]["jam_level"] == by_id[f["properties"]["segment_id"]].jam_level

        client = SSEClient(url)
        events = client.events()
        assert next(events)[0] == "snapshot"
        live = make_records(helsinki, rows[:7], 0.2, T0 + 120)
        for rec in live:
            key, value = encode_speed(rec)
            producer.send(topic, key=key, value=value, partition=rec.segment_id % 3)
        producer.flush(30)
        got: set[int] = set()
        while len(got) < len(live):
            kind, _, data = next(events)
            assert kind == "speeds"
            got |= {s["segment_id"] for s in data["segments"]}
        assert got == {r.segment_id for r in live}
        client.close()

        status, _, body = get_json(url, "/readyz")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        reader.join(5)
        out = "\n".join(lines)
        assert re.search(r"stopped \([\d,]+ records read, 1 rejected\)", out), out
        assert "Traceback" not in out
    finally:
        producer.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
