"""`mae-ad demo`: the whole product on an embedded default, with no camera, no dataset and no external broker.

1. learn:   write a synthetic product dataset, train a small LoRA-MAE for a few minutes, calibrate, evaluate;
2. compile: merge the adapters, export the scoring graph to ONNX, check it against TensorRT's operator support;
3. watch:   run the agent on a synthetic product video against a local MQTT broker, with a live view of messages.

Like cli.py, this module wires the stages together, so it imports trt/ and agent/ (lazily, inside functions).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from mae_ad.contract import UserError

log = logging.getLogger(__name__)

# The embedded default, the feature-space recipe family of configs/magnetic-tile.yaml at demo scale: a 4-block
# ViT-Tiny-wide MAE over the cells of the frozen ImageNet EfficientNet-Lite0 (stride 8 and 16 levels on a 16x16 grid
# at 128 px), fused with the in-graph kNN memory (inverse_variance: each map divided by the variance of its image score
# on the held-back normals), for two CPU minutes. The demo's square synthetic parts are squashed, not tiled: they have
# one aspect ratio, and a whole 128-px frame is one model input.
DEMO_OVERRIDES = [
    "name=demo-tile",
    "model.preset=tiny-p8",
    "model.img_size=128",
    "model.patch_size=1",
    "model.depth=4",
    "model.decoder_embed_dim=128",
    "model.decoder_num_heads=4",
    "model.decoder_depth=2",
    "model.backbone.name=efficientnet_lite0",
    "model.backbone.layers=[2,3]",
    "model.backbone.stride=8",
    "scoring.pattern=grid",
    "scoring.normalize=position",
    "scoring.knn_weight=1.0",
    "scoring.fusion=inverse_variance",
    "scoring.sigma=2.0",
    "train.mask_mode=mixed",
    "train.epochs=400",
    "train.batch_size=16",
    "train.blr=3e-3",
    "train.warmup_epochs=2",
    "train.checkpoint_every=1000",
    "train.log_every=20",
    "calibration.holdout_fraction=0.2",
    "calibration.target_fpr=0.05",
    "calibration.stats_source=train",
]


def camera_roundtrip(root: Path) -> int:
    """Pass every image of a dataset (not its masks) through the MJPEG encode/decode of the demo camera's video,
    in place: the model learns from images as the camera delivers them. The round trip shifts intensities by about
    1%, which a pretrained feature backbone's per-pixel normal statistics do notice (BENCHMARKS.md). Returns the
    number of images."""
    import cv2

    paths = sorted(p for p in root.rglob("*.png") if "ground_truth" not in p.parts)
    if not paths:
        return 0
    first = cv2.imread(str(paths[0]))
    if first is None:
        raise RuntimeError(f"{paths[0]}: OpenCV cannot read the image")
    h, w = first.shape[:2]
    tmp = root / ".roundtrip.avi"
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))  # type: ignore[attr-defined]
    for p in paths:
        img = cv2.imread(str(p))
        if img is None:
            raise RuntimeError(f"{p}: OpenCV cannot read the image")
        writer.write(img)
    writer.release()
    cap = cv2.VideoCapture(str(tmp))
    try:
        for p in paths:
            ok, frame = cap.read()
            if not ok:
                raise RuntimeError(f"{tmp}: MJPEG round trip lost frames")
            cv2.imwrite(str(p), frame)
    finally:
        cap.release()
        tmp.unlink()
    return len(paths)


def _say(msg: str) -> None:
    print(msg, flush=True)  # the demo talks to a person at a terminal


def run_demo(out: Path, minutes: float = 2.0, fresh: bool = True, agent_seconds: float = 20.0) -> dict[str, Any]:
    from mae_ad.config import load_config
    from mae_ad.synthetic import write_dataset

    out = Path(out)
    if out.exists():
        if not fresh:
            raise UserError(f"{out}: exists; pass --fresh or choose another --out")
        if not (out / "demo.json").is_file() and any(out.iterdir()):
            raise UserError(f"{out}: exists and is not a demo output folder; refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (out / "demo.json").write_text(json.dumps(summary))

    _say(f"[1/3 learn] writing a synthetic product dataset to {out / 'data'}")
    data = write_dataset(out / "data", n_train=80, n_test_good=20, n_test_defect=8, size=160, seed=0)
    camera_roundtrip(data)
    cfg = load_config(None, DEMO_OVERRIDES + [f"train.max_minutes={minutes}"])
    _say(f"[1/3 learn] training {cfg.name} for up to {minutes:g} min (normal images only)")
    from mae_ad.train import run_training

    bundle = run_training(cfg, data, out / "bundle")
    from mae_ad.evaluate import run_evaluation

    metrics = run_evaluation(bundle, data, out / "report")
    summary["learn"] = {k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1", "threshold")}
    _say("[1/3 learn] " + "  ".join(f"{k}={v:.3f}" for k, v in summary["learn"].items() if isinstance(v, float)))
    _say(f"[1/3 learn] report: {out / 'report' / 'report.md'}")

    summary["compile"] = _compile(bundle, out)
    if summary["compile"].get("onnx"):
        summary["watch"] = _watch(Path(summary["compile"]["onnx"]), out, agent_seconds)
    summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    _say(f"done: {out / 'demo.json'}")
    return summary


def _compile(bundle: Path, out: Path) -> dict[str, Any]:
    try:
        from trt import export as trt_export  # noqa: F401
    except ModuleNotFoundError:
        _say("[2/3 compile] skipped: the trt package is not installed")
        return {}
    from trt.demo import compile_for_demo

    res = compile_for_demo(bundle, out)
    _say(f"[2/3 compile] ONNX: {res.get('onnx')}  ({res.get('summary', '')})")
    return res


def _watch(onnx: Path, out: Path, seconds: float) -> dict[str, Any]:
    try:
        from .agent_demo import run_agent_demo
    except ModuleNotFoundError:
        _say("[3/3 watch] skipped: the agent package is not installed")
        return {}
    _say(f"[3/3 watch] running the agent on a synthetic product video for {seconds:g} s")
    return run_agent_demo(onnx, out / "agent", seconds=seconds)
