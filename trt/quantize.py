"""INT8 post-training quantisation of an exported scoring graph, kept only when it reproduces the fp32 decisions.

    mae-ad quantize model.onnx --images data/train/good --out model.int8.onnx [--test data/test]
    mae-ad quantize model.onnx --images data --bundle runs/b --out model.int8.onnx   # the bundle's held-back images

Calibration sees normal images only: a folder of images, or a dataset root (train/good) — with `--bundle`, the
bundle's held-back calibration images, which the model never trained on. ONNX Runtime's static quantiser
(`onnxruntime.quantization.quantize_static`, MinMax/percentile/entropy calibration through a CalibrationDataReader)
writes a QDQ graph: QuantizeLinear/DequantizeLinear pairs around the convolutions and matmuls, weights int8
per output channel.

Targets:
- `onnxruntime` (default): activations uint8 with a zero point, weights int8 symmetric per channel (U8S8, the
  kernels ONNX Runtime's CPU provider runs fastest on x86);
- `tensorrt`: activations and weights int8 symmetric (zero point 0), the explicit-quantisation form TensorRT 10
  parses (`mae-ad check-trt` checks it).

The kNN distance MatMul of a feature-space model (query x memory bank) is left in fp32 by default: the distance
is |q|^2 - 2 q.m + |m|^2, a difference of large terms that int8 rounding of q.m would swamp.

The decision check: the int8 and the fp32 graph score the calibration images (and the `--test` images); an image
is anomalous when score > threshold (the graph's own calibrated threshold, from its sidecar or metadata). When
the share of images with the same decision, over every image checked (calibration and test together; each set is
also reported on its own), is below `min_agreement` (default 0.99) the int8 graph is refused:
a log line says so, nothing is written, and the fp32 graph stays the one to deploy.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mae_ad.contract import (
    INPUT_NAME,
    SCORE_NAME,
    OnnxMeta,
    UserError,
    dump_meta,
    read_bundle_meta,
    read_calibration,
    sha256_file,
    write_json_atomic,
)
from mae_ad.tiling import input_policy

from .artifacts import (
    ONNX_META_KEY,
    ORT_INSTALL_HINT,
    import_optional,
    json_dumps,
    read_onnx_meta,
    refuse_existing,
    sidecar_path,
    staged_files,
)

log = logging.getLogger(__name__)

TARGETS = ("onnxruntime", "tensorrt")
METHODS = ("minmax", "percentile", "entropy")
DEFAULT_MIN_AGREEMENT = 0.99
QUANT_OPS = ("Conv", "MatMul", "Gemm")  # the ops that carry the FLOPs; everything else stays fp32 between Q/DQ
# The default leaves Conv (a pretrained backbone) in fp32: int8 convolutions shifted the features enough to change
# 13-33 % of the feature-space recipe's decisions and were no faster (BENCHMARKS.md, "Precision and engine").
DEFAULT_OPS = ("MatMul", "Gemm")
KNN_BANK_HINT = "knn_bank"  # initializer name of the feature-space memory bank (mae_ad.scoring.Scorer)


class QuantizationRefused(Exception):
    """The int8 graph does not reproduce the fp32 decisions well enough; nothing was written."""


@dataclass
class Agreement:
    """Decision agreement of the int8 graph (or another engine: `engine`) with the fp32 graph on one image set."""

    name: str
    n: int
    agree: int
    fp32_anomalous: int
    int8_anomalous: int
    score_max_rel: float
    score_corr: float
    engine: str = "int8"  # what `int8_anomalous` counts, as the log line names it

    @property
    def fraction(self) -> float:
        return self.agree / self.n if self.n else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.n, "agree": self.agree, "fraction": self.fraction,
                "fp32_anomalous": self.fp32_anomalous, "int8_anomalous": self.int8_anomalous,
                "score_max_rel": self.score_max_rel, "score_corr": self.score_corr}

    def line(self) -> str:
        return (f"{self.name}: {self.agree}/{self.n} decisions agree ({self.fraction:.2%}); anomalous fp32 "
                f"{self.fp32_anomalous}, {self.engine} {self.int8_anomalous}; score max rel diff "
                f"{self.score_max_rel:.3g}, corr {self.score_corr:.4f}")


def agreement(name: str, ref: np.ndarray, new: np.ndarray, threshold: float, engine: str = "int8") -> Agreement:
    """Compare two score vectors [N] at `threshold` (anomalous when score > threshold); `engine` names what made
    `new` (the fp32 graph made `ref`)."""
    ref, new = np.asarray(ref, np.float64).reshape(-1), np.asarray(new, np.float64).reshape(-1)
    d_ref, d_new = ref > threshold, new > threshold
    rel = np.abs(new - ref) / np.maximum(np.abs(ref), 1e-12)
    corr = float(np.corrcoef(ref, new)[0, 1]) if len(ref) > 1 and ref.std() > 0 and new.std() > 0 else 1.0
    return Agreement(name, len(ref), int((d_ref == d_new).sum()), int(d_ref.sum()), int(d_new.sum()),
                     float(rel.max()) if len(ref) else 0.0, corr, engine)


@dataclass
class ImageSet:
    name: str
    paths: list[Path] = field(default_factory=list)


def _evenly(paths: list[Path], limit: int | None) -> list[Path]:
    if limit is None or len(paths) <= limit:
        return paths
    return [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]


def calibration_images(images: Path, bundle: Path | None = None, limit: int | None = None) -> ImageSet:
    """Normal images to calibrate on: the image files directly in `images`; or, for a dataset root, its normal
    training images — only the held-back ones of `bundle` when given. Raises UserError when there are none."""
    from mae_ad.data import index_dataset, list_images

    if not images.is_dir():
        raise UserError(f"--images {images}: folder not found")
    if bundle is not None:
        cal = read_calibration(bundle)
        held = cal.get("holdout_images") or []
        if not held:
            raise UserError(f"--bundle {bundle}: calibration.json lists no holdout_images")
        missing = [h for h in held if not (images / h).is_file()]
        if missing:
            raise UserError(f"--images {images}: the bundle's held-back image {missing[0]} is not there "
                            f"({len(missing)} of {len(held)} missing); pass the dataset root the bundle was trained on")
        return ImageSet(f"calibration (held-back normal images of {bundle.name})",
                        _evenly(sorted(images / h for h in held), limit))
    direct = list_images(images)
    if direct:
        return ImageSet(f"calibration ({images})", _evenly(direct, limit))
    if (images / "train").is_dir():
        paths = index_dataset(images).train
        if paths:
            return ImageSet(f"calibration ({images} normal training images)", _evenly(paths, limit))
    raise UserError(f"--images {images}: no images (expected image files, or a dataset root with train/good)")


def test_images(test: Path, limit: int | None = None) -> ImageSet:
    """Images to check decisions on: the files directly in `test`, else every image one level below it
    (test/good, test/<defect>)."""
    from mae_ad.data import list_images

    if not test.is_dir():
        raise UserError(f"--test {test}: folder not found")
    paths = list_images(test) or [p for sub in sorted(d for d in test.iterdir() if d.is_dir())
                                  for p in list_images(sub)]
    if not paths:
        raise UserError(f"--test {test}: no images (expected image files or test/<class>/ folders)")
    return ImageSet(f"test ({test})", _evenly(paths, limit))


def _batches(paths: list[Path], size: int, batch: int, policy: Any = "squash") -> Iterator[np.ndarray]:
    """Images read as the model reads them (`policy`: its resize policy, or a `TileSpec`: their tiles)."""
    from mae_ad.data import load_stack

    for i in range(0, len(paths), batch):
        yield load_stack(paths[i:i + batch], size, policy)


def onnx_meta(model_path: Path) -> OnnxMeta:
    """The scoring graph's mae-ad record: its sidecar, else its metadata_props. UserError when it has neither or
    no threshold."""
    from .opcheck import load_onnx

    meta = read_onnx_meta(model_path, lambda: {p.key: p.value for p in load_onnx(model_path).metadata_props})
    if meta.threshold is None:
        raise UserError(f"{model_path}: no calibrated threshold in its metadata; export a calibrated bundle")
    if (meta.precision or "fp32") != "fp32":
        raise UserError(f"{model_path}: precision {meta.precision!r}; quantise the fp32 export")
    return meta


def score_paths(session: Any, paths: list[Path], size: int, batch: int = 8, policy: Any = "squash") -> np.ndarray:
    """Scores [N] of the images at `paths` through an onnxruntime session (a tiled model: one per tile, so the
    decision agreement is counted over tiles)."""
    out = [session.run([SCORE_NAME], {INPUT_NAME: x})[0] for x in _batches(paths, size, batch, policy)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def knn_matmuls(model: Any) -> list[str]:
    """Names of the MatMul/Gemm nodes of the kNN distance |q|^2 - 2 q.m + |m|^2: those that feed, through
    elementwise arithmetic only, the op that adds the bank's squared norms (initializer `knn_bank_sq`), and those
    that take the bank itself (`knn_bank`, when the exporter kept its name). int8 must not touch them."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    found: list[str] = []
    inits = {i.name for i in graph.initializer}
    sq = {n for n in inits if KNN_BANK_HINT in n and n.endswith("_sq")}
    bank = {n for n in inits if KNN_BANK_HINT in n and not n.endswith("_sq")}
    stack = [(i, 0) for n in graph.node if sq & set(n.input) for i in n.input if i not in sq]
    seen: set[str] = set()
    while stack:
        name, depth = stack.pop()
        node = producer.get(name)
        if node is None or node.name in seen or depth > 6:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            found.append(node.name)
        elif node.op_type in ("Add", "Sub", "Mul", "Neg", "Div", "Identity", "Cast"):
            stack += [(i, depth + 1) for i in node.input]
    found += [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and bank & set(n.input)
              and n.name not in found]
    return found


def activation_matmuls(model: Any) -> list[str]:
    """Names of the MatMul/Gemm nodes that multiply two activations (attention's Q.K^T and A.V): no operand is a
    weight (an initializer or Constant, directly or through Transpose/Reshape/Identity/Cast). Quantising them adds a
    QuantizeLinear per operand and per call for matrices of only tokens x head width; measured on the 320-px
    recipe (BENCHMARKS.md), leaving them fp32 made the int8 graph faster (1.15x ORT fp32 instead of 0.83-0.96x)
    and kept 238/239 decisions."""
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    weights |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}

    def is_weight(name: str, depth: int = 0) -> bool:
        if name in weights:
            return True
        node = producer.get(name)
        return (node is not None and depth < 4 and node.op_type in ("Transpose", "Reshape", "Identity", "Cast")
                and is_weight(node.input[0], depth + 1))

    return [n.name for n in graph.node
            if n.op_type in ("MatMul", "Gemm") and not any(is_weight(i) for i in n.input if i)]


def _named(model: Any) -> Any:
    """Give every unnamed node a unique name (the quantiser's include/exclude lists are by node name)."""
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)
    return model


def _preprocess(src: Path, dst: Path) -> Path:
    """ONNX Runtime's quantisation pre-processing (shape inference, graph optimisation), which lets the quantiser
    see every tensor's shape; the graph as exported when it fails (logged)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return dst
    except Exception as e:  # noqa: BLE001 - an optional step: the quantiser works on the raw graph too
        log.info("quantisation pre-processing skipped (%s: %s)", type(e).__name__, str(e).splitlines()[0][:200])
        return src


class _DropRootInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextmanager
def _quiet_root() -> Iterator[None]:
    """ONNX Runtime's quantiser logs hundreds of INFO lines on the root logger (one per rescaled weight channel);
    keep its warnings, drop the rest."""
    f = _DropRootInfo()
    logging.root.addFilter(f)
    try:
        yield
    finally:
        logging.root.removeFilter(f)


class _Reader:
    """A CalibrationDataReader over image files: one batch of `image` per call, None when done."""

    def __init__(self, paths: list[Path], size: int, batch: int, policy: Any = "squash") -> None:
        self._args = (paths, size, batch, policy)
        self._it = _batches(*self._args)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {INPUT_NAME: x}

    def rewind(self) -> None:
        self._it = _batches(*self._args)


def quantize_onnx(
    model: str | Path, images: str | Path, out: str | Path, *, bundle: str | Path | None = None,
    test: str | Path | None = None, target: str = "onnxruntime", method: str = "minmax", per_channel: bool = True,
    min_agreement: float = DEFAULT_MIN_AGREEMENT, max_images: int | None = 256, keep_knn_fp32: bool = True,
    batch: int = 8, ops: tuple[str, ...] = DEFAULT_OPS, weight_matmuls_only: bool = True,
) -> dict[str, Any]:
    """Quantise `model` (an fp32 scoring graph from `mae-ad export`) to int8 QDQ at `out` (+ `out.meta.json`).

    Returns the record written as the sidecar (`quantization` holds the settings and the agreement figures).
    Raises UserError on bad input (exit 2) and QuantizationRefused when the decisions agree on less than
    `min_agreement` of the calibration and test images together; in both cases nothing is written.
    """
    ort = import_optional("onnxruntime", ORT_INSTALL_HINT)
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model, images, out = Path(model), Path(images), Path(out)
    if target not in TARGETS:
        raise UserError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    if method not in METHODS:
        raise UserError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if not 0.0 <= min_agreement <= 1.0:
        raise UserError(f"--min-agreement {min_agreement}: must be within 0..1")
    if max_images is not None and max_images < 1:
        raise UserError(f"--max-images {max_images}: must be at least 1")
    if not ops or set(ops) - set(QUANT_OPS):
        raise UserError(f"--ops {','.join(ops)}: choose among {', '.join(QUANT_OPS)}")
    if out.suffix != ".onnx":
        raise UserError(f"{out}: the output file name must end in .onnx")
    if out.resolve() == model.resolve():
        raise UserError(f"{out}: is the input model; choose another --out")
    refuse_existing(out, sidecar_path(out), out.with_name(out.name + ".data"), what="ONNX model")
    if not model.is_file():
        raise UserError(f"{model}: ONNX file not found")
    meta = onnx_meta(model)
    size, threshold = meta.input.size, float(meta.threshold or 0.0)
    policy = input_policy(meta.input, size)  # calibration and agreement images read as the model reads them
    if bundle is not None:
        bid = read_bundle_meta(bundle).model_id
        if bid != meta.model_id:
            raise UserError(f"--bundle {bundle}: model {bid!r}, but {model} is a graph of {meta.model_id!r}; its "
                            "held-back images are only known for its own bundle")
    cal_set = calibration_images(images, Path(bundle) if bundle is not None else None, max_images)
    sets = [cal_set] + ([test_images(Path(test), max_images)] if test is not None else [])
    log.info("calibrating int8 (%s, %s, %s) on %d normal images%s", target, method,
             "per channel" if per_channel else "per tensor", len(cal_set.paths),
             "" if isinstance(policy, str) else " (a tiled model: their tiles; decisions are counted per tile)")

    proto = _named(onnx.load(str(model)))
    exclude = knn_matmuls(proto) if keep_knn_fp32 else []
    if exclude:
        log.info("kNN distance MatMul kept in fp32: %s", ", ".join(exclude))
    act = [n for n in activation_matmuls(proto) if n not in exclude] if weight_matmuls_only else []
    if act:
        log.info("%d activation x activation MatMul(s) (attention) kept in fp32", len(act))
    tensorrt = target == "tensorrt"
    extra = {"ActivationSymmetric": tensorrt, "WeightSymmetric": True,
             "QuantizeBias": not tensorrt}  # TensorRT's DequantizeLinear takes no INT32 (biases stay fp32)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mae-ad-quant-") as work:
        src = Path(work) / "fp32.onnx"
        onnx.save_model(proto, str(src))
        src = _preprocess(src, Path(work) / "fp32.pre.onnx")
        dst = Path(work) / "int8.onnx"
        try:
            with _quiet_root():
                quantize_static(
                    str(src), str(dst), _Reader(cal_set.paths, size, batch, policy), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(ops), per_channel=per_channel,
                    activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=exclude + act, calibrate_method={"minmax": CalibrationMethod.MinMax,
                                                                "percentile": CalibrationMethod.Percentile,
                                                                "entropy": CalibrationMethod.Entropy}[method],
                    extra_options=extra,
                )
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the quantiser raises many kinds; name it and stop
            raise UserError(f"{model}: ONNX Runtime's quantiser failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None
        quant_s = time.perf_counter() - t0
        so = ort.SessionOptions()
        so.log_severity_level = 3
        s32 = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        s8 = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
        results = [agreement(s.name, score_paths(s32, s.paths, size, batch, policy),
                             score_paths(s8, s.paths, size, batch, policy), threshold) for s in sets]
        for r in results:
            log.info("%s", r.line())
        q8 = onnx.load(str(dst))
        n_q = sum(n.op_type == "QuantizeLinear" for n in q8.graph.node)
        n_dq = sum(n.op_type == "DequantizeLinear" for n in q8.graph.node)
        record: dict[str, Any] = {
            **dump_meta(meta),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "precision": "int8",
            "quantization": {
                "tool": f"onnxruntime.quantization.quantize_static {ort.__version__}", "format": "QDQ",
                "target": target, "method": method, "per_channel": per_channel,
                "activations": "int8 symmetric" if tensorrt else "uint8 asymmetric",
                "weights": "int8 symmetric" + (" per channel" if per_channel else ""),
                "ops": list(ops), "kept_fp32": exclude, "activation_matmuls_fp32": act,
                "quantize_linear": n_q, "dequantize_linear": n_dq,
                "calibration_images": len(cal_set.paths), "calibration_source": cal_set.name,
                "threshold": threshold, "min_agreement": min_agreement,
                "agreement": {("calibration" if i == 0 else "test"): r.as_dict() for i, r in enumerate(results)},
                "seconds": round(quant_s, 2),
            },
            "parent_onnx": {"path": str(model), "sha256": sha256_file(model)},
        }
        n_all, agree_all = sum(r.n for r in results), sum(r.agree for r in results)
        pooled = agree_all / n_all if n_all else 1.0
        record["quantization"]["agreement"]["all"] = {"images": n_all, "agree": agree_all, "fraction": pooled}
        if pooled < min_agreement:
            log.warning("int8 refused: %d/%d decisions agree with fp32 over every image checked (%.2f%% < %.2f%%); "
                        "nothing written, keep %s (fp32)", agree_all, n_all, 100 * pooled, 100 * min_agreement, model)
            raise QuantizationRefused(f"{model}: int8 decisions agree on {pooled:.2%} of the {n_all} images checked "
                                      f"(< {min_agreement:.2%}); keep the fp32 model")
        # the fp32 export's own measurements describe another graph: drop them; the op check is this graph's
        for stale in ("verify", "export_seconds"):
            record.pop(stale, None)
        from .opcheck import check_summary

        record["tensorrt_check"] = check_summary(q8)
        bad = record["tensorrt_check"]["unsupported"]
        if tensorrt and bad:
            raise UserError(f"{model}: the int8 graph holds ops TensorRT 10 does not take ({', '.join(bad)}); "
                            "see `mae-ad check-trt`")
        OnnxMeta.model_validate(record)  # the contract: a record the readers accept
        # the record travels in the graph as well, as `mae-ad export` does (a sidecar can be lost on a device)
        props = {p.key: p.value for p in proto.metadata_props}
        props.update({ONNX_META_KEY: json_dumps(record), "precision": "int8"})
        del q8.metadata_props[:]
        for k, v in props.items():
            q8.metadata_props.add(key=k, value=v)
        with staged_files(out) as tmp:
            onnx.save_model(q8, str(tmp / out.name))
            record["onnx_sha256"] = sha256_file(tmp / out.name)
            record["onnx_bytes"] = (tmp / out.name).stat().st_size
            write_json_atomic(tmp / sidecar_path(out).name, dump_meta(OnnxMeta.model_validate(record)))
    log.info("wrote %s (int8 %s, %.1f MB; %s)", out, target, record["onnx_bytes"] / 1e6,
             "; ".join(f"{k} agreement {v['fraction']:.2%}" for k, v in record["quantization"]["agreement"].items()))
    return record
