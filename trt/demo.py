"""The compile step of `mae-ad demo`: merge the adapters, export the scoring graph, check it for TensorRT."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def compile_for_demo(bundle: str | Path, out: str | Path) -> dict[str, Any]:
    """Merge `bundle` into `out/merged`, export it to `out/model.onnx` and check every op against TensorRT's
    ONNX support matrix. No TensorRT engine is built (that needs the target GPU)."""
    from .export import export_onnx
    from .merge import merge_bundle
    from .opcheck import check_file

    out = Path(out)
    merged = merge_bundle(bundle, out / "merged")
    onnx_path = export_onnx(merged, out / "model.onnx", exporter="torchscript")
    rows = check_file(onnx_path)
    bad = [r.op for r in rows if r.status == "unsupported"]
    return {
        "merged": str(merged),
        "onnx": str(onnx_path),
        "onnx_mb": round(onnx_path.stat().st_size / 1e6, 1),  # MB (10^6 bytes), as the export log says
        "trt_unsupported_ops": bad,
        "summary": f"{len(rows)} op types, {len(bad)} unsupported by TensorRT 10",
    }
