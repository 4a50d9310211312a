// roadpulse live map: the road network on a canvas, coloured by jam level, live from the SSE feed.
// Plain JS, no libraries, no tiles: everything comes from this server, so it works offline.
// Data flow: /v1/network (geometry, once, cacheable) + /v1/segments (speeds snapshot, gzip)
// then /v1/stream?last_event_id=<snapshot's id> (Server-Sent Events of changed segments).
"use strict";
(function () {
  const JAM_COLOURS = ["#1a9850", "#91cf60", "#f6c532", "#fc8d59", "#d73027", "#7f0000"];
  const JAM_NAMES = ["free flow", "light slowdown", "moderate congestion", "heavy congestion", "queuing", "standstill"];
  const NO_DATA = "#a3a3a3";
  const token = new URLSearchParams(location.hash.slice(1)).get("token");

  const canvas = document.getElementById("map");
  const ctx = canvas.getContext("2d");
  const statusEl = document.getElementById("status");
  const info = document.getElementById("info");
  const infoBody = document.getElementById("info-body");

  const segs = [];          // {id, props, lonlat: [[lon,lat]..], xy: Float64Array (projected, metres)}
  const byId = new Map();   // segment_id -> seg
  const speeds = new Map(); // segment_id -> latest SegmentSpeed record
  let view = {cx: 0, cy: 0, scale: 1};   // metres at canvas centre, pixels per metre
  let home = null;
  let selected = null;
  let drawQueued = false;
  let newestWindowEnd = null;

  // State for tests and curious users (no ids leave the page).
  const api = window.roadpulse = {
    ready: false, segmentsDrawn: 0, eventsReceived: 0, lastEventId: null, errors: [],
    colourCounts() {
      const c = {}; for (const s of segs) { const k = colourOf(s.id); c[k] = (c[k] || 0) + 1; } return c;
    },
    colours() { const o = {}; for (const s of segs) o[s.id] = colourOf(s.id); return o; },
    jamColours: JAM_COLOURS, noDataColour: NO_DATA,
    select(id) { selectSegment(byId.get(id) || null); },
    screenPoint(id) {  // midpoint of a segment in page CSS pixels (to click it in tests)
      const s = byId.get(id); if (!s) return null;
      const n = s.xy.length / 2, k = Math.floor((n - 1) / 2);
      const [x0, y0] = toScreen(s.xy[2 * k], s.xy[2 * k + 1]);
      const [x1, y1] = toScreen(s.xy[2 * k + 2], s.xy[2 * k + 3]);
      const [ox, oy] = offsetVec(x0, y0, x1, y1, s);
      const rect = canvas.getBoundingClientRect();  // page coordinates, as a mouse event has them
      return [rect.left + (x0 + x1) / 2 + ox, rect.top + (y0 + y1) / 2 + oy];
    },
  };

  function withToken(url) {
    if (!token) return url;
    return url + (url.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(token);
  }

  function setStatus(text, cls) { statusEl.textContent = text; statusEl.className = "status " + cls; }

  function showMessage(text) {
    const m = document.getElementById("message"); m.textContent = text; m.hidden = !text;
  }

  // ------------------------------------------------------------------ legend
  const legend = document.getElementById("legend-items");
  JAM_COLOURS.forEach((c, i) => {
    const li = document.createElement("li");
    li.innerHTML = `<span class="swatch" style="background:${c}"></span>${i} ${JAM_NAMES[i]}`;
    legend.appendChild(li);
  });
  for (const [cls, label] of [["", "no data"], ["stale", "stale (no recent data)"]]) {
    const li = document.createElement("li");
    li.innerHTML = `<span class="swatch ${cls}" style="background:${NO_DATA}"></span>${label}`;
    legend.appendChild(li);
  }

  // ------------------------------------------------------------------ projection
  let lon0 = 0, lat0 = 0, kx = 1;
  const R = 6371008.8 * Math.PI / 180;  // metres per degree of latitude
  function project(lon, lat) { return [(lon - lon0) * kx, (lat - lat0) * R]; }
  function toScreen(x, y) {
    return [canvas.clientWidth / 2 + (x - view.cx) * view.scale, canvas.clientHeight / 2 - (y - view.cy) * view.scale];
  }
  function toWorld(px, py) {
    return [view.cx + (px - canvas.clientWidth / 2) / view.scale, view.cy - (py - canvas.clientHeight / 2) / view.scale];
  }

  function colourOf(id) {
    const r = speeds.get(id);
    if (!r || r.status !== "ok" || r.jam_level === null || r.jam_level === undefined) return NO_DATA;
    return JAM_COLOURS[r.jam_level];
  }

  function widthOf(s) { const f = s.props.frc; return f <= 2 ? 4 : f <= 4 ? 3 : 2; }

  // Two-way roads: each direction is drawn shifted to its right-hand side so both show.
  function offsetVec(x0, y0, x1, y1, s) {
    if (!s.props.two_way) return [0, 0];
    const dx = x1 - x0, dy = y1 - y0, len = Math.hypot(dx, dy) || 1, d = widthOf(s) * 0.6 + 0.5;
    return [-dy / len * d, dx / len * d];  // screen y points down: (-dy, dx) is the right side
  }

  function tracePath(s) {
    const xy = s.xy, n = xy.length / 2;
    let prev = toScreen(xy[0], xy[1]);
    for (let i = 1; i < n; i++) {
      const cur = toScreen(xy[2 * i], xy[2 * i + 1]);
      const [ox, oy] = offsetVec(prev[0], prev[1], cur[0], cur[1], s);
      if (i === 1) ctx.moveTo(prev[0] + ox, prev[1] + oy);
      ctx.lineTo(cur[0] + ox, cur[1] + oy);
      prev = cur;
    }
  }

  // ------------------------------------------------------------------ drawing
  function draw() {
    drawQueued = false;
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
    }
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.lineCap = "round"; ctx.lineJoin = "round";
    // Group by style so each style is one stroke: no data first, then worse jams on top.
    const groups = new Map();
    for (const s of segs) {
      const r = speeds.get(s.id);
      const colour = colourOf(s.id);
      const stale = r && r.status === "stale";
      const key = colour + "|" + widthOf(s) + "|" + (stale ? 1 : 0);
      if (!groups.has(key)) groups.set(key, {colour, width: widthOf(s), stale, rank: colour === NO_DATA ? -1 : JAM_COLOURS.indexOf(colour), list: []});
      groups.get(key).list.push(s);
    }
    const ordered = [...groups.values()].sort((a, b) => a.rank - b.rank || a.width - b.width);
    let drawn = 0;
    for (const g of ordered) {
      ctx.beginPath();
      for (const s of g.list) { tracePath(s); drawn++; }
      ctx.strokeStyle = g.colour; ctx.lineWidth = g.width;
      ctx.setLineDash(g.stale ? [6, 3] : []);
      ctx.stroke();
    }
    ctx.setLineDash([]);
    if (selected) {
      ctx.beginPath(); tracePath(selected);
      ctx.strokeStyle = "#1f6feb"; ctx.lineWidth = widthOf(selected) + 5; ctx.globalAlpha = 0.45; ctx.stroke();
      ctx.globalAlpha = 1;
      ctx.beginPath(); tracePath(selected);
      ctx.strokeStyle = colourOf(selected.id); ctx.lineWidth = widthOf(selected); ctx.stroke();
    }
    api.segmentsDrawn = drawn;
  }

  function requestDraw() { if (!drawQueued) { drawQueued = true; requestAnimationFrame(draw); } }

  function fit(bbox) {
    const [a, b] = [project(bbox[0], bbox[1]), project(bbox[2], bbox[3])];
    const w = canvas.clientWidth || 800, h = canvas.clientHeight || 600;
    view.cx = (a[0] + b[0]) / 2; view.cy = (a[1] + b[1]) / 2;
    view.scale = 0.92 * Math.min(w / Math.max(b[0] - a[0], 1), h / Math.max(b[1] - a[1], 1));
    home = {...view};
  }

  // ------------------------------------------------------------------ info panel
  function fmt(v, unit, digits = 0) { return v === null || v === undefined ? "—" : `${Number(v).toFixed(digits)} ${unit}`.trim(); }
  function utc(t) { return t ? new Date(t * 1000).toISOString().slice(11, 16) + " UTC" : "—"; }
  function esc(t) { return String(t).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }

  function renderInfo() {
    if (!selected) { info.hidden = true; return; }
    const p = selected.props, r = speeds.get(selected.id);
    const level = r && r.status === "ok" ? r.jam_level : null;
    const chip = `<span class="chip" style="background:${colourOf(selected.id)}"></span>`;
    infoBody.innerHTML = `<h3>${esc(p.name || "(unnamed " + p.highway + ")")}</h3>
      <table>
      <tr><td>status</td><td>${chip}${r ? esc(r.status) : "no data"}${level !== null ? " · " + level + " " + JAM_NAMES[level] : ""}</td></tr>
      <tr><td>speed</td><td>${fmt(r && r.speed_kmh, "km/h")}</td></tr>
      <tr><td>free flow</td><td>${fmt(r ? r.free_flow_speed_kmh : p.free_flow_prior_kmh, "km/h")}</td></tr>
      <tr><td>confidence</td><td>${r && r.status === "ok" ? Math.round(100 * r.confidence) + " %" : "—"}</td></tr>
      <tr><td>travel time</td><td>${fmt(r && r.travel_time_s, "s")} (free ${fmt(r ? r.free_flow_travel_time_s : null, "s")})</td></tr>
      <tr><td>devices</td><td>${r && r.sample_count ? esc(r.sample_count) : "—"}</td></tr>
      <tr><td>window</td><td>${r ? utc(r.window_start) + " – " + utc(r.window_end) : "—"}</td></tr>
      <tr><td>road</td><td>${esc(p.highway)} · frc ${p.frc} · ${Math.round(p.length_m)} m</td></tr>
      <tr><td>segment</td><td>${p.segment_id}</td></tr>
      </table><div id="history"></div>`;
    info.hidden = false;
    loadHistory(selected.id);
  }

  async function loadHistory(id) {
    try {
      const res = await fetch(withToken(`/v1/segments/${id}`));
      if (!res.ok || !selected || selected.id !== id) return;
      const doc = await res.json();
      const pts = doc.history.filter(h => h.speed_kmh !== null);
      const box = document.getElementById("history");
      if (!box || pts.length === 0) return;
      const t0 = doc.history[0].window_start, t1 = doc.history[doc.history.length - 1].window_end;
      const vmax = Math.max(...pts.map(h => h.speed_kmh), doc.free_flow_prior_kmh, 1);
      const W = 264, H = 54, X = t => 2 + (W - 4) * (t - t0) / Math.max(t1 - t0, 1), Y = v => H - 2 - (H - 6) * v / vmax;
      // A step line: each entry's speed holds from the previous entry's window end to its own
      // (sliding windows overlap, so drawing every window's full span would smear).
      let from = null;
      const steps = pts.map(h => {
        const a = from === null || from < h.window_start - 1 ? h.window_start : from;
        from = h.window_end;
        return `M${X(a).toFixed(1)},${Y(h.speed_kmh).toFixed(1)}H${X(h.window_end).toFixed(1)}`;
      }).join("");
      box.innerHTML = `<svg width="${W}" height="${H}" role="img" aria-label="speed, last hour">
        <rect width="${W}" height="${H}" fill="#f6f6f6"/>
        <path d="M0,${Y(doc.free_flow_prior_kmh).toFixed(1)}H${W}" stroke="#bbb" stroke-dasharray="3 3"/>
        <path d="${steps}" stroke="#1f6feb" stroke-width="2" fill="none"/></svg>
        <small>speed, last hour (${utc(t0)} – ${utc(t1)}), top ${Math.round(vmax)} km/h; dashed: free-flow prior</small>`;
    } catch (e) { /* the panel still shows the latest record */ }
  }

  function selectSegment(s) { selected = s; renderInfo(); requestDraw(); }

  function distToSegment(px, py, ax, ay, bx, by) {
    const dx = bx - ax, dy = by - ay, l2 = dx * dx + dy * dy;
    const t = l2 ? Math.max(0, Math.min(1, ((px - ax) * dx + (py - ay) * dy) / l2)) : 0;
    return Math.hypot(px - ax - t * dx, py - ay - t * dy);
  }

  function pick(px, py) {
    let best = null, bestD = 8;
    for (const s of segs) {
      const xy = s.xy, n = xy.length / 2;
      let prev = toScreen(xy[0], xy[1]);
      for (let i = 1; i < n; i++) {
        const cur = toScreen(xy[2 * i], xy[2 * i + 1]);
        const [ox, oy] = offsetVec(prev[0], prev[1], cur[0], cur[1], s);
        const d = distToSegment(px, py, prev[0] + ox, prev[1] + oy, cur[0] + ox, cur[1] + oy);
        if (d < bestD) { bestD = d; best = s; }
        prev = cur;
      }
    }
    return best;
  }

  // ------------------------------------------------------------------ interaction
  let drag = null;
  canvas.addEventListener("mousedown", e => { drag = {x: e.clientX, y: e.clientY, cx: view.cx, cy: view.cy, moved: false}; });
  window.addEventListener("mousemove", e => {
    if (!drag) return;
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) { drag.moved = true; canvas.classList.add("dragging"); }
    view.cx = drag.cx - dx / view.scale; view.cy = drag.cy + dy / view.scale; requestDraw();
  });
  window.addEventListener("mouseup", e => {
    if (drag && !drag.moved) {
      const rect = canvas.getBoundingClientRect();
      selectSegment(pick(e.clientX - rect.left, e.clientY - rect.top));
    }
    drag = null; canvas.classList.remove("dragging");
  });
  canvas.addEventListener("wheel", e => {
    e.preventDefault();
    const rect = canvas.getBoundingClientRect();
    const [wx, wy] = toWorld(e.clientX - rect.left, e.clientY - rect.top);
    const f = Math.exp(-e.deltaY * 0.0015);
    view.scale *= f; view.cx = wx - (wx - view.cx) / f; view.cy = wy - (wy - view.cy) / f; requestDraw();
  }, {passive: false});
  canvas.addEventListener("dblclick", () => { if (home) { view = {...home}; requestDraw(); } });
  document.getElementById("info-close").addEventListener("click", () => selectSegment(null));
  window.addEventListener("resize", requestDraw);

  // ------------------------------------------------------------------ data
  function applyRecords(list, replace) {
    if (replace) speeds.clear();
    for (const r of list) {
      speeds.set(r.segment_id, r);
      if (r.window_end && (!newestWindowEnd || r.window_end > newestWindowEnd)) newestWindowEnd = r.window_end;
    }
    if (selected) renderInfoLight();
    requestDraw();
  }

  // Refresh the open panel's numbers without refetching the history on every event.
  let lastInfoRefresh = 0;
  function renderInfoLight() {
    const now = Date.now();
    if (now - lastInfoRefresh > 2000) { lastInfoRefresh = now; renderInfo(); }
  }

  function showLive() {
    setStatus(`live · data to ${utc(newestWindowEnd)} · ${speeds.size} segments with speeds`, "live");
  }

  async function getJSON(url) {
    const res = await fetch(withToken(url));
    if (res.status === 401) throw new Error("This feed needs a token: open this page as /#token=YOUR_TOKEN");
    if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
    return [await res.json(), res];
  }

  function connect(lastEventId) {
    const es = new EventSource(withToken("/v1/stream" + (lastEventId ? "?last_event_id=" + encodeURIComponent(lastEventId) : "")));
    const handle = (replace) => (ev) => {
      const doc = JSON.parse(ev.data);
      api.eventsReceived++; api.lastEventId = ev.lastEventId;
      applyRecords(doc.segments, replace);
      showLive();
    };
    es.addEventListener("snapshot", handle(true));
    es.addEventListener("speeds", handle(false));
    es.onopen = () => showLive();
    // EventSource reconnects by itself and sends Last-Event-ID; the server fills the gap.
    es.onerror = () => setStatus("reconnecting…", "connecting");
  }

  async function start() {
    try {
      const [net] = await getJSON("/v1/network");
      if (net.attribution) document.getElementById("attribution").textContent = "Map data " + net.attribution + " · speeds: roadpulse";
      const [b0, b1, b2, b3] = net.bbox;
      lon0 = (b0 + b2) / 2; lat0 = (b1 + b3) / 2; kx = R * Math.cos(lat0 * Math.PI / 180);
      for (const f of net.features) {
        const c = f.geometry.coordinates, xy = new Float64Array(c.length * 2);
        c.forEach(([lon, lat], i) => { const [x, y] = project(lon, lat); xy[2 * i] = x; xy[2 * i + 1] = y; });
        const s = {id: f.properties.segment_id, props: f.properties, xy};
        segs.push(s); byId.set(s.id, s);
      }
      fit(net.bbox);
      const [snap, res] = await getJSON("/v1/segments");
      applyRecords(snap.features.map(f => f.properties), true);
      draw();
      api.ready = true;
      showLive();
      connect(res.headers.get("X-Feed-Event-Id"));
    } catch (e) {
      api.errors.push(String(e.message || e));
      setStatus("error", "error");
      showMessage(e.message || String(e));
    }
  }

  start();
})();
