"""`mae-ad compare`: paired bootstrap intervals of metric differences between two evaluations of one test set."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mae_ad import metrics as M
from mae_ad.compare import compare, markdown, paired_bootstrap
from mae_ad.contract import UserError

MAE_AD = str(Path(sys.executable).with_name("mae-ad"))


def _write_eval(d: Path, paths: list[str], defects: list[str], labels: np.ndarray, scores: np.ndarray,
                threshold: float, hist: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    d.mkdir(parents=True)
    with open(d / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "defect", "label", "has_mask", "score", "anomalous"])
        for p, t, y, s in zip(paths, defects, labels, scores, strict=True):
            w.writerow([p, t, int(y), int(y), repr(float(s)), int(s > threshold)])
    (d / "metrics.json").write_text(json.dumps({"pixel_auroc": 0.9, "aupro": 0.8}))
    if hist is not None:
        masks, maps = hist
        edges, neg, pos = M.pixel_histograms(masks, maps)
        np.savez_compressed(d / "pixel_hist.npz", edges=edges, neg=neg.astype(np.uint32), pos=pos.astype(np.uint32),
                            paths=np.array(paths, dtype=str))
    return d


def _test_set(n_good: int = 40, n_a: int = 30, n_b: int = 30) -> tuple[list[str], list[str], np.ndarray]:
    defects = ["good"] * n_good + ["scratch"] * n_a + ["spot"] * n_b
    paths = [f"test/{t}/{i:03d}.png" for i, t in enumerate(defects)]
    return paths, defects, np.array([0 if t == "good" else 1 for t in defects])


def _row(r: dict, metric: str, subset: str = "all") -> dict:
    return next(x for x in r["rows"] if x["metric"] == metric and x["subset"] == subset)


def test_identical_evaluations_differ_by_nothing(tmp_path):
    paths, defects, y = _test_set()
    s = np.random.default_rng(0).normal(size=len(y)) + y
    a = _write_eval(tmp_path / "a", paths, defects, y, s, 1.0)
    b = _write_eval(tmp_path / "b", paths, defects, y, s, 1.0)
    r = compare(a, b, resamples=200)
    for row in r["rows"]:
        assert row["diff"] == 0 and row["ci_low"] == 0 and row["ci_high"] == 0
        assert row["verdict"] == "no difference detected"
    assert {x["subset"] for x in r["rows"] if x["metric"] == "image AUROC"} == {"all", "scratch", "spot"}


def test_a_clearly_better_model_is_called_better_and_a_worse_type_worse(tmp_path):
    paths, defects, y = _test_set()
    rng = np.random.default_rng(1)
    noise = rng.normal(size=len(y))
    a = _write_eval(tmp_path / "a", paths, defects, y, noise + 0.5 * y, 2.0)
    sb = noise + 0.5 * y
    sb[np.array(defects) == "scratch"] += 4.0  # B separates scratches perfectly ...
    sb[np.array(defects) == "spot"] = rng.normal(size=30) - 1.0  # ... and ranks spots below the normal images
    b = _write_eval(tmp_path / "b", paths, defects, y, sb, 2.0)
    r = compare(a, b, resamples=500)
    scratch = _row(r, "image AUROC", "scratch")
    assert scratch["b"] == 1.0 and scratch["ci_low"] > 0 and scratch["verdict"] == "B better"
    spot = _row(r, "image AUROC", "spot")
    assert spot["ci_high"] < 0 and spot["verdict"] == "B worse"
    assert spot["a"] == pytest.approx(M.auroc(y[np.array(defects) != "scratch"],
                                              (noise + 0.5 * y)[np.array(defects) != "scratch"]))
    text = markdown(r)
    assert "| image AUROC, scratch | 40 / 30 |" in text and "B worse" in text


def test_fewer_false_alarms_is_better(tmp_path):
    paths, defects, y = _test_set()
    s = np.where(y == 1, 3.0, 0.0)
    sa = s.copy()
    sa[:20] = 2.0  # A flags half the normal images at its threshold 1.0
    a = _write_eval(tmp_path / "a", paths, defects, y, sa, 1.0)
    b = _write_eval(tmp_path / "b", paths, defects, y, s, 1.0)
    fa = _row(compare(a, b, resamples=300), "false-alarm rate")
    assert fa["a"] == 0.5 and fa["b"] == 0.0 and fa["ci_high"] < 0 and fa["verdict"] == "B better"


def test_bootstrap_interval_covers_the_difference_and_is_reproducible():
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(50), np.ones(50)].astype(int)
    sa, sb = rng.normal(size=100) + y, rng.normal(size=100) + 1.5 * y
    f = np.zeros(100, int)
    fn = lambda yy, s, _f: M.auroc(yy, s)  # noqa: E731
    one = paired_bootstrap(y, (sa, f), (sb, f), fn, resamples=400, seed=3)
    assert one == paired_bootstrap(y, (sa, f), (sb, f), fn, resamples=400, seed=3)
    va, vb, lo, hi = one
    assert lo < vb - va < hi and hi - lo < 0.3


def test_pixel_auroc_is_resampled_from_the_histograms(tmp_path):
    paths, defects, y = _test_set(10, 6, 6)
    rng = np.random.default_rng(4)
    masks = [np.zeros((20, 24), bool) if t == "good" else rng.random((20, 24)) < 0.1 for t in defects]
    maps_a = [rng.normal(size=m.shape) + 1.0 * m for m in masks]
    maps_b = [rng.normal(size=m.shape) + 3.0 * m for m in masks]
    s = np.array([m.max() for m in maps_a])
    a = _write_eval(tmp_path / "a", paths, defects, y, s, 9.0, (masks, maps_a))
    b = _write_eval(tmp_path / "b", paths, defects, y, s, 9.0, (masks, maps_b))
    r = compare(a, b, resamples=300)
    px = _row(r, "pixel AUROC")
    assert px["a"] == pytest.approx(M.pixel_auroc(masks, maps_a), abs=1e-3)
    assert px["b"] == pytest.approx(M.pixel_auroc(masks, maps_b), abs=1e-3)
    assert px["verdict"] == "B better"
    assert [p["metric"] for p in r["pixel"]] == ["aupro"]  # pixel AUROC left the not-resampled list


def test_binned_auroc_matches_the_exact_pixel_auroc():
    rng = np.random.default_rng(5)
    masks = [rng.random((30, 40)) < 0.07 for _ in range(8)] + [np.zeros((25, 25), bool)] * 3
    maps = [np.round(rng.normal(size=m.shape) + 1.5 * m, 1) for m in masks]  # ties across images
    _, neg, pos = M.pixel_histograms(masks, maps)
    assert neg.shape[0] == len(masks) and neg.sum() + pos.sum() == sum(m.size for m in masks)
    assert M.binned_auroc(neg, pos) == pytest.approx(M.pixel_auroc(masks, maps), abs=1e-6)
    assert M.binned_auroc(neg[8:], pos[8:]) is None  # only normal pixels
    smooth = [rng.normal(size=m.shape) + 1.5 * m for m in masks]  # edges from a sample of the pixels
    _, neg, pos = M.pixel_histograms(masks, smooth, bins=256, max_sample=2000)
    assert neg.sum() + pos.sum() == sum(m.size for m in masks)
    assert M.binned_auroc(neg, pos) == pytest.approx(M.pixel_auroc(masks, smooth), abs=2e-3)


def test_different_test_sets_are_refused_naming_the_image(tmp_path):
    paths, defects, y = _test_set()
    s = np.linspace(0, 1, len(y))
    a = _write_eval(tmp_path / "a", paths, defects, y, s, 1.0)
    b = _write_eval(tmp_path / "b", paths[:-1] + ["test/spot/extra.png"], defects, y, s, 1.0)
    with pytest.raises(UserError, match="test/spot/099.png"):
        compare(a, b)
    relabelled = y.copy()
    relabelled[0] = 1
    c = _write_eval(tmp_path / "c", paths, defects, relabelled, s, 1.0)
    with pytest.raises(UserError, match="test/good/000.png"):
        compare(a, c)


@pytest.mark.parametrize("text, match", [
    ("path,defect,label,score\nx,good,0,1.0\n", "missing column.*anomalous"),
    ("path,defect,label,score,anomalous\nx,good,0,abc,0\n", "line 2"),
    ("path,defect,label,score,anomalous\nx,good,2,1.0,0\n", "line 2.*0 or 1"),
    ("path,defect,label,score,anomalous\nx,good,0,nan,0\n", "line 2.*finite"),
    ("path,defect,label,score,anomalous\nx,good,0,1,0\nx,good,0,1,0\n", "line 3.*twice"),
])
def test_bad_scores_files_are_named(tmp_path, text, match):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "scores.csv").write_text(text)
    paths, defects, y = _test_set()
    good = _write_eval(tmp_path / "a", paths, defects, y, np.zeros(len(y)), 1.0)
    with pytest.raises(UserError, match=match) as e:
        compare(good, d)
    assert str(d / "scores.csv") in str(e.value)


def test_cli_prints_the_table_writes_json_and_refuses_to_overwrite_it(tmp_path):
    paths, defects, y = _test_set()
    s = np.random.default_rng(6).normal(size=len(y)) + y
    a = _write_eval(tmp_path / "a", paths, defects, y, s, 1.0)
    b = _write_eval(tmp_path / "b", paths, defects, y, s + 2 * y, 1.0)
    out = tmp_path / "cmp.json"
    p = subprocess.run([MAE_AD, "compare", str(a), str(b), "--resamples", "200", "--json", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "| image AUROC | 40 / 60 |" in p.stdout and "B better" in p.stdout
    assert json.loads(out.read_text())["rows"][0]["verdict"] == "B better"
    before = out.read_text()
    p = subprocess.run([MAE_AD, "compare", str(a), str(b), "--json", str(out)], capture_output=True, text=True)
    assert p.returncode == 2 and "already exists" in p.stderr and "Traceback" not in p.stderr
    assert out.read_text() == before
    p = subprocess.run([MAE_AD, "compare", str(a), str(tmp_path / "nope")], capture_output=True, text=True)
    assert p.returncode == 2 and "nope: does not exist" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([MAE_AD, "compare", str(a), str(b / "metrics.json")], capture_output=True, text=True)
    assert p.returncode == 2 and "not a scores.csv" in p.stderr and "Traceback" not in p.stderr
    deep = tmp_path / "new" / "dir" / "cmp.json"  # missing folders are created
    p = subprocess.run([MAE_AD, "compare", str(a), str(b), "--resamples", "100", "--json", str(deep)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(deep.read_text())["resamples"] == 100
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    p = subprocess.run([MAE_AD, "compare", str(a), str(b), "--json", str(blocker / "cmp.json")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "is a file" in p.stderr and "|" not in p.stdout  # refused before any work


def test_notes_for_the_same_report_and_other_data_and_digits_for_tiny_differences(tmp_path):
    paths, defects, y = _test_set(10, 6, 6)
    rng = np.random.default_rng(8)
    masks = [np.zeros((20, 24), bool) if t == "good" else rng.random((20, 24)) < 0.1 for t in defects]
    maps = [rng.normal(size=m.shape) + 2 * m for m in masks]
    s = rng.normal(size=len(y)) + y
    a = _write_eval(tmp_path / "a", paths, defects, y, s, 9.0, (masks, maps))
    assert "same report" in markdown(compare(a, a, resamples=100))
    # B's maps: the same plus a tiny shift of the defect pixels: better, by far less than 0.001
    shifted = [m + 0.002 * k for m, k in zip(maps, masks, strict=True)]
    b = _write_eval(tmp_path / "b", paths, defects, y, s, 9.0, (masks, shifted))
    for d, data in ((a, "/data/one"), (b, "/data/two")):
        (d / "metrics.json").write_text(json.dumps({"aupro": 0.8, "data": data}))
    r = compare(a, b, resamples=200)
    px = _row(r, "pixel AUROC")
    assert 0 < px["diff"] < 0.001
    text = markdown(r)
    line = next(x for x in text.splitlines() if x.startswith("| pixel AUROC |"))
    assert "+0.000 |" not in line and "(by less than 0.001)" in line
    assert "/data/one" in text and "/data/two" in text


def test_pixel_metrics_of_reports_at_different_eval_sizes_are_left_out_with_a_note(tmp_path):
    paths, defects, y = _test_set(10, 6, 6)
    rng = np.random.default_rng(7)
    masks = [np.zeros((20, 24), bool) if t == "good" else rng.random((20, 24)) < 0.1 for t in defects]
    maps = [rng.normal(size=m.shape) + m for m in masks]
    s = rng.normal(size=len(y)) + y
    a = _write_eval(tmp_path / "a", paths, defects, y, s, 9.0, (masks, maps))
    b = _write_eval(tmp_path / "b", paths, defects, y, s, 9.0, (masks, maps))
    (b / "metrics.json").write_text(json.dumps({"pixel_auroc": 0.9, "aupro": 0.8, "eval_size": "model"}))
    (a / "metrics.json").write_text(json.dumps({"pixel_auroc": 0.9, "aupro": 0.8, "eval_size": "original"}))
    r = compare(a, b, resamples=100)
    assert not [x for x in r["rows"] if x["metric"] == "pixel AUROC"] and r["pixel"] == []
    assert "--eval-size" in markdown(r) and "image AUROC" in markdown(r)


def test_a_different_image_behind_the_same_name_is_refused_by_its_hash(tmp_path):
    paths, defects, y = _test_set()
    s = np.linspace(0, 1, len(y))
    a = _write_eval(tmp_path / "a", paths, defects, y, s, 1.0)
    b = _write_eval(tmp_path / "b", paths, defects, y, s, 1.0)
    for d, odd in ((a, None), (b, 3)):  # add the file-hash column; B's fourth image differs
        rows = list(csv.reader(open(d / "scores.csv")))
        rows[0].append("sha256")
        for i, r in enumerate(rows[1:]):
            r.append(("f" if i == odd else "e") * 64)
        with open(d / "scores.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    with pytest.raises(UserError, match="test/good/003.png.*sha256"):
        compare(a, b)
    plain = _write_eval(tmp_path / "c", paths, defects, y, s, 1.0)  # a report without hashes is compared by name
    assert compare(a, plain, resamples=100)["rows"]
