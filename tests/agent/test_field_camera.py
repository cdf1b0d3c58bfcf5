"""Field faults of cameras (issue 15, items 3-8) against real parts: video files written by OpenCV, an HTTP camera
on 127.0.0.1 (MJPEG stream and single-JPEG snapshot URL) that can freeze, fail and come back, a real mosquitto
broker, and an RTSP camera (Debian's gst-rtsp-server) where installed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.capture import ENDED, RECONNECTING, STREAMING, CameraReader, SourceError
from agent.config import CameraSection, CaptureSection, load_agent_config, redact
from mae_ad.contract import UserError
from tests.agent.conftest import AgentThread, Recorder, agent_cfg, wait_until

pytestmark = pytest.mark.timeout(120)


def _frame(value: int, size: int = 64, defect: bool = False) -> np.ndarray:
    img = np.full((size, size, 3), value, np.uint8)
    if defect:
        img[20:40, 20:40] = 255
    return img


class HttpCamera:
    """A camera on 127.0.0.1: GET /stream.mjpg (multipart MJPEG) and GET /snap.jpg (one JPEG per request).

    `frozen` set: the stream keeps its connection open and sends nothing (a hung camera); `down`: new requests are
    refused with 503; `garbage_every` n: every n-th part of the stream is not a JPEG; `auth`: required Basic
    credentials "user:password" (401 otherwise); `defect`: frames carry a bright square."""

    def __init__(self, fps: float = 20.0):
        from agent.broker import free_port

        self.port = free_port()
        self.fps = fps
        self.frozen = threading.Event()
        self.down = threading.Event()
        self.garbage_every = 0
        self.defect = False
        self.auth: str | None = None
        self.requests: dict[str, int] = {"/stream.mjpg": 0, "/snap.jpg": 0}
        self.server: ThreadingHTTPServer | None = None

    def jpeg(self, i: int) -> bytes:
        return cv2.imencode(".jpg", _frame(100 + (i % 20), defect=self.defect))[1].tobytes()

    def start(self) -> HttpCamera:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0]
                outer.requests[path] = outer.requests.get(path, 0) + 1
                if outer.down.is_set():
                    self.send_error(503)
                    return
                if outer.auth is not None:
                    import base64

                    want = "Basic " + base64.b64encode(outer.auth.encode()).decode()
                    if self.headers.get("Authorization") != want:
                        self.send_error(401)
                        return
                if path == "/snap.jpg":
                    jpg = outer.jpeg(outer.requests[path])
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(jpg)))
                    self.end_headers()
                    self.wfile.write(jpg)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                i = 0
                try:
                    while outer.server is not None and not outer.down.is_set():
                        if outer.frozen.is_set():  # hung: connection open, nothing sent
                            time.sleep(0.05)
                            continue
                        i += 1
                        bad = outer.garbage_every and i % outer.garbage_every == 0
                        jpg = b"\x00not a jpeg\x00" * 50 if bad else outer.jpeg(i)
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\n"
                                         + f"Content-Length: {len(jpg)}\r\n\r\n".encode() + jpg + b"\r\n")
                        time.sleep(1.0 / outer.fps)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def log_message(self, *a: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        srv, self.server = self.server, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()

    def url(self, path: str = "/stream.mjpg", creds: str = "") -> str:
        return f"http://{creds}127.0.0.1:{self.port}{path}"


@pytest.fixture
def cam_server():
    s = HttpCamera().start()
    yield s
    s.stop()


def _reader(source: Any, **kw: Any) -> tuple[CameraReader, CaptureSection]:
    cap = CaptureSection(**{"reconnect_initial_s": 0.2, "reconnect_max_s": 1.0, "read_timeout_s": 1.5,
                            "open_timeout_s": 3.0, "watchdog_s": 10.0, **kw.pop("capture", {})})
    cam = CameraSection(name="c", source=source, **kw)
    return CameraReader(cam, cap, threading.Event()), cap


# --- item 3: a damaged frame is not the end of a file -------------------------------------------------------------
def _damaged_video(path: Path, n: int = 60, bad: int = 20) -> None:
    """An MJPEG .avi written by OpenCV, frame i grey level 40 + 3 i, with the JPEG header of frame `bad` destroyed."""
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    for i in range(n):
        vw.write(_frame(40 + 3 * i))
    vw.release()
    data = bytearray(path.read_bytes())
    starts, i = [], data.find(b"\xff\xd8\xff")
    while i >= 0:
        starts.append(i)
        i = data.find(b"\xff\xd8\xff", i + 3)
    assert len(starts) == n
    data[starts[bad]:starts[bad] + 200] = b"\x00" * 200
    path.write_bytes(bytes(data))


def _frame_index(img: np.ndarray) -> int:
    return int(round((float(img.mean()) - 40) / 3))


def _collect(reader: CameraReader, until: Any, timeout: float = 30.0) -> list[int]:
    seen: list[int] = []

    def poll() -> bool:
        f = reader.take()
        if f is not None:
            seen.append(_frame_index(f.image))
        return until(seen)

    reader.start()
    try:
        assert wait_until(poll, timeout)
    finally:
        reader.stop()
    return seen


def test_damaged_frame_is_skipped_and_the_file_read_to_its_end(tmp_path, caplog):
    p = tmp_path / "damaged.avi"
    _damaged_video(p)
    reader, _ = _reader(str(p), realtime=True)  # 10 fps: the test takes every frame
    seen = _collect(reader, lambda s: reader.status == ENDED and reader._slot is None)
    assert reader.stats.frames == 59 and reader.stats.bad_frames == 1
    assert 20 not in seen and seen[-1] == 59 and set(range(21, 60)) <= set(seen)
    assert "unreadable frame 20 of 60" in caplog.text


def test_damaged_frame_in_a_looping_file_does_not_restart_it(tmp_path):
    from agent.capture import OpenCvSource

    p = tmp_path / "damaged.avi"
    _damaged_video(p)
    order: list[int] = []

    class Tap(OpenCvSource):  # the real OpenCV source, recording the index of every frame it delivers
        def read(self) -> np.ndarray:
            img = super().read()
            order.append(_frame_index(img))
            return img

    reader, _ = _reader(str(p), realtime=False, loop=True)
    reader.source_factory = Tap
    reader.start()
    try:
        assert wait_until(lambda: len(order) >= 130, 30)
    finally:
        reader.stop()
    assert reader.stats.bad_frames >= 2 and reader.status == STREAMING
    first_pass = order[:59]
    assert first_pass == [i for i in range(60) if i != 20]  # every intact frame, in order, then the loop
    assert order[59:118] == first_pass


def test_undecodable_jpeg_in_a_stream_is_skipped_not_a_reconnect(cam_server):
    cam_server.garbage_every = 4
    reader, _ = _reader(cam_server.url())
    reader.start()
    try:
        assert wait_until(lambda: reader.stats.frames >= 20 and reader.stats.bad_frames >= 3, 20)
    finally:
        reader.stop()
    assert reader.stats.reconnects == 0 and cam_server.requests["/stream.mjpg"] == 1


# --- decode: lazy (MJPEG): the reader hands over JPEGs, only the frames the loop scores are decoded ---------------
def test_lazy_decode_decodes_only_the_frames_taken(tmp_path, monkeypatch):
    import agent.capture as capture

    p = tmp_path / "v.avi"
    _damaged_video(p, bad=59)  # the last frame damaged: never taken here
    calls = []
    real = capture.EncodedJpeg.decode
    monkeypatch.setattr(capture.EncodedJpeg, "decode", lambda self: calls.append(1) or real(self))
    reader, _ = _reader(str(p), realtime=False, fps=100, decode="lazy")  # pulled at 100 frames/s
    taken: list[Any] = []

    def poll() -> bool:
        f = reader.take()
        if f is not None:
            taken.append(f)
            time.sleep(0.03)  # a busy loop: the reader goes on reading meanwhile
        return reader.status == ENDED

    reader.start()
    try:
        assert wait_until(poll, 30)
    finally:
        reader.stop()
    assert reader.stats.frames == 60 and 5 < len(taken) < 50  # frames were dropped while the loop was busy
    assert all(f.encoded for f in taken) and calls == []  # nothing decoded before the loop asks
    idx = [_frame_index(f.image) for f in taken[:-1]]  # the last frame is the damaged one
    assert len(calls) == len(taken) - 1 and idx == sorted(idx) and len(set(idx)) == len(idx)
    with pytest.raises(capture.BadFrame, match="undecodable JPEG"):
        _ = taken[-1].image


def test_lazy_decode_matches_eager_and_falls_back_on_other_codecs(tmp_path, caplog):
    from agent.capture import OpenCvSource

    p = tmp_path / "v.avi"
    _damaged_video(p, bad=59)
    cap = CaptureSection()
    lazy = OpenCvSource(CameraSection(name="c", source=str(p), decode="lazy"), cap)
    eager = OpenCvSource(CameraSection(name="c", source=str(p)), cap)
    lazy.open()
    eager.open()
    try:
        for _ in range(5):
            a, b = lazy.read(), eager.read()
            assert not isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
            assert np.abs(a.decode().astype(int) - b.astype(int)).max() <= 3  # libjpeg vs FFmpeg's decoder
    finally:
        lazy.close()
        eager.close()
    q = tmp_path / "lossless.avi"
    vw = cv2.VideoWriter(str(q), cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*"FFV1"), 10, (64, 64))
    vw.write(_frame(90))
    vw.release()
    src = OpenCvSource(CameraSection(name="c", source=str(q), decode="lazy"), cap)
    with caplog.at_level(logging.WARNING):
        src.open()
    try:
        assert isinstance(src.read(), np.ndarray) and "lazy needs an MJPEG stream" in caplog.text
    finally:
        src.close()
    with pytest.raises(ValueError, match="decode: lazy needs an MJPEG file or URL"):
        CameraSection(name="c", source=0, decode="lazy")


def test_lazy_http_stream_decodes_in_the_loop_and_skips_garbage(cam_server):
    cam_server.garbage_every = 4
    reader, _ = _reader(cam_server.url(), decode="lazy")
    good = bad = 0

    def poll() -> bool:  # as the loop does it (agent.loop.Agent.step)
        nonlocal good, bad
        f = reader.take()
        if f is not None:
            try:
                assert f.image.ndim == 3
                good += 1
            except capture_bad_frame as e:
                reader.bad_frame(e)
                bad += 1
        return good >= 5 and bad >= 1

    from agent.capture import BadFrame as capture_bad_frame

    reader.start()
    try:
        assert wait_until(poll, 20)
    finally:
        reader.stop()
    assert reader.stats.bad_frames == bad and reader.stats.reconnects == 0


@pytest.mark.broker
def test_agent_skips_an_undecodable_lazy_frame_and_scores_the_rest(tmp_path, broker, recorder):
    p = tmp_path / "v.avi"
    _damaged_video(p, bad=20)
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "c", "source": str(p), "decode": "lazy"}])
    at = AgentThread(cfg).start()
    try:
        assert wait_until(lambda: "c" in at.agent.cams and at.agent.cams["c"].reader.status == ENDED, 30)
        time.sleep(0.5)
    finally:
        at.stop()
    stats = at.agent.cams["c"].reader.stats
    assert at.error is None and stats.frames == 60  # the damaged packet was read; its decode failed in the loop
    assert stats.bad_frames == 1 and at.agent.frames_scored == 60 - 1 - stats.dropped


# --- item 6: a snapshot URL is polled at the configured rate -------------------------------------------------------
@pytest.mark.parametrize("fps, rate", [(4.0, 4.0), (None, 5.0)])
def test_snapshot_url_is_requested_at_the_configured_rate(cam_server, fps, rate):
    reader, _ = _reader(cam_server.url("/snap.jpg"), fps=fps)
    reader.start()
    t0 = time.monotonic()
    try:
        assert wait_until(lambda: reader.stats.frames >= 3, 10)
        time.sleep(2.0)
    finally:
        reader.stop()
        span = time.monotonic() - t0
    n = cam_server.requests["/snap.jpg"]
    assert n <= rate * span + 2, f"{n} requests in {span:.1f} s"
    assert reader.stats.frames >= rate * 2.0 - 2  # and it does keep polling at that rate


def test_file_read_as_fast_as_possible_honours_fps_without_skipping(tmp_path):
    from agent.capture import OpenCvSource

    p = tmp_path / "damaged.avi"
    _damaged_video(p)
    order: list[int] = []

    class Tap(OpenCvSource):
        def read(self) -> np.ndarray:
            img = super().read()
            order.append(_frame_index(img))
            return img

    reader, _ = _reader(str(p), realtime=False, fps=20.0)
    reader.source_factory = Tap
    reader.start()
    t0 = time.monotonic()
    try:
        assert wait_until(lambda: len(order) >= 10, 10)
        time.sleep(1.0)
    finally:
        reader.stop()
        span = time.monotonic() - t0
    assert len(order) <= 20 * span + 2  # read at 20/s, not as fast as it decodes
    assert order == [i for i in range(60) if i != 20][:len(order)]  # and nothing skipped but the damaged frame


# --- item 5: a frozen camera is a lost camera; the restart is real ---------------------------------------------
def _run_watchdog(reader: Any) -> threading.Event:
    """Check `reader`'s watchdog every 50 ms in a thread, as Agent.step does; set the returned event to stop."""
    stop = threading.Event()

    def agent_loop() -> None:
        while not stop.is_set():
            reader.check_watchdog()
            time.sleep(0.05)

    threading.Thread(target=agent_loop, daemon=True).start()
    return stop


@pytest.mark.parametrize("reader_kind", ["mjpeg", "opencv"])
def test_frozen_stream_leaves_streaming_within_read_timeout_and_reconnects(cam_server, reader_kind):
    reader, cap = _reader(cam_server.url(), reader=reader_kind)
    loop_stop = _run_watchdog(reader)
    reader.start()
    try:
        assert wait_until(lambda: reader.status == STREAMING and reader.stats.frames > 5, 20)
        before = cam_server.requests["/stream.mjpg"]
        cam_server.frozen.set()
        t_freeze = time.monotonic()
        assert wait_until(lambda: reader.status != STREAMING, cap.read_timeout_s + 3)
        left = time.monotonic() - t_freeze
        cam_server.frozen.clear()
        frames = reader.stats.frames
        assert wait_until(lambda: reader.status == STREAMING and reader.stats.frames > frames + 3, 20)
    finally:
        loop_stop.set()
        reader.stop()
    assert left <= cap.read_timeout_s + 1.0, f"still streaming {left:.1f} s after the camera froze"
    assert reader.stats.reconnects >= 1
    assert cam_server.requests["/stream.mjpg"] > before  # a new connection: the restart was real


class _BlockingSource:
    """A source whose reads block, uninterruptibly, once `hang` is set (like a GStreamer appsink of a hung
    camera); records opens and closes."""

    opened: list[_BlockingSource] = []
    hang = threading.Event()
    release = threading.Event()

    def __init__(self, cam: Any, cap: Any):
        self.closed = False
        self.blocked = False

    def open(self) -> None:
        _BlockingSource.opened.append(self)

    def read(self) -> np.ndarray:
        if _BlockingSource.hang.is_set() and self is _BlockingSource.opened[0]:
            self.blocked = True
            _BlockingSource.release.wait(30)
        time.sleep(0.02)
        return _frame(120)

    def close(self) -> None:
        self.closed = True

    def interrupt(self) -> None:
        pass  # cannot be interrupted


def test_uninterruptible_blocked_read_gets_a_fresh_capture():
    _BlockingSource.opened.clear()
    _BlockingSource.hang.clear()
    _BlockingSource.release.clear()
    cam = CameraSection(name="g", source="videotestsrc ! appsink")
    cap = CaptureSection(read_timeout_s=1.0, reconnect_initial_s=0.1)
    reader = CameraReader(cam, cap, threading.Event(), source_factory=_BlockingSource)
    reader.start()
    try:
        assert wait_until(lambda: reader.status == STREAMING, 5)
        _BlockingSource.hang.set()
        assert wait_until(lambda: _BlockingSource.opened[0].blocked, 5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(_BlockingSource.opened) < 2:
            reader.check_watchdog()
            time.sleep(0.05)
        assert len(_BlockingSource.opened) >= 2  # a fresh capture while the old one is still blocked
        first = _BlockingSource.opened[0]
        assert not first.closed and first.blocked
        frames = reader.stats.frames
        assert wait_until(lambda: reader.status == STREAMING and reader.stats.frames > frames + 3, 5)
        _BlockingSource.release.set()
        assert wait_until(lambda: first.closed, 5)  # released by its own thread when the read returned
    finally:
        _BlockingSource.release.set()
        reader.stop()
    assert reader.stats.stalls >= 1 and reader.stats.watchdog_restarts >= 1


# --- item 4: a blind camera closes its alert; retained status offline after the agent -------------------------
def test_blind_camera_closes_its_alert_and_statuses_end_offline(tmp_path, broker, recorder, cam_server):
    cam_server.defect = True
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "cam", "source": cam_server.url()}],
                    capture={"read_timeout_s": 1.5, "watchdog_s": 10.0})
    at = AgentThread(cfg).start()
    try:
        assert recorder.wait_for(lambda: any(e["event"] == "start" for e in recorder.json("alert")), 20)
        cam_server.frozen.set()  # the camera goes blind while the alert is open
        assert recorder.wait_for(lambda: any(e["event"] == "end" for e in recorder.json("alert")), 10)
        last_score_before_end = recorder.json("score")[-1]
        time.sleep(2.0)  # blind time
        assert recorder.wait_for(lambda: any(json.loads(p)["status"] == "reconnecting" and json.loads(p)["reason"]
                                             for p in recorder.payloads("detail")), 5)
    finally:
        code = at.stop()
    assert code == 0
    start = next(e for e in recorder.json("alert") if e["event"] == "start")
    end = next(e for e in recorder.json("alert") if e["event"] == "end")
    assert end["id"] == start["id"] and end["reason"] == "camera_lost" and end["camera_status"] == "reconnecting"
    assert end["end"] == last_score_before_end["time"]  # ends at its last scored frame: no blind time
    assert end["duration_s"] == pytest.approx(last_score_before_end["ts"] - _ts(start["start"]), abs=0.01)
    # after the agent, a new subscriber sees no retained "streaming": the cameras say offline
    late = Recorder(broker.port).start()
    try:
        assert late.wait_for(lambda: b"offline" in late.payloads("status"), 5)
        retained = {t: p for t, p, r in late.messages if r}
    finally:
        late.stop()
    assert retained["mae-ad/t/cam/status"] == b"offline" and retained["mae-ad/t/status"] == b"offline"
    assert json.loads(retained["mae-ad/t/cam/status/detail"])["status"] == "offline"


def _ts(iso_time: str) -> float:
    import calendar

    base, ms = iso_time.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


@pytest.mark.slow
def test_first_score_within_5_s_after_a_9_s_outage_with_default_capture(tmp_path, broker, recorder):
    server = HttpCamera().start()
    defaults = CaptureSection().model_dump()
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "cam", "source": server.url()}], capture=defaults)
    at = AgentThread(cfg).start()
    try:
        cs = None
        assert wait_until(lambda: "cam" in at.agent.cams and at.agent.cams["cam"].scored > 3, 20)
        cs = at.agent.cams["cam"]
        server.down.set()
        server.stop()
        assert wait_until(lambda: cs.reader.status == RECONNECTING, 15)
        time.sleep(9.0)
        scored = cs.scored
        server.down.clear()
        server.start()
        t_back = time.monotonic()
        assert wait_until(lambda: cs.scored > scored, 15)
        took = time.monotonic() - t_back
    finally:
        at.stop()
        server.stop()
    assert took <= 5.0, f"first score {took:.1f} s after the camera returned"


# --- items 7 and 8: credentials never leave the agent; failure reasons do ---------------------------------------
@pytest.mark.parametrize("text, secret", [
    ("rtsp://admin:Plain1Pw@cam/s", "Plain1Pw"),
    ("rtsp://admin:Line#3pw@cam/s", "3pw"),
    ("rtsp://admin:ab/CdPw9@cam/s", "CdPw9"),
    ("rtsp://admin:a?Qm7@cam:554/s", "Qm7"),
    ("rtsp://admin:Enc%233pw@cam/s", "Enc%233pw"),
    ("http://cam/cgi-bin/CGIStream.cgi?cmd=GetMJStream&usr=admin&pwd=QryPw55", "QryPw55"),
    ("http://cam/snap.jpg?user=admin&password=Pw4&channel=1", "Pw4"),
    ("http://cam/api?token=Tok3n99", "Tok3n99"),
    ("rtspsrc location=rtsp://admin:GstPw77@cam/s protocols=tcp ! rtph264depay ! appsink", "GstPw77"),
    ("rtspsrc location=rtsp://cam/s user-id=admin user-pw=GstPw77 ! rtph264depay ! appsink", "GstPw77"),
    ('rtspsrc location=rtsp://cam/s user-pw="Sp ace9" ! appsink', "ace9"),
    ("error: x.yaml (with --set cameras.0.source=rtsp://u:FromSet9@10.0.0.1/s): bad", "FromSet9"),
])
def test_redact_masks_every_credential_form(text, secret):
    out = redact(text)
    assert secret not in out and "***" in out
    assert redact(out) == out


def test_redact_keeps_what_is_not_a_secret():
    for s in ("rtsp://cam:554/live", "/dev/video0", "v4l2src device=/dev/video0 ! appsink", "0",
              "http://cam/snap.jpg?channel=1&subtype=0"):
        assert redact(s) == s


def test_config_errors_mask_set_values_and_ask_for_percent_encoding(tmp_path):
    y = tmp_path / "agent.yaml"
    y.write_text("model: {backend: brightness}\ncameras:\n  - {name: c, source: 0}\n")
    with pytest.raises(UserError) as e:
        load_agent_config(y, ["cameras.0.source=rtsp://admin:FromSet9@127.0.0.1/s", "cameras.0.trheshold=1"])
    assert "FromSet9" not in str(e.value) and "trheshold" in str(e.value) and "admin:***@" in str(e.value)
    for pw, code in (("Line#3pw", "%23"), ("ab/CdPw9", "%2F"), ("a?b9x", "%3F")):
        with pytest.raises(UserError) as e:
            load_agent_config(y, [f"cameras.0.source=rtsp://admin:{pw}@127.0.0.1:8554/s"])
        msg = str(e.value)
        assert "cameras.0.source" in msg and "percent-encoded" in msg and code in msg
        assert pw not in msg and pw[3:] not in msg
    gst = "rtspsrc location=rtsp://admin:G#st7@127.0.0.1/s ! appsink"
    with pytest.raises(UserError, match="%23") as e:
        load_agent_config(y, [f"cameras.0.source={gst}"])
    assert "G#st7" not in str(e.value)
    # percent-encoded: accepted, and not printed back by validate-config
    cfg = load_agent_config(y, ["cameras.0.source=rtsp://admin:Line%233pw@127.0.0.1:8554/s"])
    assert cfg.cameras[0].source == "rtsp://admin:Line%233pw@127.0.0.1:8554/s"
    r = subprocess.run([sys.executable, "-m", "app.cli", "validate-config", str(y), "--set",
                        "cameras.0.source=rtsp://admin:Line%233pw@127.0.0.1:8554/s"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "rtsp://admin:***@127.0.0.1:8554/s" in r.stdout and "3pw" not in r.stdout + r.stderr


def test_no_credential_in_logs_healthz_or_mqtt_and_status_says_why(tmp_path, broker, recorder, cam_server, caplog):
    from agent.broker import free_port

    caplog.set_level(logging.DEBUG)
    cam_server.auth = "viewer:RightPw1"
    closed = free_port()
    cameras = [
        {"name": "rtsp", "source": f"rtsp://admin:RtspPw9@127.0.0.1:{closed}/Streaming/Channels/101"},
        {"name": "query", "source": f"http://127.0.0.1:{closed}/cgi-bin/mjpg?usr=admin&pwd=QryPw55"},
        {"name": "wrong", "source": cam_server.url(creds="viewer:WrongPw3@")},
        {"name": "right", "source": cam_server.url(creds="viewer:RightPw1@")},
        {"name": "gst", "source": "rtspsrc location=rtsp://admin:GstPw77@127.0.0.1/s user-pw=GstPw77 ! "
                                  "rtph264depay ! avdec_h264 ! videoconvert ! appsink"},
    ]
    cfg = agent_cfg(tmp_path, broker.port, cameras, health={"enabled": True, "port": 0})
    at = AgentThread(cfg).start()
    try:
        assert wait_until(lambda: at.agent.health_server is not None and "right" in at.agent.cams
                          and at.agent.cams["right"].scored > 2, 20)
        assert wait_until(lambda: at.agent.cams["wrong"].reader.stats.last_error is not None
                          and at.agent.cams["rtsp"].reader.stats.reconnects + 1 > 0
                          and at.agent.cams["rtsp"].reader.detail is not None, 20)
        time.sleep(1.5)  # a few retries
        port = at.agent.health_server.port
        try:
            health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read().decode()
        except urllib.error.HTTPError as e:
            health = e.read().decode()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        at.stop()
    mqtt_text = "\n".join(p.decode("utf-8", "replace") for _, p, _ in recorder.messages)
    evidence = "\n".join(p.read_text(errors="replace") for p in Path(tmp_path / "evidence").rglob("*.json"))
    for where, text in (("log", caplog.text), ("healthz", health), ("metrics", metrics), ("mqtt", mqtt_text),
                        ("evidence", evidence)):
        for secret in ("RtspPw9", "QryPw55", "WrongPw3", "RightPw1", "GstPw77"):
            assert secret not in text, f"{secret} in {where}"
    reasons: dict[str, str] = {}
    for t, p, _ in recorder.messages:
        d = json.loads(p) if t.endswith("/status/detail") else {}
        if d.get("reason") and d["status"] != "offline":
            reasons[t.split("/")[-3]] = d["reason"]
    assert "401" in reasons["wrong"]
    assert "unreachable" in reasons["rtsp"] and "unreachable" in reasons["query"]
    if "GStreamer:                   YES" not in cv2.getBuildInformation():
        assert "no GStreamer" in reasons["gst"] and cv2.__version__ in reasons["gst"]
    h = json.loads(health)
    assert "401" in h["camera_reasons"]["wrong"] and h["cameras"]["right"] == "streaming"
    assert "OpenCV " + cv2.__version__ in caplog.text and "GStreamer:" in caplog.text  # the startup line


def test_opencv_line_and_install_extras():
    import tomllib

    from agent.capture import opencv_info, opencv_line

    info = opencv_info()
    line = opencv_line()
    assert cv2.__version__ in line and info["file"] in line and "GStreamer: " in line
    assert info["gstreamer"] == ("GStreamer:                   YES" in cv2.getBuildInformation())
    proj = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    has_cv = lambda deps: any(d.lower().startswith("opencv") for d in deps)  # noqa: E731
    assert not has_cv(proj["dependencies"])  # the base install never pulls the wheel
    extras = proj["optional-dependencies"]
    assert not has_cv(extras["agent-system-opencv"]) and has_cv(extras["agent"]) and has_cv(extras["learn"])
    assert set(extras["agent-system-opencv"]) == {d for d in extras["agent"] if not d.lower().startswith("opencv")}


# --- item 5 with a real RTSP camera (gst-rtsp-server) ----------------------------------------------------------
RTSP_SERVER = '''
import signal, sys
import gi
gi.require_version("Gst", "1.0"); gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer
Gst.init(None)
srv = GstRtspServer.RTSPServer(); srv.set_address("127.0.0.1"); srv.set_service(sys.argv[1])
f = GstRtspServer.RTSPMediaFactory()
f.set_launch("( filesrc location=%s ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )" % sys.argv[2])
if len(sys.argv) > 3:  # USER:PASSWORD: Basic authentication required
    user, pw = sys.argv[3].split(":", 1)
    auth = GstRtspServer.RTSPAuth()
    token = GstRtspServer.RTSPToken()
    token.set_string("media.factory.role", "user")
    auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, pw), token)
    srv.set_auth(auth)
    perms = GstRtspServer.RTSPPermissions()
    perms.add_role_from_structure(Gst.Structure.new_from_string(
        "user, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"))
    f.set_permissions(perms)
srv.get_mount_points().add_factory("/product", f)
srv.attach(None)
loop = GLib.MainLoop()
GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
print("READY", flush=True); loop.run()
'''


def _rtsp_available() -> str | None:
    if shutil.which("ffmpeg") is None:
        return "ffmpeg not installed"
    r = subprocess.run(["/usr/bin/python3", "-c", "import gi; gi.require_version('GstRtspServer', '1.0'); "
                        "from gi.repository import GstRtspServer"], capture_output=True, timeout=30)
    return None if r.returncode == 0 else "gst-rtsp-server (python3-gi, gir1.2-gst-rtsp-server-1.0) not installed"


@pytest.fixture(scope="module")
def rtsp_video(tmp_path_factory) -> Path:
    why = _rtsp_available()
    if why:
        pytest.skip(why)
    from app.agent_demo import write_product_video

    d = tmp_path_factory.mktemp("rtsp")
    write_product_video(d / "p.avi", n_frames=400, fps=10.0, size=96)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(d / "p.avi"), "-c:v", "libx264", "-profile:v", "baseline",
                    "-pix_fmt", "yuv420p", "-g", "10", "-bf", "0", str(d / "p.mp4")], check=True, timeout=120)
    (d / "srv.py").write_text(RTSP_SERVER)
    return d


def _rtsp_server(d: Path, *auth: str) -> tuple[subprocess.Popen, int]:
    from agent.broker import free_port

    port = free_port()
    srv = subprocess.Popen(["/usr/bin/python3", str(d / "srv.py"), str(port), str(d / "p.mp4"), *auth],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert srv.stdout is not None and srv.stdout.readline().strip() == "READY"
    return srv, port


@pytest.mark.slow
def test_rtsp_failure_reasons_name_401_and_404(rtsp_video):
    from agent.capture import OpenCvSource, SourceError

    srv, port = _rtsp_server(rtsp_video, "viewer:RightPw1")
    try:
        def open_(url: str) -> None:
            s = OpenCvSource(CameraSection(name="x", source=url), CaptureSection(open_timeout_s=3.0))
            s.open()
            assert s.read().ndim == 3
            s.close()

        open_(f"rtsp://viewer:RightPw1@127.0.0.1:{port}/product")  # the right credentials stream
        for url, why in ((f"rtsp://viewer:WrongPw3@127.0.0.1:{port}/product", "RTSP 401 Unauthorized"),
                         (f"rtsp://127.0.0.1:{port}/product", "RTSP 401 Unauthorized"),
                         (f"rtsp://viewer:RightPw1@127.0.0.1:{port}/nope", "RTSP 40")):
            with pytest.raises(SourceError) as e:
                open_(url)
            assert why in str(e.value) and "Pw" not in str(e.value)
    finally:
        srv.terminate()
        srv.wait(10)


@pytest.mark.slow
def test_frozen_rtsp_camera_is_detected_within_read_timeout(rtsp_video):
    srv, port = _rtsp_server(rtsp_video)
    from agent.capture import OpenCvSource, SourceError

    with pytest.raises(SourceError, match="RTSP 404 Not Found \\(wrong path\\)"):  # the status says why
        OpenCvSource(CameraSection(name="x", source=f"rtsp://127.0.0.1:{port}/nope"),
                     CaptureSection(open_timeout_s=3.0)).open()
    reader, cap = _reader(f"rtsp://127.0.0.1:{port}/product", capture={"read_timeout_s": 3.0, "open_timeout_s": 3.0})
    loop_stop = _run_watchdog(reader)
    reader.start()
    try:
        assert wait_until(lambda: reader.status == STREAMING and reader.stats.frames > 10, 30)
        os.kill(srv.pid, signal.SIGSTOP)  # hung camera: no FIN, no RST
        t_freeze = time.monotonic()
        assert wait_until(lambda: reader.status != STREAMING, 20)
        left = time.monotonic() - t_freeze
        time.sleep(2.0)
        os.kill(srv.pid, signal.SIGCONT)
        frames = reader.stats.frames
        assert wait_until(lambda: reader.status == STREAMING and reader.stats.frames > frames + 5, 40)
    finally:
        loop_stop.set()
        reader.stop()
        os.kill(srv.pid, signal.SIGCONT)
        srv.terminate()
        srv.wait(10)
    assert left <= cap.read_timeout_s + 1.0, f"still streaming {left:.1f} s after the camera froze"
    assert reader.stats.stalls >= 1 and reader.stats.reconnects >= 1


class _HangingOpen:
    """A source whose open never returns until released (an OpenCV GStreamer pipeline with a missing element)."""

    release = threading.Event()

    def __init__(self, cam: Any, cap: Any):
        pass

    def open(self) -> None:
        _HangingOpen.release.wait(30)

    def read(self) -> np.ndarray:
        time.sleep(0.02)
        return _frame(120)

    def close(self) -> None:
        pass

    def interrupt(self) -> None:
        pass


def test_an_open_that_never_returns_is_reported_not_silent():
    _HangingOpen.release.clear()
    cam = CameraSection(name="g", source="nvarguscamerasrc ! appsink", kind="gstreamer")
    reader = CameraReader(cam, CaptureSection(open_timeout_s=0.5), threading.Event(), source_factory=_HangingOpen)
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and reader.status == "starting":
            reader.check_watchdog()
            time.sleep(0.05)
        assert reader.status == RECONNECTING and "has not returned" in (reader.detail or "")
        assert "gst-launch-1.0" in reader.detail
        _HangingOpen.release.set()
        assert wait_until(lambda: reader.status == STREAMING, 5)  # the open returned: streaming, no reason left
        assert reader.detail is None
    finally:
        _HangingOpen.release.set()
        reader.stop()


class _RefusingSource:
    """A camera that never opens: the refusal's text is the class attribute `why` at the time of the attempt."""

    why = "unreachable: 10.0.0.5:554: Connection refused"
    attempts = 0

    def __init__(self, cam, cap) -> None:
        pass

    def open(self) -> None:
        _RefusingSource.attempts += 1
        raise SourceError(_RefusingSource.why)

    def close(self) -> None:
        pass

    def interrupt(self) -> None:
        pass


def test_a_camera_that_keeps_failing_warns_once_per_cause_not_per_retry(caplog):
    """Retries every 20-40 ms: the same cause is one warning (then a reminder a minute), every attempt a debug line;
    a new cause is a new warning; the status says reconnecting all along."""

    _RefusingSource.attempts = 0
    cam = CameraSection(name="dead", source="rtsp://10.0.0.5/stream")
    cap = CaptureSection(reconnect_initial_s=0.02, reconnect_max_s=0.04)
    reader = CameraReader(cam, cap, threading.Event(), source_factory=_RefusingSource)
    with caplog.at_level(logging.DEBUG, logger="agent.capture"):
        reader.start()
        try:
            assert wait_until(lambda: _RefusingSource.attempts >= 15, 10)
            _RefusingSource.why = "RTSP 401 Unauthorized (credentials wrong or missing)"
            n = _RefusingSource.attempts
            assert wait_until(lambda: _RefusingSource.attempts >= n + 10, 10)
            assert reader.status == RECONNECTING and "401" in (reader.detail or "")
        finally:
            reader.stop()
            _RefusingSource.why = "unreachable: 10.0.0.5:554: Connection refused"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "dead" in r.getMessage()]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "retrying" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert "Connection refused" in warnings[0] and "401" in warnings[1]
    assert len(debug) >= 20


def test_a_dead_camera_does_not_flood_stderr_with_opencv_and_ffmpeg_lines():
    """Retrying an unreachable RTSP camera, OpenCV and FFmpeg print lines of their own on every attempt (outside the
    logger); the reader quietens them unless the environment asks for them."""
    code = ("import threading, time\n"
            "from agent.capture import CameraReader\n"
            "from agent.config import CameraSection, CaptureSection\n"
            "r = CameraReader(CameraSection(name='dead', source='rtsp://127.0.0.1:9/stream'),\n"
            "                 CaptureSection(reconnect_initial_s=0.05, reconnect_max_s=0.1), threading.Event())\n"
            "r.start(); time.sleep(2); r.stop(); print('attempts', r.stats.reconnects)\n")
    root = Path(__file__).resolve().parents[2]

    def run(env: dict[str, str]) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")} | env
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stderr + r.stdout  # FFmpeg's lines go to either, depending on OpenCV's log callback

    quiet = run({})
    assert "Connection to tcp://" not in quiet and "cap.cpp" not in quiet, quiet[-2000:]
    assert quiet.count("camera dead:") <= 2  # the reader's own warning (stderr handler of the last-resort logger)
    loud = run({"OPENCV_FFMPEG_LOGLEVEL": "24"})
    assert loud.count("Connection to tcp://127.0.0.1:9") >= 3  # FFmpeg's own line on every attempt, asked for


def test_healthz_fails_when_every_camera_that_should_deliver_has_not_for_stale_s(tmp_path, video):
    """A camera that keeps reconnecting (max_attempts 0) never becomes `failed`; beside a streaming one the agent is
    healthy, alone it makes /healthz fail once it has not streamed for health.stale_s, and it is named."""
    from agent.broker import free_port

    dead = {"name": "dead", "source": "rtsp://127.0.0.1:9/stream"}
    live = {"name": "live", "source": str(video["path"]), "loop": True}
    for cams, healthy in (([dead, live], True), ([dead], False)):
        cfg = agent_cfg(tmp_path / str(len(cams)), free_port(), cams, health={"stale_s": 1.0})
        at = AgentThread(cfg).start()
        try:
            time.sleep(2.5)
            ok, body = at.agent.health()
        finally:
            at.stop()
        assert body["cameras"]["dead"] == RECONNECTING and body["cameras_blind"] == ["dead"], body
        assert ok is healthy and body["ok"] is healthy, body
