"""The agent against a real mosquitto with real streams (a video file written by OpenCV, MJPEG over HTTP).

RTSP is not covered: no RTSP server can be stood up here without extra software (OpenCV cannot serve RTSP and the
ffmpeg CLI / mediamtx are not installed); RTSP goes through the same OpenCV/FFmpeg path as video files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.agent.conftest import PASSWORD, USER, AgentThread, GateProxy, Recorder, agent_cfg, wait_until

pytestmark = pytest.mark.broker


def test_scores_for_every_camera_stats_health_and_clean_stop(tmp_path, broker, recorder, video, mjpeg_server):
    cfg = agent_cfg(tmp_path, broker.port, [
        {"name": "file", "source": video["path"], "loop": True},
        {"name": "http", "source": mjpeg_server.url},
    ], health={"enabled": True, "port": 0})
    at = AgentThread(cfg).start()
    try:
        assert recorder.wait_for(lambda: {d["camera"] for d in recorder.json("score")} == {"file", "http"}, 20)
        assert recorder.wait_for(lambda: len(recorder.json("stats")) >= 1, 10)
        assert wait_until(lambda: at.agent.health_server is not None, 5)
        port = at.agent.health_server.port
        # an alert raised on a frame may wait a moment for the broker's acknowledgement: with the broker up the
        # spool drains, and only then is "nothing waiting" the state to check
        assert wait_until(lambda: at.agent.spool.depth == 0, 10)
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read())
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        assert at.stop() == 0
    score = recorder.json("score")[0]
    assert set(score) >= {"time", "frame_id", "score", "threshold", "anomalous", "latency_ms", "model_id"}
    assert set(score["latency_ms"]) == {"capture", "preprocess", "engine", "decide"}
    assert score["model_id"] == "brightness-64" and score["threshold"] == pytest.approx(0.17)
    stats = recorder.json("stats")[0]
    assert set(stats["cameras"]) == {"file", "http"} and "spool_depth" in stats and stats["rss_mb"] > 0
    assert health["ok"] is True and health["cameras"] == {"file": "streaming", "http": "streaming"}
    assert 'maead_frames_scored_total{camera="http"}' in metrics and "maead_spool_depth 0" in metrics
    statuses = [p.decode() for p in recorder.payloads("status")]
    assert "streaming" in statuses and statuses[-1] == "offline"
    assert recorder.payloads("status")[0] == b"online"


def test_alert_lifecycle_matches_defect_frames(tmp_path, broker, recorder, video):
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "line", "source": video["path"], "loop": False}])
    at = AgentThread(cfg).start()
    try:
        assert wait_until(lambda: "line" in at.agent.cams and at.agent.cams["line"].reader.status == "ended", 30)
        assert recorder.wait_for(lambda: sum(e["event"] == "end" for e in recorder.json("alert")) >= 2, 10)
    finally:
        at.stop()
    events = recorder.json("alert")
    starts = [e for e in events if e["event"] == "start"]
    ends = [e for e in events if e["event"] == "end"]
    assert len(starts) == len(ends) == len(video["defect_segments"]) == 2
    for (a, b), s, e in zip(video["defect_segments"], starts, ends, strict=True):
        assert s["id"] == e["id"]
        assert a <= s["start_frame_id"] < b and a <= s["frame_id"] < b  # opened inside the defect segment
        assert b <= e["frame_id"] <= b + 6 and e["reason"] == "normal"  # closed soon after it
        assert a <= e["peak_frame_id"] < b and e["peak_score"] > e["threshold"]
        x0, y0, x1, y1 = e["box"]
        assert 0 <= x0 < x1 <= video["size"] and 0 <= y0 < y1 <= video["size"]
        ev_dir = Path(s["evidence"])
        assert (ev_dir / "frame_start.jpg").is_file() and (ev_dir / "overlay_start.jpg").is_file()
        assert json.loads((ev_dir / "alert.json").read_text())["event"] == "end"
    anomalous = [d["frame_id"] for d in recorder.json("score") if d["anomalous"]]
    defect = set(video["defect_frames"])
    assert anomalous and all(f in defect for f in anomalous)  # no false alarm on normal frames
    assert len(recorder.payloads("heatmap")) >= 2 and recorder.payloads("heatmap")[0][:2] == b"\xff\xd8"
    assert b"ended" in recorder.payloads("status")


def test_commands_pause_resume_threshold_snapshot(tmp_path, broker, recorder, video):
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "cam", "source": video["path"], "loop": True}])
    at = AgentThread(cfg).start()
    base = "mae-ad/t"
    try:
        assert recorder.wait_for(lambda: len(recorder.json("score")) > 0, 15)
        recorder.publish(f"{base}/cmd/cam/threshold", "0.5")
        assert recorder.wait_for(lambda: recorder.json("threshold", state=True), 10)
        reply = recorder.json("threshold", state=True)[-1]
        assert reply["ok"] and reply["cameras"]["cam"] == {"paused": False, "threshold": 0.5,
                                                           "threshold_source": "command", "status": "streaming"}
        n = len(recorder.json("score"))
        assert recorder.wait_for(lambda: any(d["threshold"] == 0.5 for d in recorder.json("score")[n:]), 10)

        recorder.publish(f"{base}/cmd/cam/pause", "")
        assert recorder.wait_for(lambda: recorder.json("pause", state=True), 10)
        assert recorder.json("pause", state=True)[-1]["cameras"]["cam"]["paused"] is True
        assert recorder.wait_for(lambda: recorder.payloads("status")[-1] == b"paused", 5)
        time.sleep(0.5)
        n = len(recorder.json("score"))
        time.sleep(1.0)
        assert len(recorder.json("score")) == n  # paused: nothing scored

        recorder.publish(f"{base}/cmd/cam/snapshot", "")
        assert recorder.wait_for(lambda: recorder.json("snapshot", state=True), 10)  # a paused camera still answers
        snap = recorder.json("snapshot", state=True)[-1]
        assert snap["ok"] and snap["frame_bytes"] > 0 and "score" in snap
        assert any(p[:2] == b"\xff\xd8" for p in recorder.payloads("snapshot"))

        recorder.publish(f"{base}/cmd/cam/resume", "")
        assert recorder.wait_for(lambda: len(recorder.json("score")) > n, 10)
        recorder.publish(f"{base}/cmd/cam/threshold", "reset")
        assert recorder.wait_for(lambda: len(recorder.json("threshold", state=True)) >= 2, 10)
        assert recorder.json("threshold", state=True)[-1]["cameras"]["cam"]["threshold_source"] == "model"
        recorder.publish(f"{base}/cmd/nope/pause", "")
        assert recorder.wait_for(lambda: any(not r["ok"] for r in recorder.json("pause", state=True)), 10)
        recorder.publish(f"{base}/cmd/cam/threshold", "abc")
        assert recorder.wait_for(lambda: any(not r["ok"] for r in recorder.json("threshold", state=True)), 10)
    finally:
        at.stop()


def test_wrong_password_is_clear_and_retried_then_password_and_tls_work(tmp_path, broker, pki, caplog,
                                                                         monkeypatch):
    caplog.set_level("INFO")
    monkeypatch.setenv("T_PW", "wrong-pass")
    cams = [{"name": "c", "source": str(tmp_path / "missing.avi")}]
    cfg = agent_cfg(tmp_path / "a", broker.ports["password"], cams,
                    mqtt={"port": broker.ports["password"], "username": USER, "password_env": "T_PW"})
    at = AgentThread(cfg).start()
    try:
        assert wait_until(lambda: at.agent.link is not None and at.agent.link.refusals >= 2, 15)  # keeps retrying
        assert not at.agent.link.connected
        assert "user name or password" in (at.agent.link.last_error or "").lower() \
            or "not authori" in (at.agent.link.last_error or "").lower()
    finally:
        at.stop()
    assert "check mqtt.username" in caplog.text and "wrong-pass" not in caplog.text

    monkeypatch.setenv("T_PW", PASSWORD)
    for name, port, extra in (
        ("password", broker.ports["password"], {"username": USER, "password_env": "T_PW"}),
        ("tls", broker.ports["tls"], {"tls": {"ca_file": pki["ca"]}}),
    ):
        rec = Recorder(broker.port, "mae-ad/" + name).start()
        cfg = agent_cfg(tmp_path / name, port, cams, agent_id=name, mqtt={"port": port, **extra})
        at = AgentThread(cfg).start()
        try:
            assert rec.wait_for(lambda r=rec: b"online" in r.payloads("status"), 15), name
        finally:
            at.stop()
            rec.stop()
    assert PASSWORD not in caplog.text


def _write_cfg(tmp_path: Path, cfg) -> Path:
    from agent.config import dump_agent_config

    p = tmp_path / "agent.yaml"
    p.write_text(dump_agent_config(cfg))
    return p


def _spawn(cfg_path: Path) -> subprocess.Popen[str]:
    exe = Path(sys.executable).with_name("mae-ad")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "app.cli"]
    return subprocess.Popen([*cmd, "run", "--config", str(cfg_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_sigterm_exits_zero_with_offline_and_sigkill_fires_last_will(tmp_path, broker, recorder, video):
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "cam", "source": video["path"], "loop": True}])
    proc = _spawn(_write_cfg(tmp_path, cfg))
    try:
        assert recorder.wait_for(lambda: len(recorder.json("score")) > 3, 30), proc.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert recorder.payloads("status")[-1] == b"offline"
    assert not list((tmp_path / "spool").glob("*.msg"))

    n = len(recorder.payloads("status"))
    proc = _spawn(_write_cfg(tmp_path, cfg))
    try:
        assert recorder.wait_for(lambda: b"online" in recorder.payloads("status")[n:], 30)
        assert recorder.wait_for(lambda: len(recorder.json("score")) > 10, 30)
        proc.kill()  # SIGKILL: no clean exit, the broker publishes the will
        proc.wait(10)
        assert recorder.wait_for(lambda: recorder.payloads("status")[-1] == b"offline", 15)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_broker_outage_every_alert_arrives(tmp_path, broker, video):
    """Kill the broker (SIGKILL) mid-run and restart it: every alert raised arrives, once.

    The agent reaches the broker through a gate the test opens only after its own subscriber is back, so the test
    cannot miss a message the agent delivers right after the restart."""
    from app.agent_demo import write_product_video

    clip = write_product_video(tmp_path / "busy.avi", n_frames=40, fps=20.0, size=96,
                               defect_segments=[(5, 12), (25, 32)], seed=5)  # an alert every second
    gate = GateProxy(broker.port)
    rec1 = Recorder(broker.port).start()
    rec2 = None
    cfg = agent_cfg(tmp_path, gate.port, [{"name": "cam", "source": clip["path"], "loop": True}],
                    mqtt={"port": gate.port, "score_interval_s": 1.0})
    at = AgentThread(cfg).start()
    try:
        assert rec1.wait_for(lambda: len([e for e in rec1.json("alert") if e["event"] == "start"]) >= 2, 20)
        gate.open.clear()
        broker.kill()
        raised_before = at.agent.alerts_raised
        assert wait_until(lambda: at.agent.alerts_raised >= raised_before + 2, 15)  # alerts while down
        assert at.agent.spool.depth > 0
        broker.start()
        rec1.stop()
        rec2 = Recorder(broker.port).start()
        gate.open.set()
        assert wait_until(lambda: at.agent.link.connected and at.agent.spool.depth == 0, 20)
        time.sleep(1.0)
    finally:
        at.stop()
        time.sleep(0.5)
        if rec2 is not None:
            rec2.stop()
        gate.close()
    raised = at.agent.alert_ids
    events = rec1.json("alert") + (rec2.json("alert") if rec2 else [])
    got = [e["id"] for e in events if e["event"] == "start"]
    assert len(raised) >= 4 and at.agent.link.connects >= 2
    assert got == raised  # in order, none missing, no duplicates
    assert len(events) == at.agent.alert_messages  # every start, update and end message arrived once


def test_http_stream_stops_and_returns_reconnects_quickly(tmp_path, broker, recorder, mjpeg_server):
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "http", "source": mjpeg_server.url}],
                    capture={"reconnect_initial_s": 0.2, "reconnect_max_s": 2.0, "read_timeout_s": 1.0})
    at = AgentThread(cfg).start()
    reader = None
    try:
        assert recorder.wait_for(lambda: len(recorder.json("score")) > 3, 15)
        reader = at.agent.cams["http"].reader
        mjpeg_server.stop()
        assert wait_until(lambda: reader.status == "reconnecting", 10)
        time.sleep(3.0)  # the camera is away; the reader backs off
        frames = reader.stats.frames
        mjpeg_server.start()
        t_back = time.monotonic()
        assert wait_until(lambda: reader.status == "streaming" and reader.stats.frames > frames, 10)
        took = time.monotonic() - t_back
    finally:
        at.stop()
    assert took <= 5.0, f"reconnected {took:.1f} s after the stream returned"
    statuses = [p.decode() for p in recorder.payloads("status") if p != b"online"]
    assert "reconnecting" in statuses and statuses.index("reconnecting") < len(statuses) - 1
    assert reader is not None and reader.stats.reconnects >= 1


def test_spool_left_at_exit_is_replayed_on_restart(tmp_path, broker, recorder):
    """Alerts spooled by a run that could not reach the broker are delivered, in order, by the next run."""
    from agent.decide import AlertTracker
    from agent.spool import Spool

    sp = Spool(tmp_path / "spool")
    ids = iter(["old0", "old1", "old2"])  # start events as a previous run made them (the recorder checks schemas)
    tracker = AlertTracker("cam", open_after=1, close_after=1, update_interval_s=0.0, id_factory=lambda: next(ids))
    for i in range(3):
        (start,) = tracker.update(0.9, 0.5, 2 * i, 1000.0 + 2 * i, [1, 2, 3, 4]).events
        sp.put("mae-ad/t/cam/alert", json.dumps({**start, "model_id": "previous-run"}).encode())
        tracker.update(0.1, 0.5, 2 * i + 1, 1001.0 + 2 * i, None)  # closes it (that end event is not spooled)
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "cam", "source": str(tmp_path / "none.avi")}])
    at = AgentThread(cfg).start()
    try:
        assert recorder.wait_for(lambda: len(recorder.json("alert")) >= 3, 15)
    finally:
        at.stop()
    assert [e["id"] for e in recorder.json("alert")] == ["old0", "old1", "old2"]
    assert not list((tmp_path / "spool").glob("*.msg"))


def test_onnx_model_through_trt_backends_without_torch(tmp_path, broker, recorder, video):
    """Integration: a tiny bundle exported to ONNX, scored by the agent in a process that never imports torch."""
    try:
        from trt.export import export_onnx
    except ImportError as e:
        pytest.skip(f"trt.export / trt.backends not importable yet: {e}")
    from tests.conftest import tiny_overrides
    from tests.trt.conftest import make_bundle

    bundle = make_bundle(tmp_path / "bundle", tiny_overrides())
    onnx = export_onnx(bundle, tmp_path / "tiny.onnx", exporter="torchscript")
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "cam", "source": video["path"], "loop": True}],
                    model={"backend": "onnxruntime", "path": str(onnx), "threads": 1})
    cfg_path = _write_cfg(tmp_path, cfg)
    code = ("import sys, threading; from agent.config import load_agent_config; from agent.loop import Agent; "
            "from app.engines import open_engine; "
            f"a = Agent(load_agent_config({str(cfg_path)!r}), engines=open_engine); a.run(duration_s=6, "
            "install_signals=False); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', a.frames_scored, a.model_id)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    flag, frames, model_id = r.stdout.split()
    assert flag == "NO-TORCH" and int(frames) > 5
    scores = recorder.json("score")
    assert scores and scores[0]["model_id"] == model_id and model_id != "None"
    meta_thr = yaml.safe_load(json.dumps(scores[0]))["threshold"]
    assert meta_thr > 0
