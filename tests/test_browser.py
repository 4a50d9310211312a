"""The live map in headless Chromium, driven over the DevTools protocol, against ``roadpulse demo``.

The page must load with no failed request and nothing from outside the server, draw the network,
and change colours as the demo's incident develops; a screenshot goes to ``tests/artifacts/map.png``.
Chromium comes from Debian (``make test-deps``); without it the test is skipped, saying so.
No Playwright/Selenium download: aiohttp's websocket client speaks the protocol.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

#: Flags for a quiet, offline, sandbox-less headless browser (we run as root in CI).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
)


def find_chromium() -> str | None:
    """Path of a Chromium binary, or ``None``."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


class Browser:
    """One headless Chromium process with one page, driven over CDP.

    ``events`` collects every protocol event (Network.*, Runtime.*, Log.*) of the page.
    """

    def __init__(self, binary: str, width: int = 1280, height: int = 860) -> None:
        self.binary = binary
        self.size = (width, height)
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}

    async def __aenter__(self) -> "Browser":
        self._profile = tempfile.TemporaryDirectory(prefix="roadpulse-chromium-")
        w, h = self.size
        self.proc = subprocess.Popen(
            [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self._profile.name}",
             "--remote-debugging-port=0", f"--window-size={w},{h}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = Path(self._profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit code {self.proc.poll()})")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        targets: list[dict[str, Any]] = []
        while not any(t.get("type") == "page" for t in targets):
            async with self.http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            await asyncio.sleep(0.05)
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = await self.http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Page", "Network", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        await self.send("Emulation.setDeviceMetricsOverride", width=w, height=h, deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._reader.cancel()
        await self.ws.close()
        await self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._profile.cleanup()

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One CDP command; returns its result or raises with the protocol error."""
        msg_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        data = await asyncio.wait_for(fut, 60)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        """Value of a JS expression in the page (promises awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 30.0) -> Any:
        """Poll a JS expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still falsy after {timeout_s} s")
            await asyncio.sleep(0.2)

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def screenshot(self, path: str | Path) -> Path:
        data = await self.send("Page.captureScreenshot", format="png")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    # ---------------------------------------------------------------- what the page did
    def failed_requests(self) -> list[str]:
        """Requests that failed or got an HTTP error (the live stream's cancel at close is fine)."""
        urls = {e["params"]["requestId"]: e["params"]["request"]["url"]
                for e in self.events if e.get("method") == "Network.requestWillBeSent"}
        bad = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Network.loadingFailed" and not p.get("canceled"):
                bad.append(f"{urls.get(p['requestId'], '?')}: {p.get('errorText')}")
            elif e.get("method") == "Network.responseReceived" and p["response"]["status"] >= 400:
                bad.append(f"{p['response']['url']}: HTTP {p['response']['status']}")
        return bad

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def console_errors(self) -> list[str]:
        out = []
        for e in self.events:
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(str(e["params"]["exceptionDetails"].get("text")))
            elif e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error":
                out.append(str(e["params"]["entry"].get("text")))
        return out


# ---------------------------------------------------------------- the test
import pytest  # noqa: E402

from tests.test_demo import DemoProcess  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

#: Counts canvas pixels by drawn colour: background, grey (no data) and each jam level's colour.
PIXELS_JS = """(() => {
  const c = document.getElementById('map'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const hex = h => [1, 3, 5].map(i => parseInt(h.slice(i, i + 2), 16));
  const palette = [['nodata', hex(window.roadpulse.noDataColour)], ...window.roadpulse.jamColours.map((h, i) => ['jam' + i, hex(h)])];
  const out = {painted: 0}; for (const [k] of palette) out[k] = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] < 250) continue;
    out.painted++;
    for (const [k, [r, g, b]] of palette) if (Math.abs(d[i] - r) + Math.abs(d[i + 1] - g) + Math.abs(d[i + 2] - b) < 12) { out[k]++; break; }
  }
  return out;
})()"""


@pytest.mark.browser
@pytest.mark.slow
def test_live_map_in_chromium(helsinki):
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium is not installed (Debian: `make test-deps` or `apt-get install -y chromium`)")
    from streams.commands.demo_cmd import demo_incident

    _, incident_ids = demo_incident(helsinki)
    jam_colours = ["#1a9850", "#91cf60", "#f6c532", "#fc8d59", "#d73027", "#7f0000"]
    demo = DemoProcess("--speed", "120", "--duration", "150")
    try:
        url = demo.wait_url()
        demo.wait_ready()
        result = asyncio.run(_drive(binary, url, incident_ids, jam_colours))
        assert demo.interrupt() == 0, demo.output
    finally:
        demo.kill()

    assert result["failed"] == [], result["failed"]
    assert result["console_errors"] == []
    assert all(u.startswith(url + "/") for u in result["urls"]), "the page loaded something from elsewhere"
    assert result["drawn"] == helsinki.n_segments
    first, last = result["first_pixels"], result["last_pixels"]
    assert first["painted"] > 20_000 and first["nodata"] > 0 and first["jam0"] > 0
    # The incident: segments of the closed road went from free/unknown to heavy congestion or worse.
    before = result["incident_before"]
    assert sum(c in jam_colours[3:] for c in before.values()) == 0
    assert result["incident_jammed"] >= 3
    # ... and the whole picture changed while we watched (the SSE stream updated it).
    assert result["changed_segments"] > 10
    assert last["jam3"] + last["jam4"] + last["jam5"] > 0 or result["max_jam_pixels"] > 0
    assert result["events"] >= 5
    assert result["info_text"] and "km/h" in result["info_text"]


async def _drive(binary: str, url: str, incident_ids: tuple[int, ...], jam_colours: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with Browser(binary) as browser:
        await browser.navigate(url + "/")
        await browser.wait_for("window.roadpulse && window.roadpulse.ready && window.roadpulse.segmentsDrawn > 0", 30)
        await asyncio.sleep(0.5)
        out["first_pixels"] = await browser.evaluate(PIXELS_JS)
        await browser.screenshot(ARTIFACTS / "map-start.png")
        ids_js = json.dumps(list(incident_ids))
        incident_js = f"(() => {{ const c = window.roadpulse.colours(); return Object.fromEntries({ids_js}.map(i => [i, c[i]])); }})()"
        out["incident_before"] = await browser.evaluate(incident_js)
        start_colours = await browser.evaluate("window.roadpulse.colours()")
        heavy = set(jam_colours[3:])
        jammed, max_jam_pixels = 0, 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            now = await browser.evaluate(incident_js)
            jammed = max(jammed, sum(c in heavy for c in now.values()))
            px = await browser.evaluate(PIXELS_JS)
            max_jam_pixels = max(max_jam_pixels, px["jam3"] + px["jam4"] + px["jam5"])
            if jammed >= 3:
                break
            await asyncio.sleep(1.0)
        out["incident_jammed"] = jammed
        out["max_jam_pixels"] = max_jam_pixels
        end_colours = await browser.evaluate("window.roadpulse.colours()")
        out["changed_segments"] = sum(start_colours[k] != end_colours.get(k) for k in start_colours)
        out["last_pixels"] = await browser.evaluate(PIXELS_JS)
        out["drawn"] = await browser.evaluate("window.roadpulse.segmentsDrawn")
        out["events"] = await browser.evaluate("window.roadpulse.eventsReceived")
        # Click a segment of the incident road that has a speed: the panel shows it.
        target = await browser.evaluate(
            f"{ids_js}.find(i => window.roadpulse.colours()[i] !== window.roadpulse.noDataColour) || null")
        if target is not None:
            x, y = await browser.evaluate(f"window.roadpulse.screenPoint({target})")
            await browser.click(x, y)
            await browser.wait_for("!document.getElementById('info').hidden", 5)
            await asyncio.sleep(0.5)
        out["info_text"] = await browser.evaluate("document.getElementById('info').hidden ? '' : document.getElementById('info').innerText")
        await browser.screenshot(ARTIFACTS / "map.png")
        out["failed"] = browser.failed_requests()
        out["urls"] = browser.requested_urls()
        out["console_errors"] = browser.console_errors()
    return out
