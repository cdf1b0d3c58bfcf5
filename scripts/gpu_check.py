#!/usr/bin/env python3
"""On a machine with a CUDA GPU, TensorRT and pycuda: export (if needed), build the engine, check parity against
ONNX Runtime and print latency per batch size.

    python scripts/gpu_check.py --bundle BUNDLE [--fp16] [--max-batch 8] [--work gpu_check_out]
    python scripts/gpu_check.py --onnx model.onnx [--fp16] ...
    python scripts/gpu_check.py --preset tiny-p8 ...   # random weights, when no bundle is at hand

Output (see BENCHMARKS.md): one header block, a parity line per batch size, a latency table, and the
exit status 0 only when every parity check passes (FP32: map max abs <= 1e-3, score rel <= 1e-3; FP16: decisions
agree and map error <= 2 % of the map's range).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _bundle_from_preset(preset: str, work: Path) -> Path:
    import torch

    from mae_ad.bundle import save_bundle
    from mae_ad.config import load_config
    from mae_ad.model import build_model

    cfg = load_config(None, [f"model.preset={preset}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    return save_bundle(work / f"bundle-{preset}", model, cfg, {"threshold": 1.0, "method": "gpu_check placeholder"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path)
    src.add_argument("--onnx", type=Path)
    src.add_argument("--preset")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--work", type=Path, default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--timing-cache", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from mae_ad.contract import OnnxMeta
    from trt.artifacts import read_sidecar
    from trt.backends import open_backend
    from trt.build import build_engine, gpu_info, import_tensorrt

    trt = import_tensorrt()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    gpu = gpu_info(0)
    onnx_path = args.onnx
    t_export = None
    if onnx_path is None:
        from trt.export import export_onnx

        bundle = args.bundle or _bundle_from_preset(args.preset, work)
        t0 = time.perf_counter()
        onnx_path = export_onnx(bundle, work / ("model-fp16.onnx" if args.fp16 else "model.onnx"), fp16=args.fp16,
                                max_batch=args.max_batch)
        t_export = time.perf_counter() - t0
    # reference: the FP32 ONNX on ONNX Runtime (CPU)
    ref_path = onnx_path
    meta = read_sidecar(onnx_path, "ONNX", OnnxMeta)
    plan = work / (onnx_path.stem + ".plan")
    major = int(str(trt.__version__).split(".")[0])
    use_flag = args.fp16 and meta.precision != "fp16" and major == 10
    t0 = time.perf_counter()
    build_engine(onnx_path, plan, fp16=use_flag, max_batch=args.max_batch, opt_batch=args.max_batch,
                 timing_cache=args.timing_cache or work / "timing.cache")
    t_build = time.perf_counter() - t0
    print(f"gpu: {gpu['name']} (compute {gpu['compute_capability']}), TensorRT {trt.__version__}")
    print(f"onnx: {onnx_path} precision={meta.precision} export_s={t_export and round(t_export, 1)}")
    print(f"engine: {plan} build_s={t_build:.1f} size_mb={plan.stat().st_size / 1e6:.1f}")

    size = int(meta.input.size)
    ok = True
    rows = []
    with open_backend("tensorrt", plan) as be, open_backend("onnxruntime", ref_path) as ref:
        thr = be.meta.threshold
        for b in [int(x) for x in args.batches.split(",") if int(x) <= be.max_batch]:
            x = np.random.default_rng(b).random((b, 3, size, size), dtype=np.float32)
            maps, scores = be.infer(x)
            rmaps, rscores = ref.infer(x)
            map_err = float(np.abs(maps - rmaps).max())
            score_rel = float((np.abs(scores - rscores) / np.maximum(np.abs(rscores), 1e-12)).max())
            agree = bool(((scores > thr) == (rscores > thr)).all()) if thr is not None else True
            if meta.precision == "fp16" or use_flag:
                passed = agree and map_err <= 0.02 * float(np.ptp(rmaps) or 1.0)
            else:
                passed = map_err <= 1e-3 and score_rel <= 1e-3
            ok &= passed
            print(f"parity batch={b}: map_max_abs={map_err:.2e} score_max_rel={score_rel:.2e} "
                  f"decisions_agree={agree} {'PASS' if passed else 'FAIL'}")
            ts = []
            for _ in range(5):
                be.infer(x)
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                be.infer(x)
                ts.append(time.perf_counter() - t0)
            med = statistics.median(ts)
            rows.append((b, 1000 * med, 1000 * med / b, b / med))
    print(f"{'batch':>5}  {'latency_ms':>10}  {'per_image_ms':>12}  {'images_per_s':>12}")
    for b, lat, per, ips in rows:
        print(f"{b:>5}  {lat:>10.2f}  {per:>12.2f}  {ips:>12.1f}")
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
