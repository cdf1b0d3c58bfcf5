"""What the live view costs the agent: frames/s with one page open against none, in the same run, and the agent's
added resident memory.

One agent process (`mae-ad run`, brightness or a real engine) scores a synthetic video as fast as it decodes
(`realtime: false`, so the loop is saturated and any cost of serving shows as fewer frames/s) or at camera speed
(`--realtime`), with the live view and the health endpoint on. One headless Chromium alternates between the live
view ("page" phases) and about:blank ("none" phases, browser still running) for `--rounds` rounds of `--phase-s`
seconds; frames/s per phase come from the agent's /metrics counter, the CPU time its HTTP threads spent serving
and the loop hook's mean time from /api/state. `--pin` puts the agent on CPU 0 and the browser on the others, as a
browser on another machine would be.

    .venv/bin/python scripts/bench_liveview.py --out bench_out/liveview.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def scored_total(health_port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=10).read().decode()
    return int(sum(float(m) for m in re.findall(r"^maead_frames_scored_total\{[^}]*\} (\S+)$", text, re.M)))


def web_stats(web_port: int) -> dict:
    state = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/state", timeout=10).read())
    return state["health"]["web"]


def replay(base: str) -> None:
    """What app.js asks for, as a separate light process (`--replay`): /api/state twice a second, /api/scores once a
    second since the last point, and the newest frame at most 5 times a second with ?after=<id> (204 when unchanged).
    One keep-alive connection per request kind, as a browser keeps them."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(base)
    conns = {k: http.client.HTTPConnection(u.hostname, u.port, timeout=10) for k in ("state", "scores", "frame")}

    def get(kind: str, path: str) -> tuple[int, bytes, Any]:
        c = conns[kind]
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read(), r

    state = json.loads(get("state", "/api/state")[1])
    cams = list(state["cameras"])
    last_t, last_id = 0.0, {c: None for c in cams}
    next_state = next_scores = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= next_state:
            get("state", "/api/state")
            next_state = now + 0.5
        if now >= next_scores:
            d = json.loads(get("scores", f"/api/scores?since={last_t}")[1])
            for pts in d["cameras"].values():
                if pts:
                    last_t = max(last_t, pts[-1][0])
            next_scores = now + 1.0
        for c in cams:
            after = "" if last_id[c] is None else f"&after={last_id[c]}"
            code, _, r = get("frame", f"/api/frame/{c}.jpg?overlay=1{after}")
            if code == 200:
                last_id[c] = r.getheader("X-Frame-Id")
        time.sleep(max(0.0, 0.2 - (time.monotonic() - now)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".onnx / .plan / bundle (default: the brightness engine)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--phase-s", type=float, default=8.0)
    ap.add_argument("--warmup-s", type=float, default=20.0)
    ap.add_argument("--size", type=int, default=320, help="video frame size (px)")
    ap.add_argument("--realtime", action="store_true", help="play the video at 25 fps instead of as fast as read")
    ap.add_argument("--pin", action="store_true", help="pin the agent to CPU 0 and the browser to the others")
    ap.add_argument("--client", choices=("chromium", "replay"), default="chromium",
                    help="the page: headless Chromium on this machine, or a light process replaying its requests "
                         "(as a browser on another machine would cost this one nothing)")
    ap.add_argument("--replay", default=None, help=argparse.SUPPRESS)  # internal: be the replay client
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.replay:
        replay(args.replay)
        return 0

    import psutil

    from agent.broker import MosquittoBroker, free_port, mosquitto_path
    from app.agent_demo import _guess_backend, write_product_video
    from tests.agent.browser import Browser

    work = Path(tempfile.mkdtemp(prefix="bench-liveview-"))
    video = write_product_video(work / "product.avi", n_frames=250, fps=25.0, size=args.size,
                                defect_segments=[(60, 90), (170, 200)])
    broker = MosquittoBroker(work / "broker").start() if mosquitto_path() else None
    web_port, health_port = free_port(), free_port()
    kind = _guess_backend(args.model)
    cfg = {
        "agent_id": "bench", "model": {"backend": kind, "path": args.model},
        "cameras": [{"name": "line1", "source": video["path"], "loop": True, "realtime": args.realtime}],
        "alerts": {"open_after": 2, "close_after": 3, "update_interval_s": 0.5},
        "evidence": {"dir": str(work / "evidence"), "max_alerts": 20},
        "mqtt": {"port": broker.port if broker else free_port(), "spool": {"dir": str(work / "spool"),
                                                                            "fsync": False}},
        "health": {"enabled": True, "port": health_port},
        # history bounded by time and filled during the warm-up, so later growth is the page's
        "web": {"enabled": True, "port": web_port, "history_s": min(15.0, args.warmup_s * 0.6)},
    }
    (work / "agent.yaml").write_text(json.dumps(cfg))
    exe = Path(sys.executable).with_name("mae-ad")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "app.cli"]
    ncpu = os.cpu_count() or 1
    pin = args.pin and ncpu >= 2
    agent = subprocess.Popen([*cmd, "run", "--config", str(work / "agent.yaml")], stdout=subprocess.DEVNULL,
                             stderr=open(work / "agent.log", "w"))
    proc = psutil.Process(agent.pid)
    if pin:
        proc.cpu_affinity([0])
    browser = None
    phases: list[dict] = []
    try:
        end = time.monotonic() + 60
        while True:
            try:
                scored_total(health_port)
                urllib.request.urlopen(f"http://127.0.0.1:{web_port}/api/state", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > end or agent.poll() is not None:
                    raise RuntimeError(f"agent did not start; see {work / 'agent.log'}") from None
                time.sleep(0.2)
        browser = Browser()
        replayer = None
        if pin:
            bp = psutil.Process(browser.proc.pid)
            for p in [bp, *bp.children(recursive=True)]:
                p.cpu_affinity(list(range(1, ncpu)))
        time.sleep(args.warmup_s)
        rss_before = proc.memory_info().rss / 2**20
        # none, page, none, page, ..., none: every page phase lies between two none phases, so a drift of the
        # machine's load over the run cancels in the comparison
        for r, mode in [(0, "none")] + [(i, m) for i in range(args.rounds) for m in ("page", "none")]:
            if args.client == "chromium":
                browser.goto(f"http://127.0.0.1:{web_port}/" if mode == "page" else "about:blank")
            elif mode == "page":
                replayer = subprocess.Popen([sys.executable, __file__, "--replay", f"http://127.0.0.1:{web_port}/"])
                if pin:
                    psutil.Process(replayer.pid).cpu_affinity(list(range(1, ncpu)))
            if pin:  # chromium starts renderer processes per page
                bp = psutil.Process(browser.proc.pid)
                for p in bp.children(recursive=True):
                    try:
                        p.cpu_affinity(list(range(1, ncpu)))
                    except psutil.Error:
                        pass
            time.sleep(1.0)  # settle: the page's first (full-history) requests are not counted
            w0 = web_stats(web_port)
            n0, t0, b0, a0 = scored_total(health_port), time.monotonic(), browser.cpu_s(), proc.cpu_times()
            time.sleep(args.phase_s)
            n1, t1, b1, a1 = scored_total(health_port), time.monotonic(), browser.cpu_s(), proc.cpu_times()
            w1 = web_stats(web_port)
            loads = browser.evaluate("Number(document.querySelector('img.live')?.dataset.loads || 0)") \
                if mode == "page" and args.client == "chromium" else None
            if replayer is not None:
                replayer.terminate()
                replayer.wait(10)
                replayer = None
            phases.append({"round": r, "mode": mode, "fps": (n1 - n0) / (t1 - t0),
                           "requests": w1["requests"] - w0["requests"] - 1,
                           "serve_cpu_ms_per_s": 1000 * (w1["serve_cpu_s"] - w0["serve_cpu_s"]) / (t1 - t0),
                           "hook_us_mean": w1["hook_us_mean"],
                           "agent_cpu_pct": 100 * (a1.user + a1.system - a0.user - a0.system) / (t1 - t0),
                           "agent_cpu_ms_per_frame": 1000 * (a1.user + a1.system - a0.user - a0.system)
                           / max(1, n1 - n0),
                           "browser_cpu_pct": 100 * (b1 - b0) / (t1 - t0),
                           "rss_mb": proc.memory_info().rss / 2**20, "page_frame_loads": loads,
                           "browser_rss_mb": browser.rss_mb()})
            print(json.dumps(phases[-1]), flush=True)
        rss_after = proc.memory_info().rss / 2**20
    finally:
        if browser is not None:
            browser.close()
        agent.terminate()
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
        if broker is not None:
            broker.stop()

    none = [p["fps"] for p in phases if p["mode"] == "none"]
    page = [p["fps"] for p in phases if p["mode"] == "page"]
    # each page phase against the mean of the none phases just before and just after it
    paired = [100.0 * (phases[i]["fps"] / (0.5 * (phases[i - 1]["fps"] + phases[i + 1]["fps"])) - 1.0)
              for i in range(1, len(phases) - 1, 2)]
    # the same comparison between none phases (none_i against its neighbours two phases away): the noise level
    nones = [p["fps"] for p in phases if p["mode"] == "none"]
    aa = [100.0 * (nones[i] / (0.5 * (nones[i - 1] + nones[i + 1])) - 1.0) for i in range(1, len(nones) - 1)]
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.node(), "cpus": ncpu,
        "cpu": platform.processor() or platform.machine(), "load_avg": os.getloadavg(),
        "engine": kind, "model": args.model, "client": args.client, "video": f"{args.size}x{args.size} MJPEG, realtime={args.realtime}",
        "pinned": pin, "rounds": args.rounds, "phase_s": args.phase_s,
        "fps_none_median": statistics.median(none), "fps_page_median": statistics.median(page),
        "change_pct_median": 100.0 * (statistics.median(page) / statistics.median(none) - 1.0),
        "change_pct_paired": paired, "change_pct_paired_median": statistics.median(paired),
        "noise_pct_none_vs_none": aa, "fps_none": none, "fps_page": page,
        "serve_cpu_ms_per_s_page": statistics.median(p["serve_cpu_ms_per_s"] for p in phases
                                                     if p["mode"] == "page"),
        "requests_per_s_page": statistics.median(p["requests"] / args.phase_s for p in phases if p["mode"] == "page"),
        "hook_us_mean": phases[-1]["hook_us_mean"],
        "browser_cpu_pct_page": statistics.median(p["browser_cpu_pct"] for p in phases if p["mode"] == "page"),
        "browser_cpu_pct_none": statistics.median(p["browser_cpu_pct"] for p in phases if p["mode"] == "none"),
        "agent_cpu_pct_page": statistics.median(p["agent_cpu_pct"] for p in phases if p["mode"] == "page"),
        "agent_cpu_pct_none": statistics.median(p["agent_cpu_pct"] for p in phases if p["mode"] == "none"),
        "agent_cpu_ms_per_frame_none": statistics.median(p["agent_cpu_ms_per_frame"] for p in phases
                                                         if p["mode"] == "none"),
        "agent_cpu_ms_per_frame_page": statistics.median(p["agent_cpu_ms_per_frame"] for p in phases
                                                         if p["mode"] == "page"),
        "agent_rss_before_page_mb": rss_before, "agent_rss_after_mb": rss_after,
        "agent_rss_added_mb": max(p["rss_mb"] for p in phases) - rss_before,
        "browser_rss_mb_page": statistics.median(p["browser_rss_mb"] for p in phases if p["mode"] == "page"),
        "phases": phases,
    }
    print(json.dumps({k: v for k, v in res.items() if k != "phases"}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
