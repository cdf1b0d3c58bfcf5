"""Check an ONNX graph against TensorRT 10.x's ONNX operator support (no torch, no TensorRT needed).

The project keeps its own table of the ops its exported graphs use (and a few neighbours), taken from the
onnx-tensorrt 10.1 support matrix, together with the restrictions that matter to them. Anything not in the table
is reported as unsupported, so a new op in a future export fails loudly instead of at engine build time on the
device. `mae-ad check-trt model.onnx` prints the table and exits non-zero on anything unsupported.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mae_ad.contract import UserError

TRT_OPSET_MIN, TRT_OPSET_MAX = 9, 20  # TensorRT 10.0/10.1; later 10.x releases read up to opset 24
TOPK_MAX_K = 3839

F = "FP32, FP16, BF16"
FI = "FP32, FP16, BF16, INT32, INT64"
FIB = "FP32, FP16, BF16, INT32, INT64, BOOL"


@dataclass(frozen=True)
class OpSupport:
    types: str
    restriction: str = ""
    supported: bool = True


# op -> support in TensorRT 10.x (onnx-tensorrt operators.md, 10.1-GA). Ops the exporters emit for the scorer
# first, then neighbours an exporter change could plausibly introduce.
TRT10_OPS: dict[str, OpSupport] = {
    "Add": OpSupport(FI), "Sub": OpSupport(FI), "Mul": OpSupport(FI), "Div": OpSupport(FI),
    "Pow": OpSupport(F), "Sqrt": OpSupport(F), "Erf": OpSupport(F), "Exp": OpSupport(F), "Neg": OpSupport(FI),
    "Abs": OpSupport(FI), "Max": OpSupport(FI), "Min": OpSupport(FI), "Tanh": OpSupport(F),
    "Sigmoid": OpSupport(F), "Relu": OpSupport(FI), "Clip": OpSupport(F), "Gelu": OpSupport(F),
    "MatMul": OpSupport(F), "Gemm": OpSupport(F), "Conv": OpSupport(F), "Einsum": OpSupport(F),
    "Softmax": OpSupport(F), "Log": OpSupport(F), "LogSoftmax": OpSupport(F),  # Log*: the GMM head's likelihood
    "LayerNormalization": OpSupport(F, "only the first output `Y` is supported"),
    "Cast": OpSupport("FP32, FP16, BF16, INT32, INT64, UINT8, BOOL"),
    "Constant": OpSupport(FIB, "`sparse_value`, `value_string(s)` unsupported"),
    "ConstantOfShape": OpSupport(FIB), "Identity": OpSupport(FIB), "Shape": OpSupport(FIB),
    "Concat": OpSupport(FIB), "Reshape": OpSupport(FIB), "Transpose": OpSupport(FIB), "Flatten": OpSupport(FIB),
    "Expand": OpSupport(FIB), "Tile": OpSupport(FIB), "Split": OpSupport(FIB), "Where": OpSupport(FIB),
    "Equal": OpSupport(FI), "Less": OpSupport(FI), "Greater": OpSupport(FI), "Not": OpSupport("BOOL"),
    "Range": OpSupport(FI),
    "Gather": OpSupport(FIB, "indices should be non-negative (checked when constant)"),
    "GatherElements": OpSupport(FIB), "GatherND": OpSupport(FIB),
    "Slice": OpSupport(FIB, "`axes` must be an initializer"),
    "Squeeze": OpSupport(FIB, "`axes` must be an initializer"),
    "Unsqueeze": OpSupport(FIB, "`axes` must be a constant tensor"),
    "ReduceMax": OpSupport(FI, "`axes` must be an initializer"),
    "ReduceMean": OpSupport(FI, "`axes` must be an initializer"),
    "ReduceMin": OpSupport(FI, "`axes` must be an initializer"),  # the kNN memory of a feature-space model
    "ReduceSum": OpSupport(FI, "`axes` must be an initializer"),
    "Pad": OpSupport(FI, "`axes` must be an initializer; modes constant, reflect, edge"),
    "TopK": OpSupport(FI, "`sorted` must be 1; `K` must be less than 3840"),
    # the feature-space backbone (model.backbone): local aggregation, resampling to one grid, upsampling the map
    "AveragePool": OpSupport(F, "2D or 3D pooling only; `dilations` empty or all ones"),
    "Resize": OpSupport(F, "modes nearest/linear; transformation half_pixel, pytorch_half_pixel, "
                           "tf_half_pixel_for_nn, asymmetric, align_corners; no antialias"),
    "BatchNormalization": OpSupport(F), "MaxPool": OpSupport(F, "2D or 3D pooling only"),
    "GlobalAveragePool": OpSupport(F),
    "Ceil": OpSupport(F), "Floor": OpSupport(F),  # the torchscript exporter's TF-"same" padding arithmetic
    # explicit quantisation (`mae-ad quantize --target tensorrt`): TensorRT takes symmetric int8 Q/DQ only
    "QuantizeLinear": OpSupport(F, "`y_zero_point` must be 0 (symmetric), typed INT8/FP8/INT4 (absent = UINT8)"),
    "DequantizeLinear": OpSupport("INT8, FP8, INT4", "`x_zero_point` must be zero; no UINT8 input"),
    "DynamicQuantizeLinear": OpSupport("", "not supported", False),
    "QLinearConv": OpSupport("", "not supported (use the QDQ format)", False),
    "QLinearMatMul": OpSupport("", "not supported (use the QDQ format)", False),
    "MatMulInteger": OpSupport("", "not in TensorRT's ONNX matrix", False),
    "ConvInteger": OpSupport("", "not in TensorRT's ONNX matrix", False),
    # Explicitly unsupported ones an exporter could emit
    "Unique": OpSupport("", "not supported", False), "Bernoulli": OpSupport("", "not supported", False),
    "ConcatFromSequence": OpSupport("", "not supported", False),
    "SequenceConstruct": OpSupport("", "not supported", False),
}

# input index holding `axes` (opset >= 13/18 form) for ops whose axes must be constant
_AXES_INPUT = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "ReduceMax": 1, "ReduceMean": 1, "ReduceMin": 1,
               "ReduceSum": 1, "Pad": 3}


@dataclass
class OpReport:
    op: str
    count: int
    types: str
    restriction: str
    status: str  # ok | warn | unsupported
    details: list[str] = field(default_factory=list)


class _Constants:
    """Which tensor names are constant, and their values where known (initializers, Constant nodes, and
    Identity/Cast of those)."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.names: set[str] = set()
        self.values: dict[str, Any] = {}
        self.dtypes: dict[str, int] = {}  # onnx.TensorProto data types of initializers and Constant values
        for init in graph.initializer:
            self.names.add(init.name)
            self.dtypes[init.name] = init.data_type
            if not init.data_location:  # external data not loaded: constant, value unknown
                try:
                    self.values[init.name] = numpy_helper.to_array(init)
                except Exception:  # noqa: BLE001 - a tensor we cannot read is still constant
                    pass
        for node in graph.node:
            if node.op_type == "Constant":
                self.names.update(node.output)
                for a in node.attribute:
                    if a.name == "value":
                        self.values[node.output[0]] = numpy_helper.to_array(a.t)
                        self.dtypes[node.output[0]] = a.t.data_type
            elif node.op_type in ("Identity", "Cast") and node.input[0] in self.names:
                self.names.add(node.output[0])
                if node.op_type == "Identity" and node.input[0] in self.dtypes:
                    self.dtypes[node.output[0]] = self.dtypes[node.input[0]]
                if node.input[0] in self.values:
                    self.values[node.output[0]] = self.values[node.input[0]]

    def is_const(self, name: str) -> bool:
        return name in self.names


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


# onnx.TensorProto data types TensorRT's Q/DQ take as the quantised side: INT8, FLOAT8E4M3FN, INT4
_TRT_QUANT_TYPES = {3: "INT8", 17: "FLOAT8E4M3FN", 22: "INT4"}
_ONNX_TYPE_NAMES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 10: "FLOAT16",
                    16: "BFLOAT16",
                    17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ", 21: "UINT4",
                    22: "INT4"}


def _qdq_issues(node: Any, consts: _Constants, label: str) -> list[str]:
    """TensorRT's Q/DQ restrictions: the zero point is a constant 0 of a signed quantised type (symmetric
    quantisation); a missing QuantizeLinear zero point means UINT8 output, which TensorRT does not take."""
    errors: list[str] = []
    zp = node.input[2] if len(node.input) > 2 else ""
    if not zp:
        if node.op_type == "QuantizeLinear" and _attr(node, "output_dtype", 0) not in _TRT_QUANT_TYPES:
            errors.append(f"{label}: no y_zero_point (UINT8 output)")
        elif node.op_type == "DequantizeLinear" and node.input[0] in consts.dtypes and \
                consts.dtypes[node.input[0]] not in _TRT_QUANT_TYPES:
            xt = consts.dtypes[node.input[0]]
            errors.append(f"{label}: {_ONNX_TYPE_NAMES.get(xt, xt)} input")
        return errors
    if not consts.is_const(zp):
        return [f"{label}: zero point computed at run time"]
    t = consts.dtypes.get(zp)
    if t is not None and t not in _TRT_QUANT_TYPES:
        errors.append(f"{label}: {_ONNX_TYPE_NAMES.get(t, t)} zero point (asymmetric; TensorRT takes INT8 with 0)")
    if zp in consts.values and (consts.values[zp].astype("float64") != 0).any():
        errors.append(f"{label}: non-zero zero point")
    return errors


def _node_issues(node: Any, consts: _Constants, consumed: set[str]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of one node against the restrictions in the table."""
    errors: list[str] = []
    warns: list[str] = []
    op, label = node.op_type, node.name or node.output[0]
    axes_i = _AXES_INPUT.get(op)
    if axes_i is not None and len(node.input) > axes_i and node.input[axes_i] and not consts.is_const(
            node.input[axes_i]):
        errors.append(f"{label}: `axes` is computed at run time")
    if op == "Pad":
        mode = _attr(node, "mode", "constant")
        if mode not in ("constant", "reflect", "edge"):
            errors.append(f"{label}: mode {mode!r}")
    elif op in ("AveragePool", "MaxPool"):
        if len(_attr(node, "kernel_shape", [])) not in (2, 3):
            errors.append(f"{label}: {len(_attr(node, 'kernel_shape', []))}-D pooling")
        if any(d != 1 for d in _attr(node, "dilations", []) or []):
            errors.append(f"{label}: dilations {list(_attr(node, 'dilations'))}")
    elif op == "Resize":
        mode = _attr(node, "mode", "nearest")
        ctm = _attr(node, "coordinate_transformation_mode", "half_pixel")
        if mode not in ("nearest", "linear"):
            errors.append(f"{label}: mode {mode!r}")
        if ctm not in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
            errors.append(f"{label}: coordinate_transformation_mode {ctm!r}")
        if _attr(node, "antialias", 0):
            errors.append(f"{label}: antialias")
        if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
            errors.append(f"{label}: keep_aspect_ratio_policy {_attr(node, 'keep_aspect_ratio_policy')!r}")
    elif op == "TopK":
        if _attr(node, "sorted", 1) != 1:
            errors.append(f"{label}: sorted=0")
        k = node.input[1] if len(node.input) > 1 else ""
        if not consts.is_const(k):
            errors.append(f"{label}: K is computed at run time")
        elif k in consts.values and int(consts.values[k].reshape(-1)[0]) > TOPK_MAX_K:
            errors.append(f"{label}: K={int(consts.values[k].reshape(-1)[0])} >= 3840")
    elif op == "LayerNormalization":
        if any(o and o in consumed for o in node.output[1:]):
            errors.append(f"{label}: uses Mean/InvStdDev outputs")
    elif op == "Gather":
        idx = node.input[1]
        if idx in consts.values and (consts.values[idx] < 0).any():
            warns.append(f"{label}: negative constant indices")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        errors += _qdq_issues(node, consts, label)
    elif op == "Constant" and any(a.name in ("sparse_value", "value_string", "value_strings") for a in node.attribute):
        errors.append(f"{label}: string or sparse constant")
    return errors, warns


def check_graph(model: Any) -> list[OpReport]:
    """One report row per op type in the graph (sorted by op), plus a row `(opset)` when the opset is out of range
    and `(dtype)` rows for initializer types TensorRT handles only partly."""
    graph = model.graph
    consts = _Constants(graph)
    consumed = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    counts = Counter(n.op_type for n in graph.node)
    errors: dict[str, list[str]] = defaultdict(list)
    warns: dict[str, list[str]] = defaultdict(list)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            errors[node.op_type].append(f"custom domain {node.domain!r}")
            continue
        e, w = _node_issues(node, consts, consumed)
        errors[node.op_type] += e
        warns[node.op_type] += w
    rows: list[OpReport] = []
    for op in sorted(counts):
        sup = TRT10_OPS.get(op)
        if sup is None:
            rows.append(OpReport(op, counts[op], "?", "not in the project's TensorRT op table", "unsupported"))
            continue
        status = "unsupported" if not sup.supported or errors[op] else ("warn" if warns[op] else "ok")
        rows.append(OpReport(op, counts[op], sup.types, sup.restriction, status, errors[op] + warns[op]))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not TRT_OPSET_MIN <= opset <= 24:
        rows.append(OpReport("(opset)", 1, "", f"TensorRT 10 parses opsets {TRT_OPSET_MIN}-24", "unsupported",
                             [f"opset {opset}"]))
    elif opset > TRT_OPSET_MAX:
        rows.append(OpReport("(opset)", 1, "", f"TensorRT 10.0/10.1 parse up to {TRT_OPSET_MAX}", "warn",
                             [f"opset {opset}"]))
    doubles = [i.name for i in graph.initializer if i.data_type == 11]  # DOUBLE
    if doubles:
        rows.append(OpReport("(dtype)", len(doubles), "DOUBLE", "cast down to FLOAT by TensorRT", "warn", doubles[:3]))
    return rows


def check_summary(model: Any) -> dict[str, list[str]]:
    """`check_graph` as the `tensorrt_check` record of an ONNX sidecar: {"unsupported": [op, ...], "warnings": [...]}."""
    report = check_graph(model)
    return {"unsupported": [r.op for r in report if r.status == "unsupported"],
            "warnings": [r.op for r in report if r.status == "warn"]}


def load_onnx(path: str | Path) -> Any:
    """Load an ONNX graph without its external weights; UserError if missing or not ONNX."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: ONNX file not found")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise UserError(f"{p}: not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.node:
        raise UserError(f"{p}: not a readable ONNX model (no graph nodes)")
    return model


def check_file(path: str | Path) -> list[OpReport]:
    return check_graph(load_onnx(path))


def format_table(rows: list[OpReport]) -> str:
    head = ("op", "count", "status", "TensorRT 10 types", "restriction / finding")
    lines = []
    for r in rows:
        note = "; ".join(r.details[:3]) if r.details else r.restriction
        lines.append((r.op, str(r.count), r.status, r.types, note))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths), "-" * 20)]
    out += [fmt.format(*x) for x in lines]
    bad = sum(r.status == "unsupported" for r in rows)
    out.append(f"{len(rows)} op types, {bad} unsupported, {sum(r.status == 'warn' for r in rows)} warnings")
    return "\n".join(out)
