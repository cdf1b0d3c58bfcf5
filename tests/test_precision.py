"""Scoring precision by hardware: detection, the `auto`/forced settings, and the decision check that falls back
to fp32 (bf16 is computed for real here, emulated where the CPU lacks it: only decisions are asserted)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from mae_ad.contract import UserError
from mae_ad.precision import resolve_precision, score_batches, select_precision

NATIVE = ["avx2", "avx512f", "avx512_bf16"]
AVX2 = ["avx2", "fma"]


def test_auto_follows_native_bf16_and_env_overrides(monkeypatch) -> None:
    monkeypatch.delenv("MAE_AD_PRECISION", raising=False)
    assert resolve_precision("auto", NATIVE) == "bf16"
    assert resolve_precision("auto", ["amx_tile", "amx_bf16"]) == "bf16"
    assert resolve_precision(None, AVX2) == "fp32"
    assert resolve_precision("fp32", NATIVE) == "fp32"
    monkeypatch.setenv("MAE_AD_PRECISION", "fp32")
    assert resolve_precision(None, NATIVE) == "fp32"
    with pytest.raises(UserError, match="precision 'fp16'"):
        resolve_precision("fp16", NATIVE)


def test_forced_bf16_without_native_support_is_logged(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="mae_ad.precision"):
        assert resolve_precision("bf16", AVX2) == "bf16"
    assert "without native bf16" in caplog.text


@pytest.fixture(scope="module")
def scorer_and_images():
    from mae_ad.config import load_config
    from mae_ad.model import build_model
    from mae_ad.scoring import Scorer
    from tests.conftest import tiny_overrides
    from tests.trt.conftest import synthetic_images

    cfg = load_config(None, tiny_overrides())
    torch.manual_seed(0)
    scorer = Scorer(build_model(cfg.model), cfg.scoring, cfg.data).eval()
    return scorer, synthetic_images(12, cfg.model.img_size, seed=5)


def test_bf16_is_used_when_its_decisions_agree(scorer_and_images) -> None:
    scorer, images = scorer_and_images
    ref = score_batches(scorer, images, "fp32")
    thr = float(ref.max() + 10 * abs(ref.max()))  # far from every score: bf16 rounding cannot flip a decision
    c = select_precision(scorer, images, thr, "auto", flags=NATIVE)
    assert (c.precision, c.images, c.agree) == ("bf16", 12, 12)
    assert c.agreement == 1.0
    assert select_precision(scorer, images, thr, "auto", flags=AVX2).precision == "fp32"


def test_bf16_falls_back_to_fp32_when_decisions_disagree(scorer_and_images, caplog) -> None:
    scorer, images = scorer_and_images
    ref, low = score_batches(scorer, images, "fp32"), score_batches(scorer, images, "bf16")
    assert not np.array_equal(ref, low)  # bf16 really changes the scores
    up = np.flatnonzero(low > ref)
    assert len(up) > 0
    thr = float(ref[up[0]])  # fp32 says normal (not above), bf16 says anomalous for this image
    expect = int(((ref > thr) == (low > thr)).sum())
    with caplog.at_level(logging.WARNING, logger="mae_ad.precision"):
        c = select_precision(scorer, images, thr, "bf16", flags=NATIVE)
    assert c.precision == "fp32" and c.wanted == "bf16" and c.agree == expect < 12
    assert "bf16 refused" in caplog.text
    caplog.clear()  # under auto the refusal is an ordinary choice: logged, not warned
    with caplog.at_level(logging.INFO, logger="mae_ad.precision"):
        assert select_precision(scorer, images, thr, "auto", flags=NATIVE).precision == "fp32"
    assert [r.levelno for r in caplog.records if "bf16 refused" in r.getMessage()] == [logging.INFO]
    # the same disagreement passes a gate set below it
    assert select_precision(scorer, images, thr, "bf16", min_agreement=expect / 12, flags=NATIVE).precision == "bf16"


def test_prepare_precision_checks_on_the_bundles_held_back_images(scorer_and_images, synthetic_data) -> None:
    import copy

    from mae_ad.data import list_images
    from mae_ad.precision import prepare_precision

    scorer, _ = scorer_and_images
    scorer = copy.deepcopy(scorer)
    held = [str(p.relative_to(synthetic_data)) for p in list_images(synthetic_data / "train" / "good")[:5]]
    meta = {"training": {"data": str(synthetic_data)}}
    x = torch.from_numpy(np.stack([np.full((3, 32, 32), 0.5, np.float32)]))
    with torch.inference_mode():
        _, s32 = scorer(x)
    c = prepare_precision(scorer, meta, {"threshold": 1e9, "holdout_images": held}, "bf16", flags=NATIVE)
    assert (c.precision, c.images, c.agree) == ("bf16", 5, 5)
    with torch.inference_mode():
        amap, s16 = scorer(x)
    assert amap.dtype == torch.float32 and s16.dtype == torch.float32 and not torch.equal(s16, s32)
    # held-back images that cannot be found: nothing to check bf16 on, so fp32 (and scores are fp32's again)
    c = prepare_precision(scorer, {"training": {"data": "/nonexistent"}}, {"threshold": 1e9, "holdout_images": held},
                          "bf16", flags=NATIVE)
    assert c.precision == "fp32" and c.reason == "no images to check bf16"
    with torch.inference_mode():
        assert torch.equal(scorer(x)[1], s32)
