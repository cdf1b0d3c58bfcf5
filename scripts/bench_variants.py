"""Rough cost per variant (BENCHMARKS.md, "Variant costs"): tiny-p8 at 128 px, K=4, CPU, 1 thread. Run from the repo root."""

from __future__ import annotations

import json
import time

import torch

from mae_ad.config import load_config
from mae_ad.model import build_model, count_params
from mae_ad.scoring import Scorer

BASE = ["model.img_size=128", "scoring.sigma=4"]
VARIANTS = {
    "baseline (tiny-p8)": [], "tiny-p8-d2": ["model.preset=tiny-p8-d2"], "tiny-p8-d1": ["model.preset=tiny-p8-d1"],
    "pos_embed=hybrid": ["model.pos_embed=hybrid"], "norm=dyt": ["model.norm=dyt"],
    "multiscale=[3,7,11] mean": ["model.multiscale=[3,7,11]"],
    "multiscale=[3,7,11] linear": ["model.multiscale=[3,7,11]", "model.multiscale_fusion=linear"],
    "num_registers=4": ["model.num_registers=4"], "ssim_weight=0.5": ["scoring.ssim_weight=0.5"],
    "gmm_components=8 + gmm_weight=0.1": ["model.gmm_components=8", "scoring.gmm_weight=0.1"],
    "ssim_loss_weight=0.5": ["model.ssim_loss_weight=0.5"], "mask_mode=block": ["train.mask_mode=block"],
}


def mean_ms(fn, seconds: float) -> float:
    fn()
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t) / n * 1000


def step(model, x, mode):
    model.zero_grad()
    model(x, 0.75, mask_mode=mode)[0].backward()


def main() -> None:
    torch.set_num_threads(1)
    x1, xb = torch.rand(1, 3, 128, 128), torch.rand(8, 3, 128, 128)
    rows = []
    for name, sets in VARIANTS.items():
        cfg = load_config(None, BASE + sets)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        scorer = Scorer(model, cfg.scoring, cfg.data).eval()
        with torch.no_grad():
            score_ms = mean_ms(lambda: scorer(x1), 3)  # noqa: B023
        model.train()
        step_ms = mean_ms(lambda: step(model, xb, cfg.train.mask_mode), 4)  # noqa: B023
        rows.append({"variant": name, "params": count_params(model), "score_ms": round(score_ms, 1),
                     "train_step_ms_b8": round(step_ms, 1)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
