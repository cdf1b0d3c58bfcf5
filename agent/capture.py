"""Camera sources and the reader thread: one per camera, keeping only the newest frame.

A reader never blocks on the engine: it overwrites its one-frame slot and counts the frames nobody took (`dropped`).
When a source fails it reconnects with capped exponential back-off (`capture.reconnect_max_s`, 2 s by default, so a
camera that returns is back within about that plus its open time).

Stalls: a camera that stops sending without closing the connection is noticed from frames that are actually new.
A read that brings no new frame within `capture.read_timeout_s` - one still blocked, one that returns a frame only
after the timeout (a decoder handing out its delayed frames), or reads that return the same decoder timestamp again -
marks the camera `reconnecting` (reason "stalled ...") and restarts it for real: the capture is released and
reopened; a capture blocked inside a read that cannot be interrupted (a GStreamer pipeline) is left to its thread,
which releases it when the read returns, and a fresh capture is opened beside it.

Damaged frames: a frame that cannot be decoded (a damaged frame of a file, an undecodable JPEG of a stream) is
skipped and counted (`bad_frames`), with a warning naming its index; only `capture.max_bad_frames` in a row fail the
source. A file ends at its real end (and loops from there with `loop: true`). Sources:

- device index (V4L2 / OpenCV), video file (optionally looping, paced at its frame rate or as fast as it reads),
- rtsp:// and other URLs through OpenCV's FFmpeg, http(s):// MJPEG streams or single-JPEG snapshots through a
  small built-in reader (socket timeouts, so a dead stream is noticed; a snapshot URL is requested at most `fps`
  times a second, `capture.snapshot_fps` when the camera sets none), GStreamer pipelines (OpenCV built with
  GStreamer, as on Jetson).

Every text that names a source goes through `agent.config.redact` (credentials masked).
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
from urllib.parse import unquote, urlsplit

import numpy as np

from .config import CameraSection, CaptureSection, redact

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


class BadFrame(Exception):
    """One frame could not be read or decoded; the source goes on (the reader skips and counts it)."""

    def __init__(self, msg: str, index: int | None = None):
        super().__init__(msg)
        self.index = index


def opencv_info() -> dict[str, Any]:
    """Which OpenCV the agent loaded: version, file, and whether it has GStreamer and FFmpeg video I/O.
    Raises ImportError when there is none."""
    import cv2

    build = cv2.getBuildInformation()

    def _flag(name: str) -> str:
        for line in build.splitlines():
            if line.strip().startswith(name + ":"):
                return line.split(":", 1)[1].strip()
        return "NO"

    gst, ffmpeg = _flag("GStreamer"), _flag("FFMPEG")
    return {"version": cv2.__version__, "file": str(getattr(cv2, "__file__", "?")), "gstreamer": gst.startswith("YES"),
            "gstreamer_detail": gst, "ffmpeg": ffmpeg.startswith("YES")}


def opencv_line() -> str:
    """One log line naming the OpenCV in use and its video back-ends."""
    try:
        i = opencv_info()
    except ImportError as e:
        return f"OpenCV: not importable ({e})"
    return (f"OpenCV {i['version']} from {i['file']} (GStreamer: {i['gstreamer_detail']}, "
            f"FFmpeg: {'YES' if i['ffmpeg'] else 'NO'})")


class Source(Protocol):
    def open(self) -> None: ...
    def read(self) -> np.ndarray | EncodedJpeg: ...  # BGR/RGB/gray uint8 (or, decode: lazy, the JPEG); raises
    # SourceError, EndOfStream or BadFrame
    def close(self) -> None: ...
    def interrupt(self) -> None: ...  # from another thread: make a blocked read() return soon


def quiet_native_logs() -> None:
    """Quieten what OpenCV and FFmpeg print to stderr on their own, outside the logger: a line or two on every failed
    open or retry of a camera (`[tcp @ ...] Connection refused`, `cap.cpp:212 ... can't be used to capture by name`),
    thousands an hour for one dead camera. The reader names each cause itself (a warning per new cause, a reminder a
    minute, the status and /healthz). Set OPENCV_FFMPEG_LOGLEVEL (e.g. 24) or OPENCV_LOG_LEVEL (e.g. INFO) in the
    environment to bring them back."""
    import os

    import cv2

    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "8")  # AV_LOG_FATAL; read when FFmpeg opens a source
    if "OPENCV_LOG_LEVEL" not in os.environ:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


REMIND_S = 60.0  # an unchanged failure to open a camera is logged again this often (debug lines in between)
MJPEG_FOURCCS = ("MJPG", "MJPEG", "JPEG", "AVRN", "LJPG", "DMB1")  # FFmpeg's MJPEG codec tags: intra-only JPEGs


def _fourcc(code: float) -> str:
    n = int(code)
    return "".join(chr((n >> (8 * i)) & 0xFF) for i in range(4)).strip("\x00 ")


class OpenCvSource:
    """cv2.VideoCapture for devices, files, URLs (FFmpeg) and GStreamer pipelines."""

    def __init__(self, cam: CameraSection, cap_cfg: CaptureSection):
        self.cam, self.cap_cfg = cam, cap_cfg
        self.kind = cam.resolved_kind()
        self.cap: Any = None
        self.frame_interval = 0.0
        self._next_t = 0.0
        self.frame_count = 0  # files: frames in the file (0: unknown)
        self.repeated = False  # the last read() returned a frame with the previous frame's decoder timestamp
        self._last_pts: float | None = None
        self.raw = False  # decode: lazy on an MJPEG stream: read() returns the encoded JPEG of each frame

    def open(self) -> None:
        import cv2

        quiet_native_logs()  # before OpenCV's FFmpeg backend opens (and fails) anything
        src = self.cam.source
        if self.kind == "device":
            self.cap = cv2.VideoCapture(int(src))
            if self.cam.width:
                self.cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.cam.width)
            if self.cam.height:
                self.cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.cam.height)
            if self.cam.fps:
                self.cap.set(cv2.CAP_PROP_FPS, self.cam.fps)  # ask the device for the configured rate
        elif self.kind == "gstreamer":
            info = opencv_info()
            if not info["gstreamer"]:
                raise SourceError(f"no GStreamer: this OpenCV ({info['version']} from {info['file']}) has no "
                                  "GStreamer support; use the system/JetPack OpenCV (install with the "
                                  "agent-system-opencv extra in a venv made with --system-site-packages; "
                                  "docs/agent.md, 'Jetson')", retry=False)
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
            why = _unreachable(str(src)) if self.kind == "url" else None
            raise SourceError(f"cannot open {self.kind} source {redact(src)}"
                              + (f": {why}" if why else (" (reachable; wrong path, credentials or codec?)"
                                                         if self.kind == "url" else "")))
        fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.frame_interval = 0.0
        if self.kind == "file" and self.cam.realtime and 0 < fps < 1000:
            self.frame_interval = 1.0 / fps  # the file's own rate (an fps cap below it skips frames, as time passes)
        elif self.kind == "file" and not self.cam.realtime and self.cam.fps:
            self.frame_interval = 1.0 / self.cam.fps  # a pulled source: read at the configured rate, skip nothing
        self.frame_count = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if self.kind == "file" else 0
        self._next_t = time.monotonic()
        self._last_pts = None
        self.raw = False
        if self.cam.decode == "lazy" and self.kind in ("file", "url"):
            codec = _fourcc(self.cap.get(cv2.CAP_PROP_FOURCC))
            if codec.upper() in MJPEG_FOURCCS and self.cap.set(cv2.CAP_PROP_FORMAT, -1):
                self.raw = True
            else:
                log.warning("camera %s: decode: lazy needs an MJPEG stream, this one is %r; decoding every frame",
                            self.cam.name, codec)

    def pace(self, stop: threading.Event) -> None:
        """Files: wait until the next frame is due, at the file's rate (realtime) or at `fps` (realtime false);
        the reader calls this before read()."""
        if self.frame_interval:
            now = time.monotonic()
            if self._next_t > now:
                stop.wait(self._next_t - now)
            self._next_t = max(self._next_t + self.frame_interval, time.monotonic() - self.frame_interval)

    def read(self) -> np.ndarray | EncodedJpeg:
        """The next frame (with decode: lazy on an MJPEG stream, its encoded JPEG). Files: a damaged frame before the end raises BadFrame (the next read goes on after it);
        the real end raises EndOfStream or, with loop, starts again. Other sources: SourceError."""
        import cv2

        pos = int(self.cap.get(cv2.CAP_PROP_POS_FRAMES) or 0) if self.kind == "file" else 0
        ok, frame = self.cap.read()
        if ok and frame is not None and frame.size:
            if self.kind in ("url", "gstreamer", "device"):
                pts = float(self.cap.get(cv2.CAP_PROP_POS_MSEC) or 0.0)
                self.repeated = pts > 0 and pts == self._last_pts
                self._last_pts = pts
            return self._packet(frame) if self.raw else frame
        if self.kind == "file":
            if self.frame_count > 0 and pos < self.frame_count - 1:  # not the end: one damaged frame
                raise BadFrame(f"unreadable frame {pos} of {self.frame_count} in {self.cam.source}", pos)
            if self.cam.loop and pos > 0:
                self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = self.cap.read()
                if ok and frame is not None and frame.size:
                    return self._packet(frame) if self.raw else frame
            raise EndOfStream(f"end of {self.cam.source}")
        raise SourceError(f"no frame from {self.kind} source {redact(self.cam.source)}")

    def _packet(self, pkt: np.ndarray) -> EncodedJpeg:
        return EncodedJpeg(pkt.copy(), redact(self.cam.source))  # FFmpeg reuses its packet buffer

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None

    def interrupt(self) -> None:
        pass  # OpenCV reads cannot be interrupted: FFmpeg's time out (read_timeout_s); the reader abandons others


def _unreachable(url: str, timeout: float = 2.0) -> str | None:
    """Why FFmpeg could not open a URL, from a short probe of its host: "unreachable: host:port: Connection
    refused"; for rtsp:// the camera's own answer to a DESCRIBE ("RTSP 401 Unauthorized (credentials wrong or
    missing)", "RTSP 404 Not Found (wrong path)"); None when the camera answers and accepts (then: codec, transport)."""
    import socket

    try:
        u = urlsplit(url)
        host = u.hostname
        scheme = u.scheme.lower()
        port = u.port or {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443, "rtmp": 1935}.get(scheme)
    except ValueError:
        return "unparsable URL (reserved characters in the password must be percent-encoded)"
    if not host or not port:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if scheme != "rtsp":
                return None
            netloc = host if u.port is None else f"{host}:{u.port}"
            bare = u._replace(netloc=netloc).geturl()  # no credentials on the wire in clear text
            sock.settimeout(timeout)
            sock.sendall(f"DESCRIBE {bare} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n"
                         f"User-Agent: mae-ad-agent\r\n\r\n".encode())
            line = sock.recv(1024).split(b"\r\n", 1)[0].decode("latin-1")
    except OSError as e:
        return f"unreachable: {host}:{port}: {e.strerror or type(e).__name__}"
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("RTSP/") or parts[1] == "200":
        return None
    code, text = parts[1], (parts[2] if len(parts) > 2 else "")
    hint = {"401": " (credentials wrong or missing)", "403": " (credentials wrong or not allowed)",
            "404": " (wrong path)"}.get(code, "")
    return f"RTSP {code} {text}{hint}".strip()


class MjpegHttpSource:
    """HTTP(S) camera: a multipart/x-mixed-replace MJPEG stream, or a URL answering one JPEG per request."""

    def __init__(self, cam: CameraSection, cap_cfg: CaptureSection):
        self.cam, self.cap_cfg = cam, cap_cfg
        u = urlsplit(str(cam.source))
        self.scheme, self.host, self.port = u.scheme.lower(), u.hostname or "", u.port
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.headers = {"User-Agent": "mae-ad-agent"}
        if u.username is not None:
            token = base64.b64encode(f"{unquote(u.username)}:{unquote(u.password or '')}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self.conn: http.client.HTTPConnection | None = None
        self.resp: http.client.HTTPResponse | None = None
        self.boundary: bytes | None = None
        self.single = False
        self._lock = threading.Lock()
        # single-JPEG URLs are pulled: at most fps requests per second (capture.snapshot_fps when fps is unset)
        self.snapshot_interval = 1.0 / (cam.fps or cap_cfg.snapshot_fps)
        self._next_request = 0.0
        self.requests = 0

    def pace(self, stop: threading.Event) -> None:
        """Snapshot URLs: sleep until the next request is due (the reader calls this before read())."""
        if self.single:
            now = time.monotonic()
            if self._next_request > now:
                stop.wait(self._next_request - now)
            self._next_request = max(self._next_request + self.snapshot_interval, time.monotonic())

    def _request(self) -> http.client.HTTPResponse:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.cap_cfg.open_timeout_s)
        with self._lock:
            self.conn = conn
        try:
            self.requests += 1
            conn.request("GET", self.path, headers=self.headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            raise SourceError(f"HTTP {redact(self.cam.source)}: unreachable: {e}") from None
        if resp.status != 200:
            hint = " (credentials: user:password in the URL)" if resp.status in (401, 403) else ""
            raise SourceError(f"HTTP {redact(self.cam.source)}: status {resp.status} {resp.reason}{hint}")
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
            self._next_request = time.monotonic()
            self.close()
        else:
            self.close()
            raise SourceError(f"HTTP {redact(self.cam.source)}: unsupported Content-Type {ctype!r} "
                              "(use reader: opencv for other stream formats)", retry=False)

    def _decode(self, data: bytes) -> np.ndarray | EncodedJpeg:
        import cv2

        if self.cam.decode == "lazy":
            if not data:
                raise BadFrame(f"HTTP {redact(self.cam.source)}: empty image part")
            return EncodedJpeg(data, f"HTTP {redact(self.cam.source)}")
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if img is None:
            raise BadFrame(f"HTTP {redact(self.cam.source)}: undecodable image ({len(data)} bytes)")
        return img

    def read(self) -> np.ndarray | EncodedJpeg:
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


class EncodedJpeg:
    """One frame as its source delivered it, still JPEG-encoded (`cameras[].decode: lazy`): decoded only when the
    loop scores it (`Frame.image`), so the frames a busy loop never takes are never decoded."""

    __slots__ = ("data", "where")

    def __init__(self, data: np.ndarray | bytes, where: str):
        self.data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else data.reshape(-1)
        self.where = where  # names the source in a decode error

    def decode(self) -> np.ndarray:
        """BGR uint8 [H, W, 3]; raises BadFrame when the bytes are not a decodable image."""
        import cv2

        img = cv2.imdecode(self.data, cv2.IMREAD_COLOR) if self.data.size else None
        if img is None:
            raise BadFrame(f"{self.where}: undecodable JPEG frame ({self.data.size} bytes)")
        return img


class Frame:
    """A frame handed from a camera's reader to the loop. `image` is the decoded frame; a frame read with
    `cameras[].decode: lazy` is decoded on the first access (raising BadFrame if it cannot be), in the thread that
    asks for it."""

    __slots__ = ("_image", "_encoded", "frame_id", "t_read_start", "t_read", "wall_time")

    def __init__(self, image: np.ndarray | EncodedJpeg, frame_id: int, t_read_start: float, t_read: float,
                 wall_time: float):
        self._image: np.ndarray | None = None if isinstance(image, EncodedJpeg) else image
        self._encoded: EncodedJpeg | None = image if isinstance(image, EncodedJpeg) else None
        self.frame_id = frame_id  # per camera, counts every frame the reader delivered (gaps = dropped frames)
        self.t_read_start = t_read_start  # time.monotonic() before the read
        self.t_read = t_read  # time.monotonic() after the read
        self.wall_time = wall_time  # time.time() after the read

    @property
    def encoded(self) -> bool:
        """True while the frame is still encoded (lazy decoding, not yet accessed)."""
        return self._image is None

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            assert self._encoded is not None
            self._image = self._encoded.decode()
            self._encoded = None
        return self._image


@dataclass
class ReaderStats:
    frames: int = 0
    dropped: int = 0
    taken: int = 0
    reconnects: int = 0
    watchdog_restarts: int = 0
    stalls: int = 0  # restarts because no new frame came within read_timeout_s
    bad_frames: int = 0  # unreadable/undecodable frames skipped
    last_error: str | None = None
    fps_window: list[float] = field(default_factory=list)


class CameraReader:
    """A thread that reads one source, keeps only the newest frame and reconnects with back-off.

    `status` is one of starting, streaming, reconnecting, failed, ended; `detail` says why (None while streaming).
    `on_status(camera, status, detail)` is called on each change; `new_frame` (a shared Event) is set on every frame
    so the loop can sleep until one arrives. The loop calls `check_watchdog()` often (stall detection).
    """

    ABANDONED_MAX = 3  # captures left blocked in a read (each in its own thread) before no new one is started

    def __init__(self, cam: CameraSection, cap_cfg: CaptureSection, new_frame: threading.Event,
                 on_status: Any = None, source_factory: Any = make_source):
        self.cam, self.cap_cfg = cam, cap_cfg
        self.name = cam.name
        self.new_frame = new_frame
        self.on_status = on_status
        self.source_factory = source_factory
        self.stats = ReaderStats()
        self.status = STARTING
        self.status_since = time.monotonic()  # when `status` last changed
        self.detail: str | None = None
        self.last_frame_t = time.monotonic()  # last new frame (or end of a deliberate pause between requests)
        self._slot: Frame | None = None
        self._lock = threading.Lock()
        self._status_lock = threading.RLock()
        self._stop = threading.Event()
        self._restart = threading.Event()
        self._restart_t: float | None = None
        self._source: Source | None = None
        self._thread: threading.Thread | None = None
        self._abandoned: list[threading.Thread] = []
        self._gen = 0
        self._read_started: float | None = None  # monotonic start of the read in progress (None: not reading)
        self._open_started: float | None = None  # monotonic start of the open in progress
        self._open_reported = False
        self._min_interval = 1.0 / cam.fps if cam.fps else 0.0

    # --- thread API -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, args=(self._gen,), name=f"reader-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        src = self._source
        if src is not None:
            src.interrupt()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("camera %s: reader did not stop within %.0f s (blocked in a read or an open)", self.name, timeout)

    def restart(self, reason: str) -> None:
        """Close and reopen the source (the watchdog and the stall check call this). A read that cannot be
        interrupted is abandoned by `check_watchdog` after a grace period and a fresh capture is opened."""
        log.warning("camera %s: restarting source (%s)", self.name, reason)
        self.stats.watchdog_restarts += 1
        with self._status_lock:
            self.stats.last_error = reason
            if self.status == STREAMING:
                self._set_status(RECONNECTING, reason)
            self._restart_t = time.monotonic()
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
        """Stall check, called often by the loop. A read in progress for more than capture.read_timeout_s, or no
        new frame for capture.watchdog_s while streaming, restarts the source. A restart whose read is still
        blocked after a grace period starts a fresh capture in a new thread. Returns True if it acted."""
        now = time.monotonic() if now is None else now
        cfg = self.cap_cfg
        os_ = self._open_started
        if os_ is not None and not self._open_reported and now - os_ > cfg.open_timeout_s + 1.0:
            self._open_reported = True  # an open that never returns (a GStreamer pipeline waiting): say so
            hint = (" (a GStreamer element missing or waiting? try the pipeline with gst-launch-1.0)"
                    if self.cam.resolved_kind() == "gstreamer" else "")
            why = f"opening the source has not returned after {now - os_:.0f} s{hint}"
            log.error("camera %s: %s", self.name, why)
            self.stats.last_error = why
            self._set_status(RECONNECTING, why)
            return True
        if self._restart.is_set() and self._restart_t is not None:
            rs = self._read_started
            if rs is not None and now - self._restart_t > min(2.0, cfg.read_timeout_s):
                self._abandon(now)
                return True
            return False
        if self.status != STREAMING:
            return False
        rs = self._read_started
        if rs is not None and now - rs > cfg.read_timeout_s:
            self.stats.stalls += 1
            self.restart(f"stalled: no new frame for {now - rs:.1f} s (read_timeout_s {cfg.read_timeout_s:g})")
            return True
        if now - self.last_frame_t > cfg.watchdog_s:
            self.last_frame_t = now
            self.restart(f"no new frame for {cfg.watchdog_s:.1f} s")
            return True
        return False

    def _abandon(self, now: float) -> None:
        """The capture is stuck in a read nobody can interrupt: leave it to its thread (which releases it when the
        read returns) and open a fresh one in a new thread."""
        self._abandoned = [t for t in self._abandoned if t.is_alive()]
        if len(self._abandoned) >= self.ABANDONED_MAX:
            if self._restart_t is not None and now - self._restart_t > 60:
                log.error("camera %s: %d captures still blocked in a read; not opening another", self.name,
                          len(self._abandoned))
                self._restart_t = now
            return
        log.warning("camera %s: the capture is blocked in a read; opening a fresh one (the old one is released "
                    "when its read returns)", self.name)
        with self._status_lock:
            if self._thread is not None:
                self._abandoned.append(self._thread)
            self._gen += 1
            self._source = None
            self._read_started = None
            self._restart_t = None
            self._restart.clear()
            self.start()

    def fps(self) -> float:
        w = self.stats.fps_window
        if len(w) < 2:
            return 0.0
        span = w[-1] - w[0]
        return (len(w) - 1) / span if span > 0 else 0.0

    # --- internals --------------------------------------------------------------------------------------------
    def _set_status(self, status: str, detail: str | None = None) -> None:
        with self._status_lock:
            if status != self.status or (status != STREAMING and detail != self.detail):
                changed = status != self.status
                if changed:
                    self.status_since = time.monotonic()
                self.status = status
                self.detail = None if status == STREAMING else (redact(detail) if detail else None)
                if changed:
                    log.info("camera %s: %s%s", self.name, status, f" ({self.detail})" if self.detail else "")
                if self.on_status is not None:
                    try:
                        self.on_status(self.name, status, self.detail)
                    except Exception:
                        log.exception("camera %s: status callback failed", self.name)

    def _current(self, gen: int) -> bool:
        return gen == self._gen and not self._stop.is_set()

    def _run(self, gen: int) -> None:
        attempts = 0
        delay = self.cap_cfg.reconnect_initial_s
        said, said_t, failing_since = "", 0.0, 0.0  # the open failure last logged as a warning, when; first failure
        while self._current(gen):
            with self._status_lock:
                if gen != self._gen:
                    return
                self._restart.clear()
                self._restart_t = None
            src = self.source_factory(self.cam, self.cap_cfg)
            self._open_started, self._open_reported = time.monotonic(), False
            try:
                src.open()
            except SourceError as e:
                self._open_started = None
                if not self._current(gen):
                    src.close()
                    return
                self.stats.last_error = redact(e)
                attempts += 1
                if not e.retry or (self.cap_cfg.max_attempts and attempts >= self.cap_cfg.max_attempts):
                    self._set_status(FAILED, str(e))
                    log.error("camera %s: %s", self.name, redact(e))
                    return
                self._set_status(RECONNECTING, str(e))
                now, why = time.monotonic(), redact(e)
                failing_since = failing_since or now
                if why != said or now - said_t >= REMIND_S:  # a new cause now, an unchanged one once a minute
                    log.warning("camera %s: %s; retrying in %.1f s%s", self.name, why, delay,
                                f" (attempt {attempts}, failing for {now - failing_since:.0f} s)" if why == said else "")
                    said, said_t = why, now
                else:
                    log.debug("camera %s: %s; retrying in %.1f s (attempt %d)", self.name, why, delay, attempts)
                self._stop.wait(delay)
                delay = min(delay * 2, self.cap_cfg.reconnect_max_s)
                continue
            self._open_started = None
            said, failing_since = "", 0.0  # opened: the next failure is news
            with self._status_lock:
                if gen != self._gen:
                    src.close()
                    return
                self._source = src
            ended = self._read_loop(src, gen)
            with self._status_lock:
                if self._source is src:
                    self._source = None
            src.close()  # a real restart: the capture is released before a new one is opened
            if not self._current(gen):
                return
            if ended:
                self._set_status(ENDED, "end of file")
                return
            restarted = self._restart.is_set()
            if self.status == STREAMING or restarted:
                attempts, delay = 0, self.cap_cfg.reconnect_initial_s  # it worked once: start the back-off afresh
            self.stats.reconnects += 1
            self._set_status(RECONNECTING, self.stats.last_error)
            self._stop.wait(delay)
            delay = min(delay * 2, self.cap_cfg.reconnect_max_s)

    def bad_frame(self, e: BadFrame) -> None:
        """Count and log an unreadable frame: one the reader skipped, or one found undecodable after it handed it over
        (decode: lazy)."""
        self.stats.bad_frames += 1
        n = self.stats.bad_frames
        if n <= 10 or n % 100 == 0:  # every one of the first ten, then every hundredth
            log.warning("camera %s: %s; skipped (%d bad frame(s) so far)", self.name, redact(e), n)

    def _read_loop(self, src: Source, gen: int) -> bool:
        """Read until stop/restart/error. Returns True at the end of a non-looping file."""
        next_allowed = 0.0
        bad_run = 0
        pace = getattr(src, "pace", None)
        timeout = self.cap_cfg.read_timeout_s
        repeat_since: float | None = None
        while self._current(gen) and not self._restart.is_set():
            if pace is not None:
                pace(self._stop)
                self.last_frame_t = max(self.last_frame_t, time.monotonic())  # a deliberate wait is no stall
            t0 = time.monotonic()
            self._read_started = t0
            try:
                img = src.read()
            except EndOfStream:
                return True
            except BadFrame as e:
                bad_run += 1
                self.bad_frame(e)
                if bad_run >= self.cap_cfg.max_bad_frames:
                    self.stats.last_error = f"{bad_run} unreadable frames in a row"
                    log.warning("camera %s: %s; reopening", self.name, self.stats.last_error)
                    if getattr(src, "kind", None) == "file" and not self.cam.loop:
                        return True
                    return False
                continue
            except SourceError as e:
                if self._current(gen):
                    self.stats.last_error = redact(e)
                    log.warning("camera %s: %s", self.name, redact(e))
                return False
            except Exception as e:  # a decoder bug must not kill the reader
                self.stats.last_error = redact(f"{type(e).__name__}: {e}")
                log.exception("camera %s: read failed", self.name)
                return False
            finally:
                if gen == self._gen:
                    self._read_started = None
            bad_run = 0
            t1 = time.monotonic()
            if not self._current(gen) or self._restart.is_set():
                return False  # a restart was asked while this read was blocked: its frame is stale
            if t1 - t0 >= timeout:  # handed out only after the read timeout: a delayed frame of a stalled camera
                self.stats.stalls += 1
                self.stats.last_error = f"stalled: the read took {t1 - t0:.1f} s (read_timeout_s {timeout:g})"
                log.warning("camera %s: %s; reopening", self.name, self.stats.last_error)
                return False
            if getattr(src, "repeated", False):  # same decoder timestamp as the previous frame: not new
                repeat_since = repeat_since or t0
                if t1 - repeat_since >= timeout:
                    self.stats.stalls += 1
                    self.stats.last_error = f"stalled: the same frame for {t1 - repeat_since:.1f} s"
                    log.warning("camera %s: %s; reopening", self.name, self.stats.last_error)
                    return False
                continue
            repeat_since = None
            self.last_frame_t = t1
            if self._min_interval:
                if t1 < next_allowed - 0.1 * self._min_interval:  # 10 % slack: paced sources jitter
                    continue
                next_allowed = max(next_allowed + self._min_interval, t1 - self._min_interval)
            with self._status_lock:
                if gen != self._gen or self._restart.is_set():
                    return False
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
