"""Compile-stage benchmark on this CPU: `python -m trt.bench [--presets tiny-p8,small-p8] [--out bench.json]`.

For each preset (random weights, LoRA adapters with non-zero B, calibrated on synthetic normal tiles), in one run:
export time and ONNX size (FP32 and FP16), PyTorch eager vs ONNX Runtime latency at batch 1 and 4 (ORT tuned over
graph optimisation level and intra-op threads), FP16 map error and decision agreement against FP32 on synthetic
images, and FLOPs per image (mae_ad.model.scoring_flops, cross-checked with torch's FlopCounterMode).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("trt.bench")


def _timeit(fn: Any, repeat: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _synthetic(n: int, size: int, seed: int, defects: bool) -> np.ndarray:
    import cv2

    from mae_ad.synthetic import DEFECTS, add_defect, normal_tile

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = normal_tile(rng, size)
        if defects:
            img, _ = add_defect(img, DEFECTS[i % len(DEFECTS)], rng)
        out.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(out)


def counted_flops(cfg: Any) -> float:
    """FLOPs of one scoring pass at batch 1 counted by torch (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mae_ad.lora import merge_lora
    from mae_ad.model import build_model
    from mae_ad.scoring import Scorer

    model = build_model(cfg.model)
    merge_lora(model)
    scorer = Scorer(model, cfg.scoring, cfg.data).to("meta").eval()  # shapes only: nothing is computed
    x = torch.empty(1, 3, cfg.model.img_size, cfg.model.img_size, device="meta")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        scorer(x)
    return float(fc.get_total_flops())


def bench_preset(preset: str, work: Path, repeat: int) -> dict[str, Any]:
    import onnxruntime as ort

    from mae_ad.bundle import load_scorer, save_bundle
    from mae_ad.config import load_config
    from mae_ad.model import build_model, scoring_flops
    from mae_ad.scoring import Scorer, calibrate

    from .backends import ort_session_options
    from .export import export_onnx

    cfg = load_config(None, [f"model.preset={preset}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    model.eval()
    size = cfg.model.img_size
    scorer = Scorer(model, cfg.scoring, cfg.data).eval()
    normals = torch.from_numpy(_synthetic(8, size, 1, False))
    cal = calibrate(scorer, normals, target_fpr=0.2, batch_size=4)
    bundle = save_bundle(work / preset, model, cfg, cal, scorer=scorer)
    res: dict[str, Any] = {"preset": preset, "flops_formula": scoring_flops(cfg.model, cfg.scoring.num_masks)}
    try:
        res["flops_counted"] = counted_flops(cfg)
    except Exception as e:  # noqa: BLE001 - a counter failure must not lose the rest of the run
        res["flops_counted"] = f"failed: {type(e).__name__}: {e}"
    t0 = time.perf_counter()
    f32 = export_onnx(bundle, work / f"{preset}.onnx", verify=False)
    res["export_s_fp32"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    f16 = export_onnx(bundle, work / f"{preset}-fp16.onnx", fp16=True, verify=False)
    res["export_s_fp16"] = time.perf_counter() - t0
    res["onnx_mb_fp32"] = f32.stat().st_size / 1e6
    res["onnx_mb_fp16"] = f16.stat().st_size / 1e6
    t0 = time.perf_counter()
    export_onnx(bundle, work / f"{preset}-ts.onnx", exporter="torchscript", verify=False)
    res["export_s_torchscript"] = time.perf_counter() - t0

    eager, _, _ = load_scorer(bundle)
    rng = np.random.default_rng(0)
    for b in (1, 4):
        x = rng.random((b, 3, size, size), dtype=np.float32)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            res[f"eager_ms_b{b}"] = 1000 * _timeit(lambda xt=xt: eager(xt), repeat)
        configs = [(lv, t) for lv in ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL") for t in (1, 2)]
        if b > 1:  # the sweep runs at batch 1; larger batches use its winner
            configs = [(res["ort_best_b1"].split(",")[0], int(res["ort_best_b1"].split(", ")[1].split()[0]))]
        best = None
        for level, threads in configs:
            so = ort_session_options(ort, threads)
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            sess = ort.InferenceSession(str(f32), so, providers=["CPUExecutionProvider"])
            ms = 1000 * _timeit(lambda s=sess, x=x: s.run(None, {"image": x}), repeat)
            res[f"ort_ms_b{b}_{level.removeprefix('ORT_ENABLE_').lower()}_t{threads}"] = ms
            if best is None or ms < best[0]:
                best = (ms, level, threads)
        assert best is not None
        res[f"ort_ms_b{b}"], res[f"ort_best_b{b}"] = best[0], f"{best[1]}, {best[2]} threads"
        res[f"speedup_b{b}"] = res[f"eager_ms_b{b}"] / best[0]

    images = np.concatenate([_synthetic(8, size, 2, False), _synthetic(8, size, 3, True)])
    s32 = ort.InferenceSession(str(f32), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(str(f16), providers=["CPUExecutionProvider"])
    m32, sc32 = s32.run(None, {"image": images})
    m16, sc16 = s16.run(None, {"image": images})
    thr = cal["threshold"]
    res["fp16_map_max_abs"] = float(np.abs(m16 - m32).max())
    res["fp16_map_max_rel"] = float(np.abs(m16 - m32).max() / np.abs(m32).max())
    res["fp16_score_max_rel"] = float((np.abs(sc16 - sc32) / np.abs(sc32)).max())
    res["fp16_decisions_agree"] = f"{int(((sc16 > thr) == (sc32 > thr)).sum())}/{len(images)}"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny-p8,small-p8")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--flops-only", action="store_true", help="only the FLOP counts of every preset")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from mae_ad.config import PRESETS, load_config
    from mae_ad.model import scoring_flops

    flops = {}
    for p in PRESETS:
        cfg = load_config(None, [f"model.preset={p}"])
        f: dict[str, Any] = {"formula_gflop": scoring_flops(cfg.model, cfg.scoring.num_masks) / 1e9}
        try:
            f["counted_gflop"] = counted_flops(cfg) / 1e9
        except Exception as e:  # noqa: BLE001
            f["counted_gflop"] = f"failed: {e}"
        flops[p] = f
    out: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, "
                                      f"{torch.get_num_threads()} torch threads",
                           "torch": torch.__version__, "flops_per_image": flops, "presets": []}
    if not args.flops_only:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
        with tempfile.TemporaryDirectory() as d:
            for p in args.presets.split(","):
                r = bench_preset(p.strip(), Path(d), args.repeat)
                log.info("%s", r)
                out["presets"].append(r)
    text = json.dumps(out, indent=2)
    print(text)  # noqa: T201 - a script's result
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
