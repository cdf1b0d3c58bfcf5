"""Agent benchmark: end-to-end frames/s against the bare engine on the same model in the same run, per-stage
latency, resident memory and time to the first published score of a separate agent process, and alerts delivered
versus raised across a broker outage.

    mae-ad agent-bench --model model.onnx --seconds 15 --out bench_out/agent.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .agent_demo import _guess_backend, write_product_video


def _model_section(model: str | None, backend: str | None, threads: int | None) -> dict[str, Any]:
    kind = backend or _guess_backend(model)
    return {"backend": kind, "path": model, "threads": threads}


def _bare_fps(be: Any, batch: np.ndarray, seconds: float, chunk: int | None = None) -> dict[str, float]:
    """Batches of `batch` per second through `be`, each sent in pieces of at most `chunk` items (a tiled model's
    tiles, as the agent sends them)."""
    step = chunk or batch.shape[0]

    def once() -> None:
        for i in range(0, batch.shape[0], step):
            be.infer(batch[i:i + step])

    once()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        once()
        n += 1
    dt = time.perf_counter() - t0
    return {"fps": n * batch.shape[0] / dt, "ms_per_batch": 1000 * dt / n, "batches": n}


def turns_between(turns: Any, t0: float, t1: float = float("inf")) -> list[tuple[float, int]]:
    """The agent's loop turns (monotonic end time, frames scored) that ended in [t0, t1]."""
    return [(t, n) for t, n in list(turns) if t0 <= t <= t1]


def completion_rate(turns: Any, t0: float, t1: float) -> dict[str, Any]:
    """Frames/s between the first and the last loop turn that ended in [t0, t1]: the frames of every turn after the
    first over the time between them, so a window of a few slow frames is not rounded to whole frames (counting
    frames in a fixed window is off by up to one frame: 14 % at 7 frames). `fps` is None below two turns."""
    got = turns_between(turns, t0, t1)
    if len(got) < 2:
        return {"fps": None, "frames": sum(n for _, n in got), "turns": len(got)}
    frames = sum(n for _, n in got[1:])
    return {"fps": frames / (got[-1][0] - got[0][0]), "frames": frames, "turns": len(got)}


def _tiled_batch(be: Any, video: str) -> np.ndarray | None:
    """A tiled model (input.resize=tile): the tiles of the video's first frame [T, 3, S, S], as the agent cuts them
    (the bare engine's batch per frame); None for an untiled model."""
    import cv2

    from agent.config import CameraSection
    from agent.preprocess import preprocess_tiles
    from mae_ad.tiling import spec_from

    spec = spec_from(be.meta.input, be.input_size)
    if spec is None:
        return None
    cap = cv2.VideoCapture(video)
    ok, frame = cap.read()
    cap.release()
    if not ok:
        raise RuntimeError(f"{video}: cannot read a frame")
    return preprocess_tiles(frame, CameraSection(name="bench", source=video), spec)[0]


def _frames_for(be: Any, n: int) -> np.ndarray:
    import cv2

    from mae_ad.synthetic import normal_tile

    rng = np.random.default_rng(0)
    s = be.input_size
    imgs = [cv2.cvtColor(cv2.resize(normal_tile(rng, 160), (s, s)), cv2.COLOR_BGR2RGB) for _ in range(n)]
    return np.stack([i.transpose(2, 0, 1).astype(np.float32) / 255.0 for i in imgs])


def _agent_cfg(work: Path, port: int, protocol: str, model: dict[str, Any], cams: list[dict[str, Any]],
               **extra: Any) -> Any:
    from agent.config import agent_config_from_dict

    data: dict[str, Any] = {"agent_id": "bench", "model": model, "cameras": cams,
            "evidence": {"dir": str(work / "evidence")},
            "alerts": {"open_after": 2, "close_after": 3, "update_interval_s": 0.5},
            "capture": {"reconnect_initial_s": 0.2, "reconnect_max_s": 1.0},
            "mqtt": {"port": port, "protocol": protocol, "stats_interval_s": 2.0, "reconnect_min_s": 1,
                     "reconnect_max_s": 2, "spool": {"dir": str(work / "spool")}}}
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return agent_config_from_dict(data, "<agent bench>")


def run_agent_bench(model: str | None, backend: str | None = None, seconds: float = 15.0, cameras: int = 1,
                    threads: int | None = None, out: str | Path | None = None, outage: bool = True,
                    realtime: bool = True, video_path: str | None = None, min_frames: int = 10,
                    threshold: float | None = None, decode: str = "eager") -> dict[str, Any]:
    """realtime: the video plays at its 25 fps, like a camera (the default); False: decoded as fast as possible,
    which puts a decoder thread on the engine's cores and measures that contention too. `video_path`: this video
    instead of the synthetic 256-px product (e.g. `mae_ad.synthetic.small_defect_video`, 1920x1080). A tiled
    model's bare engine scores one frame's tiles per batch, so both figures are frames/s.

    The bare engine is timed before and after the agent (`bare`, `bare_after`) and the agent is compared with their
    mean, so a machine whose speed drifts does not count as agent overhead. The agent's rate runs from its first to
    its last completed frame in a window of at least `seconds` and more than `min_frames` completed loop turns
    (at most max(20 x seconds, 60 s)): `agent.overhead` = 1 - agent fps / bare fps. `threshold`: every camera's
    threshold (e.g. from `mae-ad camera-threshold`) instead of the model's; `agent.scores` lists the published
    (frame_id, score, anomalous) and `agent.alert_start_frames` the frame each alert opened on, to check them against
    the video's defect frames (a looping file's frame_id counts on: take it modulo the video's length). `decode`: the
    cameras' `decode` (lazy: an MJPEG video's frames are decoded only when scored)."""
    from agent.backend import open_backend
    from agent.broker import start_local_broker
    from agent.config import ModelSection
    from agent.loop import Agent

    from .agent_demo import LiveView
    from .engines import open_engine

    work = Path(tempfile.mkdtemp(prefix="mae-ad-agent-bench-"))
    msec = _model_section(model, backend, threads)
    video = {"path": str(video_path)} if video_path else \
        write_product_video(work / "product.avi", n_frames=200, fps=25.0, size=256)
    brk, protocol = start_local_broker(work / "broker")
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "model": model, "backend": msec["backend"],
                           "video": video["path"], "decode": decode, "threshold": threshold,
                           "cameras": cameras, "realtime": realtime, "threads": threads, "cpu_count": os.cpu_count(),
                           "broker": type(brk).__name__}
    try:
        be = open_backend(ModelSection(**msec), open_engine)
        res["model_id"], res["input_size"] = be.meta.model_id, be.input_size
        tiles = _tiled_batch(be, video["path"])
        batch = _frames_for(be, cameras) if tiles is None else np.concatenate([tiles] * cameras)
        chunk = None if tiles is None else min(be.max_batch or len(batch), ModelSection(**msec).tile_batch)

        def bare_frames() -> dict[str, float]:  # a tiled model's batch holds `cameras` frames of T tiles: frames/s
            b = _bare_fps(be, batch, seconds, chunk)
            if tiles is not None:
                b["fps"] *= cameras / batch.shape[0]
            return b

        res["bare"] = bare_frames()
        if tiles is not None:
            res["tile_batch"] = chunk
            res["tiles_per_frame"] = int(tiles.shape[0])
            res["bare"]["tiles_per_s"] = res["bare"]["fps"] * tiles.shape[0]

        # the agent on the same engine object, cameras reading the video as fast as they can
        cams = [{"name": f"cam{i}", "source": video["path"], "loop": True, "realtime": realtime, "decode": decode,
                 **({} if threshold is None else {"threshold": threshold})} for i in range(cameras)]
        cfg = _agent_cfg(work / "e2e", brk.port, protocol, msec, cams, evidence={"enabled": False})
        agent = Agent(cfg, be)
        view = LiveView("127.0.0.1", brk.port, "mae-ad/bench", protocol, None).start()
        th = threading.Thread(target=agent.run, kwargs={"install_signals": False}, daemon=True)
        th.start()
        while len(agent.turns) < 2 and th.is_alive():  # warm-up: the first turn and one more
            time.sleep(0.05)
        time.sleep(1.0)
        engine0 = agent.timer.total["engine"]
        t0 = time.monotonic()
        end_by = t0 + max(20 * seconds, 60.0)
        while th.is_alive() and time.monotonic() < end_by and not (
                time.monotonic() - t0 >= seconds and len(turns_between(agent.turns, t0)) > min_frames):
            time.sleep(0.05)
        t1 = time.monotonic()
        engine_s = agent.timer.total["engine"] - engine0
        agent.stop()
        th.join(30)
        view.stop()
        rate = completion_rate(agent.turns, t0, t1)
        res["bare_after"] = bare_frames()
        be.close()
        bare = (res["bare"]["fps"] + res["bare_after"]["fps"]) / 2
        stage = {k: (round(v, 3) if v is not None else None) for k, v in agent.timer.mean_ms().items()}
        res["agent"] = {**rate, "window_s": t1 - t0, "fraction_of_bare": rate["fps"] / bare if rate["fps"] else None,
                        "overhead": 1 - rate["fps"] / bare if rate["fps"] else None,
                        "bare_fps": bare, "engine_busy": engine_s / (t1 - t0),
                        "engine_ms_per_frame_in_agent": stage.get("engine"),
                        "bare_ms_per_frame": 1000 / bare,
                        "stage_ms": stage,
                        "dropped": {n: cs.reader.stats.dropped for n, cs in agent.cams.items()},
                        "alerts_raised": agent.alerts_raised,
                        "alert_start_frames": [e.get("start_frame_id") for e in view.alert_events
                                               if e.get("event") == "start"],
                        "scores": [[d["frame_id"], round(d["score"], 4), d["anomalous"]]
                                   for d in (json.loads(p) for t, p in view.messages if t.endswith("/score"))],
                        "score_messages_received": view.counts.get("score", 0)}

        # a separate agent process: memory, torch never imported, time to first score message
        res["process"] = _process_run(work / "proc", brk.port, protocol, msec, video["path"], seconds, decode)
        if outage:
            res["outage"] = _outage_run(work / "outage", msec)
    finally:
        brk.stop()
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    return res


def _process_run(work: Path, port: int, protocol: str, msec: dict[str, Any], video: str,
                 seconds: float, decode: str = "eager") -> dict[str, Any]:
    import psutil

    from agent.config import dump_agent_config

    from .agent_demo import LiveView

    work.mkdir(parents=True, exist_ok=True)
    cfg = _agent_cfg(work, port, protocol, msec, [{"name": "cam", "source": video, "loop": True, "decode": decode}],
                     mqtt={"stats_interval_s": 1.0})
    cfg_path = work / "agent.yaml"
    cfg_path.write_text(dump_agent_config(cfg))
    view = LiveView("127.0.0.1", port, "mae-ad/bench", protocol, None).start()
    exe = Path(sys.executable).with_name("mae-ad")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "app.cli"]
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, "run", "--config", str(cfg_path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = None
    peak = 0.0
    try:
        p = psutil.Process(proc.pid)
        end = t0 + max(10.0, seconds)
        while time.perf_counter() < end and proc.poll() is None:
            if first is None and view.counts.get("score", 0) > 0:
                first = time.perf_counter() - t0
            try:
                peak = max(peak, p.memory_info().rss / 2**20)
            except psutil.Error:
                break
            time.sleep(0.05)
        proc.terminate()
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        view.stop()
    stats = [json.loads(pl) for t, pl in view.messages if t.endswith("/stats")]
    return {"first_score_s": first, "peak_rss_mb": peak, "exit_code": code,
            "torch_loaded": stats[-1].get("torch_loaded") if stats else None,
            "rss_mb_reported": stats[-1].get("rss_mb") if stats else None}


def _outage_run(work: Path, msec: dict[str, Any]) -> dict[str, Any]:
    """Kill the broker (SIGKILL) for 5 s while alerts keep coming; count what arrives."""
    from agent.broker import MosquittoBroker, TcpGate, mosquitto_path
    from agent.loop import Agent

    from .agent_demo import LiveView

    if mosquitto_path() is None:
        return {"skipped": "needs mosquitto"}
    clip = write_product_video(work / "busy.avi", n_frames=40, fps=20.0, size=128,
                               defect_segments=[(5, 12), (25, 32)], seed=5)
    brk = MosquittoBroker(work / "broker").start()
    gate = TcpGate(brk.port)
    cfg = _agent_cfg(work, gate.port, "5", {"backend": "brightness", "input_size": 64},
                     [{"name": "cam", "source": clip["path"], "loop": True}], mqtt={"score_interval_s": 1.0})
    views = [LiveView("127.0.0.1", brk.port, "mae-ad/bench", "5", None).start()]
    agent = Agent(cfg)
    th = threading.Thread(target=agent.run, kwargs={"install_signals": False}, daemon=True)
    th.start()
    try:
        time.sleep(4.0)
        gate.open.clear()
        brk.kill()
        raised_at_kill = agent.alerts_raised
        time.sleep(5.0)
        spooled = agent.spool.depth
        brk.start()
        views[0].stop()
        views.append(LiveView("127.0.0.1", brk.port, "mae-ad/bench", "5", None).start())
        gate.open.set()
        end = time.monotonic() + 20
        while time.monotonic() < end and not (agent.link and agent.link.connected and agent.spool.depth == 0):
            time.sleep(0.1)
        time.sleep(3.0)
    finally:
        agent.stop()
        th.join(30)
        time.sleep(0.5)
        for v in views:
            v.stop()
        gate.close()
        brk.stop()
    ids = [e["id"] for v in views for e in v.alert_events if e["event"] == "start"]
    return {"alerts_raised": agent.alerts_raised, "alerts_raised_during_outage": agent.alerts_raised - raised_at_kill,
            "spool_depth_at_restart": spooled, "alerts_delivered": len(ids), "unique_delivered": len(set(ids)),
            "all_raised_delivered_in_order": ids == agent.alert_ids,
            "alert_messages_sent": agent.alert_messages,
            "alert_messages_delivered": sum(len(v.alert_events) for v in views)}
