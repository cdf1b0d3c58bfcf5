"""Which engine scores the images of `evaluate` and `predict` (issue 14, item 4).

`auto` (the default) is ONNX Runtime on the bundle's fp32 ONNX export (cached per bundle, `trt.onnx_cache`) where
onnxruntime is installed: on the CPU boxes measured it scored 4.5-5x faster than eager torch with identical decisions
(BENCHMARKS.md, "Precision and engine"). Without onnxruntime, or when the export fails, `auto` falls back to the
bundle's torch scorer with a log line. `torch` is the bundle's scorer at the precision `mae_ad.precision` chooses
(bf16 only on a CPU with native bf16, and only when it reproduces the fp32 decisions). `--onnx FILE` scores with a
given graph of the same model (e.g. an int8 one from `mae-ad quantize`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mae_ad.contract import OnnxMeta, UserError, read_bundle_meta
from mae_ad.evaluate import ENGINES, ScoringEngine
from mae_ad.precision import ENV_VAR, PRECISIONS, precision_setting

log = logging.getLogger(__name__)


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _onnxruntime_engine(path: Path, threads: int | None, source: str) -> tuple[ScoringEngine, OnnxMeta]:
    from trt.backends import open_backend

    backend = open_backend("onnxruntime", path, threads=threads)

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = backend.infer(images)
        return p.maps, p.scores

    meta = backend.meta
    if not isinstance(meta, OnnxMeta):  # pragma: no cover - the onnxruntime backend reads an OnnxMeta
        raise UserError(f"{path}: not an ONNX scoring graph")
    info = {"name": "onnxruntime", "onnx": str(path), "precision": meta.precision, "graph": source,
            "threads": threads or "onnxruntime default"}
    return ScoringEngine("onnxruntime", run, info), meta


def open_scoring_engine(bundle: Path, engine: str = "auto", onnx: Path | None = None, precision: str | None = None,
                        threads: int | None = None) -> ScoringEngine | None:
    """The engine for `bundle`: a ScoringEngine, or None for the bundle's own torch scorer (at `precision`).

    Raises UserError for an unknown engine, onnxruntime asked for but not installed, an `onnx` file of another
    model or input size, or bf16 asked of ONNX Runtime."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    # the torch precision, from --precision or $MAE_AD_PRECISION: checked whatever the engine, and bf16 (from
    # either) means the torch engine, the only one that has it
    setting = precision_setting(precision)
    source = "--precision" if precision else f"${ENV_VAR}"
    if setting not in PRECISIONS:
        raise UserError(f"{source} {setting!r}: choose one of {', '.join(PRECISIONS)}")
    if onnx is not None:
        if engine == "torch":
            raise UserError(f"--onnx {onnx}: an ONNX graph runs on --engine onnxruntime (or auto), not torch")
        engine = "onnxruntime"
    if setting == "bf16":
        if engine == "onnxruntime":
            raise UserError(f"{source} bf16 is a torch precision; ONNX Runtime scores the graph as exported "
                            "(use --engine torch, or an int8 graph from `mae-ad quantize` with --onnx)")
        if engine == "auto":
            log.info("%s bf16: scoring with the torch engine (ONNX Runtime scores in the graph's own precision)",
                     source)
        engine = "torch"
    if engine == "torch":
        if threads is not None:
            log.warning("--threads %d applies to ONNX Runtime; the torch engine uses torch's %d threads "
                        "(set OMP_NUM_THREADS to change them)", threads, _torch_threads())
        return None
    if onnx is not None:
        if onnx.is_dir():
            raise UserError(f"--onnx {onnx}: is a folder; give the .onnx file")
        if not onnx.is_file():
            raise UserError(f"--onnx {onnx}: file not found")
        bmeta = read_bundle_meta(bundle)
        eng, meta = _onnxruntime_engine(onnx, threads, "--onnx")
        if meta.model_id != bmeta.model_id:
            raise UserError(f"--onnx {onnx}: a graph of model {meta.model_id!r}, not of {bundle} ({bmeta.model_id!r})")
        if meta.input.size != bmeta.input.size:
            raise UserError(f"--onnx {onnx}: input {meta.input.size} px, the bundle's is {bmeta.input.size} px")
        return eng
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if engine == "onnxruntime":
            raise UserError("--engine onnxruntime: onnxruntime is not installed (pip install onnxruntime)") from None
        log.info("engine auto: onnxruntime is not installed; scoring with the bundle's torch model")
        return None
    from trt.onnx_cache import cached_onnx

    try:
        path, exported = cached_onnx(bundle)
    except UserError as e:
        if engine == "onnxruntime":
            raise
        log.warning("engine auto: no ONNX export of %s (%s); scoring with the bundle's torch model", bundle, e)
        return None
    return _onnxruntime_engine(path, threads, "exported now into the cache" if exported else "the cache")[0]
