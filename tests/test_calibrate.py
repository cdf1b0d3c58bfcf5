"""Where position statistics come from (calibration.stats_source) and `mae-ad calibrate` on a trained bundle."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mae_ad.bundle import save_bundle
from mae_ad.calibrate import recalibrate
from mae_ad.config import load_config
from mae_ad.contract import BUNDLE_CALIB_TENSORS, UserError
from mae_ad.data import index_dataset, load_stack, stats_training_paths
from mae_ad.model import build_model
from mae_ad.scoring import Scorer, calibrate, normal_statistics, score_batches

from .conftest import tiny_overrides

POSITION = ["scoring.normalize=position", "scoring.sigma=1"]


def test_train_statistics_use_every_held_back_image_for_the_threshold():
    cfg = load_config(None, tiny_overrides() + POSITION)
    torch.manual_seed(0)
    scorer = Scorer(build_model(cfg.model).eval(), cfg.scoring, cfg.data).eval()
    held = torch.rand(6, 3, 32, 32)
    train = torch.rand(10, 3, 32, 32) * 0.5 + 0.25
    cal = calibrate(scorer, held, target_fpr=0.2, stats_images=train)
    assert (cal["n_stats_images"], cal["n_threshold_images"], cal["stats_source"]) == (10, 6, "train")
    raw, _ = score_batches(Scorer.from_config(scorer.model, load_config(None, tiny_overrides() + ["scoring.sigma=1"])), train,
                           raw=True)
    mean, std = normal_statistics(raw, floor_share=0.25, eps=1e-8)
    assert torch.allclose(scorer.map_mean, mean.view_as(scorer.map_mean), atol=1e-6)
    assert torch.allclose(scorer.map_std, std.view_as(scorer.map_std), atol=1e-6)
    _, scores = score_batches(scorer, held)  # the threshold is a quantile of all six held-back scores
    assert cal["threshold"] == pytest.approx(float(scores.double().quantile(0.8, interpolation="higher")), rel=1e-5)
    # default: half of the held-back images for the statistics, the other half for the threshold
    cal = calibrate(scorer, held, target_fpr=0.2)
    assert (cal["n_stats_images"], cal["n_threshold_images"], cal["stats_source"]) == (3, 3, "holdout")


def test_training_paths_are_capped_evenly_and_deterministically(tmp_path):
    paths = [tmp_path / f"{i:04d}.png" for i in range(1000)]
    got = stats_training_paths(list(reversed(paths)), limit=100)
    assert len(got) == 100 and got[0] == paths[0] and got[-1] == paths[-1] and got == sorted(set(got))
    assert stats_training_paths(paths[:7], limit=100) == paths[:7]


def test_recalibrate_with_training_statistics(synthetic_data, tmp_path):
    """The bundle's training images are the dataset's normal images minus its held-back ones."""
    cfg = load_config(None, tiny_overrides(img=64, patch=8) + POSITION)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    scorer = Scorer(model, cfg.scoring, cfg.data).eval()
    index = index_dataset(synthetic_data)
    holdout, train = index.train[:4], index.train[4:]
    cal = calibrate(scorer, torch.from_numpy(load_stack(holdout, 64)), target_fpr=0.25)
    cal["holdout_images"] = [str(p.relative_to(index.root)) for p in holdout]
    save_bundle(tmp_path / "b", model, cfg, cal, scorer)

    out = recalibrate(tmp_path / "b", synthetic_data, tmp_path / "b2", ["calibration.stats_source=train"])
    new = json.loads((out / "calibration.json").read_text())
    assert (new["n_stats_images"], new["n_threshold_images"], new["stats_source"]) == (len(train), 4, "train")
    raw, _ = score_batches(Scorer.from_config(model, load_config(None, tiny_overrides(img=64, patch=8) + ["scoring.sigma=1"])),
                           torch.from_numpy(load_stack(sorted(train), 64)), raw=True)
    mean, _ = normal_statistics(raw, floor_share=0.25, eps=1e-8)
    saved = load_file(str(out / BUNDLE_CALIB_TENSORS))
    assert torch.allclose(saved["map_mean"], mean.view_as(saved["map_mean"]), atol=1e-6)
    old = load_file(str(tmp_path / "b" / BUNDLE_CALIB_TENSORS))
    assert not torch.allclose(saved["map_mean"], old["map_mean"])
    # other statistics score images differently: a new model_id (published with every score), the same weights
    m_old, m_new = (json.loads((d / "meta.json").read_text()) for d in (tmp_path / "b", out))
    assert m_new["model_id"] != m_old["model_id"] and m_new["weights_sha256"] == m_old["weights_sha256"]
    assert new["recalibrated_from"] == m_old["model_id"] and m_new["model_id"].startswith(cfg.name + "-")
    save_bundle(tmp_path / "b-again", model, cfg, cal, scorer)  # the same weights and calibration: the same id
    assert json.loads((tmp_path / "b-again" / "meta.json").read_text())["model_id"] == m_old["model_id"]

    with pytest.raises(UserError, match="calibration.holdout_fraction.*stats_source"):
        recalibrate(tmp_path / "b", synthetic_data, tmp_path / "b3", ["calibration.holdout_fraction=0.5"])
    assert not (tmp_path / "b3").exists()
