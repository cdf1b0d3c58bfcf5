"""Scoring precision and engine on this CPU, in one run: images/s and decision agreement with fp32 torch.

    python scripts/bench_precision.py --bundle runs/mtf --data ../shared/data/magnetic_tile --work bench_out/prec \
        --seconds 10 --out bench_out/precision.json

For one bundle: the GEMM ceiling of every engine (mae_ad.bench.gemm_ceiling) and the CPU's ISA flags; the bundle
exported to ONNX (fp32) and quantised to int8 (`mae-ad quantize`, ONNX Runtime target, calibrated on the bundle's
held-back normal images; the TensorRT variant too, for its agreement); then for fp32 torch, bf16 torch (autocast),
ORT fp32 and ORT int8: images/s at batch 1 and 8 (same thread count), and the anomalous/normal decisions on the
dataset's test images at the bundle's threshold against fp32 torch's. Ratios are within this one run.
A tiled bundle (data.resize=tile) is scored as it is deployed: each test image cut into its tiles, every engine's
tile maps stitched and the image score taken on the stitched map, so decisions are per image; speeds are measured
in tiles (model inputs) per second and converted to images/s with the test set's mean tiles per image.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench_precision")


def _rate(fn: Any, batch: int, seconds: float) -> float:
    """Model inputs per second of `fn` (one call = `batch` inputs), after a warm-up, over at least 2 calls."""
    from mae_ad.bench import time_it

    return batch / time_it(fn, seconds, min_reps=2)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="dataset root: train/good (held-back images), test/")
    ap.add_argument("--work", type=Path, required=True, help="folder for the ONNX files (created)")
    ap.add_argument("--seconds", type=float, default=10.0, help="per engine and batch, over all rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--agent-seconds", type=float, default=0.0,
                    help="also run `mae-ad agent-bench` (no outage, video decoded as fast as possible) on the fp32 "
                         "and int8 graphs for this long each; 0: skip")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import onnxruntime as ort

    from mae_ad.bench import estimated_scoring_flops, format_ceiling, gemm_ceiling
    from mae_ad.bundle import load_bundle_config, load_scorer
    from mae_ad.contract import OnnxMeta
    from mae_ad.data import index_dataset, load_stack_placed
    from mae_ad.precision import precision_context
    from mae_ad.scoring import _image_scores
    from mae_ad.tiling import TiledPlacements, input_policy
    from trt.artifacts import read_sidecar
    from trt.backends import ort_session_options
    from trt.export import export_onnx
    from trt.quantize import agreement, quantize_onnx

    threads = torch.get_num_threads()
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
                           "machine": {"cpu": None, "python": platform.python_version(), "torch": torch.__version__,
                                       "onnxruntime": ort.__version__, "threads": threads}}
    from mae_ad.bench import _cpu_name

    res["machine"]["cpu"] = _cpu_name()
    ceiling = gemm_ceiling(min(args.seconds, 5.0))
    res["ceiling"] = ceiling
    res["machine"]["isa_flags"] = ceiling["flags"]
    log.info("\n%s", format_ceiling(ceiling))

    scorer, cal, _meta = load_scorer(args.bundle, require_calibration=True)
    assert cal is not None
    thr, size = float(cal["threshold"]), int(scorer.img_size)
    res["bundle"] = {"path": str(args.bundle), "threshold": thr, "img_size": size,
                     "flop_per_input": estimated_scoring_flops(load_bundle_config(args.bundle), scorer)}
    args.work.mkdir(parents=True, exist_ok=True)
    f32 = args.work / "model.onnx"
    if not f32.exists():
        t0 = time.perf_counter()
        export_onnx(args.bundle, f32)
        res["export_s"] = time.perf_counter() - t0
    # default: `mae-ad quantize` as shipped (weight MatMul/Gemm only); onnxruntime/tensorrt: every Conv and MatMul;
    # mae_only: every MatMul/Gemm, attention products included (the backbone's convs stay fp32)
    variants = {"default": args.work / "model.int8-w.onnx", "onnxruntime": args.work / "model.int8.onnx",
                "tensorrt": args.work / "model.int8-trt.onnx", "mae_only": args.work / "model.int8-mae.onnx"}
    res["quantize"] = {}
    for target, path in variants.items():
        if not path.exists():
            every = target != "default"
            rec = quantize_onnx(f32, args.data, path, bundle=args.bundle, test=args.data / "test",
                                target="tensorrt" if target == "tensorrt" else "onnxruntime", min_agreement=0.0,
                                ops=("Conv", "MatMul", "Gemm") if target in ("onnxruntime", "tensorrt")
                                else ("MatMul", "Gemm"), weight_matmuls_only=not every)
        else:
            rec = read_sidecar(path, "ONNX", OnnxMeta).model_dump()
        res["quantize"][target] = rec["quantization"]

    test = index_dataset(args.data, need_test=True).test
    policy = input_policy(scorer.data, size)
    images, places = load_stack_placed([s.path for s in test], size, policy)
    tiled = isinstance(places, TiledPlacements)
    per_image = len(images) / len(test)  # model inputs (tiles) per test image
    labels = np.array([s.label for s in test])
    res["test_images"] = {"n": len(test), "anomalous_labelled": int(labels.sum()), "resize": str(policy),
                          "inputs": len(images), "inputs_per_image": per_image}

    def ort_session(path: Path) -> Any:
        return ort.InferenceSession(str(path), ort_session_options(ort, threads), providers=["CPUExecutionProvider"])

    sessions = {"ort_fp32": ort_session(f32), "ort_int8_default": ort_session(variants["default"]),
                "ort_int8": ort_session(variants["onnxruntime"]),
                "ort_int8_mae_only": ort_session(variants["mae_only"]),
                "ort_int8_trt_qdq": ort_session(variants["tensorrt"])}

    def image_scores(maps: list[np.ndarray]) -> np.ndarray:
        """Each test image's score from its maps: stitched over its tiles for a tiled bundle."""
        return _image_scores(scorer, torch.from_numpy(np.concatenate(maps)).float(), places)

    def ort_scores(sess: Any, x: np.ndarray, batch: int = 8) -> np.ndarray:
        return image_scores([sess.run(["anomaly_map"], {"image": x[i:i + batch]})[0] for i in range(0, len(x), batch)])

    def torch_scores(precision: str, x: np.ndarray, batch: int = 8) -> np.ndarray:
        maps = []
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                with precision_context(precision):
                    maps.append(scorer(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])))[0].float().numpy())
        return image_scores(maps)

    scores = {"torch_fp32": torch_scores("fp32", images), "torch_bf16": torch_scores("bf16", images)}
    scores.update({k: ort_scores(s, images) for k, s in sessions.items()})
    ref = scores["torch_fp32"]
    res["agreement"] = {}
    for k, s in scores.items():
        a = agreement(k, ref, s, thr, engine=k)
        res["agreement"][k] = {**a.as_dict(), "recall_defects": float((s[labels == 1] > thr).mean()),
                               "fpr_good": float((s[labels == 0] > thr).mean())}
        log.info("%s", a.line())

    res["speed"] = {}
    rng = np.random.default_rng(0)
    flop = res["bundle"]["flop_per_input"]  # per model input (a tile when tiled)
    best = ceiling["best_fp32"]["ops_per_s"]
    for batch in (1, 8):
        x = images[rng.choice(len(images), batch, replace=False)]
        xt = torch.from_numpy(x)

        def torch_run(precision: str, xt: torch.Tensor = xt) -> Any:
            def run() -> None:
                with torch.inference_mode():
                    if precision == "bf16":
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            scorer(xt)
                    else:
                        scorer(xt)
            return run

        runs = {"torch_fp32": torch_run("fp32"), "torch_bf16": torch_run("bf16"),
                **{k: (lambda s=s, x=x: s.run(None, {"image": x})) for k, s in sessions.items()}}
        # round-robin, `rounds` short measurements per engine: on a shared box each engine sees the same mix of
        # load; the best round is reported (the closest to what the engine does), the median beside it
        got: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, fn in runs.items():
                got[k].append(_rate(fn, batch, args.seconds / args.rounds))
        for k, rates in got.items():
            ips = max(rates)  # model inputs (a tiled bundle: tiles) per second; flop is per model input
            res["speed"][f"{k}_b{batch}"] = {"inputs_per_s": ips, "images_per_s": ips / per_image,
                                             "median_images_per_s": float(np.median(rates)) / per_image,
                                             "rounds": rates, "gflop_per_s": ips * flop / 1e9,
                                             "fraction_of_ceiling": ips * flop / best}
            log.info("batch %d %-18s %7.2f %s/s = %.2f img/s (median %.2f)  %.1f%% of the fp32 ceiling", batch, k,
                     ips, "tiles" if tiled else "img", ips / per_image, float(np.median(rates)) / per_image,
                     100 * ips * flop / best)
    if args.agent_seconds > 0:
        from app.agent_bench import run_agent_bench

        res["agent"] = {}
        for k, path in (("ort_fp32", f32), ("ort_int8_default", variants["default"]),
                        ("ort_int8", variants["onnxruntime"])):
            a = run_agent_bench(str(path), "onnxruntime", seconds=args.agent_seconds, threads=threads, outage=False,
                                realtime=False)
            res["agent"][k] = {"agent_fps": a["agent"]["fps"], "bare_fps": a["agent"]["bare_fps"],
                               "fraction_of_bare": a["agent"]["fraction_of_bare"],
                               "peak_rss_mb": (a.get("process") or {}).get("peak_rss_mb"),
                               "torch_loaded": (a.get("process") or {}).get("torch_loaded")}
            log.info("agent %-18s %s frames/s (bare engine %6.2f, %s)", k, a["agent"]["fps"],
                     a["agent"]["bare_fps"], a["agent"]["fraction_of_bare"])
    end = gemm_ceiling(min(args.seconds, 5.0), flags=ceiling["flags"])
    res["ceiling_end_best_fp32"] = end["best_fp32"]
    text = json.dumps(res, indent=2, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)  # noqa: T201 - a script's result


if __name__ == "__main__":
    main()
