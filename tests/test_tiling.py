"""Tiling (data.resize=tile, issue 11): the tile grid, cut-and-stitch geometry, config refusals, the training and
evaluation path on tiles, and calibration on stitched maps. Tiny models on generated images; nothing downloaded."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mae_ad.tiling import (
    TiledPlacements,
    TileSpec,
    cut_tiles,
    layout,
    reduce_stitched,
    stitch,
    stitched_to_source,
    tile_offsets,
)
from tests.conftest import tiny_overrides
from tests.test_feature_space import feature_overrides, lite_weights  # noqa: F401  (a module fixture)


@pytest.mark.parametrize("length,size,overlap", [(1024, 256, 32), (1920, 256, 32), (300, 64, 16), (64, 64, 8),
                                                 (65, 64, 0), (1000, 224, 100)])
def test_tile_offsets_cover_the_side_with_at_least_the_overlap(length, size, overlap) -> None:
    off = tile_offsets(length, size, overlap)
    assert off[0] == 0 and off[-1] == length - size  # first and last tile touch the edges
    assert off == sorted(set(off))
    gaps = np.diff(off)
    assert (size - gaps >= overlap).all()  # neighbours overlap by at least `overlap`
    # and by no more than needed: one tile fewer could not keep the overlap
    n = len(off)
    assert n == 1 or (n == 2 and length > size) or (length - size) / (n - 2) > size - overlap


def test_short_side_is_one_padded_tile_and_overlap_must_be_below_the_tile() -> None:
    assert tile_offsets(40, 64, 16) == [0]
    with pytest.raises(ValueError, match="overlap"):
        tile_offsets(100, 64, 64)
    with pytest.raises(ValueError, match="data.tile.overlap"):
        TileSpec(64, 64)


@pytest.mark.parametrize("h,w,scale", [(300, 200, 1.0), (150, 610, 0.5), (50, 90, 1.0), (100, 100, 1.5)])
def test_stitching_the_tiles_themselves_gives_back_the_working_image(h, w, scale) -> None:
    """Each tile's 'map' is its own pixels: the stitched map must be the scaled image exactly, whatever the
    overlaps, the blend weights and the padding (a misplaced tile or a wrong weight sum shows up here)."""
    import cv2

    rng = np.random.default_rng(0)
    img = rng.random((h, w)).astype(np.float32)
    spec = TileSpec(64, 16, scale)
    tiles, lay = cut_tiles(img, spec)
    assert tiles.shape == (lay.n_tiles, 64, 64) and (lay.work_h, lay.work_w) == (round(h * scale), round(w * scale))
    work = img if scale == 1.0 else cv2.resize(img, (lay.work_w, lay.work_h),
                                               interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    np.testing.assert_allclose(stitch(tiles, lay), work, atol=1e-5)
    assert stitched_to_source(stitch(tiles, lay), lay).shape == (h, w)
    # a padded tile's valid region is the image part only
    if h * scale < 64:
        assert lay.tile_placement(0).height == lay.work_h < 64


def test_blend_prefers_the_tile_where_a_pixel_lies_further_from_the_edge() -> None:
    spec = TileSpec(64, 32)
    lay = layout(64, 96, spec)  # two tiles, columns 0-63 and 32-95
    assert lay.offsets == ((0, 0), (0, 32))
    maps = np.stack([np.zeros((64, 64)), np.ones((64, 64))]).astype(np.float32)
    row = stitch(maps, lay)[32]
    assert row[0] == 0 and row[-1] == 1
    assert (np.diff(row[32:64]) > 0).all()  # a smooth hand-over inside the overlap, no seam
    assert row[40] < 0.5 < row[56]


def test_tiled_placements_group_tiles_into_images_and_score_stitched_maps() -> None:
    spec = TileSpec(32, 8)
    lays = [layout(32, 32, spec), layout(40, 70, spec), layout(20, 20, spec)]
    tp = TiledPlacements(lays)
    assert len(tp) == sum(la.n_tiles for la in lays) and tp.starts == [0, 1, 1 + lays[1].n_tiles]
    assert list(tp.image_of_tile()) == [0] + [1] * lays[1].n_tiles + [2]
    sub = tp[1:len(tp)]  # on image boundaries: the images themselves
    assert isinstance(sub, TiledPlacements) and sub.n_images == 2
    maps = np.zeros((len(tp), 1, 32, 32), np.float32)
    maps[1, 0, 5, 6] = 3.0  # a peak in the second image's first tile
    scores = tp.scores(maps)
    assert list(scores) == [0.0, 3.0, 0.0]
    st = tp.stitched(maps)
    assert [a.shape for a in st] == [(32, 32), (40, 70), (20, 20)]
    assert reduce_stitched(st[1], "topk_mean", 0.5) < 3.0


def test_config_refuses_a_letterboxed_tile_and_an_overlap_as_large_as_the_tile(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {img_size: 64}\ndata: {resize: letterbox, tile: {scale: 2}}\n")
    r = subprocess.run([sys.executable, "-m", "app.cli", "validate-config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "data.tile is set but data.resize is 'letterbox'" in r.stderr
    assert "Traceback" not in r.stderr
    cfg.write_text("model: {img_size: 64}\ndata: {resize: tile, tile: {overlap: 33}}\n")
    r = subprocess.run([sys.executable, "-m", "app.cli", "validate-config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "data.tile.overlap: 33 must be at most half the tile" in r.stderr
    cfg.write_text("model: {img_size: 64}\ndata: {resize: tile, tile: {scale: 0}}\n")
    r = subprocess.run([sys.executable, "-m", "app.cli", "validate-config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2 and "scale" in r.stderr


@pytest.fixture(scope="module")
def tiled_data(tmp_path_factory):
    """Synthetic parts of 100 x 150 px: six 64-px tiles each with overlap 16."""
    from mae_ad.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("tiled") / "data", n_train=12, n_test_good=3, n_test_defect=2,
                         size=100, seed=2)


@pytest.fixture(scope="module")
def tiled_bundle(tmp_path_factory, tiled_data):
    out = tmp_path_factory.mktemp("tb") / "bundle"
    cmd = [sys.executable, "-m", "app.cli", "train", "--data", str(tiled_data), "--out", str(out)]
    for o in [*tiny_overrides(64, 8), "scoring.normalize=position", "train.epochs=2", "train.batch_size=8",
              "train.warmup_epochs=1", "train.tensorboard=false", "data.resize=tile", "data.tile.overlap=16",
              "data.tile.scale=0.9", "calibration.min_holdout=4"]:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_tiled_bundle_records_its_tiling_and_calibrates_on_stitched_images(tiled_bundle) -> None:
    meta = json.loads((tiled_bundle / "meta.json").read_text())
    assert meta["input"]["resize"] == "tile" and meta["input"]["tile_scale"] == 0.9
    assert meta["input"]["tile_overlap"] == 16
    cal = json.loads((tiled_bundle / "calibration.json").read_text())
    # 4 held-back images of 90 x 90 working px -> 2 x 2 tiles each; the statistics take whole images (2 + 2)
    assert cal["n_images"] == 4 and cal["n_tiles"] == 16
    assert cal["n_stats_images"] == 2 and cal["n_threshold_images"] == 2


def test_tiled_evaluation_scores_stitched_maps_at_each_images_own_size(tiled_bundle, tiled_data, tmp_path) -> None:
    """evaluate's image scores are the reduce of each image's stitched tile maps, the same through ONNX Runtime and
    torch; recomputed here from the scorer on the tiles."""
    import torch

    from app.scoring_engines import open_scoring_engine
    from mae_ad.bundle import load_scorer
    from mae_ad.data import index_dataset, load_stack_placed
    from mae_ad.evaluate import run_evaluation
    from mae_ad.tiling import input_policy

    m_ort = run_evaluation(tiled_bundle, tiled_data, tmp_path / "ev", baseline=True,
                           open_engine=lambda: open_scoring_engine(tiled_bundle, "onnxruntime"))
    m_pt = run_evaluation(tiled_bundle, tiled_data, tmp_path / "ev2", baseline=False, precision="fp32")
    assert m_ort["tile"]["n_tiles"] == 9 * 4 and m_ort["tile"]["tiles_per_image_max"] == 4
    assert m_ort["engine"]["name"] == "onnxruntime" and m_pt["engine"]["name"] == "torch"
    assert "on the same tiles, stitched" in m_ort["baseline"]["method"]

    scorer, _, _ = load_scorer(tiled_bundle, require_calibration=True)
    index = index_dataset(tiled_data, need_test=True)
    tiles, tp = load_stack_placed([s.path for s in index.test], 64, input_policy(scorer.data, 64))
    with torch.no_grad():
        maps, _ = scorer(torch.from_numpy(tiles))
    want = tp.scores(maps)
    rows = (tmp_path / "ev" / "scores.csv").read_text().splitlines()[1:]
    got = np.array([float(r.split(",")[4]) for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    rows = (tmp_path / "ev2" / "scores.csv").read_text().splitlines()[1:]
    np.testing.assert_allclose(np.array([float(r.split(",")[4]) for r in rows]), want, rtol=1e-5, atol=1e-6)


def test_tiled_predict_writes_maps_at_the_working_size(tiled_bundle, tiled_data, tmp_path) -> None:
    import cv2

    from mae_ad.evaluate import run_predict

    img = next((tiled_data / "test" / "good").iterdir())
    run_predict(tiled_bundle, [img], tmp_path / "pred")
    heat = cv2.imread(str(tmp_path / "pred" / f"{img.stem}_map.png"), cv2.IMREAD_GRAYSCALE)
    assert heat.shape == (90, 90)  # 100 px at tile scale 0.9
    assert cv2.imread(str(tmp_path / "pred" / f"{img.stem}_overlay.jpg")).shape[:2] == (100, 100)


def test_tiled_int8_calibrates_and_counts_agreement_on_tiles(tiled_bundle, tiled_data, tmp_path) -> None:
    """int8 calibration and the decision-agreement gate read a tiled model's images as its tiles (a squashed image
    would be another input than the graph ever scores)."""
    from trt.export import export_onnx
    from trt.quantize import quantize_onnx

    onnx = export_onnx(tiled_bundle, tmp_path / "m.onnx", exporter="torchscript")
    assert json.loads((tmp_path / "m.onnx.meta.json").read_text())["input"]["tile_overlap"] == 16
    quantize_onnx(onnx, tiled_data / "train" / "good", tmp_path / "m.int8.onnx", min_agreement=0.0)
    q = json.loads((tmp_path / "m.int8.onnx.meta.json").read_text())["quantization"]
    # the 12 normal training images of 90 x 90 working px: 4 tiles each
    assert q["agreement"]["calibration"]["images"] == 12 * 4


def _recalibrated(bundle, data, out) -> tuple[dict, dict]:
    """`mae-ad calibrate BUNDLE --data DATA --out OUT` with no change: (the bundle's calibration.json, the new one)."""
    r = subprocess.run([sys.executable, "-m", "app.cli", "calibrate", str(bundle), "--data", str(data),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return (json.loads((bundle / "calibration.json").read_text()),
            json.loads((out / "calibration.json").read_text()))


def test_recalibrating_a_tiled_bundle_without_changes_reproduces_its_threshold(tiled_bundle, tiled_data,
                                                                                tmp_path) -> None:
    """`mae-ad calibrate` with no --set (it used to crash on the missing overrides) re-scores the held-back images
    tile by tile and finds the threshold training found."""
    old, new = _recalibrated(tiled_bundle, tiled_data, tmp_path / "recal")
    assert new["n_tiles"] == old["n_tiles"] == 16
    assert new["threshold"] == pytest.approx(old["threshold"], rel=1e-5)


def test_a_tiled_feature_bundle_recalibrates_to_the_same_knn_memory_and_fusion(
        tiled_data, lite_weights, tmp_path) -> None:  # noqa: F811
    """Training and `mae-ad calibrate` must build the kNN memory from the same tiles. At a working scale other than 1
    the resized tiles are not whole grey levels, so a memory built from a uint8 training cache would hold other
    cells than the one calibration (and scoring) computes from the decoded image, and the coreset, the kNN
    statistics, the fusion divisors and the threshold would all move on a recalibration without changes."""
    import torch
    from safetensors.torch import load_file

    bundle = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "app.cli", "train", "--data", str(tiled_data), "--out", str(bundle)]
    for o in [*feature_overrides(lite_weights), "data.resize=tile", "data.tile.overlap=16", "data.tile.scale=0.9",
              "scoring.fusion=inverse_variance", "calibration.min_holdout=4", "train.epochs=1"]:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "recal"
    old, new = _recalibrated(bundle, tiled_data, out)
    assert old["fusion"] == new["fusion"] == "inverse_variance"
    for key in ("threshold", "fusion_scale_reconstruction", "fusion_scale_knn"):
        assert new[key] == pytest.approx(old[key], rel=1e-5), key
    a, b = load_file(str(bundle / "calibration.safetensors")), load_file(str(out / "calibration.safetensors"))
    assert torch.allclose(a["knn_bank"], b["knn_bank"], atol=1e-5)
