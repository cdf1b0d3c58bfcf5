"""Export a bundle's whole scoring graph (image -> anomaly_map, score) to ONNX, with its metadata.

The graph is `mae_ad.scoring.Scorer.forward` itself: input normalisation, the K fixed masks (constant index
tensors), encoder and decoder over the B*K masked copies, the squared error, the Gaussian smoothing, the optional
per-pixel normalisation and the reduction to a score. LoRA adapters are merged first (in memory when the bundle is
not merged yet). The batch axis is dynamic.

Exporters: `dynamo` (torch.export, the default: the cleanest graph, opset 18) or `torchscript` (the legacy
tracer, still working in torch 2.14, about 20x faster to export, a few more shape ops). Both give graphs whose
every op is in TensorRT 10's ONNX matrix (`mae-ad check-trt`).

FP16 variant (for TensorRT 11, whose networks are always strongly typed, and for 10.x strongly typed builds):
the transformer (patch embedding, encoder, decoder) runs in float16; input, normalisation, the error map, the
smoothing, the score and the outputs stay float32, so tiny squared errors do not underflow.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mae_ad.contract import (
    INPUT_NAME,
    KIND_ONNX,
    MAP_NAME,
    SCHEMA_VERSION,
    SCORE_NAME,
    BundleMeta,
    OnnxMeta,
    ParentRef,
    ScoringSpec,
    UserError,
    dump_meta,
    read_bundle_meta,
    read_calibration,
    sha256_file,
    write_json_atomic,
)
from mae_ad.scoring import Scorer

from .artifacts import (
    ONNX_META_KEY,
    bundle_sha256,
    json_dumps,
    refuse_existing,
    sidecar_path,
    staged_files,
)

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
MIN_OPSET, MAX_OPSET = 17, 20  # 17: LayerNormalization; TensorRT 10.0's parser reads opsets 9-20
DEFAULT_OPSET = 18
TRT_TOPK_MAX = 3839  # TensorRT's TopK needs K < 3840
EXTERNAL_DATA_BYTES = 512 << 20  # weights above this go to `<name>.data` beside the graph
# Ops that must never appear: random ops, data-dependent control flow or shapes. TopK only for reduce=topk_mean.
FORBIDDEN_OPS = frozenset({
    "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial", "Bernoulli",
    "Dropout", "NonZero", "Unique", "Loop", "If", "Scan", "TopK",
})
FP32_PARITY_TOL = 1e-4


class HalfPrecisionScorer(Scorer):
    """The same scorer with the transformer in float16; everything around it stays float32."""

    @classmethod
    def from_scorer(cls, scorer: Scorer) -> HalfPrecisionScorer:
        new = cls(copy.deepcopy(scorer.model), scorer.scoring, scorer.data, scorer.img_size)
        if scorer.knn_weight > 0:  # the memory buffer is sized by the training set: size it before copying
            new.set_knn_memory(scorer.knn_bank)
        new.model.half()
        for cnn in new.model.frozen_cnns():  # pretrained CNNs (feature / perceptual backbone) stay float32
            cnn.float()
        new.load_state_dict(scorer.state_dict())  # after the casts: the float32 parts keep their exact values
        return new.eval()

    def reconstruct_with_nll(self, x: torch.Tensor, with_nll: bool = True) -> tuple[torch.Tensor, Any]:
        pred, nll = super().reconstruct_with_nll(x.half(), with_nll)  # type: ignore[misc]
        return pred.float(), None if nll is None else nll.float()


def prepare_scorer(bundle: Path) -> tuple[Scorer, dict[str, Any], BundleMeta, bool]:
    """Load a calibrated bundle as a Scorer with LoRA merged. Returns (scorer, calibration, bundle meta,
    merged_here)."""
    from mae_ad.bundle import load_scorer
    from mae_ad.lora import has_lora, merge_lora

    read_bundle_meta(bundle)
    read_calibration(bundle)  # a bundle without calibration has no threshold to carry: refuse early
    scorer, cal, meta = load_scorer(bundle, "cpu", require_calibration=True)
    assert cal is not None
    merged_here = False
    if has_lora(scorer.model):
        n = merge_lora(scorer.model)
        log.info("merged %d LoRA layers in memory (run `mae-ad merge` to keep a merged bundle)", n)
        merged_here = True
    return scorer.eval(), cal, meta, merged_here


def check_topk(scorer: Scorer) -> None:
    if scorer.reduce == "topk_mean" and scorer.topk > TRT_TOPK_MAX:
        raise UserError(
            f"scoring.topk_fraction={scorer.scoring.topk_fraction} gives K={scorer.topk} pixels, but TensorRT's "
            f"TopK needs K < {TRT_TOPK_MAX + 1}; lower scoring.topk_fraction or use scoring.reduce=max"
        )


def forbidden_ops(model: Any, allow_topk: bool) -> list[str]:
    """Op types of `model` (an onnx.ModelProto) that must not be in the scoring graph."""
    bad = FORBIDDEN_OPS - ({"TopK"} if allow_topk else set())
    found = sorted({n.op_type for n in model.graph.node if n.op_type in bad})
    if allow_topk and sum(n.op_type == "TopK" for n in model.graph.node) > 1:
        found.append("TopK (more than one)")
    return found


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _trace_quietly() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # their INFO lines are the exporter's internals
        lg = logging.getLogger(name)
        stack.callback(lg.setLevel, lg.level)
        lg.setLevel(logging.WARNING)
    buf = io.StringIO()
    stack.enter_context(contextlib.redirect_stdout(buf))  # the dynamo exporter prints its progress
    stack.callback(lambda: log.debug("exporter output:\n%s", buf.getvalue()))
    return stack


def _export_graph(module: torch.nn.Module, example: torch.Tensor, dest: Path, *, exporter: str, opset: int,
                  external_data: bool, metadata: dict[str, str]) -> None:
    import onnx

    names: dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[MAP_NAME, SCORE_NAME], opset_version=opset)
    with torch.no_grad(), _trace_quietly():
        if exporter == "dynamo":
            from torch.export import Dim

            prog = torch.onnx.export(
                module, (example,), None, dynamo=True, dynamic_shapes={"image": {0: Dim("batch", min=1, max=4096)}},
                **names,
            )
            assert prog is not None
            prog.model.metadata_props.update(metadata)
            prog.save(dest, external_data=external_data)
            return
        tmp = dest.with_name(dest.name + ".trace")
        torch.onnx.export(
            module, (example,), str(tmp), dynamo=False, do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: "batch"}, MAP_NAME: {0: "batch"}, SCORE_NAME: {0: "batch"}}, **names,
        )
    model = onnx.load(str(tmp))
    tmp.unlink()
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    if external_data:
        onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dest.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dest))


def onnx_metadata(meta: OnnxMeta) -> dict[str, str]:
    """metadata_props of the graph: the whole record as JSON plus the keys a person looks for first."""
    assert meta.threshold is not None and meta.precision is not None and meta.parent is not None
    return {
        ONNX_META_KEY: json_dumps(dump_meta(meta)),
        "model_id": meta.model_id,
        "threshold": repr(float(meta.threshold)),
        "input_size": str(meta.input.size),
        "mean": json_dumps(meta.input.mean),
        "std": json_dumps(meta.input.std),
        "precision": meta.precision,
        "parent_bundle_sha256": str(meta.parent.bundle_sha256),
    }


def ort_parity(path: Path, scorer: Scorer, images: np.ndarray) -> dict[str, float]:
    """Run the ONNX with ONNX Runtime and the scorer with PyTorch on the same images; return the differences."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    o_map, o_score = sess.run([MAP_NAME, SCORE_NAME], {INPUT_NAME: images})
    with torch.no_grad():
        t_map, t_score = scorer(torch.from_numpy(images))
    t_map, t_score = t_map.numpy(), t_score.numpy()
    map_abs = float(np.abs(o_map - t_map).max())
    return {
        "map_max_abs": map_abs,
        # relative to the map's own scale (z-score maps of images far from normal reach hundreds; float32 rounding
        # there is ~1e-4 absolute), never below the absolute difference for maps within [-1, 1]
        "map_max_rel": map_abs / max(1.0, float(np.abs(t_map).max())),
        "score_max_rel": float((np.abs(o_score - t_score) / np.maximum(np.abs(t_score), 1e-12)).max()),
    }


def export_onnx(
    bundle: str | Path, out: str | Path, *, fp16: bool = False, opset: int = DEFAULT_OPSET,
    max_batch: int | None = None, exporter: str = "dynamo", external_data: bool | None = None,
    verify: bool = True,
) -> Path:
    """Export `bundle` to `out` (+ `out.meta.json`, + `out.data` with external data). Returns `out`.

    verify: run ONNX Runtime against PyTorch on two random images after export (FP32: must agree to 1e-4,
    else the export fails; FP16: the difference is recorded in the metadata).
    """
    import onnx

    bundle, out = Path(bundle), Path(out)
    if exporter not in EXPORTERS:
        raise UserError(f"--exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset {opset}: choose {MIN_OPSET}..{MAX_OPSET} (LayerNormalization needs 17; "
                        f"TensorRT 10.0 parses up to {MAX_OPSET})")
    if max_batch is not None and max_batch < 1:
        raise UserError(f"--max-batch {max_batch}: must be at least 1")
    if out.suffix != ".onnx":
        raise UserError(f"{out}: the output file name must end in .onnx")
    refuse_existing(out, sidecar_path(out), out.with_name(out.name + ".data"), what="ONNX model")

    scorer, cal, bmeta, merged_here = prepare_scorer(bundle)
    check_topk(scorer)
    module: Scorer = HalfPrecisionScorer.from_scorer(scorer) if fp16 else scorer
    ext = external_data if external_data is not None else _param_bytes(scorer) > EXTERNAL_DATA_BYTES
    size = scorer.img_size
    meta = OnnxMeta(
        format_version=SCHEMA_VERSION,
        kind=KIND_ONNX,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model_id=bmeta.model_id,
        name=bmeta.name,
        threshold=float(cal["threshold"]),
        calibration={k: cal[k] for k in ("target_fpr", "n_images", "method") if k in cal},
        input=bmeta.input.model_copy(update={"size": size}),
        outputs={"map": MAP_NAME, "score": SCORE_NAME, "input": INPUT_NAME},
        scoring=bmeta.scoring or ScoringSpec.model_validate(scorer.scoring.model_dump(mode="json")),
        precision="fp16" if fp16 else "fp32",
        io_dtype="float32",
        opset=opset,
        exporter=exporter,
        dynamic_batch=True,
        max_batch_hint=max_batch,
        external_data=bool(ext),
        merged=True,
        merged_at_export=merged_here,
        parent=ParentRef(bundle=str(bundle), bundle_sha256=bundle_sha256(bundle),
                         weights_sha256=bmeta.weights_sha256, model_id=bmeta.model_id),
        versions={"torch": str(torch.__version__), "onnx": str(onnx.__version__),
                  **{k: v for k, v in (bmeta.versions or {}).items() if k == "mae_ad"}},
    )
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, size, size, generator=gen)
    t0 = time.perf_counter()
    with staged_files(out) as tmp:
        dest = tmp / out.name
        _export_graph(module, example, dest, exporter=exporter, opset=opset, external_data=bool(ext),
                      metadata=onnx_metadata(meta))
        export_s = time.perf_counter() - t0
        onnx.checker.check_model(str(dest))
        proto = onnx.load(str(dest), load_external_data=False)
        bad = forbidden_ops(proto, allow_topk=scorer.reduce == "topk_mean")
        if bad:
            raise UserError(f"{bundle}: the exported graph holds forbidden ops ({', '.join(bad)}); "
                            "the scoring graph must be free of random and data-dependent ops")
        from .opcheck import check_summary

        meta.tensorrt_check = check_summary(proto)
        unsupported = meta.tensorrt_check["unsupported"]
        if unsupported:
            log.warning("ops outside TensorRT's ONNX support: %s (see `mae-ad check-trt`)", ", ".join(unsupported))
        if verify:
            images = torch.rand(2, 3, size, size, generator=gen).numpy()
            diff = ort_parity(dest, scorer, images)  # against the FP32 PyTorch scorer in both cases
            meta.verify = {"images": "2 uniform random", **diff}
            if not fp16 and (diff["map_max_rel"] > FP32_PARITY_TOL or diff["score_max_rel"] > FP32_PARITY_TOL):
                raise RuntimeError(f"ONNX Runtime disagrees with PyTorch after export: {diff}")
        meta.export_seconds = round(export_s, 3)
        meta.onnx_sha256 = sha256_file(dest)
        meta.onnx_bytes = sum(f.stat().st_size for f in tmp.iterdir())
        write_json_atomic(tmp / sidecar_path(out).name, dump_meta(meta))
    log.info("wrote %s (%s, %.1f MB, exported in %.1f s)", out, meta.precision, (meta.onnx_bytes or 0) / 1e6, export_s)
    return out
