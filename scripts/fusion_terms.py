"""The two z-maps of a feature-space bundle with the kNN term, scored apart (research aid for issue 10; BENCHMARKS.md,
"Feature space at 320 px"): each term's image-score spread on the bundle's held-back normal images (what
scoring.fusion=balanced divides by), then test-split metrics at the model's input size for the reconstruction term
alone, the kNN term alone, their plain sum and their balanced sum. Test labels are read: a diagnostic, not a
calibration.

    python scripts/fusion_terms.py runs/mtf320 --data ../shared/data/magnetic_tile
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mae_ad import data as D, metrics as M  # noqa: E402
from mae_ad.bundle import load_scorer  # noqa: E402
from mae_ad.evaluate import _load_test_set  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    sc, cal, _ = load_scorer(a.bundle, require_calibration=True)
    if sc.knn_weight <= 0 or not sc.normalize:
        sys.exit(f"{a.bundle}: needs scoring.knn_weight > 0 and scoring.normalize=position")
    size = sc.img_size

    def terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, k = [], []
        with torch.no_grad():
            for i in range(0, len(x), 8):
                rr, kk = sc.fusion_terms(x[i:i + 8])
                r.append(rr)
                k.append(kk)
        return torch.cat(r), sc.knn_weight * torch.cat(k)

    held = torch.from_numpy(D.load_stack([Path(a.data) / h for h in cal["holdout_images"]], size))
    rh, kh = terms(held)
    s_r, s_k = (float(t.flatten(1).amax(1).std()) for t in (rh, kh))
    print(f"held-back normals ({len(held)}): image-score std reconstruction {s_r:.2f}, kNN {s_k:.2f}")
    idx = D.index_dataset(a.data, need_test=True)
    x, masks = _load_test_set(idx.test, size)[:2]
    lab = np.array([s.label for s in idx.test])
    types = [s.defect for s in idx.test]
    r, k = terms(torch.from_numpy(x))
    for tag, m in (("reconstruction alone", r), ("kNN alone", k), ("plain sum", r + k),
                   ("balanced", r / s_r + k / s_k)):
        s = m.flatten(1).amax(1).numpy()
        mp = m.numpy()[:, 0]
        per = {t: round(M.auroc(lab[sel], s[sel]), 3) for t in sorted(set(types) - {"good"})
               for sel in [np.array([y in ("good", t) for y in types])]}
        print(f"{tag:22s} image AUROC {M.auroc(lab, s):.3f}  pixel AUROC {M.pixel_auroc(masks, mp):.3f}  "
              f"AUPRO {M.aupro(masks, mp):.3f}  {per}", flush=True)


if __name__ == "__main__":
    main()
