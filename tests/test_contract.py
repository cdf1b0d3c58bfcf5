"""The artefact contract (mae_ad.contract): one schema version, records that load as written by version 1, and one
clear error naming the file and the field when a record does not fit."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mae_ad.contract import (
    BUNDLE_FORMAT_VERSION,
    SCHEMA_VERSION,
    ArtefactMeta,
    BundleMeta,
    EngineMeta,
    OnnxMeta,
    Prediction,
    UserError,
    dump_meta,
    parse_meta,
    read_bundle_meta,
)

ROOT = Path(__file__).resolve().parents[1]

# meta.json as the version-1 writer (mae_ad.bundle before the typed contract) wrote it for a merged bundle
BUNDLE_V1 = {
    "calibrated": True, "created": "2026-11-20T10:00:00Z", "format_version": 1, "kind": "mae_ad.bundle",
    "input": {"channels": 3, "colour": "RGB", "layout": "NCHW", "mean": [0.485, 0.456, 0.406], "range": [0, 1],
              "resize": "squash", "size": 32, "std": [0.229, 0.224, 0.225]},
    "lora": False, "merged": True, "merged_layers": 8, "model_id": "tiny-0123456789ab", "name": "tiny",
    "parent": {"bundle": "runs/b", "bundle_sha256": "a" * 64, "model_id": "tiny-ba9876543210", "weights_sha256": "b"},
    "scoring": {"gmm_weight": 0.0, "knn_memory": 8192, "knn_weight": 0.0, "lowpass_sigma": 0.0, "normalize": "none",
                "num_masks": 4, "pattern": "stripes", "perceptual_weight": 0.0, "reduce": "max", "sigma": 4.0,
                "ssim_sigma": 1.5, "ssim_weight": 0.0, "stats_weight": 0.0, "topk_fraction": 0.01},
    "training": {"epochs_done": 2, "data": "/data/tile"},
    "versions": {"mae_ad": "0.1.0", "python": "3.11.2", "timm": "1.0.15", "torch": "2.14.1"},
    "weights_sha256": "c" * 64,
}
ONNX_V1 = {
    "format_version": 1, "kind": "mae_ad.onnx", "created": "2026-11-20T10:01:00Z", "model_id": "tiny-0123456789ab",
    "name": "tiny", "threshold": 0.0123, "calibration": {"target_fpr": 0.01, "n_images": 4},
    "input": BUNDLE_V1["input"], "outputs": {"map": "anomaly_map", "score": "score", "input": "image"},
    "scoring": BUNDLE_V1["scoring"], "precision": "fp32", "io_dtype": "float32", "opset": 18, "exporter": "dynamo",
    "dynamic_batch": True, "max_batch_hint": None, "external_data": False, "merged": True, "merged_at_export": False,
    "parent": {"bundle": "runs/m", "bundle_sha256": "d" * 64, "weights_sha256": "c" * 64, "model_id": "tiny-0"},
    "versions": {"torch": "2.14.1", "onnx": "1.17.0", "mae_ad": "0.1.0"},
    "tensorrt_check": {"unsupported": [], "warnings": []}, "verify": {"images": "2 uniform random",
                                                                      "map_max_abs": 1e-7},
    "export_seconds": 3.2, "onnx_sha256": "e" * 64, "onnx_bytes": 123456,
}
PLAN_V1 = {
    "format_version": 1, "kind": "mae_ad.plan", "created": "2026-11-20T10:02:00Z", "tensorrt_version": "10.3.0",
    "gpu": {"name": "Orin", "compute_capability": "8.7", "index": 0}, "onnx": "model.onnx", "onnx_sha256": "e" * 64,
    "precision": "fp16", "strongly_typed": True,
    "profile": {"input": "image", "min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [4, 3, 32, 32]},
    "max_batch": 4, "workspace_mb": 1024, "build_seconds": 12.5, "plan_sha256": "f" * 64,
    "model_id": "tiny-0123456789ab", "threshold": 0.0123, "input": {"size": 32}, "scoring": None,
    "parent": {"onnx_sha256": "e" * 64, "bundle_sha256": None},
}


def test_one_schema_version():
    assert SCHEMA_VERSION == BUNDLE_FORMAT_VERSION == 1
    for literal in ('"format_version": 1', "'format_version': 1", '"format_version": BUNDLE'):
        hits = [p for p in (ROOT / "mae_ad").glob("*.py") if literal in p.read_text()]
        hits += [p for p in (ROOT / "trt").glob("*.py") if literal in p.read_text()]
        assert hits == [], f"{literal} written as a literal in {hits}"


@pytest.mark.parametrize(("record", "model"), [(BUNDLE_V1, BundleMeta), (ONNX_V1, OnnxMeta), (PLAN_V1, EngineMeta)])
def test_version_1_records_load_and_write_back_unchanged(record, model):
    meta = parse_meta(copy.deepcopy(record), model, "x.json")
    assert isinstance(meta, ArtefactMeta) and meta.model_id == "tiny-0123456789ab" and meta.input.size == 32
    assert dump_meta(meta) == record


def test_typed_fields_read_from_a_version_1_record():
    b = parse_meta(copy.deepcopy(BUNDLE_V1), BundleMeta, "meta.json")
    assert b.merged is True and b.training == {"epochs_done": 2, "data": "/data/tile"}
    assert b.scoring is not None and b.scoring.reduce == "max" and b.scoring.topk_fraction == 0.01
    assert b.input.resize == "squash" and b.parent is not None and b.parent.bundle_sha256 == "a" * 64
    e = parse_meta(copy.deepcopy(PLAN_V1), EngineMeta, "model.plan.meta.json")
    assert e.gpu.compute_capability == "8.7" and e.max_batch == 4 and e.input.resize == "squash"


def test_a_sparse_version_1_record_loads_with_defaults(tmp_path):
    """Informational fields may be absent (what a reader needs may not): version, kind, model_id, input.size."""
    d = _bundle(tmp_path, {"format_version": 1, "kind": "mae_ad.bundle", "model_id": "m", "input": {"size": 64}})
    meta = read_bundle_meta(d)
    assert meta.merged is False and meta.input.resize == "squash" and meta.scoring is None and meta.threshold is None
    assert dump_meta(meta) == {"format_version": 1, "kind": "mae_ad.bundle", "model_id": "m", "input": {"size": 64}}


def _bundle(tmp_path: Path, meta: dict) -> Path:
    d = tmp_path / "bundle"
    d.mkdir()
    (d / "weights.safetensors").write_bytes(b"")
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize(("change", "field", "why"), [
    ({"format_version": 2}, "format_version", "2 is not supported"),
    ({"format_version": "1"}, "format_version", "'1' is not supported"),
    ({"format_version": None}, "format_version", "None is not supported"),
    ({"kind": "mae_ad.onnx"}, "kind", "Input should be 'mae_ad.bundle'"),
    ({"model_id": None}, "model_id", "valid string"),
    ({"input": {"size": "32"}}, "input.size", "valid integer"),
    ({"input": {"size": 32, "resize": "tiles"}}, "input.resize", "'squash', 'letterbox' or 'tile'"),
    ({"merged": "yes"}, "merged", "valid boolean"),
    ({"scoring": {"reduce": "median"}}, "scoring.reduce", "'max' or 'topk_mean'"),
])
def test_a_bad_bundle_record_fails_at_load_naming_file_and_field(tmp_path, change, field, why):
    d = _bundle(tmp_path, {**BUNDLE_V1, **change})
    with pytest.raises(UserError) as e:
        read_bundle_meta(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'meta.json'}: ") and f"{field}: " in msg and why in msg and "\n" not in msg


@pytest.mark.parametrize("missing", ["format_version", "kind", "model_id", "input"])
def test_a_missing_field_is_named(tmp_path, missing):
    d = _bundle(tmp_path, {k: v for k, v in BUNDLE_V1.items() if k != missing})
    with pytest.raises(UserError, match=rf"meta\.json: .*{missing}: (missing|Field required)"):
        read_bundle_meta(d)


def test_bad_sidecars_fail_when_the_artefact_is_opened(tmp_path):
    from trt.artifacts import meta_from_onnx_props, read_onnx_meta, read_sidecar

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"")
    side = tmp_path / "m.onnx.meta.json"
    side.write_text(json.dumps({**ONNX_V1, "threshold": "0.5"}))
    with pytest.raises(UserError, match=r"m\.onnx\.meta\.json: invalid metadata: threshold: Input should be a valid"):
        read_onnx_meta(onnx, lambda: {})
    side.write_text(json.dumps({**ONNX_V1, "format_version": 7}))
    with pytest.raises(UserError, match=r"m\.onnx\.meta\.json: format_version: 7 is not supported"):
        read_onnx_meta(onnx, lambda: {})
    side.unlink()  # no sidecar: the graph's metadata_props record is read, and checked the same way
    props = {"mae_ad.meta": json.dumps({k: v for k, v in ONNX_V1.items() if k != "input"})}
    with pytest.raises(UserError, match=r"m\.onnx \(metadata_props 'mae_ad\.meta'\): invalid metadata: input: Field"):
        read_onnx_meta(onnx, lambda: props)
    assert meta_from_onnx_props({"mae_ad.meta": json.dumps(ONNX_V1)}, onnx).threshold == pytest.approx(0.0123)
    plan = tmp_path / "m.plan"
    (tmp_path / "m.plan.meta.json").write_text(json.dumps({**PLAN_V1, "gpu": {"name": "Orin"}}))
    with pytest.raises(UserError, match=r"m\.plan\.meta\.json: invalid metadata: gpu\.compute_capability: Field"):
        read_sidecar(plan, "engine", EngineMeta)


def test_prediction_unpacks_and_checks_shapes():
    maps, scores = Prediction(np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.float32))
    assert maps.shape == (2, 1, 4, 4) and scores.shape == (2,)
    p = Prediction.checked(np.zeros((2, 1, 4, 4), np.float64), np.zeros((2, 1)), "engine")
    assert p.maps.dtype == np.float32 and p.scores.shape == (2,)
    with pytest.raises(ValueError, match="engine: expected maps"):
        Prediction.checked(np.zeros((2, 3, 4, 4)), np.zeros(2), "engine")
    with pytest.raises(ValueError, match="engine: expected maps"):
        Prediction.checked(np.zeros((2, 1, 4, 4)), np.zeros(3), "engine")


def test_contract_imports_no_torch():
    code = "import sys, mae_ad.contract; print([m for m in ('torch', 'timm', 'cv2') if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
