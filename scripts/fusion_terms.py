"""The two z-maps of a feature-space bundle with the kNN term, scored apart (research aid for issue 10; BENCHMARKS.md,
"What each term contributes, and the fusion"): each term's image-score spread σ on the bundle's held-back normal
images, then test-split metrics for the reconstruction term alone, the kNN term alone, and three fusions: the plain
sum, balanced (each term / σ) and inverse variance (each term / σ²), plus, with --weights, balanced sums with the
reconstruction term scaled. Squashed bundles: at the model's input size; tiled bundles: stitched maps, pixel metrics
at each image's own size. Per type: image AUROC, then pixel AUROC (that type's images and the normal ones).
Test labels are read: a diagnostic, not a calibration.

    python scripts/fusion_terms.py runs/mt --data ../shared/data/magnetic_tile --weights 0.25
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mae_ad import data as D  # noqa: E402
from mae_ad import metrics as M  # noqa: E402
from mae_ad.bundle import load_scorer  # noqa: E402
from mae_ad.evaluate import _load_test_set  # noqa: E402
from mae_ad.tiling import TiledPlacements, TileSpec, input_policy, stitched_to_source  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description="Score a feature-space bundle's reconstruction and kNN z-maps apart and "
                                 "in several fusions on the test split (test labels read: a diagnostic).")
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", type=float, nargs="*", default=[],
                    help="extra rows: the balanced sum with the reconstruction term scaled by each weight")
    ap.add_argument("--knn-only", action="store_true",
                    help="score the kNN term alone (no MAE pass: far faster on large token grids)")
    a = ap.parse_args()
    if a.knn_only and a.weights:
        sys.exit("error: --weights scales the reconstruction term, which --knn-only does not score")
    torch.set_num_threads(2)
    sc, cal, _ = load_scorer(a.bundle, require_calibration=True)
    if sc.knn_weight <= 0 or not sc.normalize:
        sys.exit(f"{a.bundle}: needs scoring.knn_weight > 0 and scoring.normalize=position")
    size = sc.img_size
    policy = input_policy(sc.data, size)  # the bundle's own resize policy (a TileSpec when it tiles)
    spec = policy if isinstance(policy, TileSpec) else None

    def terms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, k = [], []
        with torch.no_grad():
            for i in range(0, len(x), 8):
                if a.knn_only:  # the reconstruction term left at zero
                    kk = (sc.knn_raw_map(sc.normalise_input(x[i:i + 8])) - sc.knn_mean) / sc.knn_std
                    rr = torch.zeros_like(kk)
                else:
                    rr, kk = sc.fusion_terms(x[i:i + 8])
                r.append(rr)
                k.append(kk)
        return torch.cat(r), sc.knn_weight * torch.cat(k)

    def image_maps(m: torch.Tensor, places) -> list[np.ndarray]:
        """[N or T, 1, S, S] -> one map per image (stitched for a tiled bundle)."""
        if isinstance(places, TiledPlacements):
            return places.stitched(m)
        return list(m.numpy()[:, 0])

    held_x, held_pl = D.load_stack_placed([Path(a.data) / h for h in cal["holdout_images"]], size, policy)
    rh, kh = terms(torch.from_numpy(held_x))
    s_r, s_k = (float(np.std([x.max() for x in image_maps(t, held_pl)], ddof=1)) for t in (rh, kh))
    rec_std = "not scored (--knn-only)" if a.knn_only else f"{s_r:.2f}"
    print(f"held-back normals ({len(cal['holdout_images'])}): image-score std reconstruction {rec_std}, kNN {s_k:.2f}")
    idx = D.index_dataset(a.data, need_test=True)
    lab = np.array([s.label for s in idx.test])
    types = [s.defect for s in idx.test]
    if spec is None:
        x, masks = _load_test_set(idx.test, size, policy)[:2]
        r, k = terms(torch.from_numpy(x))
        rm, km, mk = image_maps(r, None), image_maps(k, None), list(masks)
    else:  # per image, stitched; pixel metrics at each image's own size
        rm, km, mk = [], [], []
        for smp in idx.test:
            xt, lay = D.read_image_tiles(smp.path, spec)
            pl = TiledPlacements([lay])
            r, k = terms(torch.from_numpy(xt))
            rm.append(pl.stitched(r)[0])
            km.append(pl.stitched(k)[0])
            m = np.zeros((lay.src_h, lay.src_w), bool)
            if smp.mask is not None:
                m = D.read_mask(smp.mask, expect_shape=(lay.src_h, lay.src_w)) > 0.5
            mk.append((m, lay))
    rows = [("kNN alone", 0, 1)] if a.knn_only else [
        ("reconstruction alone", 1, 0), ("kNN alone", 0, 1), ("plain sum", 1, 1), ("balanced", 1 / s_r, 1 / s_k),
        ("inverse variance", 1 / s_r**2, 1 / s_k**2),
        *((f"balanced, reconstruction x{w}", w / s_r, 1 / s_k) for w in a.weights)]
    for tag, wr, wk in rows:
        maps = [wr * r_ + wk * k_ for r_, k_ in zip(rm, km, strict=True)]
        s = np.array([m.max() for m in maps])
        per = {t: round(M.auroc(lab[sel], s[sel]), 3) for t in sorted(set(types) - {"good"})
               for sel in [np.array([y in ("good", t) for y in types])]}
        if spec is None:
            ms, up = list(mk), maps
        else:
            ms = [m for m, _ in mk]
            up = [stitched_to_source(mp, lay) for mp, (_, lay) in zip(maps, mk, strict=True)]
        pix = (M.pixel_auroc(ms, up), M.aupro(ms, up))
        per_pix = {t: round(M.pixel_auroc([ms[i] for i in np.flatnonzero(sel)], [up[i] for i in np.flatnonzero(sel)]),
                            3)
                   for t in sorted(set(types) - {"good"}) for sel in [np.array([y in ("good", t) for y in types])]}
        print(f"{tag:22s} image AUROC {M.auroc(lab, s):.3f}  pixel AUROC {pix[0]:.3f}  "
              f"AUPRO {pix[1]:.3f}  {per}  pixel AUROC per type {per_pix}", flush=True)


if __name__ == "__main__":
    main()
