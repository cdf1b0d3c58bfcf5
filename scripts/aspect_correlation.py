"""Does an image's score depend on its shape? Spearman correlation between the image score and the image's original
aspect ratio (width / height) and width, from `mae-ad evaluate` reports.

    .venv/bin/python scripts/aspect_correlation.py runs/eval-squash runs/eval-letterbox

Prints one markdown row per report: resize policy, n, Spearman(score, aspect) and Spearman(score, width) among
good test images, the same among all test images, and the report's image AUROC, pixel AUROC, AUPRO, F1.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from mae_ad.data import image_shape


def rho(score: np.ndarray, x: np.ndarray, sel: np.ndarray) -> float:
    return float(spearmanr(score[sel], x[sel]).statistic)


def fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path, help="evaluation report folders (metrics.json, scores.csv)")
    args = ap.parse_args()
    print("| report | resize | eval size | good n | ρ(score, w/h) good | ρ(score, width) good | ρ(score, w/h) all "
          "| image AUROC | pixel AUROC | AUPRO | F1 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rep in args.reports:
        m = json.loads((rep / "metrics.json").read_text())
        root = Path(m["data"])
        with open(rep / "scores.csv") as f:
            rows = list(csv.DictReader(f))
        shapes = [image_shape(root / r["path"]) for r in rows]
        aspect = np.array([w / h for h, w in shapes])
        width = np.array([w for _, w in shapes], float)
        score = np.array([float(r["score"]) for r in rows])
        good = np.array([r["label"] == "0" for r in rows])

        print(f"| `{rep}` | {m.get('resize', 'squash')} | {m.get('eval_size')} | {int(good.sum())} | "
              f"{rho(score, aspect, good):+.3f} | {rho(score, width, good):+.3f} | "
              f"{rho(score, aspect, np.ones_like(good)):+.3f} | "
              f"{fmt(m.get('image_auroc'))} | {fmt(m.get('pixel_auroc'))} | {fmt(m.get('aupro'))} | "
              f"{fmt(m.get('f1'))} |")


if __name__ == "__main__":
    main()
