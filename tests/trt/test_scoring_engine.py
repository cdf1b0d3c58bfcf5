"""evaluate/predict engines (issue 14, item 4): `auto` scores through ONNX Runtime on a cached, verified ONNX export
of the bundle, with the torch scorer's decisions; bad engine choices are refused by name."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_ad.contract import UserError
from mae_ad.data import index_dataset, load_stack

from .conftest import make_bundle, synthetic_images


@pytest.fixture(scope="module")
def eval_bundle(tmp_path_factory) -> Path:
    from tests.conftest import tiny_overrides

    return make_bundle(tmp_path_factory.mktemp("eng") / "b", tiny_overrides() + ["scoring.sigma=1.0"])


def _torch_scores(bundle: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from mae_ad.bundle import load_scorer

    scorer, _, _ = load_scorer(bundle)
    with torch.inference_mode():
        m, s = scorer(torch.from_numpy(images))
    return m.numpy(), s.numpy()


def test_auto_scores_with_onnxruntime_from_a_cache_and_matches_torch(eval_bundle, tmp_path, monkeypatch, caplog):
    from app.scoring_engines import open_scoring_engine

    monkeypatch.setenv("MAE_AD_CACHE", str(tmp_path / "cache"))
    eng = open_scoring_engine(eval_bundle, "auto")
    assert eng is not None and eng.name == "onnxruntime" and eng.info["graph"] == "exported now into the cache"
    path = Path(eng.info["onnx"])
    assert path.is_file() and path.is_relative_to(tmp_path / "cache")
    images = synthetic_images(5, 32, seed=7, defects=True)
    maps, scores = eng.run(images)
    ref_maps, ref_scores = _torch_scores(eval_bundle, images)
    assert maps.shape == ref_maps.shape and scores.shape == ref_scores.shape
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-3, atol=1e-3)

    stamp = path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="trt.onnx_cache"):
        again = open_scoring_engine(eval_bundle, "auto")
    assert again is not None and Path(again.info["onnx"]) == path and path.stat().st_mtime_ns == stamp
    assert again.info["graph"] == "the cache"
    assert "from the cache" in caplog.text


def test_a_changed_bundle_gets_a_new_export(eval_bundle, tmp_path, monkeypatch):
    from trt.onnx_cache import cached_onnx

    monkeypatch.setenv("MAE_AD_CACHE", str(tmp_path / "cache"))
    copy = Path(shutil.copytree(eval_bundle, tmp_path / "copy"))
    first, _ = cached_onnx(copy)
    cal = copy / "calibration.json"
    cal.write_text(cal.read_text().replace('"target_fpr"', '"note": "edited", "target_fpr"', 1))
    second, _ = cached_onnx(copy)
    assert second != first and first.is_file() and second.is_file()


def test_a_half_written_entry_is_exported_again(eval_bundle, tmp_path, monkeypatch):
    from trt.onnx_cache import cached_onnx

    monkeypatch.setenv("MAE_AD_CACHE", str(tmp_path / "cache"))
    path, _ = cached_onnx(eval_bundle)
    (path.parent / (path.name + ".meta.json")).unlink()  # as if the writer died between the two files
    again, _ = cached_onnx(eval_bundle)
    assert again == path and (path.parent / (path.name + ".meta.json")).is_file()


def test_engine_choices_are_checked(eval_bundle, tmp_path):
    from app.scoring_engines import open_scoring_engine

    with pytest.raises(UserError, match="--engine 'tensorrt'"):
        open_scoring_engine(eval_bundle, "tensorrt")
    with pytest.raises(UserError, match="bf16 is a torch precision"):
        open_scoring_engine(eval_bundle, "onnxruntime", precision="bf16")
    assert open_scoring_engine(eval_bundle, "auto", precision="bf16") is None  # bf16 asked: the torch scorer
    assert open_scoring_engine(eval_bundle, "torch") is None
    onnx = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="not torch"):
        open_scoring_engine(eval_bundle, "torch", onnx=onnx)
    with pytest.raises(UserError, match="file not found"):
        open_scoring_engine(eval_bundle, "auto", onnx=onnx)


def test_an_onnx_graph_of_another_model_is_refused(eval_bundle, tmp_path):
    from app.scoring_engines import open_scoring_engine
    from tests.conftest import tiny_overrides
    from trt.export import export_onnx

    other = make_bundle(tmp_path / "other", tiny_overrides() + ["scoring.sigma=1.0"], seed=3)
    onnx = export_onnx(other, tmp_path / "other.onnx")
    with pytest.raises(UserError, match="a graph of model"):
        open_scoring_engine(eval_bundle, "auto", onnx=onnx)
    assert open_scoring_engine(other, "auto", onnx=onnx).info["graph"] == "--onnx"


def test_auto_without_onnxruntime_falls_back_to_torch(eval_bundle, monkeypatch, caplog):
    from app.scoring_engines import open_scoring_engine

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with caplog.at_level(logging.INFO, logger="app.scoring_engines"):
        assert open_scoring_engine(eval_bundle, "auto") is None
    assert "not installed" in caplog.text
    with pytest.raises(UserError, match="pip install onnxruntime"):
        open_scoring_engine(eval_bundle, "onnxruntime")


def test_evaluate_by_onnxruntime_and_by_torch_agree(eval_bundle, synthetic_data, tmp_path):
    import json

    from app.scoring_engines import open_scoring_engine
    from mae_ad.evaluate import run_evaluation

    ort = run_evaluation(eval_bundle, synthetic_data, tmp_path / "ort", batch_size=4, baseline=False,
                         open_engine=lambda: open_scoring_engine(eval_bundle, "onnxruntime"))
    ref = run_evaluation(eval_bundle, synthetic_data, tmp_path / "torch", batch_size=4, baseline=False,
                         precision="fp32")
    assert ort["engine"]["name"] == "onnxruntime" and ref["engine"]["name"] == "torch"
    assert ref["engine"]["precision"] == "fp32"
    assert ort["confusion"] == ref["confusion"]
    for k in ("image_auroc", "pixel_auroc", "aupro"):
        assert ort[k] == pytest.approx(ref[k], abs=1e-4)
    assert "engine onnxruntime (fp32" in (tmp_path / "ort" / "report.md").read_text()
    assert json.loads((tmp_path / "torch" / "metrics.json").read_text())["engine"]["name"] == "torch"


def test_forced_bf16_without_held_back_images_scores_in_fp32(eval_bundle, synthetic_data, tmp_path):
    """The bundle records no held-back images to check bf16's decisions on: the torch engine keeps fp32 and
    says why (mae_ad.precision.prepare_precision)."""
    from mae_ad.evaluate import run_predict

    out = run_predict(eval_bundle, [synthetic_data / "test" / "good"], tmp_path / "pred", precision="bf16")
    assert (out / "scores.csv").is_file()
    import json

    run = json.loads((out / "run.json").read_text())
    assert run["engine"]["name"] == "torch" and run["engine"]["precision"] == "fp32" and run["images"] == 4
    from mae_ad.bundle import load_scorer
    from mae_ad.evaluate import _torch_engine

    scorer, cal, meta = load_scorer(eval_bundle)
    eng = _torch_engine(scorer, meta, cal, "bf16", None, 4)
    assert eng.info["precision"] == "fp32" and eng.info["precision_wanted"] == "bf16"
    assert "no images" in eng.info["precision_reason"]
    idx = index_dataset(synthetic_data)
    imgs = load_stack([s.path for s in idx.test[:3]], 32)
    assert eng.run(imgs)[1].shape == (3,)


def test_precision_is_checked_whatever_the_engine(eval_bundle, monkeypatch):
    """--precision and $MAE_AD_PRECISION are validated even when ONNX Runtime scores, and bf16 from either means
    the torch engine (under auto) or an error (under onnxruntime)."""
    from app.scoring_engines import open_scoring_engine

    monkeypatch.delenv("MAE_AD_PRECISION", raising=False)
    with pytest.raises(UserError, match="--precision 'fp16'"):
        open_scoring_engine(eval_bundle, "auto", precision="fp16")
    monkeypatch.setenv("MAE_AD_PRECISION", "fp16")
    with pytest.raises(UserError, match=r"\$MAE_AD_PRECISION 'fp16'"):
        open_scoring_engine(eval_bundle, "onnxruntime")
    monkeypatch.setenv("MAE_AD_PRECISION", "bf16")
    assert open_scoring_engine(eval_bundle, "auto") is None
    with pytest.raises(UserError, match=r"\$MAE_AD_PRECISION bf16 is a torch precision"):
        open_scoring_engine(eval_bundle, "onnxruntime")
    monkeypatch.setenv("MAE_AD_PRECISION", "fp32")
    assert open_scoring_engine(eval_bundle, "auto").name == "onnxruntime"


def test_an_out_under_a_file_is_refused_before_any_work(eval_bundle, tmp_path):
    from mae_ad.evaluate import refuse_existing_out
    from trt.export import export_onnx

    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(UserError, match=f"{afile} is a file"):
        refuse_existing_out(afile / "report", "evaluation report")
    with pytest.raises(UserError, match=f"{afile} is a file"):
        export_onnx(eval_bundle, afile / "sub" / "m.onnx")
    assert afile.read_text() == "not a folder"


def test_a_damaged_or_foreign_cache_entry_is_exported_again(eval_bundle, tmp_path, monkeypatch):
    from trt.onnx_cache import cached_onnx

    monkeypatch.setenv("MAE_AD_CACHE", str(tmp_path / "cache"))
    from mae_ad.contract import OnnxMeta, sha256_file
    from trt.artifacts import read_sidecar

    def whole() -> bool:  # the graph is the one its sidecar describes
        return sha256_file(path) == read_sidecar(path, "ONNX", OnnxMeta).onnx_sha256

    path, made = cached_onnx(eval_bundle)
    size = path.stat().st_size
    assert made and whole() and cached_onnx(eval_bundle) == (path, False)
    path.write_bytes(path.read_bytes()[: size // 2])  # truncated (a full disk, a killed copy)
    assert cached_onnx(eval_bundle) == (path, True) and whole() and path.stat().st_size == size
    path.write_bytes(b"another graph")  # replaced by something else behind the sidecar's back
    assert cached_onnx(eval_bundle) == (path, True) and whole() and path.stat().st_size == size


def _fake_entry(root: Path, name: str, mb: float, mtime: float) -> Path:
    import os

    d = root / name
    d.mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"\0" * int(mb * (1 << 20)))
    os.utime(d, (mtime, mtime))
    return d


def test_prune_removes_the_least_recently_used_entries_but_never_the_kept_one(tmp_path):
    from trt.onnx_cache import prune

    a, b, c, d = (_fake_entry(tmp_path, n, 1.0, t) for n, t in (("a", 100), ("b", 200), ("c", 300), ("d", 400)))
    assert prune(tmp_path, a, 0) == []  # 0: no bound
    removed = prune(tmp_path, a, int(2.5 * (1 << 20)))  # 4 MB -> at most 2.5: two go, the oldest but `a`
    assert removed == [b, c] and a.is_dir() and d.is_dir()
    assert prune(tmp_path, d, 3 << 20) == []  # already under the bound


@pytest.mark.parametrize("raw, expect", [("", 2048 << 20), ("0", 0), ("1.5", int(1.5 * (1 << 20))), ("-1", None),
                                         ("lots", None), ("nan", None)])
def test_the_cache_bound_comes_from_the_environment(monkeypatch, raw, expect):
    from trt.onnx_cache import cache_limit_bytes

    monkeypatch.setenv("MAE_AD_CACHE_MAX_MB", raw)
    if expect is None:
        with pytest.raises(UserError, match="MAE_AD_CACHE_MAX_MB"):
            cache_limit_bytes()
    else:
        assert cache_limit_bytes() == expect


def test_a_new_export_evicts_the_least_recently_used_entry_over_the_bound(eval_bundle, tmp_path, monkeypatch,
                                                                          caplog):
    import os

    from trt.onnx_cache import cached_onnx

    monkeypatch.setenv("MAE_AD_CACHE", str(tmp_path / "cache"))
    first, _ = cached_onnx(eval_bundle)
    old = _fake_entry(first.parent.parent, "old", 0.1, 1.0)  # an entry last used long ago
    os.utime(first.parent, (5.0, 5.0))
    assert cached_onnx(eval_bundle) == (first, False) and first.parent.stat().st_mtime > 5.0  # a hit marks it used
    copy = Path(shutil.copytree(eval_bundle, tmp_path / "copy"))
    cal = copy / "calibration.json"
    cal.write_text(cal.read_text().replace('"target_fpr"', '"note": "edited", "target_fpr"', 1))
    bound = (sum(f.stat().st_size for f in first.parent.rglob("*") if f.is_file()) * 2 + (1 << 10)) / (1 << 20)
    monkeypatch.setenv("MAE_AD_CACHE_MAX_MB", f"{bound:.6f}")  # room for two real entries, not for the third
    with caplog.at_level(logging.INFO, logger="trt.onnx_cache"):
        second, made = cached_onnx(copy)
    assert made and second.is_file() and first.is_file() and not old.exists()
    assert "removed" in caplog.text and "MAE_AD_CACHE_MAX_MB" in caplog.text
