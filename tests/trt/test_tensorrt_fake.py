"""Engine build and runtime against recording fakes of TensorRT 10.3 / 10.16 / 11.4 and pycuda, whose names and
enum values come from the real binding modules' API surfaces. No GPU here: this checks the call sequence and
API names, not TensorRT itself (tests marked `gpu` do that on a GPU machine)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from mae_ad.contract import UserError

from .fakes import VERSIONS, fake_gpu, load_surface, used_trt_names

TRT_SOURCES = [Path(__file__).parents[2] / "trt" / f for f in ("build.py", "runtime.py")]


@pytest.fixture(scope="module")
def onnx_pair(tiny_bundle, tmp_path_factory):
    from trt.export import export_onnx

    d = tmp_path_factory.mktemp("onnx")
    fp32 = export_onnx(tiny_bundle, d / "model.onnx", exporter="torchscript", max_batch=4, verify=False)
    fp16 = export_onnx(tiny_bundle, d / "model16.onnx", fp16=True, exporter="torchscript", verify=False)
    return fp32, fp16


def _ort(path, x):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})


@pytest.mark.parametrize("version", list(VERSIONS))
def test_build_and_run_sequence(version, onnx_pair, tmp_path, monkeypatch):
    fp32, _ = onnx_pair
    gpu = fake_gpu(version)
    gpu.install(monkeypatch)
    from trt.build import build_engine
    from trt.runtime import TensorRTEngine

    cache = tmp_path / "timing.cache"
    plan = build_engine(fp32, tmp_path / "model.plan", workspace_mb=256, opt_batch=2, timing_cache=cache)
    rec = gpu.rec
    # network: explicit batch is implicit in 10.x/11.x; no flags for an FP32 ONNX
    assert rec.find("Builder.create_network") == [((0,), {})]
    assert rec.find("IBuilderConfig.set_memory_pool_limit") == [(("WORKSPACE", 256 << 20), {})]
    assert rec.find("IOptimizationProfile.set_shape") == [
        (("image", (1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32)), {})]  # max from the export's --max-batch hint
    assert rec.find("IBuilderConfig.set_flag") == []
    assert rec.find("IBuilderConfig.set_timing_cache") == [((False,), {})]
    seq = rec.seq("")
    assert seq.index("OnnxParser.parse_from_file") < seq.index("Builder.build_serialized_network")
    assert seq.index("IBuilderConfig.add_optimization_profile") < seq.index("Builder.build_serialized_network")
    assert cache.read_bytes().startswith(b"FAKECACHE") and "tactics:model.onnx" in cache.read_text()
    meta = json.loads((tmp_path / "model.plan.meta.json").read_text())
    assert meta["tensorrt_version"] == VERSIONS[version] and meta["gpu"]["compute_capability"] == "8.7"
    assert meta["profile"]["max"] == [4, 3, 32, 32] and meta["precision"] == "fp32"
    assert meta["threshold"] is not None and meta["input"]["size"] == 32
    from mae_ad.contract import sha256_file

    assert meta["onnx_sha256"] == sha256_file(fp32)
    assert set(meta) == {  # every key of the version-1 sidecar, written through mae_ad.contract.EngineMeta
        "format_version", "kind", "created", "tensorrt_version", "gpu", "onnx", "onnx_sha256", "precision",
        "strongly_typed", "profile", "max_batch", "workspace_mb", "build_seconds", "plan_sha256", "model_id",
        "threshold", "input", "scoring", "parent"}
    assert meta["format_version"] == 1 and meta["kind"] == "mae_ad.plan" and meta["parent"]["onnx_sha256"]

    # a second build reuses the cache file's bytes
    rec.calls.clear()
    build_engine(fp32, tmp_path / "again.plan", timing_cache=cache, max_batch=4)
    assert rec.find("IBuilderConfig.create_timing_cache")[0][0][0] > len(b"FAKECACHE\n")

    rec.calls.clear()
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    with TensorRTEngine(plan) as eng:
        assert eng.max_batch == 4 and eng.input_size == 32
        maps, scores = eng.infer(x)
        m1, s1 = eng.infer(x[:1])
        with pytest.raises(UserError, match="takes 1..4"):
            eng.infer(np.zeros((5, 3, 32, 32), np.float32))
    ref_maps, ref_scores = _ort(fp32, x)
    assert maps.shape == (3, 1, 32, 32) and scores.shape == (3,)
    np.testing.assert_allclose(maps, ref_maps, atol=1e-6)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    np.testing.assert_allclose(m1[0], ref_maps[0], atol=1e-6)
    seq = rec.seq("")
    # name-based I/O, the input shape before each run, copies around the run, one stream
    run = [s for s in seq if s in ("IExecutionContext.set_input_shape", "cuda.memcpy_htod_async",
                                   "IExecutionContext.execute_async_v3", "cuda.memcpy_dtoh_async",
                                   "cuda.Stream.synchronize")]
    one = ["IExecutionContext.set_input_shape", "cuda.memcpy_htod_async", "IExecutionContext.execute_async_v3",
           "cuda.memcpy_dtoh_async", "cuda.memcpy_dtoh_async", "cuda.Stream.synchronize"]
    assert run[1:] == one + one + ["cuda.Stream.synchronize"]  # max-shape setup, two batches, close
    assert seq.count("cuda.Stream") == 1 and seq.count("cuda.mem_alloc") == 3
    assert {a[0][0] for a in rec.find("IExecutionContext.set_tensor_address")} == {"image", "anomaly_map", "score"}
    # only the batch's bytes are copied: 3 images, then 1
    assert [a[0][1] for a in rec.find("cuda.memcpy_htod_async")] == [3 * 3 * 32 * 32 * 4, 3 * 32 * 32 * 4]
    assert gpu.cuda.memory == {} and gpu.cuda.stack == []  # everything freed, context stack balanced
    assert seq.count("cuda.Context.push") == seq.count("cuda.Context.pop")
    assert gpu.unknown_names() == []  # every TensorRT name touched exists in this version's real API


@pytest.mark.parametrize("version", list(VERSIONS))
def test_fp16_semantics_per_version(version, onnx_pair, tmp_path, monkeypatch):
    fp32, fp16 = onnx_pair
    gpu = fake_gpu(version)
    gpu.install(monkeypatch)
    from trt.build import build_engine

    major = int(version.split(".")[0])
    if major == 10:
        build_engine(fp32, tmp_path / "a.plan", fp16=True)  # weakly typed FP32 graph + builder flag
        assert gpu.rec.find("IBuilderConfig.set_flag") == [(("FP16",), {})]
        assert gpu.rec.find("Builder.create_network") == [((0,), {})]
    else:
        with pytest.raises(UserError, match="export --fp16"):
            build_engine(fp32, tmp_path / "a.plan", fp16=True)
        assert not (tmp_path / "a.plan").exists()
    gpu.rec.calls.clear()
    build_engine(fp16, tmp_path / "b.plan")  # the FP16 ONNX: strongly typed, no precision flag
    assert gpu.rec.find("IBuilderConfig.set_flag") == []
    flags = gpu.rec.find("Builder.create_network")[0][0][0]
    assert flags == (1 << 1 if major == 10 else 0)  # STRONGLY_TYPED is bit 1 in 10.x; 11.x is always strongly typed
    meta = json.loads((tmp_path / "b.plan.meta.json").read_text())
    assert meta["precision"] == "fp16" and meta["strongly_typed"] is True
    assert gpu.unknown_names() == []


def test_fake_is_faithful_to_the_surface():
    """The fake must reject what the real module rejects, or the tests above prove nothing."""
    g11, g10 = fake_gpu("11.4"), fake_gpu("10.3")
    with pytest.raises(AttributeError):
        _ = g11.trt.BuilderFlag.FP16
    with pytest.raises(AttributeError):
        _ = g11.trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH
    assert int(g10.trt.BuilderFlag.VERSION_COMPATIBLE) == 13 and int(g11.trt.BuilderFlag.VERSION_COMPATIBLE) == 12
    with pytest.raises(TypeError):
        1 << g10.trt.BuilderFlag.FP16  # noqa: B018
    assert g10.trt.BuilderFlag.FP16 != 0
    with pytest.raises(TypeError, match="No constructor"):
        g10.trt.ICudaEngine()

    class NoInit(g10.trt.ILogger):
        def __init__(self):
            pass

    with pytest.raises(TypeError, match="__init__"):
        g10.trt.Builder(NoInit())


def test_api_names_in_every_surface():
    """Every `trt.X.Y` written in the builder/runtime exists in the real API of each version it can run on."""
    names = set()
    for f in TRT_SOURCES:
        names |= used_trt_names(f.read_text())
    version_specific = {"BuilderFlag.FP16": 10, "NetworkDefinitionCreationFlag.STRONGLY_TYPED": 10}
    assert names >= {"Builder", "OnnxParser", "Runtime", "MemoryPoolType.WORKSPACE", "TensorIOMode.INPUT"}
    for v in VERSIONS:
        surf = load_surface(v)
        major = int(v.split(".")[0])
        missing = [n for n in names if not surf.has(n) and version_specific.get(n) in (None, major)]
        assert missing == [], (v, missing)
        # method names called on TensorRT objects
        for q in ("Builder.create_network", "Builder.build_serialized_network", "IBuilderConfig.set_memory_pool_limit",
                  "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache", "ITimingCache.serialize",
                  "IOptimizationProfile.set_shape", "OnnxParser.parse_from_file", "OnnxParser.get_error",
                  "ParserError.desc", "ParserError.node_operator", "Runtime.deserialize_cuda_engine",
                  "ICudaEngine.get_tensor_name", "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_profile_shape",
                  "IExecutionContext.set_input_shape", "IExecutionContext.set_tensor_address",
                  "IExecutionContext.execute_async_v3", "IExecutionContext.get_tensor_shape"):
            assert surf.has(q), (v, q)
    assert not load_surface("11.4").has("Builder.platform_has_fast_fp16")  # only read on the 10.x path


def test_parser_errors_one_per_line(onnx_pair, tmp_path, monkeypatch, caplog):
    fp32, _ = onnx_pair
    gpu = fake_gpu("10.3", unsupported_ops=frozenset({"Pad", "Erf"}))
    gpu.install(monkeypatch)
    from trt.build import build_engine

    with caplog.at_level(logging.ERROR, logger="trt.build"), pytest.raises(UserError, match="parser failed"):
        build_engine(fp32, tmp_path / "m.plan")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ONNX parser:")]
    assert len(lines) >= 3 and any("(Pad)" in x and "UNSUPPORTED_NODE" in x for x in lines)
    assert not (tmp_path / "m.plan").exists() and not (tmp_path / "m.plan.meta.json").exists()


def test_refuses_engine_from_other_version_or_gpu(onnx_pair, tmp_path, monkeypatch):
    fp32, _ = onnx_pair
    fake_gpu("10.16").install(monkeypatch)
    from trt.build import build_engine
    from trt.runtime import TensorRTEngine

    plan = build_engine(fp32, tmp_path / "m.plan")
    fake_gpu("10.3").install(monkeypatch)
    with pytest.raises(UserError, match=r"TensorRT 10\.16\.1\.11, this is TensorRT 10\.3\.0.*rebuild"):
        TensorRTEngine(plan)
    other = fake_gpu("10.16", gpu_name="NVIDIA H100", cc=(9, 0))
    other.install(monkeypatch)
    with pytest.raises(UserError, match="built for NVIDIA Orin.*this GPU is NVIDIA H100.*rebuild"):
        TensorRTEngine(plan)
    assert other.cuda.stack == []
    (tmp_path / "m.plan.meta.json").unlink()
    with pytest.raises(UserError, match="meta.json: missing"):
        TensorRTEngine(plan)


def test_tensorrt_backend_interface(onnx_pair, tmp_path, monkeypatch):
    fp32, _ = onnx_pair
    gpu = fake_gpu("11.4")
    gpu.install(monkeypatch)
    from trt.backends import open_backend
    from trt.build import build_engine

    plan = build_engine(fp32, tmp_path / "m.plan", max_batch=2)
    with pytest.raises(UserError, match="up to 2"):
        open_backend("tensorrt", plan, max_batch=3)
    x = np.random.default_rng(1).random((2, 3, 32, 32), dtype=np.float32)
    with open_backend("tensorrt", plan) as be, open_backend("onnxruntime", fp32) as ref:
        assert be.max_batch == 2 and be.input_size == 32 and be.name == "tensorrt"
        assert be.meta.threshold == pytest.approx(ref.meta.threshold) and be.meta.model_id
        maps, scores = be.infer(x)
        rm, rs = ref.infer(x)
        np.testing.assert_allclose(maps, rm, atol=1e-6)
        with pytest.raises(UserError, match="at most 2"):
            be.infer(np.concatenate([x, x]))
    assert gpu.cuda.memory == {}


def test_missing_tensorrt_says_what_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as on this machine
    from trt.build import import_tensorrt

    with pytest.raises(UserError, match="python3-libnvinfer|tensorrt-cu12"):
        import_tensorrt()


@pytest.mark.gpu
def test_real_engine_matches_onnxruntime(onnx_pair, tmp_path):  # pragma: no cover - needs a GPU
    fp32, _ = onnx_pair
    from trt.backends import open_backend
    from trt.build import build_engine

    plan = build_engine(fp32, tmp_path / "m.plan", max_batch=4)
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    with open_backend("tensorrt", plan) as be:
        maps, scores = be.infer(x)
    ref_maps, ref_scores = _ort(fp32, x)
    assert np.abs(maps - ref_maps).max() <= 1e-3 and np.abs(scores - ref_scores).max() <= 1e-3 * np.abs(ref_scores).max()
