"""Merge parity, ONNX export (parity with PyTorch, dynamic batch, checker, ops, metadata), FP16 variant, check-trt
on every preset's export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_ad.contract import UserError
from tests.conftest import tiny_overrides

from .conftest import make_bundle, synthetic_images

# The real defect set beside the checkout (../shared/data/magnetic_tile), or where MAE_AD_REAL_DATA points.
MAGNETIC_TILE = Path(os.environ.get("MAE_AD_REAL_DATA", Path(__file__).resolve().parents[3] / "shared/data/magnetic_tile"))


def _real_images(size: int, n: int = 4) -> np.ndarray | None:
    """A few images of the real magnetic-tile set when it is present on this machine."""
    if not MAGNETIC_TILE.is_dir():
        return None
    import cv2

    files = sorted(p for p in MAGNETIC_TILE.rglob("*") if p.suffix.lower() in (".jpg", ".png", ".bmp")
                   and "mask" not in p.name.lower() and "ground_truth" not in str(p))[:n]
    imgs = [cv2.resize(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB), (size, size)) for f in files]
    return np.stack(imgs).astype(np.float32).transpose(0, 3, 1, 2) / 255.0 if imgs else None


def _images(size: int) -> dict[str, np.ndarray]:
    out = {"random": np.random.default_rng(3).random((3, 3, size, size), dtype=np.float32),
           "synthetic": synthetic_images(4, size, seed=7, defects=True)}
    real = _real_images(size)
    if real is not None:
        out["magnetic_tile"] = real
    return out


# --- merge -------------------------------------------------------------------------------------------------------
def test_merge_parity_and_plain_architecture(tiny_bundle, tmp_path):
    from safetensors.torch import load_file

    from mae_ad.bundle import load_bundle, load_scorer
    from mae_ad.config import load_config
    from mae_ad.lora import has_lora
    from mae_ad.model import build_model
    from trt.merge import merge_bundle

    merged = merge_bundle(tiny_bundle, tmp_path / "merged")
    meta = json.loads((merged / "meta.json").read_text())
    assert meta["merged"] is True and meta["lora"] is False and meta["parent"]["model_id"]
    assert (merged / "calibration.json").read_text() == (tiny_bundle / "calibration.json").read_text()
    # the weights load, strictly, into the architecture built without LoRA
    plain = build_model(load_config(None, tiny_overrides() + ["model.lora.rank=0"]).model)
    plain.load_state_dict(load_file(str(merged / "weights.safetensors")), strict=True)
    _, model, _ = load_bundle(merged)
    assert not has_lora(model)

    a, _, _ = load_scorer(tiny_bundle)
    b, _, _ = load_scorer(merged)
    assert has_lora(a.model)
    lora_b = a.model.blocks[0].attn.qkv.lora_B
    assert float(lora_b.detach().abs().max()) > 0  # the adapters are not trivially zero
    for name, x in _images(32).items():
        with torch.no_grad():
            ma, sa = a(torch.from_numpy(x))
            mb, sb = b(torch.from_numpy(x))
        assert float((ma - mb).abs().max()) <= 1e-5, name
        assert float((sa - sb).abs().max()) <= 1e-5, name


def test_merge_keeps_the_training_record(tiny_bundle, tmp_path):
    """The trainer's `training` record (held-back images, steps) survives the merge: precision checks on a merged
    bundle find the held-back images through it."""
    import shutil

    from trt.merge import merge_bundle

    src = tmp_path / "trained"
    shutil.copytree(tiny_bundle, src)
    meta = json.loads((src / "meta.json").read_text())
    record = {"optimizer_steps": 7, "holdout": ["a.png", "b.png"], "seed": 0}
    meta["training"] = record
    (src / "meta.json").write_text(json.dumps(meta))
    merged = merge_bundle(src, tmp_path / "merged")
    assert json.loads((merged / "meta.json").read_text())["training"] == record


def test_merge_refuses_merged_bundle_and_existing_out(tiny_bundle, tmp_path):
    from trt.merge import merge_bundle

    merged = merge_bundle(tiny_bundle, tmp_path / "merged")
    with pytest.raises(UserError, match="already merged"):
        merge_bundle(merged, tmp_path / "again")
    with pytest.raises(UserError, match="already exists"):
        merge_bundle(tiny_bundle, merged)
    assert not (tmp_path / "again").exists()


# --- export ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tiny_bundle, tmp_path_factory):
    """The default (dynamo) export of the tiny bundle, FP32 and FP16."""
    from trt.export import export_onnx

    d = tmp_path_factory.mktemp("export")
    return (export_onnx(tiny_bundle, d / "model.onnx", max_batch=4),
            export_onnx(tiny_bundle, d / "model_fp16.onnx", fp16=True))


def _run(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})


def _check_parity(tiny_bundle, path):
    from mae_ad.bundle import load_scorer

    scorer, _, _ = load_scorer(tiny_bundle)
    for name, imgs in _images(32).items():
        for b in (1, 3):  # dynamic batch
            x = imgs[:b]
            om, os_ = _run(path, x)
            with torch.no_grad():
                tm, ts = scorer(torch.from_numpy(x))
            assert om.shape == (b, 1, 32, 32) and os_.shape == (b,)
            assert np.abs(om - tm.numpy()).max() <= 1e-4, (name, b)
            assert (np.abs(os_ - ts.numpy()) / np.abs(ts.numpy())).max() <= 1e-4, (name, b)


def test_onnx_parity_dynamic_batch(tiny_bundle, exported):
    _check_parity(tiny_bundle, exported[0])


def test_onnx_graph_is_clean_and_carries_metadata(tiny_bundle, exported):
    import onnx

    from trt.export import forbidden_ops

    path = exported[0]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score"]
    assert not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")  # symbolic batch
    ops = {n.op_type for n in model.graph.node}
    assert forbidden_ops(model, allow_topk=False) == [] and not ops & {"TopK", "RandomUniform", "RandomNormal"}
    props = {p.key: p.value for p in model.metadata_props}
    cal = json.loads((tiny_bundle / "calibration.json").read_text())
    assert float(props["threshold"]) == pytest.approx(cal["threshold"])
    assert props["input_size"] == "32" and json.loads(props["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    meta = json.loads(Path(str(path) + ".meta.json").read_text())
    bmeta = json.loads((tiny_bundle / "meta.json").read_text())
    assert meta["model_id"] == props["model_id"] == bmeta["model_id"]
    assert meta["parent"]["bundle_sha256"] == props["parent_bundle_sha256"] and len(meta["parent"]["bundle_sha256"]) == 64
    assert meta["max_batch_hint"] == 4 and meta["merged_at_export"] is True
    assert meta["verify"]["map_max_abs"] <= 1e-4 and meta["tensorrt_check"]["unsupported"] == []
    # every key the version-1 sidecar had before the typed contract is still written
    assert set(meta) == {
        "format_version", "kind", "created", "model_id", "name", "threshold", "calibration", "input", "outputs",
        "scoring", "precision", "io_dtype", "opset", "exporter", "dynamic_batch", "max_batch_hint", "external_data",
        "merged", "merged_at_export", "parent", "versions", "tensorrt_check", "verify", "export_seconds",
        "onnx_sha256", "onnx_bytes"}
    assert meta["format_version"] == 1 and meta["outputs"] == {"map": "anomaly_map", "score": "score", "input": "image"}
    assert json.loads(props["mae_ad.meta"])["outputs"] == meta["outputs"]


def test_fp16_variant_same_decisions(tiny_bundle, exported):
    import onnx

    fp32, fp16 = exported
    model = onnx.load(str(fp16))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # FP32 I/O
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)  # FP16 weights
    thr = json.loads(Path(str(fp16) + ".meta.json").read_text())["threshold"]
    x = synthetic_images(12, 32, seed=11, defects=True)
    m32, s32 = _run(fp32, x)
    m16, s16 = _run(fp16, x)
    assert np.abs(m16 - m32).max() <= 1e-2 * np.abs(m32).max()
    margin = np.abs(s32 - thr).min()
    if margin > np.abs(s16 - s32).max():  # decisions can only flip for scores closer to the threshold than the error
        assert ((s16 > thr) == (s32 > thr)).all()
    assert (np.abs(s16 - s32) / np.abs(s32)).max() <= 1e-2


def test_torchscript_exporter_and_external_data(tiny_bundle, tmp_path):
    from trt.export import export_onnx

    path = export_onnx(tiny_bundle, tmp_path / "ts.onnx", exporter="torchscript", opset=17, external_data=True)
    assert (tmp_path / "ts.onnx.data").stat().st_size > 100_000
    assert (tmp_path / "ts.onnx").stat().st_size < 100_000
    _check_parity(tiny_bundle, path)


def test_recipe_options_export_with_parity(tmp_path):
    """The magnetic-tile recipe's options (per-image standardisation, grid masks, position normalisation) export,
    pass the TensorRT op check and match PyTorch in ONNX Runtime."""
    from trt.export import export_onnx
    from trt.opcheck import check_file

    b = make_bundle(tmp_path / "b", tiny_overrides() + ["data.normalize=per_image", "scoring.pattern=grid",
                                                        "scoring.normalize=position"])
    path = export_onnx(b, tmp_path / "m.onnx", exporter="torchscript")
    assert not [r.op for r in check_file(path) if r.status == "unsupported"]
    _check_parity(b, path)


def test_topk_reduce_allowed_within_tensorrt_limit(tmp_path):
    import onnx

    from trt.export import export_onnx

    b = make_bundle(tmp_path / "b", tiny_overrides() + ["scoring.reduce=topk_mean", "scoring.topk_fraction=0.05"])
    path = export_onnx(b, tmp_path / "m.onnx", exporter="torchscript")
    assert sum(n.op_type == "TopK" for n in onnx.load(str(path)).graph.node) == 1
    big = make_bundle(tmp_path / "big", ["model.preset=tiny-p8", "model.depth=1", "model.decoder_depth=1",
                                         "scoring.reduce=topk_mean", "scoring.topk_fraction=0.1"], calibrated=True)
    with pytest.raises(UserError, match="K=5018.*3840"):
        export_onnx(big, tmp_path / "big.onnx")
    assert not (tmp_path / "big.onnx").exists()


def test_export_bad_inputs(tmp_path, tiny_bundle, exported):
    from trt.export import export_onnx

    raw = make_bundle(tmp_path / "raw", tiny_overrides(), calibrated=False)
    with pytest.raises(UserError, match="no calibration"):
        export_onnx(raw, tmp_path / "x.onnx")
    with pytest.raises(UserError, match="already exists"):
        export_onnx(tiny_bundle, exported[0])
    with pytest.raises(UserError, match="opset"):
        export_onnx(tiny_bundle, tmp_path / "y.onnx", opset=13)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


# --- check-trt on every preset -------------------------------------------------------------------------------------
def _preset_check(preset: str, tmp_path: Path, exporter: str, extra: list[str] = (), **kw):
    from trt.export import export_onnx
    from trt.opcheck import check_file

    b = make_bundle(tmp_path / preset, [f"model.preset={preset}", *extra], calibrated=False)
    (b / "calibration.json").write_text(json.dumps({"threshold": 1.0}))
    path = export_onnx(b, tmp_path / f"{preset}.onnx", exporter=exporter, verify=False, **kw)
    rows = check_file(path)
    assert [r.op for r in rows if r.status == "unsupported"] == []
    assert {"MatMul", "LayerNormalization", "Softmax", "Pad"} <= {r.op for r in rows}
    return path


SHALLOW = ["model.depth=1", "model.decoder_depth=1"]  # same ops, dims, patch size and image size; fewer blocks


@pytest.mark.parametrize("preset", ["tiny-p8", "small-p8", "base-p8", "large-p7"])
def test_check_trt_every_preset_shallow(preset, tmp_path):
    """Every preset's graph (its widths, heads, patch size, 224 px) with one block per stack: the default run."""
    _preset_check(preset, tmp_path, "dynamo", SHALLOW)


@pytest.mark.parametrize("preset", ["tiny-p8", pytest.param("small-p8", marks=pytest.mark.slow)])
def test_check_trt_full_presets_torchscript(preset, tmp_path):
    _preset_check(preset, tmp_path, "torchscript")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-p8", "small-p8", "base-p8", "large-p7"])
def test_check_trt_full_presets(preset, tmp_path):
    _preset_check(preset, tmp_path, "dynamo", external_data=preset in ("base-p8", "large-p7"))
    if preset in ("base-p8", "large-p7"):
        assert (tmp_path / f"{preset}.onnx.data").stat().st_size > 100e6


def test_check_trt_flags_unsupported(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from trt.opcheck import check_graph

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [5000])
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"]), helper.make_node("Unique", ["x"], ["u"]),
             helper.make_node("Pad", ["x", "p"], ["y"], mode="wrap"),
             helper.make_node("Shape", ["x"], ["p0"]), helper.make_node("ReduceSum", ["x", "p0"], ["r"]),
             helper.make_node("Hardmax", ["x"], ["h"])]
    p = helper.make_tensor("p", TensorProto.INT64, [4], [0, 0, 0, 0])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [k, p]),
                              opset_imports=[helper.make_opsetid("", 18)])
    rows = {r.op: r for r in check_graph(model)}
    assert rows["TopK"].status == "unsupported" and "3840" in rows["TopK"].details[0]
    assert rows["Unique"].status == "unsupported" and rows["Hardmax"].status == "unsupported"
    assert rows["Pad"].status == "unsupported" and rows["ReduceSum"].status == "unsupported"
    assert rows["Shape"].status == "ok"
    onnx.save(model, str(tmp_path / "bad.onnx"))
