"""The alert rules and dashboard against a real Prometheus server.

- ``promtool check config`` / ``check rules`` / ``test rules`` on ``deploy/prometheus``.
- A real Prometheus (Debian's ``prometheus`` package; installed by :func:`prometheus_bin` when it
  can be, else the tests skip saying why) on a loopback port scrapes a running roadpulse during a
  short replay of a simulated morning on Liechtenstein (skipped when ``../shared`` is absent): the
  embedded pipeline (validator, pseudonymiser, matcher, estimator) feeding the feed server, which
  serves ``/metrics``. Then every PromQL expression of the dashboard, and every operand of every
  alert rule, must return finite data; no metric may have more than 50 series; every label value
  must come from a bounded enum.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from streams import metrics
from tests.conftest import shared_map

REPO = Path(__file__).resolve().parent.parent
PROM_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "roadpulse.json"
SCRAPE_S = 1.0
#: What Grafana's $__rate_interval becomes in the test (a few scrape intervals).
RATE_INTERVAL = "10s"
MAX_SERIES_PER_METRIC = 50


# ---------------------------------------------------------------- tools
def _install_prometheus() -> str:
    """Install Debian's prometheus (as the Makefile's test-deps target does); '' on success."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, cannot apt-get install prometheus"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"],
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode == 0 and shutil.which("prometheus") and cmd[1] == "install":
            return ""
    return f"apt-get install prometheus failed: {done.stderr.strip()[-300:]}"


@pytest.fixture(scope="session")
def prometheus_bin() -> dict[str, str]:
    """Paths of ``prometheus`` and ``promtool``, installing Debian's package when missing."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        why = _install_prometheus()
        if why:
            pytest.skip(f"Prometheus is not installed and could not be: {why}")
    return {"prometheus": shutil.which("prometheus"), "promtool": shutil.which("promtool")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def wait_for(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} answered")
        try:
            http_get(url, timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# ---------------------------------------------------------------- PromQL helpers
def dashboard_exprs() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in rules["groups"] for r in g["rules"]]


_SPLIT_OPS = re.compile(r"(>=|<=|==|!=|>|<|\band\b|\bor\b|\bunless\b)")


def promql_operands(expr: str) -> list[str]:
    """The operands of ``expr``'s top-level comparison and set operators (``a > 0.2 and b > 1`` ->
    ``[a, 0.2, b, 1]``), number literals left out. An alert expression is empty whenever the alert
    is not firing, so its operands are what must return data."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            m = _SPLIT_OPS.match(expr, i)
            if m and not (m.group(0) in ("<", ">") and expr[i + 1:i + 2] == "="):
                parts.append(expr[start:i])
                i = m.end()
                if expr[i:].lstrip().startswith("bool "):
                    i = expr.index("bool", i) + 4
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    out = []
    for p in (p.strip() for p in parts):
        try:
            float(p)
        except ValueError:
            out.append(p)
    return out


def test_promql_operands_split_at_top_level_only():
    assert promql_operands("sum(rate(a[5m])) / sum(rate(b[5m])) > 0.2") == ["sum(rate(a[5m])) / sum(rate(b[5m]))"]
    assert promql_operands('count(up{job="x"} == 1)') == ['count(up{job="x"} == 1)']
    assert promql_operands('x{a=~"y|z"} < 0.5 * max(x) and max(x) > 0.05') == ['x{a=~"y|z"}', "0.5 * max(x)", "max(x)"]
    assert promql_operands("a >= bool 3 unless b") == ["a", "b"]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> dict:
        query = urllib.parse.urlencode(params)
        body = json.loads(http_get(f"{self.url}/api/v1/{path}?{query}", timeout=30))
        assert body["status"] == "success", body
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        expr = expr.replace("$__rate_interval", RATE_INTERVAL)
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=str(step))["result"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]


def finite_points(result: list[dict]) -> int:
    return sum(1 for series in result for _, v in series["values"] if math.isfinite(float(v)))


# ---------------------------------------------------------------- promtool
def test_promtool_check_config_and_rules(prometheus_bin):
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        done = subprocess.run([prometheus_bin["promtool"], *args], cwd=PROM_DIR, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_rule_unit_tests(prometheus_bin):
    done = subprocess.run([prometheus_bin["promtool"], "test", "rules", "alerts_test.yml"], cwd=PROM_DIR,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_rule_unit_tests_fail_on_a_wrong_expectation(prometheus_bin, tmp_path):
    # the unit tests can fail: expecting the feed-stale alert while the feed still publishes
    (tmp_path / "alerts.yml").write_text((PROM_DIR / "alerts.yml").read_text())
    wrong = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())
    case = wrong["tests"][0]["alert_rule_test"]
    case[0]["exp_alerts"] = [{"exp_labels": {"severity": "critical"}}]
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(wrong))
    done = subprocess.run([prometheus_bin["promtool"], "test", "rules", "alerts_test.yml"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr


# ---------------------------------------------------------------- the running roadpulse
def replay_map() -> str:
    # The short Kotka fallback leaves the congestion panels without fresh ok speeds (seen without
    # ../shared), so the replay needs the Liechtenstein map; skip clearly when it is absent.
    return str(shared_map("liechtenstein-2024.osm.pbf"))


def drive(map_name: str, port: int, replay_s: float) -> None:
    """A running roadpulse for the scrape test (run in a subprocess by :func:`roadpulse_process`).

    The embedded pipeline on a simulated morning, paced over ``replay_s`` wall seconds, publishing
    into the feed server on ``port`` (which serves ``/metrics``). Upload batches go in as the raw
    Kafka-style messages, with a few malformed ones among them, so ingest validates and
    dead-letters for real. ``CONSUMER_LAG`` is the backlog of messages not yet processed.
    Prints ``replay done`` when the input is exhausted, then serves until terminated.
    """
    import threading

    from geo.bundled import resolve_map
    from geo.network import load_network
    from simulator.config import SimulationConfig
    from simulator.day import simulate_day
    from simulator.formats import batch_to_json
    from streams.embedded import EmbeddedPipeline
    from streams.feed import BackgroundFeedServer
    from streams.settings import cache_dir, load_settings

    settings = load_settings(overrides={"map": map_name, "http_host": "127.0.0.1", "http_port": port})
    network = load_network(resolve_map(settings.map), cache=cache_dir(settings))
    metrics.set_build_info(map_name=settings.map)
    metrics.init_label_values(topics=[settings.topic_pings])
    lag = metrics.CONSUMER_LAG.labels(topic=settings.topic_pings)
    sim = simulate_day(network, SimulationConfig(hours=0.5, start_s=7.5 * 3600, probe_share=0.05, seed=11))
    messages = [(dev.encode(), batch_to_json(dev, pings).encode()) for dev, pings in sim.ping_batches()]
    bad = [b"{not json", b'{"device": "x", "pings": []}', b'{"device": "y", "ts": 1, "lat": 95, "lon": 9}']
    for i, value in enumerate(bad * 20):
        messages.insert((i * 7919) % len(messages), (b"bad", value))
    with BackgroundFeedServer(network, settings, port=port, publish_interval_s=1.0) as feed:
        pipeline = EmbeddedPipeline(network, settings, on_publish=feed.publish)
        print(f"serving {feed.url}", flush=True)
        chunks = 40
        size = math.ceil(len(messages) / chunks)
        for k in range(chunks):
            lag.set(len(messages) - k * size)
            t0 = time.monotonic()
            pipeline.process_messages(messages[k * size:(k + 1) * size])
            time.sleep(max(0.0, replay_s / chunks - (time.monotonic() - t0)))
        pipeline.finish()
        lag.set(0)
        print("replay done", flush=True)
        threading.Event().wait()


@pytest.fixture(scope="module")
def roadpulse_process(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = f"from tests.test_prometheus import drive; drive({replay_map()!r}, {port}, 15.0)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://127.0.0.1:{port}/metrics", 120, proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(prometheus_bin, roadpulse_process, tmp_path_factory) -> Iterator[Prometheus]:
    feed_url, _ = roadpulse_process
    target = urllib.parse.urlsplit(feed_url).netloc
    workdir = tmp_path_factory.mktemp("prometheus")
    shutil.copy(PROM_DIR / "alerts.yml", workdir / "alerts.yml")
    # The embedded process is the pipeline worker and the feed server at once: one scrape job,
    # named like the compose deployment's workers, so the worker-count panel means something.
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": f"{SCRAPE_S:g}s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "roadpulse-worker", "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run([prometheus_bin["promtool"], "check", "config", "prometheus.yml"], cwd=workdir,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    proc = subprocess.Popen(
        [prometheus_bin["prometheus"], f"--config.file={workdir / 'prometheus.yml'}",
         f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(workdir / "prometheus.log", "w"))
    try:
        wait_for(f"http://127.0.0.1:{port}/-/ready", 60, proc)
        yield Prometheus(f"http://127.0.0.1:{port}")
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def replay_window(roadpulse_process, prometheus) -> tuple[float, float]:
    """Run the replay to its end with HTTP traffic and a live SSE client; (start, end) Unix time."""
    feed_url, proc = roadpulse_process
    start = time.time()
    sse = urllib.request.urlopen(f"{feed_url}/v1/stream", timeout=60)
    assert sse.status == 200
    deadline = time.monotonic() + 240
    while True:
        for path in ("/v1/segments", "/v1/segments?frc=0,1,2", "/v1/datex2", "/healthz", "/v1/segments/1"):
            try:
                http_get(feed_url + path)
            except urllib.error.HTTPError:
                pass  # 404 / 503 are requests too
        output = []
        while _readable(proc):
            line = proc.stdout.readline()
            if not line:
                break
            output.append(line)
        if any("replay done" in line for line in output):
            break
        assert proc.poll() is None, "roadpulse exited during the replay"
        assert time.monotonic() < deadline, "replay did not finish in 240 s"
        time.sleep(0.5)
    time.sleep(4 * SCRAPE_S)  # a few scrapes after the end
    sse.close()
    time.sleep(2 * SCRAPE_S)
    return start, time.time()


def _readable(proc: subprocess.Popen) -> bool:
    import select

    return bool(select.select([proc.stdout], [], [], 0)[0])


def test_prometheus_scrapes_roadpulse(prometheus, replay_window):
    targets = prometheus.api("targets")["activeTargets"]
    assert [t["labels"]["job"] for t in targets] == ["roadpulse-worker"]
    assert targets[0]["health"] == "up", targets[0].get("lastError")


def test_every_dashboard_expression_returns_data(prometheus, replay_window):
    start, end = replay_window
    empty = [f"{title}: {expr}" for title, expr in dashboard_exprs()
             if finite_points(prometheus.query_range(expr, start, end)) == 0]
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_every_alert_rule_operand_returns_data_and_the_rules_load(prometheus, replay_window):
    start, end = replay_window
    empty = []
    for rule in alert_rules():
        prometheus.query_range(rule["expr"], start, end)  # the whole expression evaluates
        for operand in promql_operands(rule["expr"]):
            if finite_points(prometheus.query_range(operand, start, end)) == 0:
                empty.append(f"{rule['alert']}: {operand}")
    assert not empty, "alert operands without data:\n" + "\n".join(empty)
    loaded = {r["name"]: r for g in prometheus.api("rules")["groups"] for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in alert_rules()}
    assert all(r["health"] == "ok" for r in loaded.values()), loaded
    # a healthy replay is no reason to page anyone about rejections or a stale feed
    firing = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"}
    assert not firing & {"RoadpulseFeedStale", "RoadpulseTargetDown"}


def test_a_misspelt_metric_would_be_caught(prometheus, replay_window):
    start, end = replay_window
    assert finite_points(prometheus.query_range("sum(rate(roadpulse_ping_received_total[10s]))", start, end)) == 0


def test_series_per_metric_bounded_and_labels_private(prometheus, replay_window, roadpulse_process):
    counts = {r["metric"]["__name__"]: int(float(r["value"][1]))
              for r in prometheus.query('count by (__name__) ({__name__=~"roadpulse_.+"})')}
    assert "roadpulse_segments_published_total" in counts and "roadpulse_pings_rejected_total" in counts
    too_many = {k: v for k, v in counts.items() if v > MAX_SERIES_PER_METRIC}
    assert not too_many, too_many
    # the process's own exposition: every label value from a bounded enum, nothing per device/segment
    feed_url, _ = roadpulse_process
    families = list(text_string_to_metric_families(http_get(f"{feed_url}/metrics").decode()))
    assert metrics.unbounded_label_values(families) == []
    assert max(metrics.series_per_metric(families).values()) <= MAX_SERIES_PER_METRIC
    build = prometheus.query("roadpulse_build_info")
    assert build and build[0]["metric"]["map"] in {"liechtenstein-2024", "kotka"}
