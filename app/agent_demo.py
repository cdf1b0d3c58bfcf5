"""The watch stage as a self-contained demo: a synthetic product video with defects, a local broker, the agent,
and a live terminal view of the MQTT messages as they arrive. No camera, no external broker.

`run_agent_demo(model, out)` is what `make demo` (through `mae-ad demo`) and `mae-ad agent-demo` call.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

import numpy as np

log = logging.getLogger(__name__)

DEFECT_KINDS = ("crack", "spot", "scratch")


def write_product_video(path: str | Path, n_frames: int = 150, fps: float = 10.0, size: int = 160,
                        defect_segments: list[tuple[int, int]] | None = None, seed: int = 0) -> dict[str, Any]:
    """Write an MJPEG .avi of the synthetic product: a new normal part every frame, and during each
    [start, end) segment one defective part (the same defect on every frame of the segment).

    Returns {"path", "frames", "fps", "size", "defect_segments", "defect_frames"}.
    """
    import cv2

    from mae_ad.synthetic import add_defect, normal_tile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if defect_segments is None:
        defect_segments = [(n_frames * 3 // 10, n_frames * 3 // 10 + 15), (n_frames * 7 // 10,
                                                                            n_frames * 7 // 10 + 15)]
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fourcc = cv2.VideoWriter_fourcc(*"MJPG")  # type: ignore[attr-defined]
    writer = cv2.VideoWriter(str(tmp), fourcc, fps, (size, size))
    if not writer.isOpened():
        raise RuntimeError(f"{path}: OpenCV cannot write MJPEG video")
    rng = np.random.default_rng(seed)
    defect_frames: list[int] = []
    try:
        for i in range(n_frames):
            img = normal_tile(rng, size)
            for k, (a, b) in enumerate(defect_segments):
                if a <= i < b:
                    drng = np.random.default_rng(seed * 1000 + k)  # same defect on every frame of the segment
                    img, _ = add_defect(img, DEFECT_KINDS[k % len(DEFECT_KINDS)], drng)
                    defect_frames.append(i)
            writer.write(img)
    finally:
        writer.release()
    tmp.replace(path)
    return {"path": str(path), "frames": n_frames, "fps": fps, "size": size,
            "defect_segments": [list(s) for s in defect_segments], "defect_frames": defect_frames}


class LiveView:
    """Subscribes to `<prefix>/<agent_id>/#` and writes one line per message (JSON summarised, JPEGs by size)."""

    def __init__(self, host: str, port: int, base: str, protocol: str = "5", stream: TextIO | None = None,
                 quiet_scores_every: int = 1):
        self.host, self.port, self.base, self.protocol = host, port, base, protocol
        self.stream = stream
        self.counts: Counter[str] = Counter()
        self.alert_events: list[dict[str, Any]] = []
        self.messages: list[tuple[str, bytes]] = []
        self._client: Any = None
        self._score_n = 0
        self.quiet_scores_every = quiet_scores_every
        self._connected = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> LiveView:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        proto = mqtt.MQTTv5 if self.protocol == "5" else mqtt.MQTTv311
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"mae-ad-view-{time.time_ns()}", protocol=proto)

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            client.subscribe(self.base + "/#", qos=1)
            self._connected.set()

        c.on_connect = on_connect
        c.on_message = self._on_message
        c.connect(self.host, self.port, keepalive=30)
        c.loop_start()
        self._client = c
        if not self._connected.wait(10):
            raise RuntimeError(f"live view: cannot connect to {self.host}:{self.port}")
        return self

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        sub = msg.topic[len(self.base) + 1:]
        kind = sub.split("/")[-1]
        with self._lock:
            self.counts[kind] += 1
            self.messages.append((msg.topic, msg.payload))
        line = None
        if kind in ("heatmap", "snapshot"):
            line = f"{sub:<24} JPEG {len(msg.payload) / 1024:.1f} kB"
        elif kind == "score":
            self._score_n += 1
            d = json.loads(msg.payload)
            flag = "ANOMALOUS" if d["anomalous"] else "ok"
            if d["anomalous"] or self._score_n % self.quiet_scores_every == 0:
                line = (f"{sub:<24} frame {d['frame_id']:>5}  score {d['score']:.4f} / {d['threshold']:.4f}  "
                        f"{flag:<9}  engine {d['latency_ms'].get('engine', 0):.1f} ms")
        elif kind == "alert":
            d = json.loads(msg.payload)
            with self._lock:
                self.alert_events.append(d)
            line = (f"{sub:<24} ** ALERT {d['event'].upper():<6} id {d['id']}  peak {d['peak_score']:.4f}  "
                    f"box {d['box']}" + (f"  {d['duration_s']} s" if d["event"] == "end" else ""))
        elif kind == "stats":
            d = json.loads(msg.payload)
            cams = " ".join(f"{n}:{c['fps']}fps/{c['dropped']}drop" for n, c in d["cameras"].items())
            line = (f"{sub:<24} {cams}  engine {d['engine']['ms_per_batch']} ms/batch  spool {d['spool_depth']}  "
                    f"rss {d['rss_mb']} MB")
        else:
            line = f"{sub:<24} {msg.payload[:120].decode('utf-8', 'replace')}"
        if line and self.stream is not None:
            self.stream.write(time.strftime("%H:%M:%S ") + line + "\n")
            self.stream.flush()

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None


def _guess_backend(model: str | None) -> str:
    if model is None:
        return "brightness"
    p = str(model).lower()
    if p.endswith(".onnx"):
        return "onnxruntime"
    if p.endswith((".plan", ".engine", ".trt")):
        return "tensorrt"
    return "torch"


def _free_or_any(port: int) -> int:
    """`port` if nothing listens on it on 127.0.0.1, else 0 (the system picks one)."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as http.server does: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return 0
    return port


def _announce_page(agent: Any, stream: TextIO | None, timeout_s: float = 60.0) -> None:
    """Print the live view's address once its server runs (from a helper thread; the agent blocks the caller)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not agent.stop_event.is_set():
        web = agent.web
        if web is not None and web._thread.is_alive():
            if stream is not None:
                stream.write(f"live view: {web.url}  (open it in a browser while the agent runs)\n")
                stream.flush()
            return
        time.sleep(0.05)


def run_agent_demo(model: str | Path | None, out: str | Path, seconds: float = 20.0, backend: str | None = None,
                   broker: str = "auto", threshold: float | None = None, stream: TextIO | None = sys.stdout,
                   video_frames: int = 150, fps: float = 10.0, web_port: int = 9109) -> dict[str, Any]:
    """Write a product video, start a broker, run the agent on the video for `seconds`, print the messages as they
    arrive and the live view's address (127.0.0.1:`web_port`, another free port if that one is taken; read-only:
    no action token), stop everything and return a summary."""
    from agent.broker import start_local_broker
    from agent.config import agent_config_from_dict
    from agent.loop import Agent

    from .engines import open_engine

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    video = write_product_video(out / "product.avi", n_frames=video_frames, fps=fps)
    kind = backend or _guess_backend(str(model) if model is not None else None)
    brk, protocol = start_local_broker(out / "broker", broker)
    agent_id = "demo"
    cfg = agent_config_from_dict({
        "agent_id": agent_id,
        "model": {"backend": kind, "path": str(model) if model is not None else None, "threshold": threshold},
        "cameras": [{"name": "line1", "source": video["path"], "loop": True}],
        "alerts": {"open_after": 2, "close_after": 3, "update_interval_s": 0.5},
        "evidence": {"dir": str(out / "evidence"), "max_alerts": 50},
        "mqtt": {"host": "127.0.0.1", "port": brk.port, "protocol": protocol, "score_interval_s": 0.5,
                 "stats_interval_s": 5.0, "spool": {"dir": str(out / "spool")}},
        "web": {"enabled": True, "host": "127.0.0.1", "port": _free_or_any(web_port)},
    }, "<agent demo>")
    view = LiveView("127.0.0.1", brk.port, f"mae-ad/{agent_id}", protocol, stream)
    agent = Agent(cfg, engines=open_engine)
    try:
        view.start()
        if stream is not None:
            stream.write(f"agent demo: {video['path']} ({video['frames']} frames at {fps:g} fps, defects in frames "
                         f"{video['defect_segments']}, played in a loop: each pass raises its alerts again), "
                         f"engine {kind}, broker "
                         f"{type(brk).__name__} on 127.0.0.1:{brk.port}, {seconds:g} s\n")
        threading.Thread(target=_announce_page, args=(agent, stream), name="announce", daemon=True).start()
        agent.run(duration_s=seconds, install_signals=threading.current_thread() is threading.main_thread())
        time.sleep(0.5)  # let the last messages arrive
    finally:
        view.stop()
        brk.stop()
    starts = {e["id"] for e in view.alert_events if e["event"] == "start"}
    summary = {
        "broker": type(brk).__name__, "protocol": protocol, "backend": kind, "video": video["path"],
        "seconds": seconds, "frames_scored": agent.frames_scored, "alerts_raised": agent.alerts_raised,
        "alerts_received": len(starts), "first_score_s": agent.first_score_s, "messages": dict(view.counts),
        "evidence_dir": str(out / "evidence"), "defect_segments": video["defect_segments"],
        "video_passes": round(seconds * fps / video["frames"], 2),  # the file loops: alerts repeat per pass
        "live_view": agent.web.url if agent.web is not None else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
