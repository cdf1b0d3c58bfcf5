"""The live view: a page a line engineer leaves open next to the line, served by the agent itself.

What it shows, per camera: the newest scored frame with the anomaly heatmap and the threshold contour blended into
the region the model sees, the score of the last `web.history_s` seconds against the threshold, the camera's state,
frames per second (read and scored), dropped frames and engine latency. Then the open alerts and the last
`web.alerts_kept` closed ones (start/end, peak score, box, evidence thumbnail; a click shows the evidence frame and
its heatmap), and the agent's health (MQTT connection and last error, spool depth, model, threshold, uptime).

Operator actions (pause, resume, snapshot: the MQTT command topic's own commands, run through the same handler)
need the token of `web.token_env` / `web.token_file` as `Authorization: Bearer <token>`; without a token configured
the page is read-only and every action answers 403, with a wrong or missing token 401.

Cost to the loop: one `LiveState.on_frame` call per scored frame that keeps references (the frame, the model-size
RGB image, a copy of the model-size map) and appends to a bounded deque. Every JPEG is encoded in the HTTP threads,
only when a page asks for it, and once per frame id (cached). No internet at run time: the page's HTML, script and
style are package data in `agent/static/`.

HTTP API (JSON unless noted):
  GET  /                               the page
  GET  /static/<file>                  its script and style
  GET  /api/state                      cameras, open and recent alerts, health
  GET  /api/scores?since=<unix s>      per camera [[t, score, threshold], ...] newer than `since`
  GET  /api/frame/<camera>.jpg         JPEG of the newest scored frame; ?overlay=0 without the heatmap;
                                       ?after=<frame id>: 204 when that is still the newest
  GET  /api/alerts/<id>/<kind>.jpg     evidence: kind = frame | overlay | thumb (from the evidence folder)
  POST /api/token                      204 when the bearer token is right (the page's "unlock"), else 401/403
  POST /api/cameras/<camera>/<action>  action = pause | resume | snapshot
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from mae_ad.contract import UserError

from .config import WebSection
from .decide import iso

log = logging.getLogger(__name__)

ACTIONS = ("pause", "resume", "snapshot")
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
MAX_FRAME_WIDTH = 960  # live frames wider than this are scaled down for the page
THUMB_WIDTH = 160
FPS_WINDOW_S = 5.0
_ALERT_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(slots=True)
class Scored:
    """The newest scored frame of a camera, as the loop left it (references, no copies but the map)."""

    frame_id: int
    wall_time: float
    image: np.ndarray  # the camera frame, in the camera's channel order
    colour: str
    crop: Any  # agent.preprocess.Crop: where the model input came from
    amap: np.ndarray  # float32 [S, S] anomaly map
    threshold: float
    score: float
    anomalous: bool
    box: list[int] | None  # frame pixels
    latency_s: dict[str, float]  # per stage, seconds (the loop's own dict for this frame)


class LiveState:
    """What the page shows that the loop does not keep by itself: the newest scored frame and the score history of
    every camera, and the alert list. Written by the loop (`on_frame`), read by the HTTP threads."""

    def __init__(self, history_s: float = 300.0, alerts_kept: int = 20, max_points: int = 20000):
        self.history_s = history_s
        self.lock = threading.Lock()
        self.latest: dict[str, Scored] = {}
        self.history: dict[str, deque[tuple[float, float, float]]] = {}
        self.open_alerts: dict[str, dict[str, Any]] = {}
        self.closed_alerts: deque[dict[str, Any]] = deque(maxlen=alerts_kept)
        self.max_points = max_points

    def on_frame(self, camera: str, frame_id: int, wall_time: float, image: np.ndarray, colour: str, crop: Any,
                 amap: np.ndarray, score: float, threshold: float, box: list[int] | None,
                 latency_s: dict[str, float], events: list[dict[str, Any]]) -> None:
        """Record one scored frame (called by the loop thread; O(1) but for one copy of the model-size map)."""
        m = amap.reshape(amap.shape[-2], amap.shape[-1]).copy()  # engines may reuse their output buffer
        s = Scored(frame_id, wall_time, image, colour, crop, m, threshold, score, score > threshold, box, latency_s)
        oldest = wall_time - self.history_s
        with self.lock:
            self.latest[camera] = s
            h = self.history.get(camera)
            if h is None:
                h = self.history[camera] = deque(maxlen=self.max_points)
            h.append((wall_time, score, threshold))
            while h[0][0] < oldest:
                h.popleft()
            for ev in events:
                self._on_alert(ev)

    def _on_alert(self, ev: dict[str, Any]) -> None:
        row = {k: ev.get(k) for k in ("id", "camera", "start", "peak_score", "box", "threshold", "frames",
                                      "start_frame_id", "peak_frame_id")}
        old = self.open_alerts.get(ev["id"], {})
        row["evidence"] = ev.get("evidence") or old.get("evidence")
        if ev["event"] == "end":
            self.open_alerts.pop(ev["id"], None)
            row.update(end=ev.get("end"), duration_s=ev.get("duration_s"), reason=ev.get("reason"), open=False)
            self.closed_alerts.appendleft(row)
        else:
            row.update(end=None, open=True)
            self.open_alerts[ev["id"]] = row

    def scores_since(self, since: float) -> dict[str, list[list[float]]]:
        """Points newer than `since` (compared as sent, in ms, so asking again with the last time received gets no
        point twice). Walks back from the newest point: the cost is the number of new points."""
        raw: dict[str, list[tuple[float, float, float]]] = {}
        with self.lock:  # only the walk under the lock; the formatting after it
            for cam, h in self.history.items():
                new = []
                for p in reversed(h):
                    if round(p[0], 3) <= since:
                        break
                    new.append(p)
                raw[cam] = new
        return {cam: [[round(t, 3), round(s, 6), round(th, 6)] for t, s, th in reversed(pts)]
                for cam, pts in raw.items()}

    def alerts(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        with self.lock:
            return [dict(a) for a in self.open_alerts.values()], [dict(a) for a in self.closed_alerts]

    def evidence_dir(self, alert_id: str) -> str | None:
        with self.lock:
            for a in (*self.open_alerts.values(), *self.closed_alerts):
                if a["id"] == alert_id:
                    return a.get("evidence")
        return None


def render_frame(s: Scored, with_overlay: bool = True, max_width: int = MAX_FRAME_WIDTH) -> np.ndarray:
    """The camera frame as BGR uint8 with, inside the model's region, the heatmap (scaled so the threshold sits
    mid-scale, blended where the map is above a quarter of the threshold), the threshold contour (white) and the
    alert box (red); the region itself is outlined in grey. Scaled to at most `max_width` pixels wide (first, so the
    overlay is drawn at the size that is sent)."""
    import cv2

    img = s.image
    fh, fw = img.shape[0], img.shape[1]
    f = min(1.0, max_width / fw)
    if f < 1.0:
        img = cv2.resize(img, (max_width, max(1, int(round(fh * f)))), interpolation=cv2.INTER_LINEAR)
    if img.ndim == 2 or img.shape[2] == 1:
        bgr = cv2.cvtColor(img.reshape(img.shape[0], img.shape[1]), cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        bgr = cv2.cvtColor(img, cv2.COLOR_RGBA2BGR if s.colour == "rgb" else cv2.COLOR_BGRA2BGR)
    elif s.colour == "rgb":
        bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    else:
        bgr = img.copy() if f == 1.0 else img
    if not with_overlay:
        return bgr
    c = s.crop
    x0, y0 = int(c.x * f), int(c.y * f)
    w = max(1, min(bgr.shape[1] - x0, int(round(c.w * f))))
    h = max(1, min(bgr.shape[0] - y0, int(round(c.h * f))))
    roi = bgr[y0:y0 + h, x0:x0 + w]
    thr = s.threshold if s.threshold > 0 else float(s.amap.max() or 1.0)
    # colours and weights at the map's size (small), then scaled up by OpenCV (which releases the GIL)
    heat = cv2.applyColorMap(np.clip(s.amap * (127.5 / thr), 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    weight = np.clip((s.amap * (1.0 / thr) - 0.25) * (0.6 / 0.75), 0.0, 0.6).astype(np.float32)
    heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    alpha = cv2.resize(weight, (w, h), interpolation=cv2.INTER_LINEAR)
    roi[:] = cv2.blendLinear(roi, heat, 1.0 - alpha, alpha)
    m = cv2.resize(s.amap, (w, h), interpolation=cv2.INTER_LINEAR)
    _, mask = cv2.threshold(m, s.threshold, 1, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        cv2.drawContours(bgr, contours, -1, (255, 255, 255), max(1, w // 200), offset=(x0, y0))
    cv2.rectangle(bgr, (x0, y0), (x0 + w - 1, y0 + h - 1), (160, 160, 160), 1)
    if s.box is not None and s.anomalous:
        b = [int(round(v * f)) for v in s.box]
        t = max(1, bgr.shape[1] // 320)
        pad = 2 * t + 1  # around the contour, not over it
        cv2.rectangle(bgr, (b[0] - pad, b[1] - pad), (b[2] - 1 + pad, b[3] - 1 + pad), (0, 0, 255), t)
    return bgr


def _encode(bgr: np.ndarray, quality: int = 80) -> bytes:
    from .evidence import encode_jpeg

    return encode_jpeg(bgr, quality)


class WebView:
    """The live view of one agent: its state (`state.on_frame` is the loop's hook) and its HTTP server.

    `agent` is an `agent.loop.Agent`; read here: cams (cam, reader, paused), threshold_of, link, spool, backend,
    model_id, t_start, frames_scored, alerts_raised, health(), _on_command. Raises UserError when the token source
    is missing or the port cannot be bound.
    """

    def __init__(self, agent: Any, cfg: WebSection):
        self.agent, self.cfg = agent, cfg
        self._token = cfg.token()  # never logged
        self.state = LiveState(cfg.history_s, cfg.alerts_kept)
        self._frame_cache: dict[tuple[str, bool], tuple[int, bytes]] = {}
        self._frame_locks: dict[tuple[str, bool], threading.Lock] = {}
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.requests = 0
        self.encodes = 0
        self._scored_samples: dict[str, deque[tuple[float, int]]] = {}
        self.serve_cpu_s = 0.0  # CPU time of the HTTP threads inside the handlers (thread_time)
        self.hook_s = 0.0  # wall time of the loop's hook (on_frame)
        self.hook_calls = 0
        try:
            self.server = ThreadingHTTPServer((cfg.host, cfg.port), self._handler())
        except OSError as e:
            raise UserError(f"web.port: cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="web", daemon=True)

    @property
    def url(self) -> str:
        host = self.cfg.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    def start(self) -> None:
        self._thread.start()
        log.info("live view: %s (%s)", self.url, "actions need the token" if self._token else
                 "read-only: no web.token_env / web.token_file configured")

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() would wait forever for a server that never started
            self.server.shutdown()
        self.server.server_close()

    # --- the loop's hook ---------------------------------------------------------------------------------------
    def on_frame(self, cs: Any, f: Any, crop: Any, amap: np.ndarray, score: float, threshold: float,
                 box: list[int] | None, latency_s: dict[str, float], events: list[dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        self.state.on_frame(cs.cam.name, f.frame_id, f.wall_time, f.image, cs.cam.colour, crop, amap, score,
                            threshold, box, latency_s, events)
        self.hook_s += time.perf_counter() - t0
        self.hook_calls += 1

    # --- answers -----------------------------------------------------------------------------------------------
    def state_json(self) -> dict[str, Any]:
        a = self.agent
        cams = {}
        for name, cs in list(a.cams.items()):
            s = self.state.latest.get(name)
            st = cs.reader.stats
            thr, src = a.threshold_of(cs)
            cams[name] = {
                "status": "paused" if cs.paused else cs.reader.status,
                "paused": bool(cs.paused),
                "fps_read": round(cs.reader.fps(), 2), "fps_scored": self._scored_fps(name, cs.scored),
                "frames": st.frames, "dropped": st.dropped, "scored": cs.scored, "anomalous": cs.anomalous,
                "reconnects": st.reconnects, "threshold": thr, "threshold_source": src,
                "frame_id": s.frame_id if s else None, "frame_time": iso(s.wall_time) if s else None,
                "score": round(s.score, 6) if s else None, "is_anomalous": s.anomalous if s else False,
                "latency_ms": {k: round(v * 1000, 3) for k, v in s.latency_s.items()} if s else {},
                "alert_open": cs.tracker.alert.id if cs.tracker.alert else None,
            }
        open_a, closed_a = self.state.alerts()
        link = a.link
        ok, _ = a.health()
        health = {
            "ok": ok, "agent_id": a.cfg.agent_id,
            "mqtt_connected": bool(link and link.connected),
            "mqtt_broker": f"{a.cfg.mqtt.host}:{a.cfg.mqtt.port}",
            "mqtt_error": link.last_error if link else None,
            "spool_depth": a.spool.depth if hasattr(a, "spool") else None,
            "spool_dropped": a.spool.dropped if hasattr(a, "spool") else None,
            "model_id": a.model_id, "backend": getattr(a.backend, "name", "?"),
            "default_threshold": a.default_threshold,
            "uptime_s": round(time.monotonic() - a.t_start, 1),
            "frames_scored": a.frames_scored, "alerts_raised": a.alerts_raised,
            "web": {"requests": self.requests, "jpeg_encodes": self.encodes,
                    "serve_cpu_s": round(self.serve_cpu_s, 4), "hook_calls": self.hook_calls,
                    "hook_us_mean": round(1e6 * self.hook_s / self.hook_calls, 2) if self.hook_calls else None},
        }
        return {"time": time.time(), "actions": self._token is not None, "cameras": cams,
                "alerts": {"open": [self._alert_row(r) for r in open_a],
                           "recent": [self._alert_row(r) for r in closed_a]},
                "health": health, "history_s": self.cfg.history_s}

    def _scored_fps(self, camera: str, scored: int) -> float | None:
        """Frames scored per second over the last ~FPS_WINDOW_S s, from the camera's counter as seen by the state
        requests (None until two requests a moment apart have seen it). Costs the loop nothing."""
        now = time.monotonic()
        with self._cache_lock:
            q = self._scored_samples.setdefault(camera, deque(maxlen=64))
            q.append((now, scored))
            while len(q) > 2 and q[1][0] <= now - FPS_WINDOW_S:
                q.popleft()
            t0, n0 = q[0]
        return round((scored - n0) / (now - t0), 2) if now - t0 >= 0.2 else None

    @staticmethod
    def _alert_row(r: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in r.items() if k != "evidence"}
        out["has_evidence"] = bool(r.get("evidence"))
        return out

    def frame_jpeg(self, camera: str, with_overlay: bool) -> tuple[int, bytes] | None:
        """(frame id, JPEG) of the newest scored frame; encoded once per frame id and overlay choice."""
        s = self.state.latest.get(camera)
        if s is None:
            return None
        key = (camera, with_overlay)
        with self._cache_lock:
            lock = self._frame_locks.setdefault(key, threading.Lock())
        with lock:  # two pages asking for the same frame encode it once
            hit = self._frame_cache.get(key)
            if hit is not None and hit[0] == s.frame_id:
                return hit
            data = _encode(render_frame(s, with_overlay))
            self.encodes += 1
            self._frame_cache[key] = (s.frame_id, data)
            return s.frame_id, data

    def evidence_jpeg(self, alert_id: str, kind: str) -> bytes | None:
        """The alert's evidence: frame / overlay (the peak's if there is one, else the start's) or a thumbnail."""
        folder = self.state.evidence_dir(alert_id)
        if not folder:
            return None
        d = Path(folder)
        name = "frame" if kind in ("frame", "thumb") else "overlay"
        path = next((d / f"{name}_{tag}.jpg" for tag in ("peak", "start") if (d / f"{name}_{tag}.jpg").is_file()),
                    None)
        if path is None:
            return None
        data = path.read_bytes()
        if kind != "thumb":
            return data
        key = f"{alert_id}:{path.name}:{path.stat().st_mtime_ns}"
        with self._cache_lock:
            if key in self._thumbs:
                return self._thumbs[key]
        import cv2

        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            return None
        if img.shape[1] > THUMB_WIDTH:
            img = cv2.resize(img, (THUMB_WIDTH, max(1, img.shape[0] * THUMB_WIDTH // img.shape[1])),
                             interpolation=cv2.INTER_AREA)
        thumb = _encode(img, 75)
        with self._cache_lock:
            self._thumbs[key] = thumb
            while len(self._thumbs) > 4 * self.cfg.alerts_kept:
                self._thumbs.popitem(last=False)
        return thumb

    def authorise(self, header: str | None) -> int:
        """200 when `header` is 'Bearer <the token>', 401 when it is missing or wrong, 403 when no token is set."""
        if self._token is None:
            return 403
        if not header or not header.startswith("Bearer "):
            return 401
        given = header[len("Bearer "):].strip().encode()
        return 200 if hmac.compare_digest(given, self._token.encode()) else 401

    def action(self, camera: str, action: str) -> tuple[int, dict[str, Any]]:
        """Run pause / resume / snapshot through the agent's command handler (the MQTT command path)."""
        if camera != "all" and camera not in self.agent.cams:
            return 404, {"ok": False, "error": f"unknown camera {camera!r}"}
        if action not in ACTIONS:
            return 404, {"ok": False, "error": f"unknown action {action!r}; use {', '.join(ACTIONS)}"}
        reply = self.agent._on_command(camera, action, b"")
        log.info("live view: %s %s", action, camera)
        if reply is None:  # snapshot: the loop publishes it with the next frame (MQTT snapshot and heatmap topics)
            return 202, {"ok": True, "queued": True, "camera": camera, "action": action}
        return (200 if reply.get("ok") else 400), reply

    def _count(self, cpu_s: float) -> None:
        with self._cache_lock:
            self.requests += 1
            self.serve_cpu_s += cpu_s

    # --- HTTP --------------------------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        view = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "mae-ad-live"
            protocol_version = "HTTP/1.1"  # keep-alive: one thread per page connection, not per request
            timeout = 60  # seconds an idle connection keeps its thread

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                t0 = time.thread_time()
                try:
                    self._get()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                except Exception as e:  # never kill the server thread
                    log.exception("live view: GET %s failed", urlsplit(self.path).path)
                    self._send(500, f"{type(e).__name__}\n".encode(), "text/plain")
                finally:
                    view._count(time.thread_time() - t0)

            def do_POST(self) -> None:  # noqa: N802
                t0 = time.thread_time()
                try:
                    self._post()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                except Exception as e:
                    log.exception("live view: POST %s failed", urlsplit(self.path).path)
                    self._json(500, {"ok": False, "error": type(e).__name__})
                finally:
                    view._count(time.thread_time() - t0)

            def _get(self) -> None:
                u = urlsplit(self.path)
                path, q = u.path, parse_qs(u.query)
                if path in ("/", "/index.html"):
                    self._static("index.html")
                elif path.startswith("/static/"):
                    self._static(path[len("/static/"):])
                elif path == "/api/state":
                    self._json(200, view.state_json())
                elif path == "/api/scores":
                    try:
                        since = float(q.get("since", ["0"])[0])
                    except ValueError:
                        self._json(400, {"error": "since: expected a number (unix seconds)"})
                        return
                    self._json(200, {"time": time.time(), "cameras": view.state.scores_since(since)})
                elif path.startswith("/api/frame/") and path.endswith(".jpg"):
                    camera = path[len("/api/frame/"):-len(".jpg")]
                    after = q.get("after", [""])[0]
                    s = view.state.latest.get(camera)
                    if s is not None and after == str(s.frame_id):  # the page has this one already
                        self._send(204, b"", "text/plain")
                        return
                    got = view.frame_jpeg(camera, q.get("overlay", ["1"])[0] != "0")
                    if got is None:
                        self._send(404, b"no scored frame yet\n", "text/plain")
                    else:
                        self._send(200, got[1], "image/jpeg", {"X-Frame-Id": str(got[0])})
                elif path.startswith("/api/alerts/") and path.endswith(".jpg"):
                    parts = path[len("/api/alerts/"):-len(".jpg")].split("/")
                    if len(parts) != 2 or not _ALERT_ID_RE.match(parts[0]) or parts[1] not in (
                            "frame", "overlay", "thumb"):
                        self._send(404, b"not found\n", "text/plain")
                        return
                    data = view.evidence_jpeg(parts[0], parts[1])
                    if data is None:
                        self._send(404, b"no evidence for this alert\n", "text/plain")
                    else:  # the page's URLs carry the peak's frame id, so a URL's image does not change
                        self._send(200, data, "image/jpeg", {"Cache-Control": "private, max-age=600"})
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _post(self) -> None:
                path = urlsplit(self.path).path
                n = int(self.headers.get("Content-Length") or 0)
                if n > 65536:  # actions carry no body; do not read a big one, and do not reuse the connection
                    self.close_connection = True
                elif n:
                    self.rfile.read(n)
                code = view.authorise(self.headers.get("Authorization"))
                if path == "/api/token":
                    if code == 200:
                        self._send(204, b"", "text/plain")
                    else:
                        self._json(code, _refusal(code))
                    return
                parts = path.strip("/").split("/")
                if len(parts) != 4 or parts[:2] != ["api", "cameras"]:
                    self._json(404, {"ok": False, "error": "not found"})
                    return
                if code != 200:
                    log.warning("live view: %s %s refused (%d) from %s", parts[3], parts[2], code,
                                self.client_address[0])
                    self._json(code, _refusal(code))
                    return
                status, body = view.action(parts[2], parts[3])
                self._json(status, body)

            def _static(self, name: str) -> None:
                data = _static_file(name)
                if data is None:
                    self._send(404, b"not found\n", "text/plain")
                else:
                    self._send(200, data, STATIC_TYPES[Path(name).suffix], {"Cache-Control": "no-cache"})

            def _json(self, code: int, body: Any) -> None:
                self._send(code, json.dumps(body).encode(), "application/json")

            def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                extra = extra or {}
                if "Cache-Control" not in extra and ctype in ("application/json", "image/jpeg"):
                    self.send_header("Cache-Control", "no-store")
                for k, v in extra.items():
                    self.send_header(k, v)
                if code == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="mae-ad live view"')
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no headers, so no token
                log.debug("live view http: " + format, *args)

        return Handler


def _refusal(code: int) -> dict[str, Any]:
    if code == 403:
        return {"ok": False, "error": "actions are disabled: the agent has no web.token_env / web.token_file"}
    return {"ok": False, "error": "a valid token is needed (Authorization: Bearer <token>)"}


def _static_file(name: str) -> bytes | None:
    """A file of agent/static/ by plain name (no folders, known suffixes only), or None."""
    if "/" in name or "\\" in name or name.startswith(".") or Path(name).suffix not in STATIC_TYPES:
        return None
    ref = resources.files("agent").joinpath("static").joinpath(name)
    try:
        return ref.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
