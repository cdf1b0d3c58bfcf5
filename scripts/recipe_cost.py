"""Scoring cost of exported recipes through ONNX Runtime, the engine the agent and `evaluate` use on a CPU box, in
one run (issue 10's cost comparison): images per second of each graph against the first one given.

    python scripts/recipe_cost.py --data ../shared/data/magnetic_tile/test runs/pix-cost.onnx runs/mt.onnx

Each graph is timed on random inputs of its own size at batch 1 and 8 (model inputs per call), in interleaved
rounds (the best round reported, the median beside). A tiled graph (input.resize=tile in its metadata) needs
several inputs per image: the mean over the images under --data of the tiles each one is cut into, by the
graph's own tile spec. images/s = inputs/s / inputs per image. Weights do not change the cost, so a briefly
trained bundle of a recipe measures the recipe.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rate(fn: Any, batch: int, seconds: float) -> float:
    """Model inputs per second of `fn` (one call = `batch` inputs), after a warm-up, over at least 2 calls."""
    from mae_ad.bench import time_it

    return batch / time_it(fn, seconds, min_reps=2)[0]


def inputs_per_image(meta: Any, sizes: list[tuple[int, int]]) -> float:
    """Mean model inputs per image of the given (height, width) sizes under the graph's resize policy."""
    from mae_ad.tiling import input_policy, layout

    policy = input_policy(meta.input, meta.input.size)
    if isinstance(policy, str):
        return 1.0
    return float(np.mean([layout(h, w, policy).n_tiles for h, w in sizes]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("graphs", nargs="+", type=Path, help="exported ONNX graphs (`mae-ad export`); the first is the "
                                                          "reference of the ratios")
    ap.add_argument("--data", type=Path, required=True,
                    help="a dataset's test/ folder, or any folder: every image under it (recursively) sets the tiles "
                         "per image")
    ap.add_argument("--seconds", type=float, default=10.0, help="per graph and batch, over all rounds (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.rounds < 1 or args.seconds <= 0:
        sys.exit("error: --rounds must be >= 1 and --seconds > 0")
    import cv2
    import onnxruntime as ort

    from mae_ad.bench import _cpu_name
    from mae_ad.contract import OnnxMeta, UserError
    from mae_ad.data import IMAGE_EXTS
    from mae_ad.precision import cpu_isa_flags
    from trt.artifacts import read_sidecar
    from trt.backends import ort_session_options

    paths = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not paths:
        sys.exit(f"error: {args.data}: no images under this folder")
    sizes = []
    for path in paths:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            sys.exit(f"error: {path}: unreadable image")
        sizes.append(img.shape[:2])
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
                           "machine": {"cpu": _cpu_name(), "isa_flags": cpu_isa_flags(), "threads": args.threads,
                                       "onnxruntime": ort.__version__}, "graphs": []}
    sessions, per_image, side = [], [], []
    for g in args.graphs:
        try:
            meta = read_sidecar(g, "ONNX", OnnxMeta)
        except UserError as e:
            sys.exit(f"error: {e}")
        sessions.append(ort.InferenceSession(str(g), ort_session_options(ort, args.threads),
                                             providers=["CPUExecutionProvider"]))
        per_image.append(inputs_per_image(meta, sizes))
        side.append(meta.input.size)
        res["graphs"].append({"path": str(g), "name": meta.name, "input": meta.input.size,
                              "resize": meta.input.resize, "inputs_per_image": per_image[-1]})
    rng = np.random.default_rng(0)
    for batch in (1, 8):
        got: list[list[float]] = [[] for _ in args.graphs]
        xs = [rng.random((batch, 3, s, s), dtype=np.float32) for s in side]
        for _ in range(args.rounds):
            for i, sess in enumerate(sessions):
                got[i].append(_rate(lambda s=sess, x=xs[i]: s.run(None, {"image": x}), batch,
                                    args.seconds / args.rounds))
        ref = max(got[0]) / per_image[0]
        for i, rates in enumerate(got):
            ips = max(rates) / per_image[i]
            res["graphs"][i][f"b{batch}"] = {"inputs_per_s": max(rates), "images_per_s": ips,
                                             "median_images_per_s": float(np.median(rates)) / per_image[i],
                                             "rounds": rates, "images_per_s_vs_first": ips / ref}
            print(f"batch {batch}  {args.graphs[i]}  {max(rates):7.2f} inputs/s  x {1 / per_image[i]:.3f} = "  # noqa: T201
                  f"{ips:7.2f} images/s (median {np.median(rates) / per_image[i]:.2f})  {ips / ref:.2f}x the first",
                  flush=True)
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
