"""Metrics against hand-computed cases and brute-force definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from mae_ad.metrics import (
    area_until,
    aupro,
    auroc,
    best_f1,
    f1_at,
    image_metrics,
    pixel_auroc,
    pro_curve,
    roc_curve,
)


# --- AUROC -------------------------------------------------------------------------------------------------------
def brute_auroc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 5, 60).astype(np.float32)  # many ties
    assert auroc(y, s) == pytest.approx(brute_auroc(y, s), abs=1e-12)
    fpr, tpr, thr = roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(brute_auroc(y, s), abs=1e-12)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1 and np.isinf(thr[0])
    assert len(thr) == len(np.unique(s)) + 1


def test_auroc_hand_cases():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert auroc([0, 1, 1], [0.2, 0.2, 0.9]) == pytest.approx(0.75)
    assert auroc([1, 1], [0.1, 0.2]) is None
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.1, float("nan")])


def test_pixel_auroc_is_auroc_over_all_pixels():
    rng = np.random.default_rng(3)
    masks = rng.random((4, 8, 8)) > 0.8
    maps = rng.integers(0, 6, (4, 8, 8)).astype(np.float32) + masks * 1.5
    assert pixel_auroc(masks, maps) == pytest.approx(brute_auroc(masks.reshape(-1).astype(int), maps.reshape(-1)))
    assert pixel_auroc(np.zeros((2, 4, 4)), maps[:2, :4, :4]) is None


# --- AUPRO -------------------------------------------------------------------------------------------------------
def test_perfect_map_gives_aupro_one_and_constant_offset_changes_nothing():
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:5, 2:9] = True
    masks[0, 10:14, 10:12] = True
    masks[1, 0:3, 13:16] = True  # image 2 is a defect-free image
    perfect = masks.astype(np.float32)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, 3.0 * perfect + 7.0) == pytest.approx(1.0)  # only the ordering matters
    assert pixel_auroc(masks, perfect) == 1.0
    assert aupro(masks, 1.0 - perfect) == pytest.approx(0.0)  # every defect pixel scores lowest


def test_region_flagged_at_a_spatial_offset():
    """The map flags a region the size of the defect, shifted 2 columns: half the defect is found and 8 normal
    pixels are flagged. Curve: (0,0) -> (8/84, 0.5) -> (1,1)."""
    mask = np.zeros((1, 10, 10), bool)
    mask[0, 2:6, 2:6] = True  # 16 defect pixels, 84 normal
    amap = np.zeros((1, 10, 10), np.float32)
    amap[0, 2:6, 4:8] = 1.0  # 8 on the defect, 8 off it
    fpr, pro, thr = pro_curve(mask, amap)
    np.testing.assert_allclose(fpr, [0, 8 / 84, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 1])
    x1 = 8 / 84
    y_cut = 0.5 + 0.5 * (0.3 - x1) / (1 - x1)
    expected = (x1 * 0.5 / 2 + (0.3 - x1) * (0.5 + y_cut) / 2) / 0.3
    assert aupro(mask, amap) == pytest.approx(expected, rel=1e-12)


def test_pro_averages_per_region_not_per_pixel():
    """A small region (4 px) found, a large one (16 px) missed: PRO is 0.5, whereas the per-pixel overlap is 0.2."""
    mask = np.zeros((1, 12, 12), bool)
    mask[0, 1:3, 1:3] = True  # 4 px, found
    mask[0, 6:10, 6:10] = True  # 16 px, missed (scores like the background)
    amap = np.zeros((1, 12, 12), np.float32)
    amap[0, 1:3, 1:3] = 1.0
    fpr, pro, _ = pro_curve(mask, amap)
    np.testing.assert_allclose(fpr, [0, 0, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 1])
    # area under 0.5 + 0.5 x on [0, 0.3] = 0.15 + 0.0225, normalised by 0.3
    assert aupro(mask, amap) == pytest.approx(0.575)
    per_pixel = (0.2 * 0.3 + 0.8 * 0.3**2 / 2) / 0.3
    assert abs(aupro(mask, amap) - per_pixel) > 0.2


def test_regions_are_eight_connected_and_per_image():
    mask = np.zeros((2, 8, 8), bool)
    mask[0, 2:4, 2:4] = True
    mask[0, 4, 4] = True  # touches the block only at a corner: same region under 8-connectivity
    mask[1, 2:4, 2:4] = True  # the same block in another image is a region of its own
    amap = np.zeros((2, 8, 8), np.float32)
    amap[0, 2:4, 2:4] = 1.0  # block found, the corner pixel not
    fpr, pro, _ = pro_curve(mask, amap)
    # regions: {block+corner in image 0}: 4/5 found; {block in image 1}: 0 found -> mean 0.4
    # (4-connectivity would give (1 + 0 + 0) / 3)
    assert pro[1] == pytest.approx(0.4) and fpr[1] == 0


def brute_pro_point(masks: np.ndarray, maps: np.ndarray, t: float) -> tuple[float, float]:
    overlaps = []
    for m, a in zip(masks, maps, strict=True):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        for c in range(1, n + 1):
            region = lab == c
            overlaps.append(float(np.mean(a[region] >= t)))
    ok = ~masks
    return float(np.sum((maps >= t) & ok) / ok.sum()), float(np.mean(overlaps))


@pytest.mark.parametrize("seed", [0, 1])
def test_pro_curve_matches_brute_force_sweep(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((5, 20, 20), bool)
    for i in range(4):  # image 4 stays defect-free
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, 16, 2)
            h, w = rng.integers(1, 5, 2)
            masks[i, r:r + h, c:c + w] = True
    maps = rng.integers(0, 12, masks.shape).astype(np.float32) + 4 * masks * rng.random(masks.shape)
    maps = np.round(maps, 1)  # keep ties
    fpr, pro, thr = pro_curve(masks, maps)
    for f, p, t in zip(fpr[1:], pro[1:], thr[1:], strict=True):
        bf, bp = brute_pro_point(masks, maps, t)
        assert f == pytest.approx(bf, abs=1e-12) and p == pytest.approx(bp, abs=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    # AUPRO = normalised area of the brute-force curve up to 0.3 (cut by linear interpolation)
    pts = [(0.0, 0.0)] + [brute_pro_point(masks, maps, t) for t in np.unique(maps)[::-1]]
    bx, by = map(np.array, zip(*pts, strict=True))
    assert aupro(masks, maps) == pytest.approx(area_until(bx, by, 0.3) / 0.3, abs=1e-12)


def test_area_until_interpolates_the_cut():
    x = np.array([0.0, 0.2, 0.4, 1.0])
    y = np.array([0.0, 1.0, 1.0, 1.0])
    assert area_until(x, y, 0.3) == pytest.approx(0.1 + 0.1)
    assert area_until(np.array([0.0, 0.6]), np.array([0.0, 0.6]), 0.3) == pytest.approx(0.045)
    assert area_until(x, y, 0.2) == pytest.approx(0.1)  # a point exactly at the limit


def test_aupro_undefined_without_regions():
    assert aupro(np.zeros((2, 4, 4)), np.random.default_rng(0).random((2, 4, 4))) is None


# --- F1 ----------------------------------------------------------------------------------------------------------
def test_f1_at_threshold_is_strict_and_hand_checked():
    y = [0, 0, 1, 1, 1]
    s = [0.1, 0.6, 0.5, 0.7, 0.9]
    r = f1_at(y, s, 0.55)  # flags 0.6 (fp), 0.7, 0.9 (tp); misses 0.5
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (2, 1, 1, 1)
    assert r["f1"] == pytest.approx(4 / 6) and r["precision"] == pytest.approx(2 / 3)
    assert f1_at(y, s, 0.5)["tp"] == 2  # a score equal to the threshold is not anomalous


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_f1_is_the_maximum_over_all_thresholds(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    s = rng.integers(0, 8, 40).astype(np.float64) + y * rng.random(40) * 3
    candidates = np.r_[np.unique(s), -np.inf]
    brute = max(f1_at(y, s, t)["f1"] for t in candidates)
    best = best_f1(y, s)
    assert best["f1"] == pytest.approx(brute) and best["oracle"] is True
    assert f1_at(y, s, best["threshold"])["f1"] == pytest.approx(brute)  # its threshold reproduces it


def test_image_metrics_summary():
    y = [0, 0, 0, 1, 1]
    s = [0.1, 0.2, 0.35, 0.3, 0.8]
    m = image_metrics(y, s, threshold=0.25)
    assert m["image_auroc"] == pytest.approx(5 / 6)
    assert m["confusion"] == {"tp": 2, "fp": 1, "tn": 2, "fn": 0} and m["f1"] == pytest.approx(0.8)
    assert m["f1_oracle_best"] == pytest.approx(0.8) and m["f1_oracle_best"] >= m["f1"]
