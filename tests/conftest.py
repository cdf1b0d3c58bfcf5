"""Shared fixtures: tiny models and generated images (nothing is downloaded)."""

from __future__ import annotations

import pytest


def tiny_overrides(img: int = 32, patch: int = 4) -> list[str]:
    """A model small enough for unit tests: 8x8 patches, 2+1 blocks."""
    return [
        f"model.img_size={img}", f"model.patch_size={patch}", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
    ]


def crash_after_checkpoint(monkeypatch, epoch: int):
    """Make training raise KeyboardInterrupt right after writing the checkpoint of `epoch` (an interrupted run).
    Returns a function that undoes it."""
    import mae_ad.train as train_mod

    real_save = train_mod.save_checkpoint

    def save_then_crash(path, model, optimizer, info):
        real_save(path, model, optimizer, info)
        if info["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    return lambda: monkeypatch.setattr(train_mod, "save_checkpoint", real_save)


@pytest.fixture(scope="session", autouse=True)
def _onnx_cache(tmp_path_factory):
    """evaluate/predict export bundles to ONNX into a per-user cache (trt.onnx_cache): in tests, a session folder,
    never the user's home (subprocesses inherit it)."""
    import os

    old = os.environ.get("MAE_AD_CACHE")
    os.environ["MAE_AD_CACHE"] = str(tmp_path_factory.mktemp("mae_ad_cache"))
    yield
    if old is None:
        os.environ.pop("MAE_AD_CACHE", None)
    else:
        os.environ["MAE_AD_CACHE"] = old


@pytest.fixture
def tiny_cfg():
    from mae_ad.config import load_config

    return load_config(None, tiny_overrides())


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small synthetic MVTec-layout dataset (written once per session)."""
    from mae_ad.synthetic import write_dataset

    root = tmp_path_factory.mktemp("synth") / "data"
    return write_dataset(root, n_train=16, n_test_good=4, n_test_defect=3, size=64, seed=1)


def _gpu_reason() -> str | None:
    """Why GPU tests cannot run here (None when CUDA, TensorRT and pycuda are all importable)."""
    import importlib.util

    missing = [m for m in ("tensorrt", "pycuda") if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs a CUDA GPU with {', '.join(missing)} installed (not available on this machine)"
    try:
        import pycuda.driver as cuda  # type: ignore[import-not-found]

        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device found"
    except Exception as e:  # pragma: no cover - only on machines with pycuda
        return f"CUDA unavailable: {e}"
    return None


def _mosquitto_path() -> str | None:
    import shutil

    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if __import__("os").path.exists("/usr/sbin/mosquitto") else None)


def pytest_collection_modifyitems(config, items):
    gpu_reason = None
    gpu_checked = False
    broker_missing = _mosquitto_path() is None
    for item in items:
        if "gpu" in item.keywords:
            if not gpu_checked:
                gpu_reason, gpu_checked = _gpu_reason(), True
            if gpu_reason:
                item.add_marker(pytest.mark.skip(reason=f"gpu: {gpu_reason}"))
        if "broker" in item.keywords and broker_missing:
            item.add_marker(pytest.mark.skip(reason="broker: mosquitto not installed (apt-get install mosquitto)"))
