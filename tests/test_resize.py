"""data.resize (squash | letterbox): the geometry, the letterbox fill never counting, and every path (calibration,
evaluation, predict, the agent) applying the same rule."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mae_ad import metrics as M
from mae_ad.config import load_config
from mae_ad.contract import (
    UserError,
    crop_valid,
    fit_image,
    map_to_source,
    mask_fill,
    placement,
    score_valid,
    valid_mask,
)
from mae_ad.data import index_dataset, load_stack_placed, place_mask, read_image_placed
from mae_ad.synthetic import add_defect, normal_tile

from .conftest import tiny_overrides

SHAPES = [(60, 150), (150, 60), (64, 64), (1, 300), (37, 90), (400, 123), (20, 19)]


@pytest.mark.parametrize("h,w", SHAPES)
def test_letterbox_keeps_aspect_ratio_centred_inside_the_square(h, w):
    pl = placement(h, w, 64, "letterbox")
    assert max(pl.height, pl.width) == 64
    exact = min(h, w) * 64 / max(h, w)  # the shorter side at the longer side's scale
    assert abs(min(pl.height, pl.width) - exact) <= 0.5 or min(pl.height, pl.width) == 1
    assert (pl.height >= pl.width) == (h >= w)
    assert 0 <= pl.top and pl.top + pl.height <= 64 and 0 <= pl.left and pl.left + pl.width <= 64
    assert abs(pl.top - (64 - pl.top - pl.height)) <= 1 and abs(pl.left - (64 - pl.left - pl.width)) <= 1
    assert valid_mask(pl).sum() == pl.height * pl.width
    sq = placement(h, w, 64, "squash")
    assert sq.full and (sq.src_h, sq.src_w) == (h, w)


def test_unknown_policy_is_refused_by_config_and_geometry():
    with pytest.raises(UserError, match=r"data\.resize"):
        load_config(None, ["data.resize=stretch"])
    with pytest.raises(ValueError, match=r"data\.resize"):
        placement(10, 10, 8, "stretch")


def test_letterbox_round_trip_returns_the_image_at_its_own_size():
    """A smooth image placed into the square (area down-scaling by 3) and brought back by `map_to_source` (crop,
    bilinear up) is the image again, and the fill is the image mirrored at its border."""
    h, w, s = 60, 150, 50
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    src = (0.3 * yy / h + 0.7 * xx / w).astype(np.float32)
    sq, pl = fit_image(src, s, "letterbox")
    assert sq.shape == (s, s) and (pl.height, pl.width, pl.top, pl.left) == (20, 50, 15, 0)
    back = map_to_source(sq, pl)
    assert back.shape == (h, w)
    assert np.abs(back - src)[3:-3, 3:-3].max() < 0.01  # exact up to interpolation at the outer pixels
    # reflect fill: row top-1-i mirrors row top+1+i
    for i in range(5):
        assert np.array_equal(sq[pl.top - 1 - i], sq[pl.top + 1 + i])
    # the same placement from the data reader (RGB float) as from the numpy function the agent calls
    assert placement(h, w, s, "letterbox") == pl


def test_mask_round_trip_through_model_coordinates():
    h, w, s = 90, 240, 80
    mask = np.zeros((h, w), bool)
    mask[30:60, 90:150] = True
    pl = placement(h, w, s, "letterbox")
    placed = place_mask(mask, pl)
    assert not placed[~valid_mask(pl)].any()
    back = cv2.resize(crop_valid(placed, pl).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    assert (back != mask).mean() < 0.01


def test_padding_never_raises_the_score_nor_shows_in_the_map():
    """Extreme values on the letterbox fill of a map change neither the image score (max or top-k mean) nor the
    valid region, and the map handed to overlays shows the fill at the valid minimum."""
    rng = np.random.default_rng(0)
    pl = placement(40, 100, 64, "letterbox")
    amap = rng.random((64, 64)).astype(np.float32)
    hot = amap.copy()
    hot[~valid_mask(pl)] = 1e6
    for reduce in ("max", "topk_mean"):
        base = score_valid(amap, pl, reduce, 0.05)
        assert score_valid(hot, pl, reduce, 0.05) == base
        assert base <= amap[valid_mask(pl)].max()
    filled = mask_fill(hot, pl)
    assert np.array_equal(filled[valid_mask(pl)], hot[valid_mask(pl)])
    assert filled[~valid_mask(pl)].max() == hot[valid_mask(pl)].min()
    assert np.array_equal(map_to_source(hot, pl), map_to_source(amap, pl))
    # squash: the whole square is the image
    sq = placement(40, 100, 64, "squash")
    assert score_valid(hot, sq) == hot.max()


def test_evaluation_under_letterbox_compares_the_right_pixels():
    """A map that is exactly the ground truth in model coordinates scores a perfect pixel AUROC at the image's own
    size after crop + upsample; reading the same map as if squashed (no crop) does not."""
    h, w, s = 70, 210, 63
    masks, maps_right, maps_wrong = [], [], []
    rng = np.random.default_rng(1)
    for _ in range(4):
        m = np.zeros((h, w), bool)
        y, x = rng.integers(10, h - 30), rng.integers(10, w - 60)
        m[y:y + 20, x:x + 50] = True
        pl = placement(h, w, s, "letterbox")
        amap = cv2.GaussianBlur(place_mask(m, pl).astype(np.float32), (3, 3), 0.6)
        masks.append(m)
        maps_right.append(map_to_source(amap, pl))
        maps_wrong.append(cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR))
    assert M.pixel_auroc(masks, maps_right) > 0.99
    assert M.pixel_auroc(masks, maps_wrong) < 0.9


# --- the same rule on every path ------------------------------------------------------------------------------
def _write_wide_dataset(root: Path, seed: int = 3) -> Path:
    """A dataset of non-square images (aspect ratios 0.5 to 2.5), defects with masks at full size."""
    rng = np.random.default_rng(seed)
    shapes = [(48, 120), (96, 48), (64, 64), (40, 100), (72, 36), (50, 90)]
    for split, n in (("train/good", 12), ("test/good", 3), ("test/spot", 3)):
        d = root / split
        d.mkdir(parents=True)
        for i in range(n):
            h, w = shapes[i % len(shapes)]
            img = cv2.resize(normal_tile(rng, 96), (w, h), interpolation=cv2.INTER_AREA)
            if split == "test/spot":
                img, mask = add_defect(img, "spot", rng)
                g = root / "ground_truth/spot"
                g.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(g / f"{i:03d}_mask.png"), (mask > 0).astype(np.uint8) * 255)
            cv2.imwrite(str(d / f"{i:03d}.png"), img)
    return root


@pytest.fixture(scope="module")
def letterbox_bundle(tmp_path_factory):
    from mae_ad.bundle import save_bundle
    from mae_ad.model import build_model
    from mae_ad.scoring import Scorer, calibrate

    data = _write_wide_dataset(tmp_path_factory.mktemp("wide") / "data")
    cfg = load_config(None, tiny_overrides() + ["scoring.sigma=1.0", "data.resize=letterbox"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    scorer = Scorer(model, cfg.scoring, cfg.data).eval()
    arr, places = load_stack_placed(index_dataset(data).train[-6:], 32, "letterbox")
    assert not all(p.full for p in places)
    cal = calibrate(scorer, torch.from_numpy(arr), target_fpr=0.1, placements=places)
    # the threshold comes from valid-region scores: never above the whole-square scores
    whole = calibrate(scorer, torch.from_numpy(arr), target_fpr=0.1)
    assert cal["threshold"] <= whole["threshold"]
    return save_bundle(tmp_path_factory.mktemp("b") / "bundle", model, cfg, cal, scorer), data, scorer


def test_bundle_records_the_policy(letterbox_bundle):
    from mae_ad.contract import read_bundle_meta

    bundle, _, _ = letterbox_bundle
    assert read_bundle_meta(bundle).input.resize == "letterbox"


def test_evaluate_predict_and_agent_score_alike(letterbox_bundle, tmp_path):
    from agent.config import CameraSection
    from agent.preprocess import box_to_frame, preprocess, valid_view
    from mae_ad.evaluate import run_evaluation, run_predict

    bundle, data, scorer = letterbox_bundle
    m_orig = run_evaluation(bundle, data, tmp_path / "ev", baseline=False)
    m_model = run_evaluation(bundle, data, tmp_path / "ev_model", baseline=False, eval_size="model")
    assert m_orig["eval_size"] == "original" and m_model["eval_size"] == "model" and m_orig["resize"] == "letterbox"
    assert "own size" in (tmp_path / "ev" / "report.md").read_text()
    with open(tmp_path / "ev" / "scores.csv") as f:
        ev = {Path(r["path"]).name + r["defect"]: float(r["score"]) for r in csv.DictReader(f)}
    assert m_orig["image_auroc"] == m_model["image_auroc"]  # image scores do not depend on where masks are read

    files = sorted((data / "test/spot").glob("*.png"))
    run_predict(bundle, files, tmp_path / "pred")
    with open(tmp_path / "pred" / "scores.csv") as f:
        pred = {Path(r["path"]).name: float(r["score"]) for r in csv.DictReader(f)}
    cam = CameraSection(name="c", source=str(files[0]))
    n_letterboxed = 0
    for p in files:
        assert pred[p.name] == pytest.approx(ev[p.name + "spot"], rel=1e-5)
        # the agent: uint8 frame -> the same placement and (up to 8-bit rounding) the same input and score
        frame = cv2.imread(str(p))
        chw, crop, rgb = preprocess(frame, cam, 32, "letterbox")
        ref, pl = read_image_placed(p, 32, "letterbox")
        assert crop.place == pl
        n_letterboxed += not pl.full
        assert np.abs(chw - ref).max() < 2 / 255
        with torch.no_grad():
            amap, score = scorer(torch.from_numpy(chw[None]))
        vmap, vrgb, vscore = valid_view(amap[0].numpy(), rgb, float(score[0]), crop)
        assert vmap.shape[-2:] == (pl.height, pl.width) == vrgb.shape[:2]
        assert vscore == pytest.approx(pred[p.name], rel=0.05)
        assert vscore <= float(score[0])
        # the whole valid map corresponds to the whole frame
        assert box_to_frame((0, 0, pl.width, pl.height), crop, 32) == [0, 0, frame.shape[1], frame.shape[0]]
    assert n_letterboxed >= 2
    maps = sorted((tmp_path / "pred").glob("*_map.png"))
    assert {cv2.imread(str(m), cv2.IMREAD_GRAYSCALE).shape for m in maps} == \
        {(placement(*cv2.imread(str(p)).shape[:2], 32, "letterbox").height,
          placement(*cv2.imread(str(p)).shape[:2], 32, "letterbox").width) for p in files}


def test_position_statistics_ignore_the_fill():
    """Per-pixel normal statistics count an image only where it is valid: extreme values on the fill of the maps
    change nothing at pixels valid in enough images; pixels valid in too few keep the all-image statistics."""
    from mae_ad.scoring import _valid_masks, normal_statistics, valid_normal_statistics

    rng = np.random.default_rng(2)
    places = [placement(*hw, 16, "letterbox") for hw in [(8, 16), (16, 8), (16, 16), (10, 16), (16, 12)] * 2]
    valid = _valid_masks(places)
    maps = torch.from_numpy(rng.random((len(places), 1, 16, 16)).astype(np.float32))
    hot = maps.masked_fill(~valid, 1e4)
    m1, s1 = valid_normal_statistics(maps, valid, 0.25, 1e-8)
    m2, s2 = valid_normal_statistics(hot, valid, 0.25, 1e-8)
    enough = valid.sum(dim=0, keepdim=True) >= 3
    assert enough.any() and not enough.all()
    assert torch.allclose(m1[enough], m2[enough]) and torch.allclose(s1[enough], s2[enough])
    assert float(m2[enough].max()) < 1.0  # the fill's 1e4 never entered
    m0, s0 = normal_statistics(hot, 0.25, 1e-8)
    assert torch.equal(m2[~enough], m0[~enough])
    # squash (all valid): exactly the plain statistics
    m3, s3 = valid_normal_statistics(maps, torch.ones_like(valid), 0.25, 1e-8)
    assert torch.equal(m3, normal_statistics(maps, 0.25, 1e-8)[0])
