"""Fixtures of the compile-stage tests: small calibrated bundles (random weights, non-zero LoRA adapters)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def synthetic_images(n: int, size: int, seed: int = 0, defects: bool = False) -> np.ndarray:
    """n synthetic product tiles (float32 [n, 3, size, size] RGB in [0, 1]); every other one defective if asked."""
    import cv2

    from mae_ad.synthetic import DEFECTS, add_defect, normal_tile

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = normal_tile(rng, max(size, 64))
        if defects and i % 2 == 1:
            img, _ = add_defect(img, DEFECTS[(i // 2) % len(DEFECTS)], rng)
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        out.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(out)


def make_bundle(out: Path, overrides: list[str], *, calibrated: bool = True, seed: int = 0,
                lora_scale: float = 0.05) -> Path:
    """Save a bundle of a randomly initialised model whose LoRA B matrices are non-zero (so merging matters)."""
    import torch

    from mae_ad.bundle import save_bundle
    from mae_ad.config import load_config
    from mae_ad.model import build_model
    from mae_ad.scoring import Scorer, calibrate

    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, lora_scale)
    model.eval()
    cal = None
    scorer = Scorer(model, cfg.scoring, cfg.data).eval()
    if calibrated:
        imgs = torch.from_numpy(synthetic_images(6, cfg.model.img_size, seed=100 + seed))
        cal = calibrate(scorer, imgs, target_fpr=0.2)
    return save_bundle(out, model, cfg, cal, scorer=scorer)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from tests.conftest import tiny_overrides

    return make_bundle(tmp_path_factory.mktemp("b") / "tiny", tiny_overrides())
