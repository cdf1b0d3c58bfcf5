"""The agent: readers -> newest frame of every camera as one batch -> engine -> decisions -> MQTT and evidence.

One loop thread drives the engine; each camera has its own reader thread (agent.capture) that only keeps the
newest frame; paho runs its own network thread. SIGTERM/SIGINT stop the loop: open alerts are closed (reason
`shutdown`), every camera's retained status is set to `offline`, the spool is flushed for up to
`mqtt.shutdown_flush_s`, `offline` is published, cameras are released and `run()` returns 0. A camera that stops
delivering (reconnecting, stalled, failed, ended) closes its open alert at once (reason `camera_lost` or
`source_ended`, ending at its last scored frame). Every log line, MQTT status and /healthz text is passed through
`agent.config.redact` (credentials masked).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mae_ad.contract import UserError
from mae_ad.tiling import TileSpec, working_size

from .backend import Backend, EngineOpener, model_threshold, open_backend
from .capture import ENDED, FAILED, PAUSED, STREAMING, BadFrame, CameraReader, Frame, opencv_line
from .commands import NO_VALUE_COMMANDS, check_no_value, check_threshold, parse_threshold
from .config import AgentConfig, CameraSection, install_log_redaction, redact
from .decide import AlertTracker, iso
from .evidence import EvidenceStore, encode_jpeg
from .mqtt import MqttLink
from .mqtt import preflight as mqtt_preflight
from .preprocess import anomalous_box, box_to_frame, overlay, roi_outside
from .scoring import FramePolicy, score_frames
from .spool import Spool

log = logging.getLogger(__name__)

STAGES = ("capture", "preprocess", "engine", "decide", "publish")
OFFLINE = "offline"  # a camera's retained status once the agent has stopped


def rss_mb() -> float:
    try:
        import psutil

        return float(psutil.Process().memory_info().rss) / 2**20
    except ImportError:  # pragma: no cover - psutil is in the agent extra
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class StageTimer:
    """Per-stage latency sums: for the interval (stats topic) and since start (metrics, bench)."""

    def __init__(self) -> None:
        self.total = {s: 0.0 for s in STAGES}
        self.count = {s: 0 for s in STAGES}
        self.win = {s: 0.0 for s in STAGES}
        self.win_count = {s: 0 for s in STAGES}

    def add(self, stage: str, seconds: float, n: int = 1) -> None:
        self.total[stage] += seconds * n
        self.count[stage] += n
        self.win[stage] += seconds * n
        self.win_count[stage] += n

    def window_ms(self) -> dict[str, float | None]:
        out = {s: (round(1000 * self.win[s] / self.win_count[s], 3) if self.win_count[s] else None) for s in STAGES}
        self.win = {s: 0.0 for s in STAGES}
        self.win_count = {s: 0 for s in STAGES}
        return out

    def mean_ms(self) -> dict[str, float | None]:
        return {s: (1000 * self.total[s] / self.count[s] if self.count[s] else None) for s in STAGES}


@dataclass
class CameraState:
    cam: CameraSection
    reader: CameraReader
    tracker: AlertTracker
    threshold_cmd: float | None = None  # set by the threshold command
    paused: bool = False
    scored: int = 0
    anomalous: int = 0
    last_score_pub: float = 0.0
    last_heatmap_pub: float = 0.0
    snapshot_requests: list[Any] = field(default_factory=list)


class Agent:
    def __init__(self, cfg: AgentConfig, backend: Backend | None = None, engines: EngineOpener | None = None):
        """backend: an open engine to drive (the caller closes it); else `cfg.model` is opened at start, a real
        engine through `engines` (`trt.backends.open_backend`, which `mae-ad run` passes)."""
        self.cfg = cfg
        self._backend_given = backend
        self._engines = engines
        self.backend: Backend | None = backend
        self.stop_event = threading.Event()
        self.new_frame = threading.Event()
        self.cams: dict[str, CameraState] = {}
        self.timer = StageTimer()
        self.link: MqttLink | None = None
        self.evidence = EvidenceStore(cfg.evidence)
        self.health_server: Any = None
        self.web: Any = None  # agent.web.WebView when web.enabled
        self.t_start = time.monotonic()
        self.first_score_s: float | None = None
        self.last_tick = time.monotonic()
        self.batches = 0
        self.frames_scored = 0
        # (monotonic end of a loop turn, frames it scored), newest last: a benchmark's rate between completions
        self.turns: collections.deque[tuple[float, int]] = collections.deque(maxlen=4096)
        self.alerts_raised = 0
        self.alert_messages = 0
        self.alert_ids: list[str] = []
        self.model_id = "?"
        self._lock = threading.Lock()
        self._engine_win = [0.0, 0, 0]  # engine seconds, batches, frames since the last stats message
        self._last_stats = time.monotonic()
        self.default_threshold: float | None = None
        self.policy = FramePolicy()  # the model's resize policy, score rule and tiling: set from its metadata
        self._roi_refused: set[str] = set()  # cameras whose ROI lies outside their frames (logged once)

    @property
    def tile(self) -> TileSpec | None:
        """The model's tiling (input.resize=tile), else None."""
        return self.policy.tile

    # --- thresholds -------------------------------------------------------------------------------------------
    def threshold_of(self, cs: CameraState) -> tuple[float, str]:
        for value, source in ((cs.threshold_cmd, "command"), (cs.cam.threshold, "camera"),
                              (self.cfg.model.threshold, "model.threshold"), (self.default_threshold, "model")):
            if value is not None:
                return float(value), source
        raise AssertionError("threshold checked at start")

    # --- setup ------------------------------------------------------------------------------------------------
    def _setup(self) -> None:
        cfg = self.cfg
        install_log_redaction()
        log.info("%s", opencv_line())
        mqtt_preflight(cfg.mqtt)  # TLS files and password source named before anything starts
        if self.backend is None:
            self.backend = open_backend(cfg.model, self._engines)
        b = self.backend
        self.model_id = b.meta.model_id
        self.default_threshold = model_threshold(b)
        # the model's resize policy and score rule, from its metadata (models without it were squashed)
        self.policy = FramePolicy.of(b, f"model.path={cfg.model.path}")
        if self.tile is not None:
            self._check_tiles(cfg.cameras)
        for i, cam in enumerate(cfg.cameras):
            if not cam.enabled:
                continue
            if cam.threshold is None and cfg.model.threshold is None and self.default_threshold is None:
                raise UserError(f"cameras.{i}.threshold: the model {cfg.model.path} carries no calibrated threshold; "
                                "set model.threshold or a per-camera threshold")
            open_after = cam.open_after or cfg.alerts.open_after
            close_after = cam.close_after or cfg.alerts.close_after
            reader = CameraReader(cam, cfg.capture, self.new_frame, on_status=self._on_camera_status)
            self.cams[cam.name] = CameraState(cam, reader, AlertTracker(cam.name, open_after, close_after,
                                                                        cfg.alerts.update_interval_s))
        if not self.cams:
            raise UserError("cameras: every camera is disabled")
        spool_dir = os.path.join(cfg.mqtt.spool.dir)
        self.spool = Spool(spool_dir, cfg.mqtt.spool.max_messages, cfg.mqtt.spool.on_full, cfg.mqtt.spool.fsync)
        self.link = MqttLink(cfg.mqtt, cfg.agent_id, self.spool, on_command=self._on_command,
                             on_connected=self._on_connected)
        if cfg.web.enabled:
            from .web import WebView

            self.web = WebView(self, cfg.web)
        tiling = "" if self.tile is None else \
            f", tiled: scale {self.tile.scale:g}, overlap >= {self.tile.overlap} px, one engine batch per frame"
        thr = ", ".join(f"{n} {t:.5g} ({src})" for n, (t, src) in
                        ((n, self.threshold_of(cs)) for n, cs in self.cams.items()))
        log.info("agent %s: model %s on %s (input %d px%s; calibrated threshold %s), %d camera(s); thresholds: %s",
                 cfg.agent_id, self.model_id, b.name, b.input_size, tiling, self.default_threshold, len(self.cams), thr)

    def _check_tiles(self, cameras: list[CameraSection]) -> None:
        """A tiled model: every camera's ROI (or its requested capture size), scaled by the tile scale, must hold
        at least one tile; UserError naming the key otherwise."""
        assert self.tile is not None
        spec = self.tile
        for i, cam in enumerate(cameras):
            if cam.roi is not None:
                key, w, h = f"cameras.{i}.roi", cam.roi.width, cam.roi.height
            elif cam.width is not None and cam.height is not None:
                key, w, h = f"cameras.{i}.width/height", cam.width, cam.height
            else:
                continue
            wh, ww = working_size(h, w, spec.scale)
            if wh < spec.size or ww < spec.size:
                raise UserError(f"{key}: {w}x{h} px at the model's tile scale {spec.scale:g} is {ww}x{wh}, smaller "
                                f"than one {spec.size}-px tile; enlarge it or use a squash/letterbox model")

    def _overlay_size(self, rgb: np.ndarray, size: int) -> int:
        """Longer side of published overlays: the model input (at least 224 px), or for a tiled model the scaled
        ROI itself up to 1280 px (a small defect stays visible)."""
        return min(1280, max(rgb.shape[:2])) if self.tile is not None else max(size, 224)

    def _on_connected(self) -> None:
        for cs in self.cams.values():
            self._publish_camera_status(cs)

    def _publish_camera_status(self, cs: CameraState, status: str | None = None, reason: str | None = None) -> None:
        """<camera>/status (retained word) and <camera>/status/detail (retained JSON: status, reason, time)."""
        if self.link is not None:
            if status is None:
                status = PAUSED if cs.paused else cs.reader.status
                reason = None if status in (STREAMING, PAUSED) else cs.reader.detail
            detail = {"status": status, "reason": redact(reason) if reason else None, "time": iso(time.time()),
                      "camera": cs.cam.name, "source": redact(cs.cam.source)}
            self.link.publish(self.link.topic(cs.cam.name, "status"), status, qos=1, retain=True)
            self.link.publish(self.link.topic(cs.cam.name, "status", "detail"), json.dumps(detail), qos=1,
                              retain=True)

    def _on_camera_status(self, camera: str, status: str, detail: str | None) -> None:
        cs = self.cams.get(camera)
        if cs is not None:
            self._publish_camera_status(cs)

    # --- commands (paho thread) -------------------------------------------------------------------------------
    def _on_command(self, camera: str, command: str, payload: bytes) -> dict[str, Any] | None:
        targets = list(self.cams.values()) if camera == "all" else [self.cams[camera]] if camera in self.cams else []
        if not targets:
            return {"ok": False, "error": f"unknown camera {camera!r}; cameras: {', '.join(self.cams)}"}
        if command in NO_VALUE_COMMANDS:
            try:
                check_no_value(command, payload)
            except ValueError as e:
                return {"ok": False, "error": str(e), **self._state(targets)}
        if command == "pause" or command == "resume":
            for cs in targets:
                cs.paused = command == "pause"
                self._publish_camera_status(cs)
            log.info("command: %s %s", command, camera)
            return {"ok": True, **self._state(targets)}
        if command == "threshold":
            try:
                value = parse_threshold(payload)
                for cs in targets:
                    ref = next(v for v in (cs.cam.threshold, self.cfg.model.threshold, self.default_threshold)
                               if v is not None)
                    if value is not None:
                        check_threshold(value, float(ref), cs.cam.name)
            except ValueError as e:
                log.warning("command: threshold %s refused: %s", camera, e)
                return {"ok": False, "error": str(e), **self._state(targets)}
            for cs in targets:
                cs.threshold_cmd = value
            log.info("command: threshold %s = %s", camera, value)
            return {"ok": True, **self._state(targets)}
        if command == "snapshot":
            for cs in targets:
                cs.snapshot_requests.append(camera)
            self.new_frame.set()
            return None  # answered by the loop with the next frame
        return {"ok": False, "error": f"unknown command {command!r}; use pause, resume, threshold or snapshot"}

    def _state(self, targets: list[CameraState]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for cs in targets:
            t, src = self.threshold_of(cs)
            out[cs.cam.name] = {"paused": cs.paused, "threshold": t, "threshold_source": src,
                                "status": PAUSED if cs.paused else cs.reader.status}
        return {"cameras": out}

    # --- run --------------------------------------------------------------------------------------------------
    def run(self, duration_s: float | None = None, install_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT, `stop()` or `duration_s`. Returns the exit code (0)."""
        self.t_start = time.monotonic()
        self._setup()
        assert self.link is not None and self.backend is not None
        old_handlers: dict[int, Any] = {}
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self.link.start()
            if self.cfg.health.enabled:
                from .health import HealthServer

                self.health_server = HealthServer(self.cfg.health.host, self.cfg.health.port, self.health,
                                                  self.metrics_text)
                self.health_server.start()
            if self.web is not None:
                self.web.start()
            for cs in self.cams.values():
                cs.reader.start()
            end = None if duration_s is None else time.monotonic() + duration_s
            while not self.stop_event.is_set():
                if end is not None and time.monotonic() >= end:
                    break
                self.step()
        finally:
            self._shutdown()
            for signum, h in old_handlers.items():
                signal.signal(signum, h)
        return 0

    def stop(self) -> None:
        self.stop_event.set()
        self.new_frame.set()

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        self.stop()

    def step(self, wait_s: float = 0.1) -> int:
        """One loop turn: wait for frames, score the newest of every camera as one batch. Returns frames scored."""
        self.new_frame.wait(wait_s)
        self.new_frame.clear()
        now = time.monotonic()
        self.last_tick = now
        self._periodic(now)
        batch: list[tuple[CameraState, Frame]] = []
        for cs in self.cams.values():
            if cs.reader.status != STREAMING:
                self._camera_lost(cs)
            f = cs.reader.take()
            if f is None:
                continue
            if cs.paused and not cs.snapshot_requests:
                continue
            if f.encoded:  # decode: lazy: only the frames scored are decoded, here
                try:
                    f.image  # noqa: B018 - decodes and keeps the image
                except BadFrame as e:
                    cs.reader.bad_frame(BadFrame(f"frame {f.frame_id}: {e}"))
                    continue
            batch.append((cs, f))
        if not batch:
            return 0
        assert self.backend is not None
        mb = self.backend.max_batch or len(batch)
        before = self.frames_scored
        for i in range(0, len(batch), mb):
            self._score(batch[i:i + mb])
        if self.frames_scored > before:
            self.turns.append((time.monotonic(), self.frames_scored - before))
        return len(batch)

    def _refuse_roi(self, batch: list[tuple[CameraState, Frame]]) -> list[tuple[CameraState, Frame]]:
        """Frames whose camera ROI lies outside the frame, or (a tiled model) that hold less than one tile at its
        scale, are not scored: logged once per camera and published as the camera's status "failed" with the reason
        (a misplaced ROI would otherwise score a clipped sliver, a small frame mostly padding)."""
        keep = []
        for cs, f in batch:
            why = roi_outside(f.image.shape, cs.cam, f"cameras.{self.cfg.cameras.index(cs.cam)}.roi", self.tile)
            if why is None:
                keep.append((cs, f))
                self._roi_refused.discard(cs.cam.name)
            elif cs.cam.name not in self._roi_refused:
                self._roi_refused.add(cs.cam.name)
                log.error("camera %s: %s; its frames are not scored", cs.cam.name, why)
                self._publish_camera_status(cs, FAILED, why)
        return keep

    def _score(self, batch: list[tuple[CameraState, Frame]]) -> None:
        """One engine turn (`agent.scoring.score_frames`): untiled, the frames as one batch; tiled, the tiles of
        every frame in chunks of at most model.tile_batch (and the engine's max batch), each frame's map stitched
        from its tiles. Then each frame's decision and messages."""
        assert self.backend is not None and self.link is not None
        batch = self._refuse_roi(batch)
        if not batch:
            return
        scored, (t0, t1, t2) = score_frames(self.backend, self.policy, [(cs.cam, f.image) for cs, f in batch],
                                            self.cfg.model.tile_batch)
        n = self._count_batch(len(batch), t0, t1, t2)
        for (cs, f), s in zip(batch, scored, strict=True):
            self.timer.add("capture", t0 - f.t_read_start)
            self._decide_publish(cs, f, s.crop, s.rgb, s.amap, s.score,
                                 {"capture": t0 - f.t_read_start, "preprocess": (t1 - t0) / n, "engine": (t2 - t1) / n})
        if self.first_score_s is None:
            self.first_score_s = time.monotonic() - self.t_start
            log.info("first frame scored %.2f s after start%s", self.first_score_s,
                     f" ({scored[0].tiles} tiles per frame)" if self.tile is not None else "")

    def _count_batch(self, n: int, t0: float, t1: float, t2: float) -> int:
        """Count one engine turn of `n` frames (preprocessing t0-t1, engine t1-t2) in the counters and stage timers.
        Returns n."""
        self.batches += 1
        self.frames_scored += n
        self._engine_win[0] += t2 - t1
        self._engine_win[1] += 1
        self._engine_win[2] += n
        self.timer.add("preprocess", (t1 - t0) / n, n)
        self.timer.add("engine", (t2 - t1) / n, n)
        return n

    def _decide_publish(self, cs: CameraState, f: Frame, crop: Any, rgb: np.ndarray, amap: np.ndarray, score: float,
                        lat: dict[str, float]) -> None:
        assert self.link is not None and self.backend is not None
        link, name, size = self.link, cs.cam.name, self.backend.input_size
        td = time.monotonic()
        threshold, _ = self.threshold_of(cs)
        if cs.snapshot_requests:
            self._snapshot(cs, f, rgb, amap, score, threshold)
            if cs.paused:
                return
        anomalous = score > threshold
        box_in = anomalous_box(amap, threshold) if anomalous else None
        box = box_to_frame(box_in, crop, size) if box_in is not None else None
        decision = cs.tracker.update(score, threshold, f.frame_id, f.wall_time, box)
        cs.scored += 1
        cs.anomalous += int(anomalous)
        tp = time.monotonic()
        lat["decide"] = tp - td
        self.timer.add("decide", tp - td)
        now = tp
        interval = cs.cam.score_interval_s if cs.cam.score_interval_s is not None else self.cfg.mqtt.score_interval_s
        if interval == 0 or now - cs.last_score_pub >= interval or decision.events:
            cs.last_score_pub = now
            msg = {"time": iso(f.wall_time), "ts": round(f.wall_time, 3), "camera": name, "frame_id": f.frame_id,
                   "score": round(score, 6), "threshold": round(threshold, 6), "anomalous": anomalous,
                   "latency_ms": {k: round(v * 1000, 3) for k, v in lat.items()}, "model_id": self.model_id}
            if box is not None:
                msg["box"] = box
            link.publish(link.topic(name, "score"), json.dumps(msg), qos=self.cfg.mqtt.score_qos)
        heat_jpeg: bytes | None = None
        for ev in decision.events:
            ev["model_id"] = self.model_id
            if ev["event"] == "start":
                self.alerts_raised += 1
                self.alert_ids.append(ev["id"])
                log.warning("camera %s: alert %s opened (score %.4f > %.4f)", name, ev["id"], score, threshold)
            elif ev["event"] == "end":
                log.info("camera %s: alert %s closed (peak %.4f)", name, ev["id"], ev["peak_score"])
            if ev["event"] in ("start", "update"):
                heat_jpeg = heat_jpeg or encode_jpeg(overlay(rgb, amap, threshold, box_in, self._overlay_size(rgb, size)))
                frame_bgr = self._frame_bgr(cs, f.image, box)
                folder = self.evidence.save(name, ev["id"], f.wall_time, frame_bgr, heat_jpeg, ev,
                                            "start" if ev["event"] == "start" else "peak")
                if folder is not None:
                    ev["evidence"] = str(folder)
            else:
                self.evidence.finish(ev["id"], ev)
            self.link.publish_durable(link.topic(name, "alert"), json.dumps(ev).encode())
            self.alert_messages += 1
        hi = self.cfg.mqtt.heatmap_interval_s
        if heat_jpeg is None and hi > 0 and now - cs.last_heatmap_pub >= hi:
            heat_jpeg = encode_jpeg(overlay(rgb, amap, threshold, box_in, self._overlay_size(rgb, size)))
        if heat_jpeg is not None:
            cs.last_heatmap_pub = now
            link.publish(link.topic(name, "heatmap"), heat_jpeg, qos=0)
        self.timer.add("publish", time.monotonic() - tp)
        if self.web is not None:
            self.web.on_frame(cs, f, crop, amap, score, threshold, box, lat, decision.events)

    def _camera_lost(self, cs: CameraState) -> None:
        """The camera is not streaming: close its open alert at its last scored frame (blind time not counted)."""
        if cs.tracker.alert is None:
            cs.tracker.anomalous_run = cs.tracker.normal_run = 0
            return
        status = cs.reader.status
        ev = cs.tracker.lose("source_ended" if status == ENDED else "camera_lost")
        if ev is None or self.link is None:
            return
        ev["model_id"] = self.model_id
        ev["camera_status"] = status
        if cs.reader.detail:
            ev["camera_reason"] = redact(cs.reader.detail)
        log.warning("camera %s: alert %s closed: camera %s (%s)", cs.cam.name, ev["id"], status,
                    ev.get("camera_reason", "-"))
        self.evidence.finish(ev["id"], ev)
        self.link.publish_durable(self.link.topic(cs.cam.name, "alert"), json.dumps(ev).encode())
        self.alert_messages += 1

    def _frame_bgr(self, cs: CameraState, img: np.ndarray, box: list[int] | None) -> np.ndarray:
        import cv2

        out = img
        if img.ndim == 2:
            out = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
        elif cs.cam.colour == "rgb":
            out = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        else:
            out = img.copy()
        if box is not None:
            cv2.rectangle(out, (box[0], box[1]), (box[2], box[3]), (0, 0, 255), 2)
        return out

    def _snapshot(self, cs: CameraState, f: Frame, rgb: np.ndarray, amap: np.ndarray, score: float,
                  threshold: float) -> None:
        assert self.link is not None
        link, name = self.link, cs.cam.name
        frame_jpeg = encode_jpeg(self._frame_bgr(cs, f.image, None))
        heat = encode_jpeg(overlay(rgb, amap, threshold, None, max(rgb.shape[0], 224)))
        link.publish(link.topic(name, "snapshot"), frame_jpeg, qos=1)
        link.publish(link.topic(name, "heatmap"), heat, qos=0)
        requested = set(cs.snapshot_requests)
        cs.snapshot_requests.clear()
        for who in requested:
            body = {"ok": True, "frame_id": f.frame_id, "score": round(score, 6), "threshold": threshold,
                    "anomalous": score > threshold, "time_frame": iso(f.wall_time), "frame_bytes": len(frame_jpeg),
                    "heatmap_bytes": len(heat), **self._state([cs])}
            link.reply(who if who == "all" else name, "snapshot", body)

    # --- periodic work ----------------------------------------------------------------------------------------
    def _periodic(self, now: float) -> None:
        for cs in self.cams.values():
            cs.reader.check_watchdog(now)
        if now - self._last_stats >= self.cfg.mqtt.stats_interval_s:
            span = now - self._last_stats
            self._last_stats = now
            if self.link is not None:
                self.link.publish(self.link.topic("stats"), json.dumps(self.stats(span)))

    def stats(self, span: float | None = None) -> dict[str, Any]:
        e_s, e_b, e_f = self._engine_win
        self._engine_win = [0.0, 0, 0]
        span = span or self.cfg.mqtt.stats_interval_s
        cams = {}
        for name, cs in self.cams.items():
            st = cs.reader.stats
            t, src = self.threshold_of(cs)
            cams[name] = {"status": PAUSED if cs.paused else cs.reader.status, "fps": round(cs.reader.fps(), 2),
                          "frames": st.frames, "dropped": st.dropped, "scored": cs.scored,
                          "anomalous": cs.anomalous, "reconnects": st.reconnects,
                          "watchdog_restarts": st.watchdog_restarts, "stalls": st.stalls,
                          "bad_frames": st.bad_frames, "reason": cs.reader.detail,
                          "threshold": t, "threshold_source": src,
                          "alert_open": cs.tracker.alert.id if cs.tracker.alert else None}
        link = self.link
        return {
            "time": iso(time.time()), "uptime_s": round(time.monotonic() - self.t_start, 1),
            "model_id": self.model_id, "backend": getattr(self.backend, "name", "?"),
            "engine": {"batches": e_b, "frames": e_f, "ms_per_batch": round(1000 * e_s / e_b, 3) if e_b else None,
                       "fps": round(e_f / span, 2)},
            "latency_ms": self.timer.window_ms(), "cameras": cams,
            "spool_depth": self.spool.depth, "spool_dropped": self.spool.dropped,
            "alerts_raised": self.alerts_raised, "alerts_acked": link.alerts_acked if link else 0,
            "mqtt_connected": bool(link and link.connected), "rss_mb": round(rss_mb(), 1),
            "first_score_s": round(self.first_score_s, 3) if self.first_score_s is not None else None,
            "torch_loaded": "torch" in sys.modules,
        }

    def health(self) -> tuple[bool, dict[str, Any]]:
        now, stale_s = time.monotonic(), self.cfg.health.stale_s
        stale = now - self.last_tick > stale_s
        statuses = {n: (PAUSED if cs.paused else cs.reader.status) for n, cs in self.cams.items()}
        all_failed = all(s == FAILED for s in statuses.values())
        # cameras that should deliver (not paused by an operator, not a file that ended) and have not for stale_s
        live = {n: cs for n, cs in self.cams.items() if statuses[n] not in (PAUSED, ENDED)}
        blind = sorted(n for n, cs in live.items() if statuses[n] != STREAMING and now - cs.reader.status_since > stale_s)
        all_blind = bool(live) and len(blind) == len(live)
        ok = not stale and not all_failed and not all_blind and not self.stop_event.is_set()
        reasons = {n: cs.reader.detail for n, cs in self.cams.items() if cs.reader.detail}
        return ok, {"ok": ok, "loop_stale": stale, "cameras": statuses, "camera_reasons": reasons,
                    "cameras_blind": blind,
                    "spool_depth": self.spool.depth,
                    **(self.link.health() if self.link else {"mqtt_connected": False, "mqtt_error": None})}

    def metrics_text(self) -> str:
        from .health import prom_lines

        lines: list[str] = []
        cams = self.cams.items()
        lines += prom_lines("maead_frames_read_total", "Frames delivered by the camera reader", "counter",
                            [({"camera": n}, cs.reader.stats.frames) for n, cs in cams])
        lines += prom_lines("maead_frames_dropped_total", "Frames overwritten before the engine took them", "counter",
                            [({"camera": n}, cs.reader.stats.dropped) for n, cs in cams])
        lines += prom_lines("maead_frames_scored_total", "Frames scored", "counter",
                            [({"camera": n}, cs.scored) for n, cs in cams])
        lines += prom_lines("maead_anomalous_frames_total", "Frames above the threshold", "counter",
                            [({"camera": n}, cs.anomalous) for n, cs in cams])
        lines += prom_lines("maead_camera_reconnects_total", "Source reconnects", "counter",
                            [({"camera": n}, cs.reader.stats.reconnects) for n, cs in cams])
        lines += prom_lines("maead_camera_streaming", "1 if the camera is streaming", "gauge",
                            [({"camera": n}, float(cs.reader.status == STREAMING)) for n, cs in cams])
        lines += prom_lines("maead_camera_fps", "Frames per second read", "gauge",
                            [({"camera": n}, cs.reader.fps()) for n, cs in cams])
        lines += prom_lines("maead_alerts_raised_total", "Alerts opened", "counter", [({}, self.alerts_raised)])
        lines += prom_lines("maead_alert_messages_acked_total", "Alert messages acknowledged by the broker",
                            "counter", [({}, self.link.alerts_acked if self.link else 0)])
        lines += prom_lines("maead_spool_depth", "Alert messages waiting for the broker", "gauge",
                            [({}, self.spool.depth)])
        lines += prom_lines("maead_spool_dropped_total", "Alert messages dropped at the spool bound", "counter",
                            [({}, self.spool.dropped)])
        lines += prom_lines("maead_mqtt_connected", "1 while connected to the broker", "gauge",
                            [({}, float(bool(self.link and self.link.connected)))])
        lines += prom_lines("maead_mqtt_disconnected_seconds", "Seconds without the broker (0 while connected)",
                            "gauge", [({}, round(self.link.disconnected_for(), 1) if self.link else 0.0)])
        lines += prom_lines("maead_degraded", "1 while the agent reports itself degraded (see /healthz)", "gauge",
                            [({}, float(bool(self.link and self.link.degraded)))])
        means = self.timer.mean_ms()
        lines += prom_lines("maead_stage_latency_ms", "Mean latency per frame and stage since start", "gauge",
                            [({"stage": s}, v) for s, v in means.items() if v is not None])
        lines += prom_lines("maead_engine_batches_total", "Engine calls", "counter", [({}, self.batches)])
        lines += prom_lines("maead_resident_memory_mb", "Resident memory of the agent", "gauge", [({}, rss_mb())])
        return "\n".join(lines) + "\n"

    # --- shutdown ---------------------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        for cs in self.cams.values():
            cs.reader.stop()
        if self.link is not None:
            now = time.time()
            for cs in self.cams.values():
                if cs.tracker.alert is not None:
                    ev = cs.tracker.close(now, -1, "shutdown")
                    ev["model_id"] = self.model_id
                    self.evidence.finish(ev["id"], ev)
                    self.link.publish_durable(self.link.topic(cs.cam.name, "alert"), json.dumps(ev).encode())
                    self.alert_messages += 1
            for cs in self.cams.values():  # no retained "streaming" may outlive the agent
                self._publish_camera_status(cs, OFFLINE, "agent stopped")
            self.link.stop()
        if self.health_server is not None:
            self.health_server.stop()
        if self.web is not None:
            self.web.stop()
        if self.backend is not None and self._backend_given is None:
            self.backend.close()
        log.info("agent %s stopped: %d frames scored, %d alerts raised, %d message(s) left in the spool",
                 self.cfg.agent_id, self.frames_scored, self.alerts_raised, self.spool.depth if self.link else 0)
