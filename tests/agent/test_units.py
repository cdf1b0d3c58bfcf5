"""Unit tests of the watch stage without a broker: decisions, preprocessing, spool, readers, evidence, backend."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.config import CameraSection, CaptureSection, EvidenceSection, RoiSection


# --- import boundary -------------------------------------------------------------------------------------------
def test_import_agent_loads_no_torch_or_timm():
    code = ("import sys, agent, agent.config, agent.backend, agent.capture, agent.preprocess, agent.decide, "
            "agent.spool, agent.mqtt, agent.health, agent.loop, agent.commands, agent.broker, agent.web, "
            "agent.evidence, app.cli_watch, app.engines, app.agent_demo, app.agent_bench; "
            "bad = [m for m in ('torch', 'timm', 'loralib') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- decisions --------------------------------------------------------------------------------------------------
def test_alert_opens_after_n_and_closes_after_m():
    from agent.decide import AlertTracker

    ids = iter(["a1", "a2"])
    tr = AlertTracker("cam", open_after=3, close_after=3, update_interval_s=0.0, id_factory=lambda: next(ids))
    scores = [0.1, 0.9, 0.9, 0.1,  # two anomalous frames: no alert
              0.8, 0.9, 0.95, 0.99, 0.5,  # opens on the 3rd, new peaks update
              0.1, 0.9, 0.1, 0.1,  # two normal, anomalous again (stays open), then three normal: closes
              0.1, 0.1]
    events = []
    for i, s in enumerate(scores):
        d = tr.update(s, 0.6, i, 1000.0 + i, [i, i, i + 1, i + 1])
        assert d.anomalous == (s > 0.6)
        events += d.events
    kinds = [(e["event"], e["frame_id"]) for e in events]
    assert kinds == [("start", 6), ("update", 7), ("end", 13)]
    start, upd, end = events
    assert start["id"] == upd["id"] == end["id"] == "a1"
    assert start["peak_score"] == pytest.approx(0.95) and start["box"] == [6, 6, 7, 7]
    assert upd["peak_score"] == pytest.approx(0.99) and upd["peak_frame_id"] == 7
    assert end["peak_score"] == pytest.approx(0.99) and end["reason"] == "normal"
    assert end["duration_s"] == pytest.approx(7.0) and end["frames"] == 5
    assert tr.alert is None and tr.opened == tr.closed == 1


def test_update_events_are_rate_limited():
    from agent.decide import AlertTracker

    tr = AlertTracker("cam", open_after=1, close_after=1, update_interval_s=10.0)
    evs = []
    for i, s in enumerate([0.7, 0.8, 0.9, 1.0]):
        evs += tr.update(s, 0.5, i, 100.0 + i, None).events
    assert [e["event"] for e in evs] == ["start"]  # peaks rise within 10 s: no update yet
    evs = tr.update(1.1, 0.5, 9, 111.0, None).events
    assert [e["event"] for e in evs] == ["update"] and evs[0]["peak_score"] == pytest.approx(1.1)


# --- preprocessing ----------------------------------------------------------------------------------------------
def test_preprocess_roi_colour_and_range():
    from agent.preprocess import preprocess

    frame = np.zeros((100, 200, 3), np.uint8)
    frame[20:60, 50:130] = (0, 0, 255)  # BGR red inside the ROI
    cam = CameraSection(name="c", source="x.avi", roi=RoiSection(x=50, y=20, width=80, height=40))
    chw, crop, rgb = preprocess(frame, cam, 16)
    assert chw.shape == (3, 16, 16) and chw.dtype == np.float32
    assert (crop.x, crop.y, crop.w, crop.h) == (50, 20, 80, 40)
    assert np.allclose(chw[0], 1.0) and np.allclose(chw[1:], 0.0)  # red lands in the R channel
    cam_rgb = CameraSection(name="c", source="x.avi", colour="rgb")
    chw2, crop2, _ = preprocess(frame, cam_rgb, 16)
    assert (crop2.w, crop2.h) == (200, 100)
    assert chw2[2].max() == pytest.approx(1.0) and chw2[0].max() == 0.0  # an RGB source is not swapped


def test_box_found_and_mapped_back_to_frame():
    from agent.preprocess import Crop, anomalous_box, box_to_frame

    amap = np.zeros((1, 32, 32), np.float32)
    amap[0, 4:8, 10:20] = 1.0
    amap[0, 25, 25] = 0.7  # a second, weaker blob
    box = anomalous_box(amap, 0.5)
    assert box == (10, 4, 20, 8)
    assert box_to_frame(box, Crop(100, 50, 64, 128), 32) == [120, 66, 140, 82]


def test_roi_outside_frame_is_clipped():
    from agent.preprocess import roi_crop

    cam = CameraSection(name="c", source="x.avi", roi=RoiSection(x=90, y=90, width=50, height=50))
    c = roi_crop((100, 120, 3), cam)
    assert (c.x, c.y, c.w, c.h) == (90, 90, 30, 10)


# --- backend ----------------------------------------------------------------------------------------------------
def test_brightness_backend_honours_protocol_and_flags_defects():
    import cv2

    from agent.backend import Backend, BrightnessBackend
    from mae_ad.synthetic import add_defect, normal_tile

    rng = np.random.default_rng(0)
    b = BrightnessBackend(64)
    assert isinstance(b, Backend)

    def prep(img: np.ndarray) -> np.ndarray:
        img = cv2.cvtColor(cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        return img.astype(np.float32).transpose(2, 0, 1) / 255

    normal = np.stack([prep(normal_tile(rng, 160)) for _ in range(8)])
    defect = np.stack([prep(add_defect(normal_tile(rng, 160), k, rng)[0]) for k in ("crack", "spot") * 4])
    maps, scores = b.infer(np.concatenate([normal, defect]))
    assert maps.shape == (16, 1, 64, 64) and maps.dtype == np.float32 and scores.shape == (16,)
    thr = b.meta.threshold
    assert (scores[:8] < thr).all() and (scores[8:] > thr).all()
    with pytest.raises(ValueError):
        b.infer(np.zeros((1, 3, 32, 32), np.float32))


# --- spool ------------------------------------------------------------------------------------------------------
def test_spool_is_durable_ordered_and_acked(tmp_path):
    from agent.spool import Spool

    s = Spool(tmp_path / "sp", max_messages=10)
    for i in range(4):
        s.put("t/alert", f"m{i}".encode())
    m0 = s.next_unsent()
    assert m0 is not None and m0.payload == b"m0"
    s.ack(m0.seq)
    m1 = s.next_unsent()  # handed, never acked: a crash now must not lose it
    assert m1 is not None and m1.payload == b"m1"
    (tmp_path / "sp" / ".000000000099.x.tmp").write_text("half")  # a write interrupted by a crash
    s2 = Spool(tmp_path / "sp", max_messages=10)  # "restart"
    assert s2.depth == 3
    replay = [s2.next_unsent() for _ in range(3)]
    assert [m.payload for m in replay if m] == [b"m1", b"m2", b"m3"]
    assert s2.next_unsent() is None
    new = s2.put("t/alert", b"m4")
    assert new is not None and new.seq > replay[-1].seq  # sequence continues after a restart
    assert not list((tmp_path / "sp").glob(".*.tmp"))


@pytest.mark.parametrize("policy,expect", [("drop_oldest", [b"2", b"3", b"4"]), ("drop_newest", [b"0", b"1", b"2"])])
def test_spool_bound(tmp_path, policy, expect):
    from agent.spool import Spool

    s = Spool(tmp_path / policy, max_messages=3, on_full=policy)
    results = [s.put("t", str(i).encode()) for i in range(5)]
    assert s.depth == 3 and s.dropped == 2
    assert (results[3] is None) == (policy == "drop_newest")
    got = []
    while (m := s.next_unsent()) is not None:
        got.append(m.payload)
    assert got == expect
    assert len(list((tmp_path / policy).glob("*.msg"))) == 3


# --- readers ----------------------------------------------------------------------------------------------------
class FakeSource:
    """Opens fail `fail_opens` times, then frames come from a counter; `stall_after` makes read() block."""

    opens = 0

    def __init__(self, fail_opens: int = 0, stall_after: int | None = None, fast: bool = True):
        self.fail_opens, self.stall_after, self.fast = fail_opens, stall_after, fast
        self.n = 0
        self.unblock = threading.Event()

    def factory(self, cam, cap_cfg):
        return self

    def open(self) -> None:
        from agent.capture import SourceError

        FakeSource.opens += 1
        self.unblock.clear()
        if self.fail_opens > 0:
            self.fail_opens -= 1
            raise SourceError("camera unplugged")
        self.n_open = 0

    def read(self) -> np.ndarray:
        from agent.capture import SourceError

        if self.stall_after is not None and self.n_open >= self.stall_after:
            self.unblock.wait(30)
            raise SourceError("interrupted")
        self.n += 1
        self.n_open += 1
        if not self.fast:
            time.sleep(0.002)
        return np.full((8, 8, 3), self.n % 255, np.uint8)

    def close(self) -> None:
        pass

    def interrupt(self) -> None:
        self.unblock.set()


def _reader(src: FakeSource, **cap):
    from agent.capture import CameraReader

    statuses: list[str] = []
    cam = CameraSection(name="c", source="fake.avi")
    cfg = CaptureSection(**{"reconnect_initial_s": 0.05, "reconnect_max_s": 0.2, "watchdog_s": 0.5, **cap})
    r = CameraReader(cam, cfg, threading.Event(), on_status=lambda n, s, d: statuses.append(s),
                     source_factory=src.factory)
    return r, statuses


def test_reader_keeps_newest_frame_and_counts_drops():
    from tests.agent.conftest import wait_until

    src = FakeSource(fast=False)
    r, _ = _reader(src)
    r.start()
    try:
        assert wait_until(lambda: r.stats.frames > 50, 10)
        time.sleep(0.05)
        f = r.take()
        assert f is not None
        assert f.frame_id >= r.stats.frames - 2  # the newest, not the oldest
        assert r.stats.dropped >= 40  # nobody took the others
        assert r.stats.dropped + r.stats.taken <= r.stats.frames + 1
    finally:
        r.stop()


def test_reader_reconnects_with_backoff_after_failures():
    from tests.agent.conftest import wait_until

    FakeSource.opens = 0
    src = FakeSource(fail_opens=3)
    r, statuses = _reader(src)
    r.start()
    try:
        assert wait_until(lambda: r.status == "streaming", 10)
        assert FakeSource.opens == 4
        assert statuses[:2] == ["reconnecting", "streaming"]
        assert r.stats.last_error == "camera unplugged"
    finally:
        r.stop()


def test_reader_fails_after_max_attempts():
    from tests.agent.conftest import wait_until

    r, statuses = _reader(FakeSource(fail_opens=100), max_attempts=3)
    r.start()
    try:
        assert wait_until(lambda: r.status == "failed", 10)
        assert statuses[-1] == "failed"
    finally:
        r.stop()


def test_watchdog_restarts_a_stalled_source():
    from tests.agent.conftest import wait_until

    FakeSource.opens = 0
    src = FakeSource(stall_after=5)
    r, statuses = _reader(src)
    r.start()
    try:
        assert wait_until(lambda: r.stats.frames >= 5, 5)
        assert not r.check_watchdog()  # not silent long enough yet
        assert wait_until(lambda: r.check_watchdog(), 5)
        assert wait_until(lambda: FakeSource.opens >= 2 and r.stats.frames >= 10, 5)
        assert r.stats.watchdog_restarts == 1 and r.stats.reconnects >= 1
    finally:
        r.stop()


def test_gstreamer_source_without_gstreamer_fails_clearly():
    import cv2

    from agent.capture import OpenCvSource, SourceError

    if "GStreamer:                   YES" in cv2.getBuildInformation():
        pytest.skip("this OpenCV has GStreamer")
    cam = CameraSection(name="c", source="nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink")
    assert cam.resolved_kind() == "gstreamer"
    with pytest.raises(SourceError) as e:
        OpenCvSource(cam, CaptureSection()).open()
    assert "GStreamer" in str(e.value) and e.value.retry is False


def test_video_file_reader_delivers_every_frame_in_order(video):
    from agent.capture import CameraReader
    from tests.agent.conftest import wait_until

    cam = CameraSection(name="v", source=video["path"], realtime=False)
    r = CameraReader(cam, CaptureSection(), threading.Event())
    ids = []
    got: list[int] = []

    def take_all() -> bool:
        f = r.take()
        if f is not None:
            ids.append(f.frame_id)
            got.append(int(f.image.shape[0]))
        return r.status == "ended"

    r.start()
    try:
        assert wait_until(take_all, 20)
        take_all()
        assert r.stats.frames == video["frames"]
        assert ids == sorted(ids) and set(got) == {video["size"]}
        assert r.stats.dropped + len(ids) == video["frames"]
    finally:
        r.stop()


# --- evidence ---------------------------------------------------------------------------------------------------
def test_evidence_retention_keeps_newest(tmp_path):
    from agent.evidence import EvidenceStore

    store = EvidenceStore(EvidenceSection(dir=str(tmp_path / "ev"), max_alerts=3))
    img = np.zeros((16, 16, 3), np.uint8)
    for i in range(5):
        d = store.save("cam", f"id{i}", 1_700_000_000 + i, img, b"\xff\xd8jpeg", {"id": f"id{i}"}, "start")
        assert d is not None and (d / "frame_start.jpg").is_file()
        store.finish(f"id{i}", {"id": f"id{i}", "event": "end"})
    left = sorted(p.name.split("_")[1] for p in (tmp_path / "ev" / "cam").iterdir())
    assert left == ["id2", "id3", "id4"]
    assert json.loads((next((tmp_path / "ev" / "cam").glob("*_id4")) / "alert.json").read_text())["event"] == "end"


# --- health -----------------------------------------------------------------------------------------------------
def test_health_server_answers(tmp_path):
    import urllib.error
    import urllib.request

    from agent.health import HealthServer, prom_lines

    state = {"ok": True}
    hs = HealthServer("127.0.0.1", 0, lambda: (state["ok"], {"ok": state["ok"]}),
                      lambda: "\n".join(prom_lines("maead_x_total", "x", "counter", [({"camera": "a"}, 3)])) + "\n")
    hs.start()
    try:
        base = f"http://127.0.0.1:{hs.port}"
        assert json.loads(urllib.request.urlopen(base + "/healthz", timeout=5).read()) == {"ok": True}
        text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        assert 'maead_x_total{camera="a"} 3' in text and "# TYPE maead_x_total counter" in text
        state["ok"] = False
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/healthz", timeout=5)
        assert e.value.code == 503
    finally:
        hs.stop()


def test_example_configs_validate():
    from agent.config import load_agent_config

    files = sorted(Path(__file__).resolve().parents[2].glob("configs/agent*.yaml"))
    assert len(files) >= 3
    for f in files:
        cfg = load_agent_config(f)
        assert cfg.cameras


def test_box_of_a_strong_defect_is_its_half_maximum_region_not_its_tail():
    """A spot scored far above the threshold: its smoothed tail stays above the threshold almost everywhere, and the
    box is the half-maximum region around the spot; a spot just above the threshold is boxed at the threshold."""
    from agent.preprocess import anomalous_box

    yy, xx = np.mgrid[:160, :160]
    blob = np.exp(-((yy - 80.0) ** 2 + (xx - 60.0) ** 2) / (2 * 12.0 ** 2)).astype(np.float32)
    x0, y0, x1, y1 = anomalous_box(450.0 * blob, 7.0)  # above 7 out to r ~ 35 px; half max at r ~ 14 px
    assert 40 <= x0 <= 50 and 70 <= x1 <= 80 and 60 <= y0 <= 70 and 90 <= y1 <= 100, (x0, y0, x1, y1)
    x0, y0, x1, y1 = anomalous_box(10.0 * blob, 7.0)  # faint: 0.7 of the peak is the binding level
    assert 48 <= x0 <= 52 and 68 <= x1 <= 72, (x0, x1)
