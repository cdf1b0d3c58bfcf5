"""Probe (issue 10): does an image-level Gaussian term add to a bundle's map score?

Each model input (image or tile) is summarised by the mean and standard deviation of every standardised backbone
channel over its cells; a Gaussian (mean, covariance with shrinkage) is fitted on the summaries of the bundle's
training images (its held-back images excluded) and the Mahalanobis distance is the input's global score; an image's
global score is the maximum over its tiles. Printed: AUROC of the global score alone and of its sums with the
bundle's evaluated image scores (each term z-scored on the held-back normal images only). Every figure uses this
split's test labels: a choice made from it is tuning.

    python scripts/global_study.py runs/mt-tiled-s1 --data ../shared/data/magnetic_tile --scores runs/mt-tiled-s1-eval/scores.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from mae_ad.bundle import load_bundle
from mae_ad.data import index_dataset, load_stack_placed, require_train_images
from mae_ad.metrics import auroc as image_auroc
from mae_ad.tiling import input_policy


def summaries(model, paths, size, resize) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (the summary vector of every model input, float64 [T, 2C]: each standardised channel's mean and std
    over the input's cells; the index in `paths` of each input's image, [T])."""
    vecs, owners = [], []
    for i, p in enumerate(paths):
        x, _ = load_stack_placed([p], size, resize)
        with torch.no_grad():
            f = model.backbone(torch.from_numpy(x)).double()  # [T, C, g, g]
        v = torch.cat([f.mean(dim=(2, 3)), f.std(dim=(2, 3))], dim=1)
        vecs.append(v.numpy())
        owners += [i] * v.shape[0]
    return np.concatenate(vecs), np.array(owners)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True)
    ap.add_argument("--scores", required=True)
    ap.add_argument("--shrink", type=float, default=0.01)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg, model, _ = load_bundle(a.bundle)
    cal = json.loads((Path(a.bundle) / "calibration.json").read_text())
    size = cfg.model.img_size
    resize = input_policy(cfg.data, size)
    idx = index_dataset(a.data, need_test=True)
    train = require_train_images(idx)
    hold = set(cal["holdout_images"])
    root = Path(a.data)
    fit = [p for p in train if p.relative_to(root).as_posix() not in hold]
    held = [p for p in train if p not in fit]
    print(f"fit on {len(fit)} images, held-back {len(held)}")
    rows = list(csv.DictReader(open(a.scores)))
    test = [root / r["path"] for r in rows]
    labels = np.array([int(r["label"]) for r in rows])
    mscore = np.array([float(r["score"]) for r in rows])

    vf, _ = summaries(model, fit, size, resize)
    vh, oh = summaries(model, held, size, resize)
    vt, ot = summaries(model, test, size, resize)
    mu = vf.mean(0)
    cov = np.cov(vf - mu, rowvar=False)
    d = cov.shape[0]
    cov = (1 - a.shrink) * cov + a.shrink * np.trace(cov) / d * np.eye(d)
    prec = np.linalg.inv(cov)

    def image_scores(v, o, n):
        z = v - mu
        m = np.sqrt(np.einsum("td,de,te->t", z, prec, z))
        return np.array([m[o == i].max() for i in range(n)])

    gh = image_scores(vh, oh, len(held))
    gt = image_scores(vt, ot, len(test))
    zg = (gt - gh.mean()) / gh.std()
    zm = (mscore - cal["normal_score_mean"]) / cal["normal_score_std"]
    print(f"global alone  image AUROC {image_auroc(labels, gt):.3f}")
    print(f"map alone     image AUROC {image_auroc(labels, mscore):.3f}")
    for w in (0.25, 0.5, 1.0):
        print(f"map + {w} x global: {image_auroc(labels, zm + w * zg):.3f}")
    print(f"max(map, global): {image_auroc(labels, np.maximum(zm, zg)):.3f}")
    defects = sorted({r['defect'] for r in rows} - {'good'})
    for dname in defects:
        sel = np.array([r["defect"] in (dname, "good") for r in rows])
        print(f"  {dname}: global {image_auroc(labels[sel], gt[sel]):.3f}  map {image_auroc(labels[sel], mscore[sel]):.3f}"
              f"  sum(1) {image_auroc(labels[sel], (zm + zg)[sel]):.3f}")


if __name__ == "__main__":
    main()
