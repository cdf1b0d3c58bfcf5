"""Pixel AUROC of one defect type split by crop shape (research aid for issue 11; BENCHMARKS.md, "Magnetic tile,
tiled at a fixed scale"): each bundle's anomaly maps at each image's own size (stitched under tiling, resized under
squash), then pixel AUROC over that type's images and all normal test images, for all of them, for the crops whose
shorter side is under `--short` px (padded to one tile under the tiled recipe: 192 / 1.25 = 154 px), and for the
others, each against all normal images. Test labels are read: a diagnostic.

    python scripts/pixel_by_crop.py runs/mt-s1-iv runs/mtf320-s1 --data ../shared/data/magnetic_tile --type fray
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mae_ad import data as D  # noqa: E402
from mae_ad import metrics as M  # noqa: E402
from mae_ad.bundle import load_scorer  # noqa: E402
from mae_ad.tiling import TiledPlacements, TileSpec, input_policy, stitched_to_source  # noqa: E402


def maps_of(bundle: str, samples: list[D.Sample]) -> list[np.ndarray]:
    """The bundle's anomaly map of each sample at the image's own size."""
    sc, _, _ = load_scorer(bundle, require_calibration=True)
    policy = input_policy(sc.data, sc.img_size)
    out = []
    with torch.no_grad():
        for s in samples:
            h, w = D.image_shape(s.path)
            if isinstance(policy, TileSpec):
                xt, lay = D.read_image_tiles(s.path, policy)
                m, _ = sc(torch.from_numpy(xt))
                out.append(stitched_to_source(TiledPlacements([lay]).stitched(m)[0], lay))
            else:
                x, _ = D.load_stack_placed([s.path], sc.img_size, policy)
                m, _ = sc(torch.from_numpy(x))
                out.append(cv2.resize(m[0, 0].numpy(), (w, h), interpolation=cv2.INTER_LINEAR))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--type", required=True, help="defect type (a folder of test/)")
    ap.add_argument("--short", type=int, default=154, help="a crop is short when its shorter side is under this")
    a = ap.parse_args()
    torch.set_num_threads(2)
    test = [s for s in D.index_dataset(a.data, need_test=True).test if s.defect in ("good", a.type)]
    if not any(s.defect == a.type for s in test):
        sys.exit(f"error: {a.data}: no test images of type {a.type!r}")
    masks, short = [], []
    for s in test:
        h, w = D.image_shape(s.path)
        masks.append(D.read_mask(s.mask, expect_shape=(h, w)) > 0.5 if s.mask is not None
                     else np.zeros((h, w), bool))
        short.append(min(h, w) < a.short)
    lab = np.array([s.label for s in test])
    sh = np.array(short)
    groups = [("all", np.ones(len(test), bool)), (f"short side < {a.short} px", sh), ("the others", ~sh)]
    for b in a.bundles:
        maps = maps_of(b, test)
        parts = []
        for name, g in groups:
            ii = np.flatnonzero((lab == 0) | g)
            parts.append(f"{name} ({int((lab[ii] == 1).sum())}): "
                         f"{M.pixel_auroc([masks[i] for i in ii], [maps[i] for i in ii]):.4f}")
        print(f"{b}: {a.type} + all {int((lab == 0).sum())} normal images, pixel AUROC  " + "  ".join(parts),
              flush=True)


if __name__ == "__main__":
    main()
