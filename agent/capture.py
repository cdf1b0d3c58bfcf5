"""Camera sources and the reader thread: one per camera, keeping only the newest frame.

A reader never blocks on the engine: it overwrites its one-frame slot and counts the frames nobody took (`dropped`).
When a source fails it reconnects with capped exponential back-off; a watchdog restarts a source that has delivered
nothing for `capture.watchdog_s`. Sources:

- device index (V4L2 / OpenCV), video file (optionally looping, paced at its frame rate or as fast as it reads),
- rtsp:// and other URLs through OpenCV's FFmpeg, http(s):// MJPEG streams or single-JPEG snapshots through a
  small built-in reader (socket timeouts, so a dead stream is noticed), GStreamer pipelines (OpenCV built with
  GStreamer, as on Jetson).
"""

from __future__ import annotations

import base64
import http.client
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np

from .config import CameraSection, CaptureSection

log = logging.getLogger(__name__)

STARTING, STREAMING, RECONNECTING, FAILED, ENDED, PAUSED = (
    "starting", "streaming", "reconnecting", "failed", "ended", "paused")


class SourceError(Exception):
    """The source cannot deliver; `retry` False when retrying cannot help (bad pipeline, OpenCV lacks GStreamer)."""

    def __init__(self, msg: str, retry: bool = True):
        super().__init__(msg)
        self.retry = retry


class EndOfStream(Exception):
    """A non-looping file has ended."""


class Source(Protocol):
    def open(self) -> None: ...
    def read(self) -> np.ndarray: ...  # BGR/RGB/gray uint8; raises SourceError or EndOfStream
    def close(self) -> None: ...
    def interrupt(self) -> None: ...  # from another thread: make a blocked read() return soon


class OpenCvSource:
    """cv2.VideoCapture for devices, files, URLs (FFmpeg) and GStreamer pipelines."""

    def __init__(self, cam: CameraSection, cap_cfg: CaptureSection):
        self.cam, self.cap_cfg = cam, cap_cfg
        self.kind = cam.resolved_kind()
        self.cap: Any = None
        self.frame_interval = 0.0
        self._next_t = 0.0

    def open(self) -> None:
        import cv2

        src = self.cam.source
        if self.kind == "device":
            self.cap = cv2.VideoCapture(int(src))
            if self.cam.width:
                self.cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cam.width)
            if self.cam.height:
                self.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cam.height)
        elif self.kind == "gstreamer":
            if "GStreamer:                   YES" not in cv2.getBuildInformation():
                raise SourceError("this OpenCV build has no GStreamer support (use the Jetson/JetPack OpenCV)",
                                  retry=False)
            self.cap = cv2.VideoCapture(str(src), cv2.CAP_GSTREAMER)
        elif self.kind == "file":
            if not Path(str(src)).is_file():
                raise SourceError(f"video file {src} not found")
            self.cap = cv2.VideoCapture(str(src), cv2.CAP_FFMPEG)
        else:  # url through FFmpeg, with timeouts so a dead stream does not block forever
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.cap_cfg.open_timeout_s * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.cap_cfg.read_timeout_s * 1000)]
            self.cap = cv2.VideoCapture(str(src), cv2.CAP_FFMPEG, params)
        if not self.cap.isOpened():
            self.close()
            raise SourceError(f"cannot open {self.kind} source {redact(src)}")
        fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.frame_interval = 1.0 / fps if (self.kind == "file" and self.cam.realtime and 0 < fps < 1000) else 0.0
        self._next_t = time.monotonic()

    def pace(self, stop: threading.Event) -> None:
        """Files with realtime=True: wait until the next frame is due (the reader calls this before read())."""
        if self.frame_interval:
            now = time.monotonic()
            if self._next_t > now:
                stop.wait(self._next_t - now)
            self._next_t = max(self._next_t + self.frame_interval, time.monotonic() - self.frame_interval)

    def read(self) -> np.ndarray:
        import cv2

        ok, frame = self.cap.read()
        if ok and frame is not None:
            return frame
        if self.kind == "file":
            if self.cam.loop and self.cap.get(cv2.CAP_PROP_POS_FRAMES) > 0:
                self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = self.cap.read()
                if ok and frame is not None:
                    return frame
            raise EndOfStream(f"end of {self.cam.source}")
        raise SourceError(f"no frame from {self.kind} source {redact(self.cam.source)}")

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None

    def interrupt(self) -> None:
        pass  # OpenCV reads time out by themselves (read_timeout_s)


class MjpegHttpSource:
    """HTTP(S) camera: a multipart/x-mixed-replace MJPEG stream, or a URL answering one JPEG per request."""

    def __init__(self, cam: CameraSection, cap_cfg: CaptureSection):
        self.cam, self.cap_cfg = cam, cap_cfg
        u = urlsplit(str(cam.source))
        self.scheme, self.host, self.port = u.scheme.lower(), u.hostname or "", u.port
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.headers = {"User-Agent": "mae-ad-agent"}
        if u.username is not None:
            token = base64.b64encode(f"{u.username}:{u.password or ''}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self.conn: http.client.HTTPConnection | None = None
        self.resp: http.client.HTTPResponse | None = None
        self.boundary: bytes | None = None
        self.single = False
        self._lock = threading.Lock()

    def _request(self) -> http.client.HTTPResponse:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.cap_cfg.open_timeout_s)
        with self._lock:
            self.conn = conn
        try:
            conn.request("GET", self.path, headers=self.headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(f"HTTP {redact(self.cam.source)}: {e}") from None
        if resp.status != 200:
            raise SourceError(f"HTTP {redact(self.cam.source)}: status {resp.status} {resp.reason}")
        if conn.sock is not None:
            conn.sock.settimeout(self.cap_cfg.read_timeout_s)
        return resp

    def open(self) -> None:
        resp = self._request()
        ctype = resp.getheader("Content-Type", "") or ""
        if ctype.lower().startswith("multipart/"):
            b = [p.split("=", 1)[1].strip().strip('"') for p in ctype.split(";") if p.strip().startswith("boundary=")]
            if not b:
                raise SourceError(f"HTTP {redact(self.cam.source)}: multipart stream without a boundary", retry=False)
            self.boundary = b"--" + b[0].encode().removeprefix(b"--")
            self.single, self.resp = False, resp
        elif ctype.lower().startswith("image/"):
            self.single = True
            self._first: bytes | None = resp.read()
            self.close()
        else:
            self.close()
            raise SourceError(f"HTTP {redact(self.cam.source)}: unsupported Content-Type {ctype!r} "
                              "(use reader: opencv for other stream formats)", retry=False)

    def _decode(self, data: bytes) -> np.ndarray:
        import cv2

        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise SourceError(f"HTTP {redact(self.cam.source)}: undecodable image ({len(data)} bytes)")
        return img

    def read(self) -> np.ndarray:
        try:
            if self.single:
                data = self._first
                self._first = None
                if data is None:
                    resp = self._request()
                    data = resp.read()
                    self.close()
                return self._decode(data)
            return self._decode(self._read_part())
        except (OSError, http.client.HTTPException, ValueError, AttributeError) as e:
            raise SourceError(f"HTTP {redact(self.cam.source)}: {type(e).__name__}: {e}") from None

    def _read_part(self) -> bytes:
        fp = self.resp
        if fp is None:
            raise SourceError("stream closed")
        assert self.boundary is not None
        # skip to the boundary line
        for _ in range(64):
            line = fp.readline(1024)
            if not line:
                raise SourceError("stream ended")
            if line.strip().startswith(self.boundary):
                if line.strip().endswith(b"--"):
                    raise SourceError("stream ended (final boundary)")
                break
        else:
            raise SourceError("no multipart boundary found")
        length = None
        while True:
            line = fp.readline(1024)
            if not line:
                raise SourceError("stream ended")
            if line in (b"\r\n", b"\n"):
                break
            k, _, v = line.decode("latin-1").partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        if length is not None:
            data = fp.read(length)
            if len(data) != length:
                raise SourceError("stream ended inside a frame")
            return data
        # no Content-Length: read up to the JPEG end marker
        buf = bytearray()
        while True:
            chunk = fp.read1(65536) if hasattr(fp, "read1") else fp.read(4096)
            if not chunk:
                raise SourceError("stream ended inside a frame")
            buf += chunk
            end = buf.find(b"\xff\xd9")
            if end >= 0:
                return bytes(buf[: end + 2])

    def close(self) -> None:
        with self._lock:
            conn, self.conn = self.conn, None
        if self.resp is not None:
            try:
                self.resp.close()
            except Exception:
                pass
            self.resp = None
        if conn is not None:
            conn.close()

    def interrupt(self) -> None:
        with self._lock:
            conn = self.conn
        if conn is not None and conn.sock is not None:
            import socket

            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def make_source(cam: CameraSection, cap_cfg: CaptureSection) -> Source:
    kind = cam.resolved_kind()
    if kind == "url" and str(cam.source).lower().startswith(("http://", "https://")) and cam.reader != "opencv":
        return MjpegHttpSource(cam, cap_cfg)
    return OpenCvSource(cam, cap_cfg)


def redact(src: object) -> str:
    """A source for logs: credentials in URLs replaced by ***."""
    s = str(src)
    u = urlsplit(s)
    if u.scheme and u.password is not None:
        return s.replace(f":{u.password}@", ":***@")
    return s


@dataclass
class Frame:
    image: np.ndarray
    frame_id: int  # per camera, counts every frame the reader delivered (gaps = dropped frames)
    t_read_start: float  # time.monotonic() before the read
    t_read: float  # time.monotonic() after the read
    wall_time: float  # time.time() after the read


@dataclass
class ReaderStats:
    frames: int = 0
    dropped: int = 0
    taken: int = 0
    reconnects: int = 0
    watchdog_restarts: int = 0
    last_error: str | None = None
    fps_window: list[float] = field(default_factory=list)


class CameraReader:
    """A thread that reads one source, keeps only the newest frame and reconnects with back-off.

    `status` is one of starting, streaming, reconnecting, failed, ended. `on_status(camera, status, detail)` is called on
    each change; `new_frame` (a shared Event) is set on every frame so the loop can sleep until one arrives.
    """

    def __init__(self, cam: CameraSection, cap_cfg: CaptureSection, new_frame: threading.Event,
                 on_status: Any = None, source_factory: Any = make_source):
        self.cam, self.cap_cfg = cam, cap_cfg
        self.name = cam.name
        self.new_frame = new_frame
        self.on_status = on_status
        self.source_factory = source_factory
        self.stats = ReaderStats()
        self.status = STARTING
        self.last_frame_t = time.monotonic()
        self._slot: Frame | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._source: Source | None = None
        self._thread: threading.Thread | None = None
        self._min_interval = 1.0 / cam.fps if cam.fps else 0.0

    # --- thread API -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"reader-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        src = self._source
        if src is not None:
            src.interrupt()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("camera %s: reader did not stop within %.0f s", self.name, timeout)

    def restart(self, reason: str) -> None:
        """Ask the reader to close and reopen its source (the watchdog calls this)."""
        log.warning("camera %s: restarting source (%s)", self.name, reason)
        self.stats.watchdog_restarts += 1
        self._restart.set()
        src = self._source
        if src is not None:
            src.interrupt()

    def take(self) -> Frame | None:
        """The newest frame not taken yet (None if there is none)."""
        with self._lock:
            f, self._slot = self._slot, None
        if f is not None:
            self.stats.taken += 1
        return f

    def check_watchdog(self, now: float | None = None) -> bool:
        """Restart a source that is up but silent for capture.watchdog_s. Returns True if it restarted it."""
        now = time.monotonic() if now is None else now
        if self.status == STREAMING and now - self.last_frame_t > self.cap_cfg.watchdog_s:
            self.last_frame_t = now
            self.restart(f"no frame for {self.cap_cfg.watchdog_s:.1f} s")
            return True
        return False

    def fps(self) -> float:
        w = self.stats.fps_window
        if len(w) < 2:
            return 0.0
        span = w[-1] - w[0]
        return (len(w) - 1) / span if span > 0 else 0.0

    # --- internals --------------------------------------------------------------------------------------------
    def _set_status(self, status: str, detail: str | None = None) -> None:
        if status != self.status:
            self.status = status
            log.info("camera %s: %s%s", self.name, status, f" ({detail})" if detail else "")
            if self.on_status is not None:
                try:
                    self.on_status(self.name, status, detail)
                except Exception:
                    log.exception("camera %s: status callback failed", self.name)

    def _run(self) -> None:
        attempts = 0
        delay = self.cap_cfg.reconnect_initial_s
        while not self._stop.is_set():
            self._restart.clear()
            src = self.source_factory(self.cam, self.cap_cfg)
            try:
                src.open()
            except SourceError as e:
                self.stats.last_error = str(e)
                attempts += 1
                if not e.retry or (self.cap_cfg.max_attempts and attempts >= self.cap_cfg.max_attempts):
                    self._set_status(FAILED, str(e))
                    log.error("camera %s: %s", self.name, e)
                    return
                self._set_status(RECONNECTING, str(e))
                log.warning("camera %s: %s; retrying in %.1f s", self.name, e, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.cap_cfg.reconnect_max_s)
                continue
            self._source = src
            ended = self._read_loop(src)
            self._source = None
            src.close()
            if ended:
                self._set_status(ENDED, "end of file")
                return
            if self._stop.is_set():
                return
            if self.status == STREAMING or self._restart.is_set():
                attempts, delay = 0, self.cap_cfg.reconnect_initial_s  # it worked once: start the back-off afresh
            self.stats.reconnects += 1
            self._set_status(RECONNECTING, self.stats.last_error)
            self._stop.wait(delay)
            delay = min(delay * 2, self.cap_cfg.reconnect_max_s)

    def _read_loop(self, src: Source) -> bool:
        """Read until stop/restart/error. Returns True at the end of a non-looping file."""
        next_allowed = 0.0
        pace = getattr(src, "pace", None)
        while not self._stop.is_set() and not self._restart.is_set():
            if pace is not None:
                pace(self._stop)
            t0 = time.monotonic()
            try:
                img = src.read()
            except EndOfStream:
                return True
            except SourceError as e:
                if not self._stop.is_set():
                    self.stats.last_error = str(e)
                    log.warning("camera %s: %s", self.name, e)
                return False
            except Exception as e:  # a decoder bug must not kill the reader
                self.stats.last_error = f"{type(e).__name__}: {e}"
                log.exception("camera %s: read failed", self.name)
                return False
            t1 = time.monotonic()
            if self._min_interval:
                if t1 < next_allowed:
                    continue
                next_allowed = max(next_allowed + self._min_interval, t1 - self._min_interval)
            self.last_frame_t = t1
            if self.status != STREAMING:
                self._set_status(STREAMING)
            frame = Frame(img, self.stats.frames, t0, t1, time.time())
            self.stats.frames += 1
            w = self.stats.fps_window
            w.append(t1)
            if len(w) > 60:
                del w[0]
            with self._lock:
                if self._slot is not None:
                    self.stats.dropped += 1
                self._slot = frame
            self.new_frame.set()
        return False

