"""Commands of the compile stage (trt/), added to `mae-ad` by `register(app)`: merge, export, quantize, check-trt,
build-engine, probe.

Heavy modules (torch, onnx, tensorrt) are imported inside each command, so `mae-ad --help` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]


def _logging(verbose: bool) -> None:
    from .common import setup_logging

    setup_logging(verbose)


def merge(
    bundle: Annotated[Path, typer.Argument(help="model bundle with LoRA adapters")],
    out: Annotated[Path, typer.Option("--out", "-o", help="merged bundle directory to create")],
    verbose: Verbose = False,
) -> None:
    """Fold every LoRA adapter into its base weight; write a bundle of plain linears (meta.json merged: true)."""
    _logging(verbose)
    from trt.merge import merge_bundle

    typer.echo(str(merge_bundle(bundle, out)))


def export(
    bundle: Annotated[Path, typer.Argument(help="calibrated model bundle (merged or not)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to create (model.onnx)")],
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 transformer, FP32 I/O (TensorRT 11 strongly typed)")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (17..20)")] = 18,
    max_batch: Annotated[int | None, typer.Option(
        "--max-batch", help="largest batch the device will run (a hint recorded for build-engine)")] = None,
    exporter: Annotated[str, typer.Option(help="dynamo (torch.export) or torchscript (legacy tracer)")] = "dynamo",
    external_data: Annotated[bool | None, typer.Option(
        "--external-data/--no-external-data", help="weights in <out>.data (default: when above 512 MB)")] = None,
    verify: Annotated[bool, typer.Option(help="check ONNX Runtime against PyTorch after export")] = True,
    verbose: Verbose = False,
) -> None:
    """Export the whole scoring graph (image -> anomaly_map, score) with dynamic batch and metadata."""
    _logging(verbose)
    from trt.export import export_onnx

    path = export_onnx(bundle, out, fp16=fp16, opset=opset, max_batch=max_batch, exporter=exporter,
                       external_data=external_data, verify=verify)
    typer.echo(str(path))


def check_trt(
    model: Annotated[Path, typer.Argument(help="ONNX model to check")],
) -> None:
    """Check every op of an ONNX graph against TensorRT 10's ONNX support matrix; exit 1 if any is unsupported."""
    from trt.opcheck import check_file, format_table

    rows = check_file(model)
    typer.echo(format_table(rows))
    bad = [r.op for r in rows if r.status == "unsupported"]
    if bad:
        typer.echo(f"error: {model}: unsupported by TensorRT: {', '.join(bad)}", err=True)
        raise typer.Exit(1)


def quantize(
    model: Annotated[Path, typer.Argument(help="fp32 ONNX from `mae-ad export`")],
    images: Annotated[Path, typer.Option(
        "--images", help="normal images to calibrate on: a folder of images, or a dataset root (train/good)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="int8 ONNX file to create (model.int8.onnx)")],
    bundle: Annotated[Path | None, typer.Option(
        "--bundle", help="with a dataset root as --images: calibrate on this bundle's held-back images only")] = None,
    test: Annotated[Path | None, typer.Option(
        "--test", help="also check decisions on these images (a folder, or test/ with class folders)")] = None,
    target: Annotated[str, typer.Option(
        help="onnxruntime (uint8 activations, fastest on CPU) or tensorrt (symmetric int8, Q/DQ for TensorRT)")
                      ] = "onnxruntime",
    method: Annotated[str, typer.Option(help="calibration: minmax, percentile or entropy")] = "minmax",
    per_channel: Annotated[bool, typer.Option("--per-channel/--per-tensor", help="weight scales")] = True,
    min_agreement: Annotated[float, typer.Option(
        "--min-agreement", help="refuse the int8 model below this share of fp32 decisions reproduced")] = 0.99,
    max_images: Annotated[int, typer.Option("--max-images", help="at most this many images per set")] = 256,
    keep_knn_fp32: Annotated[bool, typer.Option(
        "--keep-knn-fp32/--quantize-knn", help="leave the kNN distance MatMul in fp32")] = True,
    ops: Annotated[str, typer.Option(help="op types made int8 (default MatMul,Gemm: the transformer only, a CNN "
                                          "backbone's Conv stays fp32; add Conv to quantise it too)")] = "MatMul,Gemm",
    weight_matmuls_only: Annotated[bool, typer.Option(
        "--weight-matmuls-only/--all-matmuls", help="leave activation x activation MatMuls (attention) in fp32")
    ] = True,
    verbose: Verbose = False,
) -> None:
    """INT8 post-training quantisation (ONNX Runtime, QDQ, calibrated on normal images), kept only if it reproduces
    the fp32 decisions at the model's threshold; exit 1 and nothing written when it does not."""
    _logging(verbose)
    from trt.quantize import QuantizationRefused, quantize_onnx

    try:
        rec = quantize_onnx(model, images, out, bundle=bundle, test=test, target=target, method=method,
                            per_channel=per_channel, min_agreement=min_agreement, max_images=max_images,
                            keep_knn_fp32=keep_knn_fp32, weight_matmuls_only=weight_matmuls_only,
                            ops=tuple(o.strip() for o in ops.split(",") if o.strip()))
    except QuantizationRefused as e:
        typer.echo(f"refused: {e}", err=True)
        raise typer.Exit(1) from None
    for name, a in rec["quantization"]["agreement"].items():
        typer.echo(f"{name}: {a['agree']}/{a['images']} decisions agree ({a['fraction']:.2%})")
    typer.echo(str(out))


def build_engine(
    model: Annotated[Path, typer.Argument(help="ONNX model from `mae-ad export`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="engine file to create (model.plan)")],
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 (builder flag on TensorRT 10; 11 needs an FP16 ONNX)")
                    ] = False,
    workspace_mb: Annotated[int, typer.Option("--workspace-mb", help="builder workspace limit")] = 1024,
    max_batch: Annotated[int | None, typer.Option(
        "--max-batch", help="largest batch (cameras batched by the agent); default: export hint or 8")] = None,
    opt_batch: Annotated[int | None, typer.Option("--opt-batch", help="batch to tune for (default: max)")] = None,
    timing_cache: Annotated[Path | None, typer.Option(
        "--timing-cache", help="timing cache file, read and updated (speeds up rebuilds)")] = None,
    device: Annotated[int, typer.Option(help="CUDA device index")] = 0,
    verbose: Verbose = False,
) -> None:
    """Build a TensorRT engine on this device, with a meta.json (TensorRT version, GPU, ONNX hash, profile)."""
    _logging(verbose)
    from trt.build import build_engine as build

    typer.echo(str(build(model, out, fp16=fp16, workspace_mb=workspace_mb, max_batch=max_batch, opt_batch=opt_batch,
                         timing_cache=timing_cache, device=device)))


def probe(
    artifact: Annotated[Path, typer.Argument(help="bundle directory, model.onnx or model.plan")],
    backend: Annotated[str, typer.Option(help="auto (from the path), torch, onnxruntime or tensorrt")] = "auto",
    batch: Annotated[int, typer.Option(help="random images per inference")] = 1,
    max_batch: Annotated[int | None, typer.Option("--max-batch", help="largest batch the backend accepts")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (torch, onnxruntime)")] = None,
    repeat: Annotated[int, typer.Option(help="timed inferences after one warm-up")] = 3,
) -> None:
    """Open an artefact with a backend (the agent's interface), run random batches, print metadata and latency."""
    import time

    import numpy as np

    from trt.backends import open_backend

    kind = backend
    if kind == "auto":
        kind = "torch" if artifact.is_dir() else {".onnx": "onnxruntime", ".plan": "tensorrt",
                                                  ".engine": "tensorrt"}.get(artifact.suffix, "")
        if not kind:
            from mae_ad.contract import UserError

            raise UserError(f"{artifact}: cannot tell the backend from the name; pass --backend")
    with open_backend(kind, artifact, threads=threads, max_batch=max_batch) as be:
        s = be.input_size
        images = np.random.default_rng(0).random((batch, 3, s, s), dtype=np.float32)
        be.infer(images)
        times = []
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            maps, scores = be.infer(images)
            times.append(time.perf_counter() - t0)
        typer.echo(f"backend={be.name} model_id={be.meta.model_id} threshold={be.meta.threshold} "
                   f"size={s} max_batch={be.max_batch} precision={be.meta.precision}")
        typer.echo(f"batch={batch} maps={tuple(maps.shape)} scores={np.round(scores, 5).tolist()} "
                   f"latency_ms={1000 * min(times):.2f} per_image_ms={1000 * min(times) / batch:.2f}")


def register(app: typer.Typer) -> None:
    app.command("probe")(probe)
    app.command("merge")(merge)
    app.command("export")(export)
    app.command("check-trt")(check_trt)
    app.command("quantize")(quantize)
    app.command("build-engine")(build_engine)
