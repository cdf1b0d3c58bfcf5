"""The live view (agent.web): configuration rules, the HTTP API and its token, the frame overlay, and the page itself
in a real headless Chromium while the agent plays a synthetic video with a defect segment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.agent.conftest import AgentThread, agent_cfg, wait_until

TOKEN = "t0ken-Very-Secret-42"
ROOT = Path(__file__).resolve().parents[2]


def _req(url: str, method: str = "GET", token: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    r = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        r.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(r, timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _no_broker_port() -> int:
    from agent.broker import free_port

    return free_port()  # nothing listens there: the agent runs, MQTT keeps reconnecting


def test_import_agent_web_loads_no_torch():
    code = ("import sys, agent.web; bad = [m for m in ('torch', 'timm', 'loralib') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- configuration ----------------------------------------------------------------------------------------------
def test_non_local_bind_needs_a_token_source(tmp_path):
    from mae_ad.contract import UserError

    cams = [{"name": "c", "source": "x.avi"}]
    with pytest.raises(UserError, match=r"web.*0\.0\.0\.0.*token"):
        agent_cfg(tmp_path, 1883, cams, web={"enabled": True, "host": "0.0.0.0"})
    with pytest.raises(UserError, match="token_env and token_file"):
        agent_cfg(tmp_path, 1883, cams, web={"token_env": "A", "token_file": "b"})
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):  # loopback: no token needed
        assert agent_cfg(tmp_path, 1883, cams, web={"enabled": True, "host": host}).web.host == host
    assert agent_cfg(tmp_path, 1883, cams, web={"enabled": True, "host": "0.0.0.0", "token_env": "T"}).web.token_env


def test_cli_non_local_bind_without_token_is_one_error_line(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(json.dumps({"model": {"backend": "brightness"}, "cameras": [{"name": "c", "source": "x.avi"}],
                               "web": {"enabled": True, "host": "192.168.1.10"}}))
    p = subprocess.run([sys.executable, "-m", "app.cli", "run", "--config", str(cfg)], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert err and err[0].startswith("error:") and "web" in err[0] and "192.168.1.10" in err[0], p.stderr
    assert "Traceback" not in p.stderr


def test_token_sources(tmp_path, monkeypatch):
    from agent.config import WebSection
    from mae_ad.contract import UserError

    monkeypatch.delenv("MAEAD_T", raising=False)
    with pytest.raises(UserError, match="MAEAD_T is not set"):
        WebSection(token_env="MAEAD_T").token()
    monkeypatch.setenv("MAEAD_T", "  ")
    with pytest.raises(UserError, match="empty token"):
        WebSection(token_env="MAEAD_T").token()
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\nsecond line ignored\n")
    assert WebSection(token_file=str(f)).token() == TOKEN
    with pytest.raises(UserError, match="not found"):
        WebSection(token_file=str(tmp_path / "missing")).token()
    assert WebSection().token() is None


# --- overlay ----------------------------------------------------------------------------------------------------
def test_overlay_stays_in_the_model_region_and_draws_the_threshold_contour():
    from agent.preprocess import Crop
    from agent.web import Scored, render_frame

    frame = np.full((120, 200, 3), 100, np.uint8)
    amap = np.zeros((32, 32), np.float32)
    amap[10:20, 10:20] = 1.0  # above the threshold in a square of the region
    s = Scored(1, 0.0, frame, "bgr", Crop(40, 20, 96, 96), amap, 0.5, 1.0, True, [70, 50, 100, 80], {})
    out = render_frame(s)
    assert out.shape == frame.shape
    outside = np.ones(frame.shape[:2], bool)
    outside[20 - 1:20 + 96 + 1, 40 - 1:40 + 96 + 1] = False  # the region and its outline
    assert (out[outside] == 100).all()  # nothing drawn outside the model's region
    # map 0 -> no blend; map above threshold -> heat colour; the contour (white) borders the hot square
    assert (out[30, 50] == 100).all()
    assert not (out[20 + 45, 40 + 45] == 100).all()
    inside = out[20:116, 40:136]
    assert (inside.min(axis=2) > 240).sum() >= 4 * 20  # white contour pixels around the ~30 px square
    plain = render_frame(s, with_overlay=False)
    assert (plain == 100).all()
    wide = Scored(1, 0.0, np.zeros((500, 2000, 3), np.uint8), "bgr", Crop(0, 0, 2000, 500), amap, 0.5, 0.1,
                  False, None, {})
    assert render_frame(wide).shape == (240, 960, 3)  # scaled to the page's width limit


# --- HTTP API ---------------------------------------------------------------------------------------------------
@pytest.fixture
def long_video(tmp_path_factory):
    """200 frames at 20 fps, 256 px, one defect in frames [50, 90)."""
    from app.agent_demo import write_product_video

    return write_product_video(tmp_path_factory.mktemp("webvideo") / "product.avi", n_frames=200, fps=20.0,
                               size=256, defect_segments=[(50, 90)], seed=5)


def test_api_token_lazy_frames_and_evidence(tmp_path, monkeypatch, caplog, long_video):
    import cv2

    caplog.set_level("DEBUG")
    monkeypatch.setenv("MAEAD_WEB_TOKEN", TOKEN)
    cfg = agent_cfg(tmp_path, _no_broker_port(), [{"name": "line1", "source": long_video["path"], "loop": True}],
                    web={"enabled": True, "port": 0, "token_env": "MAEAD_WEB_TOKEN"})
    at = AgentThread(cfg).start()
    try:
        assert wait_until(lambda: at.agent.web is not None and at.agent.web._thread.is_alive(), 10)
        web = at.agent.web
        base = web.url.rstrip("/")
        assert wait_until(lambda: at.agent.cams["line1"].scored >= 10, 15)
        assert web.encodes == 0  # nothing encoded while no page asks

        code, body, hdr = _req(base + "/")
        assert code == 200 and b"/static/app.js" in body and hdr["Content-Type"].startswith("text/html")
        for name in ("app.js", "style.css"):
            assert _req(f"{base}/static/{name}")[0] == 200
        for bad in ("/static/../web.py", "/static/web.py", "/static/..%2Fweb.py", "/static/.hidden.js", "/nope"):
            assert _req(base + bad)[0] == 404, bad

        code, body, hdr = _req(base + "/api/frame/line1.jpg")
        assert code == 200 and hdr["Content-Type"] == "image/jpeg"
        img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (256, 256, 3)
        at.agent.cams["line1"].paused = True  # no new frames: the same frame is served from the cache
        time.sleep(0.3)
        fid = _req(base + "/api/frame/line1.jpg")[2]["X-Frame-Id"]
        n = web.encodes
        for _ in range(3):
            code, _, hdr = _req(base + "/api/frame/line1.jpg")
            assert code == 200 and hdr["X-Frame-Id"] == fid
        assert web.encodes == n
        assert _req(f"{base}/api/frame/line1.jpg?after={fid}")[0] == 204
        assert _req(base + "/api/frame/nocam.jpg")[0] == 404
        at.agent.cams["line1"].paused = False

        # actions: refused without or with a wrong token, done with it
        assert _req(base + "/api/cameras/line1/pause", "POST")[0] == 401
        assert _req(base + "/api/cameras/line1/pause", "POST", token="wrong")[0] == 401
        assert _req(base + "/api/token", "POST", token="wrong")[0] == 401
        assert not at.agent.cams["line1"].paused
        assert _req(base + "/api/token", "POST", token=TOKEN)[0] == 204
        code, body, _ = _req(base + "/api/cameras/line1/pause", "POST", token=TOKEN)
        assert code == 200 and json.loads(body)["cameras"]["line1"]["paused"] is True
        assert at.agent.cams["line1"].paused
        state = json.loads(_req(base + "/api/state")[1])
        assert state["cameras"]["line1"]["status"] == "paused" and state["actions"] is True
        code, body, _ = _req(base + "/api/cameras/line1/resume", "POST", token=TOKEN)
        assert code == 200 and not at.agent.cams["line1"].paused
        assert _req(base + "/api/cameras/line1/snapshot", "POST", token=TOKEN)[0] == 202
        assert wait_until(lambda: not at.agent.cams["line1"].snapshot_requests, 5)  # the loop took it
        assert _req(base + "/api/cameras/nocam/pause", "POST", token=TOKEN)[0] == 404
        assert _req(base + "/api/cameras/line1/explode", "POST", token=TOKEN)[0] == 404

        # the defect (frames 50..89) opens an alert that closes after it, with evidence
        assert wait_until(lambda: json.loads(_req(base + "/api/state")[1])["alerts"]["recent"], 20)
        state = json.loads(_req(base + "/api/state")[1])
        a = state["alerts"]["recent"][0]
        assert 50 <= a["start_frame_id"] % 200 < 90 and a["end"] and a["peak_score"] > a["threshold"]
        assert a["has_evidence"] and len(a["box"]) == 4
        for kind in ("frame", "overlay", "thumb"):
            code, body, _ = _req(f"{base}/api/alerts/{a['id']}/{kind}.jpg")
            assert code == 200, kind
            im = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
            assert im is not None and (im.shape[1] <= 160 if kind == "thumb" else im.shape[1] >= 224), kind
        assert _req(f"{base}/api/alerts/0000/frame.jpg")[0] == 404
        assert _req(f"{base}/api/alerts/..%2F..%2Fetc/frame.jpg")[0] == 404
        scores = json.loads(_req(base + "/api/scores?since=0")[1])["cameras"]["line1"]
        assert len(scores) >= 50 and all(len(p) == 3 for p in scores)
        assert any(p[1] > p[2] for p in scores) and any(p[1] <= p[2] for p in scores)
        later = json.loads(_req(f"{base}/api/scores?since={scores[-1][0]}")[1])["cameras"]["line1"]
        assert all(p[0] > scores[-1][0] for p in later)
        assert _req(base + "/api/scores?since=abc")[0] == 400
    finally:
        assert at.stop() == 0
    assert TOKEN not in caplog.text  # the token is never logged, even at debug level
    assert "refused (401)" in caplog.text


def test_without_token_the_page_is_read_only(tmp_path, long_video):
    cfg = agent_cfg(tmp_path, _no_broker_port(), [{"name": "line1", "source": long_video["path"], "loop": True}],
                    web={"enabled": True, "port": 0})
    at = AgentThread(cfg).start()
    try:
        assert wait_until(lambda: at.agent.web is not None and at.agent.web._thread.is_alive(), 10)
        base = at.agent.web.url.rstrip("/")
        assert json.loads(_req(base + "/api/state")[1])["actions"] is False
        for tok in (None, "anything"):
            code, body, _ = _req(base + "/api/cameras/line1/pause", "POST", token=tok)
            assert code == 403 and "no web.token_env" in json.loads(body)["error"]
        assert not at.agent.cams["line1"].paused
    finally:
        assert at.stop() == 0


def test_static_files_are_package_data():
    """The page ships in the wheel: pyproject's package-data names every file of agent/static/."""
    tomllib = pytest.importorskip("tomllib")

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["agent"]
    files = sorted((ROOT / "agent" / "static").iterdir())
    assert {f.suffix for f in files} == {".html", ".js", ".css"}
    for f in files:
        assert any(f.match(p) for p in patterns), f
    page = (ROOT / "agent" / "static" / "index.html").read_text() + (ROOT / "agent" / "static" / "app.js").read_text()
    assert "http://" not in page and "https://" not in page  # nothing from the internet


# --- the page in a real browser ---------------------------------------------------------------------------------
CHART_PIXELS = """(() => {
  const cv = document.querySelector('canvas.chart');
  const d = cv.getContext('2d').getImageData(0, 0, cv.width, cv.height).data;
  let line = 0, red = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] < 200) continue;
    if (Math.abs(d[i] - 74) < 30 && Math.abs(d[i + 1] - 163) < 30 && d[i + 2] > 220) line++;
    if (d[i] > 200 && d[i + 1] < 110 && d[i + 2] < 110) red++;
  }
  return [line, red, Number(cv.dataset.points || 0)];
})()"""

PAGE_STATE = """(() => ({
  frame: document.querySelector('img.live')?.dataset.frameId ?? null,
  width: document.querySelector('img.live')?.naturalWidth ?? 0,
  status: document.querySelector('article.camera')?.dataset.status ?? null,
  rows: [...document.querySelectorAll('tr.alert-row')].map(r => [r.dataset.id, r.dataset.open,
         Number(r.dataset.startFrame)]),
  action: document.querySelector('#message').dataset.lastAction ?? null,
  mode: document.querySelector('#mode').textContent,
  mqtt: document.querySelector('#health [data-key="MQTT"]')?.textContent ?? '',
}))()"""


@pytest.mark.broker
def test_page_in_headless_chromium(tmp_path, monkeypatch, broker, long_video):
    from tests.agent.browser import Browser, chromium_path

    if chromium_path() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("websocket", reason="websocket-client is not installed (dev extra)")
    monkeypatch.setenv("MAEAD_WEB_TOKEN", TOKEN)
    cfg = agent_cfg(tmp_path, broker.port, [{"name": "line1", "source": long_video["path"], "loop": True}],
                    web={"enabled": True, "port": 0, "token_env": "MAEAD_WEB_TOKEN", "history_s": 60})
    at = AgentThread(cfg).start()
    browser = None
    try:
        assert wait_until(lambda: at.agent.web is not None and at.agent.web._thread.is_alive(), 10)
        browser = Browser()
        browser.goto(at.agent.web.url)
        frames: set[str] = set()
        seen_open: dict[str, int] = {}
        closed: dict[str, int] = {}
        shot = tmp_path / "liveview.png"
        end = time.monotonic() + 40
        while time.monotonic() < end and not closed:
            s = browser.evaluate(PAGE_STATE)
            if s["frame"] is not None:
                frames.add(s["frame"])
            for rid, is_open, start in s["rows"]:
                if is_open == "1" and rid not in seen_open:
                    seen_open[rid] = start
                    time.sleep(0.4)  # let the thumbnail and the chart catch up, then keep the picture
                    browser.screenshot(shot)
                elif is_open == "0" and rid in seen_open:
                    closed[rid] = start
            time.sleep(0.1)
        # the frame image updates, at the video's size
        assert len(frames) >= 5, frames
        assert s["width"] == 256
        # an alert row appeared while the defect (frames 50..89 of each loop) was on screen, and closed after it
        assert seen_open and closed, (seen_open, s["rows"])
        rid = next(iter(closed))
        assert 50 <= seen_open[rid] % 200 < 90
        assert "connected" in s["mqtt"] and "disconnected" not in s["mqtt"]
        # the score chart draws: the score line (blue) and the threshold and anomalous points (red) are on it
        line, red, points = browser.evaluate(CHART_PIXELS)
        assert points >= 20 and line >= 50 and red >= 20, (line, red, points)
        # a click on the closed alert shows its evidence frame and heatmap
        browser.evaluate(f"document.querySelector('tr.alert-row[data-id=\"{rid}\"]').click()")
        assert wait_until(lambda: browser.evaluate(
            "document.querySelector('#evidence').open && document.querySelector('#evidence-frame').naturalWidth > 0"
            " && document.querySelector('#evidence-overlay').naturalWidth > 0"), 10)
        browser.evaluate("document.querySelector('#evidence').close()")
        # an action without the token is refused, and does nothing
        browser.evaluate("document.querySelector('button[data-action=pause]').click()")
        assert wait_until(lambda: browser.evaluate(PAGE_STATE)["action"] == "pause:line1:401", 10)
        assert not at.agent.cams["line1"].paused
        # a wrong token does not unlock; the right one does, and the action is done
        browser.evaluate("document.querySelector('#token').value = 'nope'; "
                         "document.querySelector('#token-form').requestSubmit()")
        time.sleep(0.5)
        assert browser.evaluate(PAGE_STATE)["mode"] != "actions unlocked"
        browser.evaluate(f"document.querySelector('#token').value = {json.dumps(TOKEN)}; "
                         "document.querySelector('#token-form').requestSubmit()")
        assert wait_until(lambda: browser.evaluate(PAGE_STATE)["mode"] == "actions unlocked", 10)
        browser.evaluate("document.querySelector('button[data-action=pause]').click()")
        assert wait_until(lambda: browser.evaluate(PAGE_STATE)["action"] == "pause:line1:200", 10)
        assert at.agent.cams["line1"].paused
        assert wait_until(lambda: browser.evaluate(PAGE_STATE)["status"] == "paused", 5)
        browser.evaluate("document.querySelector('button[data-action=resume]').click()")
        assert wait_until(lambda: browser.evaluate(PAGE_STATE)["status"] == "streaming", 10)
        assert not at.agent.cams["line1"].paused
        assert shot.is_file() and shot.stat().st_size > 10_000
        keep = os.environ.get("MAEAD_LIVEVIEW_SCREENSHOT")  # docs/figures/liveview.png is made this way
        if keep:
            shutil.copyfile(shot, keep)
    finally:
        if browser is not None:
            browser.close()
        assert at.stop() == 0


@pytest.mark.broker
def test_agent_demo_prints_the_page_address_while_it_runs(tmp_path):
    """`make demo` / `mae-ad agent-demo` open nothing but print the live view's address while the agent runs."""
    import io
    import threading

    from agent.broker import mosquitto_path
    from app.agent_demo import run_agent_demo

    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed")

    out = io.StringIO()
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(run_agent_demo(
        None, tmp_path / "demo", seconds=6.0, broker="mosquitto", stream=out, video_frames=40)), daemon=True)
    t.start()
    assert wait_until(lambda: "live view: http://127.0.0.1:" in out.getvalue(), 20), out.getvalue()
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("live view: "))
    url = line.split()[2]
    code, body, _ = _req(url)  # the agent is still running: the page answers
    assert code == 200 and b"mae-ad live view" in body
    assert json.loads(_req(url + "api/state")[1])["actions"] is False  # the demo's page is read-only
    t.join(60)
    assert not t.is_alive() and result["live_view"] == url
    # 6 s at 10 fps over a 40-frame file that loops: 1.5 passes, said in the announcement and the summary
    assert result["video_passes"] == 1.5 and "played in a loop" in out.getvalue()


def test_port_in_use_and_missing_token_are_clear_errors(tmp_path, monkeypatch):
    import socket

    from agent.loop import Agent
    from mae_ad.contract import UserError

    cams = [{"name": "c", "source": str(tmp_path / "none.avi")}]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        cfg = agent_cfg(tmp_path, _no_broker_port(), cams, web={"enabled": True, "port": port})
        with pytest.raises(UserError, match=f"web.port: cannot listen on 127.0.0.1:{port}"):
            Agent(cfg).run(duration_s=1, install_signals=False)
    monkeypatch.delenv("MAEAD_NO_SUCH_TOKEN", raising=False)
    cfg = agent_cfg(tmp_path, _no_broker_port(), cams, web={"enabled": True, "port": 0,
                                                             "token_env": "MAEAD_NO_SUCH_TOKEN"})
    with pytest.raises(UserError, match="web.token_env: environment variable MAEAD_NO_SUCH_TOKEN is not set"):
        Agent(cfg).run(duration_s=1, install_signals=False)
