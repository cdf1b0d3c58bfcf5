"""`mae-ad quantize`: int8 QDQ graphs calibrated on normal images, the decision-agreement gate (a refused model
writes nothing), the TensorRT variant through the op check, and the Q/DQ rules of the op check itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from tests.test_feature_space import feature_bundle, lite_weights  # noqa: E402,F401  (module fixtures)


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, tiny_bundle) -> Path:
    from trt.export import export_onnx

    return export_onnx(tiny_bundle, tmp_path_factory.mktemp("q") / "m.onnx", exporter="torchscript")


def _scores(path: Path, paths: list[Path], size: int) -> np.ndarray:
    import onnxruntime as ort

    from mae_ad.data import load_stack

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(["score"], {"image": load_stack(paths, size)})[0].astype(np.float64)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_tensorrt_variant_is_symmetric_qdq_with_agreement_measured(fp32_onnx, synthetic_data, tmp_path) -> None:
    from mae_ad.data import list_images
    from trt.artifacts import ONNX_META_KEY
    from trt.opcheck import check_file
    from trt.quantize import quantize_onnx

    out = tmp_path / "m.int8.onnx"
    rec = quantize_onnx(fp32_onnx, synthetic_data / "train" / "good", out, test=synthetic_data / "test",
                        target="tensorrt", min_agreement=0.0)
    side = json.loads((tmp_path / "m.int8.onnx.meta.json").read_text())
    assert side["precision"] == "int8" and side["quantization"]["target"] == "tensorrt"
    q = side["quantization"]
    assert q["quantize_linear"] > 0 and q["dequantize_linear"] > 0
    # agreement as written equals agreement recomputed here from the two files
    meta = json.loads((fp32_onnx.parent / "m.onnx.meta.json").read_text())
    thr, size = meta["threshold"], meta["input"]["size"]
    cal = list_images(synthetic_data / "train" / "good")
    f32, i8 = _scores(fp32_onnx, cal, size), _scores(out, cal, size)
    assert q["agreement"]["calibration"]["images"] == len(cal) == 16
    assert q["agreement"]["calibration"]["agree"] == int(((f32 > thr) == (i8 > thr)).sum())
    n_test = sum(len(list_images(d)) for d in (synthetic_data / "test").iterdir())
    assert q["agreement"]["test"]["images"] == n_test > 0
    assert not np.allclose(f32, i8, rtol=1e-6)  # really quantised: scores moved
    assert np.corrcoef(f32, i8)[0, 1] > 0.9
    # every zero point is 0 of type INT8: the op check passes, and the record travels in the graph too
    rows = {r.op: r for r in check_file(out)}
    assert rows["QuantizeLinear"].status == "ok" and rows["DequantizeLinear"].status == "ok"
    assert not [r.op for r in rows.values() if r.status == "unsupported"]
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props[ONNX_META_KEY])["precision"] == "int8" and props["model_id"] == meta["model_id"]
    assert rec["onnx_sha256"] == side["onnx_sha256"]


def test_onnxruntime_variant_is_asymmetric_and_check_trt_rejects_it(fp32_onnx, synthetic_data, tmp_path) -> None:
    from trt.backends import open_backend

    out = tmp_path / "ort.int8.onnx"
    r = subprocess.run([sys.executable, "-m", "app.cli", "quantize", str(fp32_onnx), "--images",
                        str(synthetic_data / "train" / "good"), "--out", str(out), "--min-agreement", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "calibration: " in r.stdout and "decisions agree" in r.stdout
    chk = subprocess.run([sys.executable, "-m", "app.cli", "check-trt", str(out)], capture_output=True,
                         text=True, timeout=120)
    assert chk.returncode == 1 and "UINT8 zero point" in chk.stdout
    with open_backend("onnxruntime", out) as be:  # the agent's backend opens it as any other graph
        assert be.meta.precision == "int8"
        maps, scores = be.infer(np.full((2, 3, be.input_size, be.input_size), 0.5, np.float32))
        assert maps.shape == (2, 1, be.input_size, be.input_size) and np.isfinite(scores).all()


def test_refused_when_decisions_disagree_writes_nothing(fp32_onnx, synthetic_data, tmp_path) -> None:
    """A threshold set at an image's fp32 score, where int8 scores that image higher, flips its decision."""
    from mae_ad.data import list_images
    from trt.quantize import QuantizationRefused, quantize_onnx

    cal_dir = synthetic_data / "train" / "good"
    probe = tmp_path / "probe" / "p.onnx"
    quantize_onnx(fp32_onnx, cal_dir, probe, min_agreement=0.0)
    meta = json.loads((fp32_onnx.parent / "m.onnx.meta.json").read_text())
    cal = list_images(cal_dir)
    f32, i8 = _scores(fp32_onnx, cal, meta["input"]["size"]), _scores(probe, cal, meta["input"]["size"])
    up = np.flatnonzero(i8 > f32)
    assert len(up) > 0
    model = tmp_path / "src" / "m.onnx"
    model.parent.mkdir()
    shutil.copy(fp32_onnx, model)
    (model.parent / "m.onnx.meta.json").write_text(json.dumps({**meta, "threshold": float(f32[up[0]])}))

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(QuantizationRefused, match="agree"):
        quantize_onnx(model, cal_dir, out_dir / "m.int8.onnx", min_agreement=1.0)
    assert _leftovers(out_dir) == []
    r = subprocess.run([sys.executable, "-m", "app.cli", "quantize", str(model), "--images", str(cal_dir),
                        "--out", str(out_dir / "m.int8.onnx"), "--min-agreement", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "refused:" in r.stderr and "int8 refused" in r.stderr
    assert "Traceback" not in r.stderr and _leftovers(out_dir) == []
    # the same model passes a looser gate: the refusal came from the agreement, not from an error
    rec = quantize_onnx(model, cal_dir, out_dir / "m.int8.onnx", min_agreement=0.5)
    assert rec["quantization"]["agreement"]["calibration"]["agree"] < len(cal)


@pytest.mark.parametrize("args, message", [
    (["--images", "{missing}"], "folder not found"),
    (["--images", "{empty}"], "no images"),
    (["--images", "{good}", "--min-agreement", "1.5"], "--min-agreement 1.5"),
    (["--images", "{good}", "--target", "gpu"], "--target 'gpu'"),
    (["--images", "{good}", "--bundle", "{empty}"], "not a model bundle"),
    (["--images", "{good}", "--ops", "Conv,Relu"], "--ops Conv,Relu"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(fp32_onnx, synthetic_data, tmp_path, args, message) -> None:
    (tmp_path / "empty").mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    subs = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "good": synthetic_data / "train" / "good"}
    argv = [a.format(**subs) for a in args]
    r = subprocess.run([sys.executable, "-m", "app.cli", "quantize", str(fp32_onnx), *argv, "--out",
                        str(out_dir / "x.onnx")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and message in err[0] and "Traceback" not in r.stderr
    assert _leftovers(out_dir) == []


def _qdq_graph(q_zp: tuple[int, object] | None, dq_weight_type: int, dq_zp: tuple[int, object] | None):
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul(., DequantizeLinear(W)) -> y, with chosen zero points."""
    from onnx import TensorProto, helper

    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
             helper.make_tensor("W", dq_weight_type, [4, 4], [1] * 16),
             helper.make_tensor("ws", TensorProto.FLOAT, [], [0.05])]
    q_in, dq_in = ["x", "s"], ["W", "ws"]
    if q_zp is not None:
        inits.append(helper.make_tensor("qz", q_zp[0], [], [q_zp[1]]))
        q_in.append("qz")
    if dq_zp is not None:
        inits.append(helper.make_tensor("wz", dq_zp[0], [], [dq_zp[1]]))
        dq_in.append("wz")
    nodes = [helper.make_node("QuantizeLinear", q_in, ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s"] + (["qz"] if q_zp else []), ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", dq_in, ["wd"], name="dq_w"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("q_zp, w_type, w_zp, bad, finding", [
    ((3, 0), 3, (3, 0), set(), ""),                                        # symmetric int8: TensorRT's form
    ((3, 0), 3, None, set(), ""),                                          # weight zero point omitted (= 0)
    ((2, 128), 3, (3, 0), {"QuantizeLinear", "DequantizeLinear"}, "UINT8 zero point"),  # ORT's U8 activations
    (None, 3, (3, 0), {"QuantizeLinear"}, "no y_zero_point"),              # default output type is UINT8
    ((3, 0), 3, (3, 5), {"DequantizeLinear"}, "non-zero zero point"),
    ((3, 0), 6, (6, 0), {"DequantizeLinear"}, "INT32 zero point"),         # a quantised bias
    ((3, 0), 2, None, {"DequantizeLinear"}, "UINT8 input"),
])
def test_opcheck_qdq_rules(q_zp, w_type, w_zp, bad, finding) -> None:
    from trt.opcheck import check_graph

    rows = {r.op: r for r in check_graph(_qdq_graph(q_zp, w_type, w_zp))}
    assert {op for op, r in rows.items() if r.status == "unsupported"} == bad
    if finding:
        assert any(finding in d for op in bad for d in rows[op].details)


@pytest.mark.slow  # trains a feature-space bundle through the CLI (about 35 s on 2 cores)
def test_feature_space_keeps_knn_distance_fp32_and_calibrates_on_held_back(
        feature_bundle, synthetic_data, tmp_path) -> None:  # noqa: F811
    """The kNN distance MatMul (query x memory bank) stays fp32; the backbone and the MAE are quantised; --bundle
    takes exactly the bundle's held-back images."""
    from mae_ad.contract import read_calibration
    from trt.export import export_onnx
    from trt.opcheck import check_file
    from trt.quantize import knn_matmuls, quantize_onnx

    m = export_onnx(feature_bundle, tmp_path / "f.onnx")
    proto = onnx.load(str(m))
    knn = knn_matmuls(proto)
    assert len(knn) == 1
    bank_sq = next(i for i in proto.graph.initializer if i.name.endswith("knn_bank_sq"))
    n_bank = bank_sq.dims[-1]
    rec = quantize_onnx(m, synthetic_data, tmp_path / "f.int8.onnx", bundle=feature_bundle, target="tensorrt",
                        min_agreement=0.0, ops=("Conv", "MatMul", "Gemm"), weight_matmuls_only=False)
    q = rec["quantization"]
    assert q["calibration_images"] == len(read_calibration(feature_bundle)["holdout_images"]) == 4
    assert q["kept_fp32"] == knn
    g = onnx.load(str(tmp_path / "f.int8.onnx")).graph
    producer = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert convs and all(producer[n.input[1]].op_type == "DequantizeLinear" for n in convs)  # backbone int8
    # the distance MatMul: neither operand comes out of a DequantizeLinear, and one of them is the [C, M] bank
    dist = [n for n in g.node if n.op_type == "MatMul" and all(
        i not in producer or producer[i].op_type != "DequantizeLinear" for i in n.input)]
    inits = {i.name: i for i in g.initializer}
    assert any(i in inits and inits[i].dims[-1] == n_bank for n in dist for i in n.input)
    assert not [r.op for r in check_file(tmp_path / "f.int8.onnx") if r.status == "unsupported"]


def test_default_int8_quantises_weight_matmuls_only(fp32_onnx, synthetic_data, tmp_path) -> None:
    """The default: the transformer's weight MatMul/Gemm become int8; attention's activation x activation MatMuls
    and the (patch-embedding) Conv stay fp32 between no Q/DQ pair, and the record lists what was left."""
    from trt.quantize import activation_matmuls, quantize_onnx

    proto = onnx.load(str(fp32_onnx))
    act = activation_matmuls(proto)
    n_matmul = sum(n.op_type in ("MatMul", "Gemm") for n in proto.graph.node)
    assert 0 < len(act) < n_matmul  # attention products found, the linear layers are not among them
    rec = quantize_onnx(fp32_onnx, synthetic_data / "train" / "good", tmp_path / "m.int8.onnx", min_agreement=0.0)
    q = rec["quantization"]
    assert q["ops"] == ["MatMul", "Gemm"] and len(q["activation_matmuls_fp32"]) == len(act)
    g = onnx.load(str(tmp_path / "m.int8.onnx")).graph
    producer = {o: n for n in g.node for o in n.output}

    def dq_inputs(n) -> int:
        return sum(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input)

    mm = [n for n in g.node if n.op_type in ("MatMul", "Gemm")]
    assert sum(dq_inputs(n) == 0 for n in mm) == len(act)  # the attention products: fp32 in, fp32 out
    assert sum(dq_inputs(n) == 2 for n in mm) == n_matmul - len(act)  # every linear: int8 weight and input
    assert all(dq_inputs(n) == 0 for n in g.node if n.op_type == "Conv")


def test_int8_record_is_the_int8_graphs_own(fp32_onnx, synthetic_data, tmp_path) -> None:
    """The sidecar keeps no measurement of the fp32 export (its parity check, its export time) and carries the op
    check of the int8 graph itself: ONNX Runtime's U8 zero points are outside what TensorRT takes."""
    from trt.opcheck import check_file
    from trt.quantize import quantize_onnx

    out = tmp_path / "m.int8.onnx"
    quantize_onnx(fp32_onnx, synthetic_data / "train" / "good", out, min_agreement=0.0)
    side = json.loads((tmp_path / "m.int8.onnx.meta.json").read_text())
    assert "verify" not in side and "export_seconds" not in side
    assert side["tensorrt_check"]["unsupported"] == sorted({r.op for r in check_file(out) if r.status == "unsupported"})
    assert side["tensorrt_check"]["unsupported"]  # uint8 Q/DQ: the tensorrt target is the one for TensorRT


def test_quantize_refuses_a_bundle_of_another_model(fp32_onnx, synthetic_data, tmp_path) -> None:
    from mae_ad.contract import UserError
    from tests.conftest import tiny_overrides
    from trt.quantize import quantize_onnx

    from .conftest import make_bundle

    other = make_bundle(tmp_path / "other", tiny_overrides(), seed=5)
    with pytest.raises(UserError, match="is a graph of"):
        quantize_onnx(fp32_onnx, synthetic_data, tmp_path / "m.int8.onnx", bundle=other)
    assert not (tmp_path / "m.int8.onnx").exists()


def test_agreement_counts_and_names_the_engine() -> None:
    """Decisions at the threshold (anomalous when score > threshold) and the log line's engine name."""
    from trt.quantize import agreement

    a = agreement("good", np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.5, 3.5]), 2.2)
    assert (a.agree, a.fp32_anomalous, a.int8_anomalous) == (2, 1, 2) and "int8 2" in a.line()
    b = agreement("torch_bf16", np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]), 2.2, engine="torch_bf16")
    assert b.fraction == 1.0 and "torch_bf16 1" in b.line() and "int8" not in b.line()
