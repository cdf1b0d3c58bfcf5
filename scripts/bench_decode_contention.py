"""What a camera's decoding costs the engine on the same cores: engine calls timed with no camera reader, with a
reader decoding every frame (`decode: eager`) and with one handing over JPEGs (`decode: lazy`), interleaved in short
blocks, so that the machine's drift (the bare engine moved 14 % between two runs of `mae-ad agent-bench` on
2026-12-05) cancels out of the paired ratios.

    python scripts/bench_decode_contention.py --model runs/sd-x2.onnx --video runs/sd-video-1080p.avi \
        --rounds 6 --block-s 10 --out bench_out/decode-contention.json

A tiled model's engine call is `model.tile_batch` (8) tiles of the video's first frame, as the agent sends them; an
untiled model's is one frame. The video plays at its own rate, looped, as a camera would deliver it.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.backend import open_backend  # noqa: E402
from agent.capture import CameraReader  # noqa: E402
from agent.config import CameraSection, CaptureSection, ModelSection  # noqa: E402
from app.agent_bench import _bare_fps, _frames_for, _tiled_batch  # noqa: E402
from app.engines import open_engine  # noqa: E402

log = logging.getLogger("decode-contention")
CONDITIONS = ("none", "eager", "lazy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="ONNX model (tiled or not)")
    ap.add_argument("--video", required=True, help="an MJPEG video the reader plays at its own frame rate")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block-s", type=float, default=10.0, help="seconds of engine calls per condition and round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="order of the conditions within each round")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not Path(a.video).is_file() or not Path(a.model).is_file():
        ap.error(f"--model {a.model} / --video {a.video}: no such file")

    msec = ModelSection(path=a.model, backend="onnxruntime", threads=a.threads)
    be = open_backend(msec, open_engine)
    tiles = _tiled_batch(be, a.video)
    x = _frames_for(be, 1) if tiles is None else tiles[:msec.tile_batch]
    rng = random.Random(a.seed)
    blocks: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    frames: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    for r in range(a.rounds):
        order = list(CONDITIONS)
        rng.shuffle(order)
        for cond in order:
            reader = None
            if cond != "none":
                cam = CameraSection(name="cam", source=a.video, loop=True, realtime=True, decode=cond)
                reader = CameraReader(cam, CaptureSection(), threading.Event())
                reader.start()
                time.sleep(1.0)
            f0, t0 = (reader.stats.frames if reader else 0), time.perf_counter()
            bare = _bare_fps(be, x, a.block_s)  # one warm-up call, then calls for block_s
            if reader is not None:
                frames[cond].append((reader.stats.frames - f0) / (time.perf_counter() - t0))
                reader.stop()
            blocks[cond].append(bare["ms_per_batch"])
            log.info("round %d %-5s %8.1f ms per engine call (%d calls)%s", r, cond, bare["ms_per_batch"],
                     bare["batches"], f", reader {frames[cond][-1]:.1f} frames/s" if reader else "")
    be.close()
    res: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "model": a.model, "video": a.video, "rounds": a.rounds,
        "block_s": a.block_s, "engine_items_per_call": int(x.shape[0]),
        "ms_per_call": {c: blocks[c] for c in CONDITIONS},
        "median_ms_per_call": {c: statistics.median(blocks[c]) for c in CONDITIONS},
        "reader_frames_per_s": {c: statistics.median(frames[c]) for c in ("eager", "lazy")},
    }
    for c in ("eager", "lazy"):  # paired within each round: the machine's drift cancels
        ratios = [b / n for b, n in zip(blocks[c], blocks["none"], strict=True)]
        res[f"slowdown_{c}"] = {"median": statistics.median(ratios) - 1, "min": min(ratios) - 1,
                                "max": max(ratios) - 1}
        log.info("engine slowed by %s decoding: median %+.1f %% (rounds %+.1f .. %+.1f %%)", c,
                 100 * (statistics.median(ratios) - 1), 100 * (min(ratios) - 1), 100 * (max(ratios) - 1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
