// mae-ad live view: plain JavaScript, no library, no network beyond the agent that served this page.
// Polls /api/state (twice a second) and /api/scores (once a second), pulls each camera's newest frame when its
// id changes (at most FRAME_INTERVAL_MS apart), draws the score chart on a canvas.
"use strict";

const STATE_INTERVAL_MS = 500;
const SCORES_INTERVAL_MS = 1000;
const FRAME_INTERVAL_MS = 200;
const TOKEN_KEY = "mae-ad-token";

const cams = new Map();        // name -> {el, series: [[t, score, thr]], lastFrame, loading, ...}
let state = null;
let historyS = 300;
let lastScoreT = 0;
let serverSkew = 0;            // server clock - browser clock (s), so the chart's "now" is the agent's
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let windowS = Number(localStorage.getItem("mae-ad-window")) || 300;  // chart span (s), at most historyS

const $ = (sel, root = document) => root.querySelector(sel);

function fmt(v, digits = 3) {
  return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits);
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60), h = Math.floor(m / 60);
  return h ? `${h} h ${m % 60} min` : `${m} min ${Math.floor(s % 60)} s`;
}

function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleTimeString([], {hour12: false}) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function say(text, kind = "") {
  const m = $("#message");
  m.textContent = text;
  m.className = "message " + kind;
  m.hidden = false;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => { m.hidden = true; }, 6000);
}

function badgeClass(status) {
  if (status === "streaming") return "ok";
  if (status === "paused" || status === "reconnecting" || status === "ended") return "warn";
  return "bad";
}

// --- cameras -------------------------------------------------------------------------------------------------
function cameraCard(name) {
  let c = cams.get(name);
  if (c) return c;
  const el = $("#camera-template").content.firstElementChild.cloneNode(true);
  el.dataset.camera = name;
  $(".name", el).textContent = name;
  $(".raw", el).href = `/api/frame/${encodeURIComponent(name)}.jpg?overlay=0`;
  for (const b of el.querySelectorAll("button[data-action]")) {
    b.addEventListener("click", () => act(name, b.dataset.action));
  }
  $("#cameras").appendChild(el);
  c = {name, el, series: [], lastFrame: null, loading: false, blobUrl: null};
  cams.set(name, c);
  pullFrame(c);
  return c;
}

async function pullFrame(c) {
  // One request at a time per camera; the agent answers 204 when it has no newer frame than `after`.
  for (;;) {
    const t0 = performance.now();
    try {
      const after = c.lastFrame === null ? "" : `&after=${c.lastFrame}`;
      const r = await fetch(`/api/frame/${encodeURIComponent(c.name)}.jpg?overlay=1${after}`, {cache: "no-store"});
      if (r.status === 200) {
        const id = Number(r.headers.get("X-Frame-Id"));
        const url = URL.createObjectURL(await r.blob());
        const img = $("img.live", c.el);
        await new Promise((ok) => { img.onload = ok; img.onerror = ok; img.src = url; });
        if (c.blobUrl) URL.revokeObjectURL(c.blobUrl);
        c.blobUrl = url;
        c.lastFrame = id;
        img.dataset.frameId = String(id);
        img.dataset.loads = String(Number(img.dataset.loads || 0) + 1);
      }
    } catch (e) {
      // the agent is restarting or gone: the state poll says so; keep trying slowly
      await new Promise((ok) => setTimeout(ok, 1000));
    }
    const wait = FRAME_INTERVAL_MS - (performance.now() - t0);
    await new Promise((ok) => setTimeout(ok, Math.max(wait, 20)));
  }
}

function renderCamera(name, s) {
  const c = cameraCard(name);
  const el = c.el;
  const st = $(".status", el);
  st.textContent = s.status;
  st.className = "status badge " + badgeClass(s.status);
  el.dataset.status = s.status;
  $(".alert-flag", el).hidden = !s.alert_open;
  const sc = $(".score", el);
  sc.textContent = fmt(s.score, 4);
  sc.classList.toggle("over", !!s.is_anomalous);
  $(".threshold", el).textContent = `${fmt(s.threshold, 4)} (${s.threshold_source})`;
  $(".fps", el).textContent = `${fmt(s.fps_read, 1)} / ${fmt(s.fps_scored, 1)}`;
  $(".dropped", el).textContent = `${s.dropped} of ${s.frames}`;
  const lat = s.latency_ms || {};
  $(".engine", el).textContent = lat.engine === undefined ? "–" : `${fmt(lat.engine, 1)} ms`;
  $(".frame", el).textContent = s.frame_id === null ? "–" : `#${s.frame_id} ${fmtTime(s.frame_time)}`;
  c.threshold = s.threshold;
  for (const b of el.querySelectorAll("button[data-action]")) {
    b.disabled = !state.actions;
    b.title = state.actions ? (token ? "" : "needs the action token (Unlock)") :
      "read-only: the agent has no action token configured";
  }
}

// --- chart ---------------------------------------------------------------------------------------------------
function drawChart(c) {
  const cv = $("canvas.chart", c.el);
  const dpr = window.devicePixelRatio || 1;
  const w = cv.clientWidth, h = cv.clientHeight;
  if (!w || !h) return;
  if (cv.width !== Math.round(w * dpr)) { cv.width = Math.round(w * dpr); cv.height = Math.round(h * dpr); }
  const g = cv.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const now = Date.now() / 1000 + serverSkew;
  const span = Math.min(windowS, historyS);
  const t0 = now - span;
  const pts = c.series.filter((p) => p[0] >= t0);
  const thr = c.threshold ?? (pts.length ? pts[pts.length - 1][2] : 1);
  let ymax = Math.max(thr * 1.5, 1e-6);
  for (const p of pts) ymax = Math.max(ymax, p[1] * 1.05);
  const L = 44, R = 8, T = 6, B = 18;
  const X = (t) => L + (t - t0) / span * (w - L - R);
  const Y = (v) => T + (1 - v / ymax) * (h - T - B);
  g.font = "11px system-ui, sans-serif";
  g.strokeStyle = "#2c313a"; g.fillStyle = "#8b929c"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = ymax * i / 4, y = Y(v);
    g.beginPath(); g.moveTo(L, y); g.lineTo(w - R, y); g.stroke();
    g.fillText(v.toFixed(3), 2, y + 4);
  }
  const step = span > 1200 ? 600 : span > 120 ? 60 : 10;
  for (let s = 0; s <= span; s += step) {
    const x = X(now - s);
    g.fillText(s === 0 ? "now" : `-${s >= 60 ? s / 60 + " min" : s + " s"}`, x - 14, h - 4);
  }
  // threshold
  g.strokeStyle = "#e5484d"; g.setLineDash([6, 4]);
  g.beginPath(); g.moveTo(L, Y(thr)); g.lineTo(w - R, Y(thr)); g.stroke(); g.setLineDash([]);
  // score line, and the points above their threshold in red
  g.strokeStyle = "#4aa3ff"; g.lineWidth = 1.5;
  g.beginPath();
  let drawn = 0;
  for (const p of pts) {
    const x = X(p[0]), y = Y(p[1]);
    if (drawn === 0) g.moveTo(x, y); else g.lineTo(x, y);
    drawn++;
  }
  g.stroke();
  g.fillStyle = "#e5484d";
  for (const p of pts) if (p[1] > p[2]) g.fillRect(X(p[0]) - 1.5, Y(p[1]) - 1.5, 3, 3);
  cv.dataset.points = String(drawn);
}

async function pollScores() {
  try {
    const r = await fetch(`/api/scores?since=${lastScoreT}`, {cache: "no-store"});
    const d = await r.json();
    serverSkew = d.time - Date.now() / 1000;
    for (const [name, pts] of Object.entries(d.cameras)) {
      const c = cameraCard(name);
      for (const p of pts) { c.series.push(p); lastScoreT = Math.max(lastScoreT, p[0]); }
      const t0 = d.time - historyS;
      let i = 0;
      while (i < c.series.length && c.series[i][0] < t0) i++;
      if (i) c.series.splice(0, i);
    }
  } catch (e) { /* shown by the state poll */ }
  for (const c of cams.values()) drawChart(c);
}

// --- alerts --------------------------------------------------------------------------------------------------
function alertRow(a) {
  const tr = document.createElement("tr");
  tr.className = "alert-row" + (a.open ? " open" : "");
  tr.dataset.id = a.id;
  tr.dataset.open = a.open ? "1" : "0";
  tr.dataset.startFrame = String(a.start_frame_id);
  const cells = [
    null, a.camera, a.open ? "OPEN" : "closed", fmtTime(a.start), a.open ? "–" : fmtTime(a.end),
    a.open ? "–" : fmtDuration(a.duration_s), fmt(a.peak_score, 4),
    a.box && a.box.length ? `[${a.box.join(", ")}]` : "–", a.id,
  ];
  for (const v of cells) {
    const td = document.createElement("td");
    if (v === null) {
      if (a.has_evidence) {
        const img = document.createElement("img");
        img.className = "thumb";
        img.alt = "evidence";
        img.src = `/api/alerts/${a.id}/thumb.jpg?p=${a.peak_frame_id}`;
        td.appendChild(img);
      } else td.textContent = "–";
    } else td.textContent = v;
    tr.appendChild(td);
  }
  tr.addEventListener("click", () => showEvidence(a));
  return tr;
}

const rowCache = new Map();  // row key -> <tr>: an unchanged alert keeps its element (and its thumbnail)

function renderAlerts(al) {
  const body = $("#alerts tbody");
  const rows = [...al.open, ...al.recent];
  $("#alert-counts").textContent = `${al.open.length} open, ${al.recent.length} recent`;
  $("#no-alerts").hidden = rows.length > 0;
  const keys = rows.map((a) => JSON.stringify([a.id, a.open, a.peak_frame_id, a.has_evidence, a.peak_score]));
  if (keys.join("|") === body.dataset.key) return;
  body.dataset.key = keys.join("|");
  const trs = rows.map((a, i) => rowCache.get(keys[i]) || alertRow(a));
  rowCache.clear();
  trs.forEach((tr, i) => rowCache.set(keys[i], tr));
  body.replaceChildren(...trs);
}

function showEvidence(a) {
  const d = $("#evidence");
  $("#evidence-title").textContent = `${a.camera}: alert ${a.id}` + (a.open ? " (open)" : "");
  const q = `?p=${a.peak_frame_id}`;
  $("#evidence-frame").src = a.has_evidence ? `/api/alerts/${a.id}/frame.jpg${q}` : "";
  $("#evidence-overlay").src = a.has_evidence ? `/api/alerts/${a.id}/overlay.jpg${q}` : "";
  $("#evidence-details").textContent = JSON.stringify(a, null, 2);
  if (!d.open) d.showModal();
}

// --- health and state ----------------------------------------------------------------------------------------
function renderHealth(h) {
  $("#agent-id").textContent = h.agent_id;
  const items = [
    ["agent", h.ok ? "ok" : "NOT OK", h.ok ? "ok" : "bad"],
    ["MQTT", h.mqtt_connected ? `connected ${h.mqtt_broker}` : `disconnected ${h.mqtt_broker}`,
      h.mqtt_connected ? "ok" : "bad"],
    ["last MQTT error", h.mqtt_error || "none", h.mqtt_error ? "warn" : ""],
    ["spool", `${h.spool_depth}` + (h.spool_dropped ? ` (${h.spool_dropped} dropped)` : ""),
      h.spool_depth ? "warn" : ""],
    ["model", `${h.model_id} (${h.backend})`, ""],
    ["model threshold", fmt(h.default_threshold, 4), ""],
    ["uptime", fmtDuration(h.uptime_s), ""],
  ];
  const box = $("#health");
  box.replaceChildren(...items.map(([k, v, cls]) => {
    const s = document.createElement("span");
    s.dataset.key = k;
    const b = document.createElement("b"); b.textContent = k;
    const val = document.createElement("span"); val.textContent = v;
    if (cls) val.className = "badge " + cls;
    s.append(b, val);
    return s;
  }));
}

function renderMode() {
  const m = $("#mode");
  if (!state || !state.actions) { m.textContent = "read-only"; m.className = "badge muted"; }
  else if (token) { m.textContent = "actions unlocked"; m.className = "badge ok"; }
  else { m.textContent = "read-only (locked)"; m.className = "badge warn"; }
  $("#token-form").dataset.unlocked = token ? "1" : "0";
}

async function pollState() {
  try {
    const r = await fetch("/api/state", {cache: "no-store"});
    state = await r.json();
    if (historyS !== state.history_s) { historyS = state.history_s; fitWindowChoice(); }
    document.body.dataset.connected = "1";
    for (const [name, s] of Object.entries(state.cameras)) renderCamera(name, s);
    renderAlerts(state.alerts);
    renderHealth(state.health);
    renderMode();
  } catch (e) {
    document.body.dataset.connected = "0";
    say("the agent does not answer (stopped or restarting)", "bad");
  }
}

// --- actions -------------------------------------------------------------------------------------------------
async function post(path) {
  const headers = token ? {Authorization: `Bearer ${token}`} : {};
  const r = await fetch(path, {method: "POST", headers});
  let body = {};
  try { body = await r.json(); } catch (e) { /* 204 */ }
  return [r.status, body];
}

async function act(camera, action) {
  const [code, body] = await post(`/api/cameras/${encodeURIComponent(camera)}/${action}`);
  const out = $("#message");
  out.dataset.lastAction = `${action}:${camera}:${code}`;
  if (code >= 200 && code < 300) {
    say(action === "snapshot" ? `snapshot of ${camera} requested (published on MQTT)` : `${camera}: ${action} done`,
      "ok");
    pollState();
  } else {
    if (code === 401 && token) { token = ""; sessionStorage.removeItem(TOKEN_KEY); renderMode(); }
    say(`${action} ${camera} refused (${code}): ${body.error || ""}`, "bad");
  }
}

$("#token-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const given = $("#token").value.trim();
  $("#token").value = "";
  if (!given) { token = ""; sessionStorage.removeItem(TOKEN_KEY); renderMode(); return; }
  token = given;
  const [code, body] = await post("/api/token");
  if (code === 204) {
    sessionStorage.setItem(TOKEN_KEY, token);
    say("actions unlocked", "ok");
  } else {
    token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    say(`token refused (${code}): ${body.error || ""}`, "bad");
  }
  renderMode();
});

const sel = $("#window");

function fitWindowChoice() {
  // only the spans the agent keeps scores for; the widest kept one when the chosen span is longer
  let best = null;
  for (const o of sel.options) {
    o.disabled = Number(o.value) > historyS && o !== sel.options[0];
    if (!o.disabled) best = o;
  }
  if (windowS > historyS || !sel.querySelector(`option[value="${windowS}"]`)) windowS = Number(best.value);
  sel.value = String(windowS);
  for (const c of cams.values()) drawChart(c);
}
fitWindowChoice();
sel.addEventListener("change", () => {
  windowS = Number(sel.value);
  localStorage.setItem("mae-ad-window", String(windowS));
  for (const c of cams.values()) drawChart(c);
});
window.addEventListener("resize", () => { for (const c of cams.values()) drawChart(c); });
pollState();
pollScores();
setInterval(pollState, STATE_INTERVAL_MS);
setInterval(pollScores, SCORES_INTERVAL_MS);
