"""The backend interface (torch, onnxruntime; tensorrt is in test_tensorrt_fake.py), import hygiene, and bad
inputs through the real `mae-ad` command: exit 2, one `error:` line, nothing overwritten."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mae_ad.contract import UserError
from tests.conftest import tiny_overrides

from .conftest import make_bundle

ROOT = Path(__file__).parents[2]
MAE_AD = str(Path(sys.executable).with_name("mae-ad"))


@pytest.fixture(scope="module")
def onnx_model(tiny_bundle, tmp_path_factory):
    from trt.export import export_onnx

    return export_onnx(tiny_bundle, tmp_path_factory.mktemp("o") / "model.onnx", exporter="torchscript")


def test_torch_and_onnxruntime_backends_agree(tiny_bundle, onnx_model):
    from trt.backends import open_backend

    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    with open_backend("torch", tiny_bundle) as tb, open_backend("onnxruntime", onnx_model, threads=1,
                                                                max_batch=3) as ob:
        assert (tb.input_size, ob.input_size) == (32, 32) and ob.max_batch == 3 and tb.max_batch is None
        assert tb.meta.threshold == pytest.approx(ob.meta.threshold) and tb.meta.threshold is not None
        assert tb.meta.model_id == ob.meta.model_id
        assert ob.meta.input.mean == pytest.approx([0.485, 0.456, 0.406])
        from mae_ad.contract import Prediction

        assert isinstance(tb.infer(x), Prediction) and isinstance(ob.infer(x), Prediction)  # the typed result
        tm, ts = tb.infer(x)
        om, os_ = ob.infer(x)
        assert tm.dtype == om.dtype == np.float32 and om.shape == (3, 1, 32, 32) and os_.shape == (3,)
        assert np.abs(tm - om).max() <= 1e-4
        with pytest.raises(UserError, match="at most 3"):
            ob.infer(np.concatenate([x, x]))
        with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
            ob.infer(x[:, :, :16])
    with pytest.raises(UserError, match="choose one of"):
        open_backend("openvino", onnx_model)


def test_onnx_metadata_without_sidecar(onnx_model, tmp_path):
    from trt.backends import open_backend

    lone = tmp_path / "lone.onnx"
    shutil.copy(onnx_model, lone)  # no lone.onnx.meta.json: metadata_props are enough
    with open_backend("onnxruntime", lone) as be:
        sidecar = json.loads(Path(str(onnx_model) + ".meta.json").read_text())
        assert be.meta.threshold == pytest.approx(sidecar["threshold"]) and be.input_size == 32


def test_onnxruntime_and_tensorrt_paths_import_no_torch(onnx_model):
    code = (
        "import sys, numpy as np\n"
        "import trt.runtime, trt.build, trt.backends\n"
        "from trt.backends import open_backend\n"
        f"be = open_backend('onnxruntime', {str(onnx_model)!r})\n"
        "m, s = be.infer(np.zeros((1, 3, 32, 32), np.float32)); be.close()\n"
        "bad = [m for m in ('torch', 'timm', 'loralib', 'mae_ad.bundle') if m in sys.modules]\n"
        "print('LOADED', bad, m.shape)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "LOADED [] (1, 1, 32, 32)" in r.stdout


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MAE_AD, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _one_error(r: subprocess.CompletedProcess, pattern: str) -> None:
    import re

    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len([x for x in lines if x.startswith("error:")]) == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(pattern, lines[-1]), lines[-1]


def test_cli_bad_inputs(tmp_path, tiny_bundle, onnx_model):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    _one_error(_cli("check-trt", str(tmp_path / "missing.onnx")), "missing.onnx: ONNX file not found")
    _one_error(_cli("check-trt", str(corrupt)), "corrupt.onnx: not a readable ONNX model")
    out = tmp_path / "m.plan"
    _one_error(_cli("build-engine", str(corrupt), "--out", str(out)), "not a readable ONNX model")
    assert not out.exists()
    raw = make_bundle(tmp_path / "raw", tiny_overrides(), calibrated=False)
    _one_error(_cli("export", str(raw), "--out", str(tmp_path / "raw.onnx")), "no calibration")
    assert not (tmp_path / "raw.onnx").exists()
    # nothing overwritten: an existing ONNX stays byte-identical
    before = onnx_model.read_bytes()
    _one_error(_cli("export", str(tiny_bundle), "--out", str(onnx_model)), "already exists")
    assert onnx_model.read_bytes() == before
    dangling = tmp_path / "dangling.onnx"  # a link to nowhere is not replaced by a file either
    dangling.symlink_to(tmp_path / "nowhere.onnx")
    _one_error(_cli("export", str(tiny_bundle), "--out", str(dangling)), "already exists")
    assert dangling.is_symlink() and not (tmp_path / "nowhere.onnx").exists()
    merged = tmp_path / "merged"
    r = _cli("merge", str(tiny_bundle), "--out", str(merged))
    assert r.returncode == 0, r.stderr
    _one_error(_cli("merge", str(merged), "--out", str(tmp_path / "twice")), "already merged")
    assert not (tmp_path / "twice").exists()
    # a batch larger than the maximum
    _one_error(_cli("probe", str(onnx_model), "--batch", "3", "--max-batch", "2", "--repeat", "1"),
               "batch of 3 images.*at most 2")


def test_cli_check_trt_table_and_exit(onnx_model, tmp_path):
    r = _cli("check-trt", str(onnx_model))
    assert r.returncode == 0 and "LayerNormalization" in r.stdout and "0 unsupported" in r.stdout
    import onnx
    from onnx import helper

    m = onnx.load(str(onnx_model))
    m.graph.node.append(helper.make_node("Unique", [m.graph.input[0].name], ["u"]))
    onnx.save(m, str(tmp_path / "bad.onnx"))
    r = _cli("check-trt", str(tmp_path / "bad.onnx"))
    assert r.returncode == 1 and "Unique" in r.stdout and "unsupported by TensorRT: Unique" in r.stderr


def test_cli_refuses_engine_from_other_tensorrt(onnx_model, tmp_path, monkeypatch):
    """The real CLI with the fake TensorRT/pycuda on PYTHONPATH: an engine built by 10.16 opened under 10.3."""
    from .fakes import fake_gpu

    fake_gpu("10.16").install(monkeypatch)
    from trt.build import build_engine

    plan = build_engine(onnx_model, tmp_path / "m.plan", max_batch=2)
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'trt' / 'fakepkg'}"}
    r = _cli("probe", str(plan), "--batch", "2", "--repeat", "1", env={**env, "MAE_AD_FAKE_TRT": "10.16"})
    assert r.returncode == 0 and "backend=tensorrt" in r.stdout and "max_batch=2" in r.stdout, r.stderr
    _one_error(_cli("probe", str(plan), env={**env, "MAE_AD_FAKE_TRT": "10.3"}),
               r"built with TensorRT 10\.16\.1\.11, this is TensorRT 10\.3\.0.*rebuild it on this device")
    _one_error(_cli("probe", str(plan), env={**env, "MAE_AD_FAKE_TRT": "10.16", "MAE_AD_FAKE_GPU": "Tesla T4"}),
               "built for NVIDIA Orin.*this GPU is Tesla T4")
    _one_error(_cli("probe", str(plan), "--batch", "3", env={**env, "MAE_AD_FAKE_TRT": "10.16"}),
               "batch of 3 images.*at most 2")


def test_gpu_check_script_flow_on_fake_gpu(onnx_model, tmp_path):
    """scripts/gpu_check.py end to end with the fake TensorRT 11.4 + pycuda (the real run needs a GPU)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'trt' / 'fakepkg'}",
           "MAE_AD_FAKE_TRT": "11.4"}
    r = subprocess.run([sys.executable, "scripts/gpu_check.py", "--onnx", str(onnx_model), "--max-batch", "2",
                        "--batches", "1,2", "--repeat", "2", "--work", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "TensorRT 11.4.0.106" in r.stdout and "parity batch=2:" in r.stdout and "RESULT: PASS" in r.stdout
    assert len([x for x in r.stdout.splitlines() if x.split()[:1] in (["1"], ["2"])]) == 2  # latency rows
