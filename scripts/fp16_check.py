"""FP16 vs FP32 ONNX on a real test set: the same decision on every image? How large is the map error?

    .venv/bin/python scripts/fp16_check.py BUNDLE --data DIR --out DIR

Exports the bundle twice (FP32 and FP16 transformer), scores every test image of DIR with ONNX Runtime and prints
the decision agreement at the calibrated threshold and the map / score errors. Writes DIR/fp16_check.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    from mae_ad.data import index_dataset, read_image
    from trt.backends import open_backend
    from trt.export import export_onnx

    args.out.mkdir(parents=True, exist_ok=False)
    p32 = export_onnx(args.bundle, args.out / "fp32.onnx", exporter="torchscript")
    p16 = export_onnx(args.bundle, args.out / "fp16.onnx", exporter="torchscript", fp16=True)
    test = index_dataset(args.data, need_test=True).test
    res: dict[str, list[np.ndarray]] = {"m32": [], "m16": [], "s32": [], "s16": []}
    with open_backend("onnxruntime", p32) as b32, open_backend("onnxruntime", p16) as b16:
        size, thr = b32.input_size, float(b32.meta.threshold or 0.0)
        for i in range(0, len(test), args.batch):
            x = np.stack([read_image(s.path, size) for s in test[i:i + args.batch]])
            m32, s32 = b32.infer(x)
            m16, s16 = b16.infer(x)
            res["m32"].append(m32)
            res["m16"].append(m16)
            res["s32"].append(s32)
            res["s16"].append(s16)
    m32, m16 = np.concatenate(res["m32"]), np.concatenate(res["m16"])
    s32, s16 = np.concatenate(res["s32"]), np.concatenate(res["s16"])
    agree = int(((s32 > thr) == (s16 > thr)).sum())
    out = {
        "bundle": str(args.bundle), "data": str(args.data), "n_images": len(test), "threshold": thr,
        "decisions_agree": agree, "map_max_abs_err": float(np.abs(m32 - m16).max()),
        "map_max_abs_err_over_map_max": float(np.abs(m32 - m16).max() / np.abs(m32).max()),
        "map_mean_abs_err": float(np.abs(m32 - m16).mean()),
        "score_max_rel_err": float((np.abs(s32 - s16) / np.abs(s32)).max()),
        "closest_score_to_threshold": float(np.abs(s32 - thr).min()),
        "fp32_mb": round(p32.stat().st_size / 2**20, 1), "fp16_mb": round(p16.stat().st_size / 2**20, 1),
    }
    (args.out / "fp16_check.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
