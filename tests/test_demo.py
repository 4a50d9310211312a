"""``roadpulse demo`` as a user runs it: prints its address, serves a live map, stops by itself
with ``--duration`` and cleanly on Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DemoProcess:
    """``roadpulse demo`` in a subprocess, its output collected line by line."""

    def __init__(self, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.lines: list[str] = []
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "demo", "--port", str(self.port), *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_url(self, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                m = re.search(r"live map at (http://\S+)", line)
                if m:
                    return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"demo printed no address in {timeout_s} s:\n{self.output}")

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Wall seconds from start until ``/readyz`` answers 200."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.get("/readyz")[0] == 200:
                return time.monotonic() - self.started
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"demo not ready in {timeout_s} s:\n{self.output}")

    def interrupt(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout_s)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_demo_serves_live_map_and_stops_on_ctrl_c():
    demo = DemoProcess("--speed", "120")
    try:
        url = demo.wait_url()
        assert url == f"http://127.0.0.1:{demo.port}"
        demo.wait_ready()
        status, body = demo.get("/")
        assert status == 200 and b"/static/map.js" in body and b"OpenStreetMap" in body
        status, body = demo.get("/v1/segments")
        doc = json.loads(body)
        assert status == 200 and doc["type"] == "FeatureCollection" and len(doc["features"]) > 0
        assert {f["properties"]["status"] for f in doc["features"]} <= {"ok", "stale", "no_data"}
        assert demo.interrupt() == 0
        assert "roadpulse demo: stopped" in demo.output
        assert "Traceback" not in demo.output
    finally:
        demo.kill()


def test_demo_duration_stops_by_itself_and_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        clash = DemoProcess("--duration", "5", port=port)
        assert clash.proc.wait(60) == 2
        clash._reader.join(5)
        assert "choose another --port" in clash.output and "Traceback" not in clash.output
    demo = DemoProcess("--duration", "4", "--speed", "120")
    try:
        demo.wait_url()
        assert demo.proc.wait(60) == 0
        demo._reader.join(5)
        assert "roadpulse demo: stopped" in demo.output
    finally:
        demo.kill()
