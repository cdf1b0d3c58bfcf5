"""`mae-ad evaluate` and `mae-ad predict` with a tiny calibrated model on the synthetic dataset (no training)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mae_ad import metrics as M
from mae_ad.config import load_config
from mae_ad.contract import UserError
from mae_ad.data import index_dataset, load_stack
from mae_ad.model import build_model
from mae_ad.scoring import Scorer, calibrate

from .conftest import tiny_overrides

MAE_AD = str(Path(sys.executable).with_name("mae-ad"))


def _make_bundle(out: Path, train_images: list[Path], calibrated: bool = True, threshold: float | None = None) -> Path:
    from mae_ad.bundle import save_bundle

    cfg = load_config(None, tiny_overrides() + ["scoring.sigma=1.0"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    scorer = Scorer(model, cfg.scoring, cfg.data).eval()
    cal = None
    if calibrated:
        cal = calibrate(scorer, torch.from_numpy(load_stack(train_images, cfg.model.img_size)), target_fpr=0.1)
        if threshold is not None:
            cal["threshold"] = threshold
    return save_bundle(out, model, cfg, cal, scorer)


@pytest.fixture(scope="module")
def bundle(synthetic_data, tmp_path_factory):
    idx = index_dataset(synthetic_data)
    return _make_bundle(tmp_path_factory.mktemp("b") / "bundle", idx.train[-6:])


@pytest.fixture(scope="module")
def evaluated(bundle, synthetic_data, tmp_path_factory):
    from mae_ad.evaluate import run_evaluation

    out = tmp_path_factory.mktemp("ev") / "report"
    metrics = run_evaluation(bundle, synthetic_data, out, batch_size=5)
    return out, metrics


def test_evaluation_files_and_values(evaluated, bundle, synthetic_data):
    out, metrics = evaluated
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["image_auroc"] == pytest.approx(metrics["image_auroc"])
    for k in ("image_auroc", "pixel_auroc", "aupro", "f1", "f1_oracle_best"):
        assert 0.0 <= on_disk[k] <= 1.0, k
    assert on_disk["f1_oracle_best"] >= on_disk["f1"]
    cal = json.loads((bundle / "calibration.json").read_text())
    meta = json.loads((bundle / "meta.json").read_text())
    assert on_disk["threshold"] == cal["threshold"] and on_disk["model_id"] == meta["model_id"]
    test_dirs = sorted(p.name for p in (synthetic_data / "test").iterdir() if p.name != "good")
    assert sorted(on_disk["per_defect"]) == test_dirs
    for t, m in on_disk["per_defect"].items():
        assert m["n"] == len(list((synthetic_data / "test" / t).glob("*.png")))
        assert all(0 <= m[k] <= 1 for k in ("image_auroc", "pixel_auroc", "aupro", "f1"))
    assert on_disk["n_images"] == len(list((synthetic_data / "test").glob("*/*.png")))
    assert on_disk["seconds_per_image"] > 0
    for name in ("roc", "score_hist", "pro", "cases_defect_highest", "cases_defect_lowest", "cases_good_highest"):
        png = out / "plots" / f"{name}.png"
        assert cv2.imread(str(png)) is not None, name
    report = (out / "report.md").read_text()
    assert "held-back NORMAL" in report and "oracle" in report and "](plots/roc.png)" in report
    scoring = on_disk["scoring"]
    assert scoring["terms"] == ["masked reconstruction error in pixel space"] and scoring["knn"] is None
    assert scoring["fusion"] == "none (one term)" and scoring["fusion_divisors"] == {}
    assert f"- Scoring: {scoring['formula']} (" in report and "image score = max of the map" in scoring["formula"]
    assert not list(out.parent.glob(".report.tmp-*"))


def test_metrics_json_agrees_with_saved_scores(evaluated):
    out, metrics = evaluated
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    thr = metrics["threshold"]
    assert metrics["image_auroc"] == pytest.approx(M.auroc(labels, scores))
    assert metrics["f1"] == pytest.approx(M.f1_at(labels, scores, thr)["f1"])
    assert metrics["f1_oracle_best"] == pytest.approx(M.best_f1(labels, scores)["f1"])
    assert [int(r["anomalous"]) for r in rows] == [int(s > thr) for s in scores]
    data = Path(metrics["data"])
    assert all(r["sha256"] == hashlib.sha256((data / r["path"]).read_bytes()).hexdigest() for r in rows)
    for t, m in metrics["per_defect"].items():
        sel = np.array([r["defect"] in ("good", t) for r in rows])
        assert m["image_auroc"] == pytest.approx(M.auroc(labels[sel], scores[sel]))
    with np.load(out / "pixel_hist.npz", allow_pickle=False) as z:  # what `mae-ad compare` resamples
        assert M.binned_auroc(z["neg"], z["pos"]) == pytest.approx(metrics["pixel_auroc"], abs=2e-3)
        assert set(z["paths"]) <= {r["path"] for r in rows} and len(z["paths"]) == metrics["n_pixel_metric_images"]


def test_pixel_metrics_line_up_with_masks(tmp_path, monkeypatch):
    """A stand-in scorer whose map is exactly 'the pixel is white': on images whose defects are white rectangles
    the maps equal the masks, so every metric must be 1. Any mix-up of image order, mask orientation or mask
    resizing would show. A defect image without mask must count for the image metrics only."""
    import mae_ad.scoring as scoring
    from mae_ad.evaluate import run_evaluation

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for d in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (root / d).mkdir(parents=True)
    grey = np.full((64, 64, 3), 120, np.uint8)
    for i in range(3):
        cv2.imwrite(str(root / f"train/good/{i}.png"), grey)
        cv2.imwrite(str(root / f"test/good/{i}.png"), grey)
    for i in range(4):
        img, mask = grey.copy(), np.zeros((64, 64), np.uint8)
        for _ in range(2):  # two rectangles at even coordinates: exact under the 2x downsampling to 32 px
            r, c = rng.integers(0, 28, 2) * 2
            h, w = rng.integers(1, 4, 2) * 2
            img[r:r + h, c + 6:c + 6 + w] = 255  # columns shifted: a transposed mask would not match
            mask[r:r + h, c + 6:c + 6 + w] = 255
        cv2.imwrite(str(root / f"test/blob/{i}.png"), img)
        if i < 3:
            cv2.imwrite(str(root / f"ground_truth/blob/{i}_mask.png"), mask)
    bundle = _make_bundle(tmp_path / "bundle", sorted((root / "train/good").glob("*.png")), threshold=0.5)

    def white_map(scorer, images, batch_size=8, raw=False):
        maps = (images.min(dim=1, keepdim=True).values > 0.99).float()
        return maps, maps.flatten(1).amax(1)

    monkeypatch.setattr(scoring, "score_batches", white_map)
    m = run_evaluation(bundle, root, tmp_path / "out")
    assert m["image_auroc"] == 1.0 and m["pixel_auroc"] == 1.0 and m["aupro"] == pytest.approx(1.0)
    assert m["f1"] == 1.0 and m["confusion"] == {"tp": 4, "fp": 0, "tn": 3, "fn": 0}
    assert m["n_defect_without_mask"] == 1 and m["n_pixel_metric_images"] == 6 and m["n_defect"] == 4
    assert "no ground-truth mask" in (tmp_path / "out" / "report.md").read_text()


# --- predict -----------------------------------------------------------------------------------------------------
def test_predict_writes_maps_overlays_and_scores(bundle, synthetic_data, evaluated, tmp_path):
    from mae_ad.evaluate import run_predict

    good = synthetic_data / "test" / "good"
    crack0 = synthetic_data / "test" / "crack" / "000.png"  # same stem as test/good/000.png
    out = run_predict(bundle, [good, crack0], tmp_path / "pred")
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    n_good = len(list(good.glob("*.png")))
    assert len(rows) == n_good + 1
    stems = [r["map"].removesuffix("_map.png") for r in rows]
    assert len(set(stems)) == len(stems) and "000-2" in stems  # the clash was renamed, not overwritten
    thr = json.loads((bundle / "calibration.json").read_text())["threshold"]
    with open(evaluated[0] / "scores.csv") as f:
        eval_scores = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
    for r in rows:
        assert float(r["threshold"]) == thr and r["anomalous"] == str(int(float(r["score"]) > thr))
        rel = str(Path(r["path"]).relative_to(synthetic_data))
        assert float(r["score"]) == pytest.approx(eval_scores[rel], rel=1e-5)  # same scorer as evaluate
        heat = cv2.imread(str(out / r["map"]), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(out / r["overlay"]))
        assert heat.shape == (32, 32) and heat.dtype == np.uint8  # the model's resolution
        assert overlay.shape == (64, 64, 3)  # the image's own resolution


def test_predict_unreadable_image_writes_nothing(bundle, tmp_path):
    from mae_ad.evaluate import run_predict

    bad = tmp_path / "imgs"
    bad.mkdir()
    cv2.imwrite(str(bad / "a.png"), np.full((40, 40, 3), 100, np.uint8))
    (bad / "b.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="b.png"):
        run_predict(bundle, [bad], tmp_path / "pred")
    assert not (tmp_path / "pred").exists() and not list(tmp_path.glob(".pred.tmp-*"))


# --- bad input through the real CLI -----------------------------------------------------------------------------
def _cli_fails(args: list[str], out: Path, must_mention: str) -> None:
    r = subprocess.run([MAE_AD, *args], capture_output=True, text=True, timeout=180)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2, r.stderr
    assert len(errors) == 1 and must_mention in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() or (out / "keep.txt").is_file()  # not created (or the pre-existing one untouched)
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture
def data_copy(synthetic_data, tmp_path):
    return Path(shutil.copytree(synthetic_data, tmp_path / "data"))


def test_cli_missing_data_folder(bundle, tmp_path):
    out = tmp_path / "out"
    _cli_fails(["evaluate", str(bundle), "--data", str(tmp_path / "nope"), "--out", str(out)], out,
               str(tmp_path / "nope"))


def test_cli_test_folder_without_defects(bundle, data_copy, tmp_path):
    for d in (data_copy / "test").iterdir():
        if d.name != "good":
            shutil.rmtree(d)
    out = tmp_path / "out"
    _cli_fails(["evaluate", str(bundle), "--data", str(data_copy), "--out", str(out)], out, "defect")


def test_cli_truncated_image(bundle, data_copy, tmp_path):
    victim = data_copy / "test" / "spot" / "001.png"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out = tmp_path / "out"
    _cli_fails(["evaluate", str(bundle), "--data", str(data_copy), "--out", str(out)], out, str(victim))


def test_cli_mask_of_wrong_size(bundle, data_copy, tmp_path):
    victim = data_copy / "ground_truth" / "scratch" / "002_mask.png"
    cv2.imwrite(str(victim), np.zeros((50, 64), np.uint8))
    out = tmp_path / "out"
    _cli_fails(["evaluate", str(bundle), "--data", str(data_copy), "--out", str(out)], out, str(victim))


def test_cli_bundle_without_calibration(synthetic_data, tmp_path):
    b = _make_bundle(tmp_path / "uncal", index_dataset(synthetic_data).train[:3], calibrated=False)
    out = tmp_path / "out"
    _cli_fails(["evaluate", str(b), "--data", str(synthetic_data), "--out", str(out)], out, "calibration")


def test_cli_output_exists(bundle, synthetic_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _cli_fails(["evaluate", str(bundle), "--data", str(synthetic_data), "--out", str(out)], out, str(out))
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_cli_predict_missing_image(bundle, synthetic_data, tmp_path):
    out = tmp_path / "pred"
    missing = tmp_path / "missing.png"
    _cli_fails(["predict", str(bundle), str(synthetic_data / "test" / "good"), str(missing), "--out", str(out)],
               out, str(missing))


def test_cli_predict_on_a_folder_of_class_folders_names_them(bundle, synthetic_data, tmp_path):
    """`predict BUNDLE DATA/test` (images one level down) is refused with the sub-folders that hold images named."""
    out = tmp_path / "pred"
    _cli_fails(["predict", str(bundle), str(synthetic_data / "test"), "--out", str(out)], out,
               "its sub-folders crack, good")


def test_predict_without_calibration_leaves_verdict_empty(synthetic_data, tmp_path):
    from mae_ad.evaluate import run_predict

    b = _make_bundle(tmp_path / "uncal", index_dataset(synthetic_data).train[:3], calibrated=False)
    out = run_predict(b, [synthetic_data / "test" / "spot"], tmp_path / "pred")
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["threshold"] == "" and r["anomalous"] == "" for r in rows)
    top = max(rows, key=lambda r: float(r["score"]))  # the run's largest value is white
    assert cv2.imread(str(out / top["map"]), cv2.IMREAD_UNCHANGED).max() == 255


def test_baseline_on_a_dataset_without_the_bundles_held_back_images_has_no_threshold(evaluated, caplog):
    """The bundle (made here, not trained on this dataset) lists no held-back image found in it: the baseline row
    has no threshold and no F1, says why, and its AUROC figures are still there."""
    out, metrics = evaluated
    b = metrics["baseline"]
    assert b["threshold"] is None and b["f1"] is None and "held-back" in b["note"]
    assert 0.0 <= b["image_auroc"] <= 1.0
    assert "no threshold, no F1" in (out / "report.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["baseline"]["threshold"] is None


def test_every_command_that_creates_a_folder_refuses_a_file_among_its_parents(bundle, synthetic_data, tmp_path):
    """`--out DIR/sub` where DIR is a file: one `error:` line naming it, exit 2, no traceback, before any work, and
    the file untouched: for every command that creates an output folder (evaluate and predict are tested above)."""
    afile = tmp_path / "afile"
    afile.write_text("keep")
    out = str(afile / "sub")
    space = tmp_path / "space.yaml"
    space.write_text("train.mask_ratio: [0.5]\n")
    tiny = [a for s in tiny_overrides() for a in ("--set", s)]
    commands = {
        "train": ["train", "--data", str(synthetic_data), "--out", out, *tiny],
        "calibrate": ["calibrate", str(bundle), "--data", str(synthetic_data), "--out", out],
        "merge": ["merge", str(bundle), "--out", out],
        "make-corpus": ["make-corpus", "--out", out, "--n", "3"],
        "prepare-data": ["prepare-data", "--good", str(synthetic_data / "train" / "good"), "--out", out],
        "sweep": ["sweep", str(space), "--data", str(synthetic_data), "--out", out, *tiny],
    }
    for name, args in commands.items():
        r = subprocess.run([MAE_AD, *args], capture_output=True, text=True, timeout=180)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert err[-1].startswith("error: ") and f"{afile} is a file, not a folder" in err[-1], (name, err[-1])
    assert afile.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "space.yaml"]
