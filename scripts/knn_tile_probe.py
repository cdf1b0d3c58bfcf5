"""Probe of a tiled bundle's kNN term (issue 10 research aid; BENCHMARKS.md, "Levers measured and not adopted"): the
nearest-normal-cell distance map under other tile sizes, working scales, test-time flips, normalisations and a
density-normalised distance, scored on the test split. Test labels are read: a diagnostic, not a calibration, and a
choice made from it is tuning on this split.

The kNN memory is rebuilt from the bundle's own training images (its held-back images excluded) at each tile size and
scale, with the bundle's coreset size; the per-pixel statistics come from the same training images, each scored
without its own cells (leave-one-image-out), as `mae-ad calibrate` fits them. Maps are stitched and compared with the
masks at each image's own size, as `mae-ad evaluate` does.

    python scripts/knn_tile_probe.py runs/mt --data ../shared/data/magnetic_tile --tiles 128,160,192,224,320
    python scripts/knn_tile_probe.py runs/mt --data ../shared/data/magnetic_tile --scales 1.0,1.25,1.6 --flips 0,1,2
    python scripts/knn_tile_probe.py runs/mt --data ../shared/data/magnetic_tile --norms pos,raw,mean,border --density

Rows (image AUROC, pixel AUROC, AUPRO, per-type image AUROC, per-type pixel AUROC):
- `pos`: per-tile-pixel mean and std of the training maps (the product's rule; std floored at 0.25 x its median);
- `hybrid`: `border` within 32 working px of the image's border, `pos` elsewhere;
- `role`: per-tile-pixel statistics kept apart by the tile's edge role (which of the image's borders it touches:
  only / first / middle / last tile along each axis, 16 roles; a role pixel with under 10 training tiles takes the
  pooled statistics);
- `raw`: no normalisation; `mean`: per-pixel mean, one global std;
- `border`: statistics of the stitched map binned by distance to the image's nearest top/bottom and left/right
  border (8-px bins up to 64 px; sides kept apart), instead of the tile pixel;
- `--density`: the distance divided by the matched memory cell's own distance to its nearest cell of another
  training image (`d/r`), by its square root, and minus it (a local-density unit, as in the local outlier factor:
  Breunig et al., SIGMOD 2000), each under `pos`;
- `--scales` with several values, and `--flips` 1 (horizontal) or 2 (horizontal, vertical, both): the z-maps of each
  scale, or the raw maps of each flipped view (flipped back), averaged.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mae_ad import data as D  # noqa: E402
from mae_ad import metrics as M  # noqa: E402
from mae_ad.bundle import load_bundle, load_scorer  # noqa: E402
from mae_ad.calibrate import _bundle_training_paths, fit_knn_memory  # noqa: E402
from mae_ad.scoring import gaussian_blur  # noqa: E402
from mae_ad.tiling import TileLayout, TileSpec, cut_tiles, input_policy, stitch, stitched_to_source  # noqa: E402

FLIPS = {0: [[]], 1: [[], [3]], 2: [[], [3], [2], [2, 3]]}


MARGIN = [0]  # --margin: reflection context around each image, in working pixels (set in main)
FIT = [False]  # --fit-short: images with a side shorter than one tile are scaled up to fill it (no padding)
CANON = [False]  # --canon: tiles that touch the image's bottom (right) border are flipped vertically (horizontally)


def canon_axes(lay: TileLayout) -> list[list[int]]:
    """Per tile, the axes ([-2] rows, [-1] columns) to flip so the image borders it touches lie at its top/left."""
    roles = tile_roles(lay)
    return [[ax for ax, last in ((-2, r // 4 == 3), (-1, r % 4 == 3)) if last] if CANON[0] else [] for r in roles]


def uncanon(maps: np.ndarray, lay: TileLayout) -> np.ndarray:
    """Tile maps [T, S, S] in the canonical frame -> the image's frame."""
    return np.stack([np.flip(m, ax) if ax else m for m, ax in zip(maps, canon_axes(lay), strict=True)])


def read_tiles(path: Path, spec: TileSpec) -> tuple[np.ndarray, TileLayout]:
    """`D.read_image_tiles`, with the image first padded by reflection by MARGIN working pixels on every side."""
    if FIT[0]:  # a side shorter than the tile: the whole image scaled up until it fills the tile
        h, w = D.image_shape(path)
        spec = TileSpec(spec.size, spec.overlap, max(spec.scale, spec.size / min(h, w) + 1e-6))
    if not MARGIN[0]:
        xt, lay = D.read_image_tiles(path, spec)
    else:
        img = D.read_image_placed(path, None)[0].transpose(1, 2, 0)
        m = int(round(MARGIN[0] / spec.scale))
        tiles, lay = cut_tiles(np.pad(img, [(m, m), (m, m), (0, 0)], mode="reflect"), spec)
        xt = tiles.transpose(0, 3, 1, 2)
    xt = np.stack([np.flip(t, ax) if ax else t for t, ax in zip(xt, canon_axes(lay), strict=True)])
    return np.ascontiguousarray(xt), lay


def margin_px() -> int:
    """Working pixels of reflected margin on each side of the working image (0 without --margin)."""
    return MARGIN[0]


def to_source(st: np.ndarray, lay: TileLayout) -> np.ndarray:
    """A stitched map -> the image's own size, the margin dropped."""
    if not MARGIN[0]:
        return stitched_to_source(st, lay)
    import cv2
    my = mx = margin_px()
    m = int(round(MARGIN[0] / (lay.work_w / lay.src_w)))
    core = np.ascontiguousarray(st[my:lay.work_h - my, mx:lay.work_w - mx])
    return cv2.resize(core, (lay.src_w - 2 * m, lay.src_h - 2 * m), interpolation=cv2.INTER_LINEAR)


def tile_valid(lay: TileLayout, s: int) -> np.ndarray:
    v = np.zeros((lay.n_tiles, s, s), bool)
    my = mx = margin_px()
    for i in range(lay.n_tiles):
        p = lay.tile_placement(i)
        top, left = lay.offsets[i]
        v[i, max(0, my - top):min(p.height, lay.work_h - my - top), max(0, mx - left):min(p.width, lay.work_w - mx - left)] = True
    return v


def position_stats(maps: list[tuple[np.ndarray, TileLayout]], s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-tile-pixel mean, floored std, count) of training tile maps over their valid pixels."""
    allk = np.concatenate([k for k, _ in maps])
    allv = np.concatenate([tile_valid(lay, s) for _, lay in maps])
    n = allv.sum(0)
    mu = (allk * allv).sum(0) / np.maximum(n, 1)
    sd = np.sqrt((((allk - mu) ** 2) * allv).sum(0) / np.maximum(n - 1, 1))
    return mu, np.maximum(sd, np.median(sd[n >= 3]) * 0.25), allk[allv]


def tile_roles(lay: TileLayout) -> np.ndarray:
    """int [T]: each tile's edge role, 4 x (row role) + (column role), a role being 0 (the only tile along that axis),
    1 (the first), 2 (a middle one) or 3 (the last): which of the image's borders the tile touches."""
    ys = sorted({y for y, _ in lay.offsets})
    xs = sorted({x for _, x in lay.offsets})

    def role(v: int, vs: list[int]) -> int:
        return 0 if len(vs) == 1 else 1 if v == vs[0] else 3 if v == vs[-1] else 2
    return np.array([4 * role(y, ys) + role(x, xs) for y, x in lay.offsets])


def role_stats(maps: list[tuple[np.ndarray, TileLayout]], s: int, min_n: int = 10
               ) -> tuple[np.ndarray, np.ndarray]:
    """([16, S, S] mean, [16, S, S] floored std) per edge role and tile pixel; a role pixel with fewer than `min_n`
    valid training tiles takes the pooled statistics."""
    mu0, sd0, _ = position_stats(maps, s)
    allk = np.concatenate([k for k, _ in maps])
    allv = np.concatenate([tile_valid(lay, s) for _, lay in maps])
    roles = np.concatenate([tile_roles(lay) for _, lay in maps])
    mu = np.repeat(mu0[None], 16, 0)
    sd = np.repeat(sd0[None], 16, 0)
    floor = float(np.median(sd0)) * 0.25
    for r in range(16):
        sel = roles == r
        if not sel.any():
            continue
        k, v = allk[sel], allv[sel]
        n = v.sum(0)
        m = (k * v).sum(0) / np.maximum(n, 1)
        d = np.sqrt((((k - m) ** 2) * v).sum(0) / np.maximum(n - 1, 1))
        ok = n >= min_n
        mu[r][ok] = m[ok]
        sd[r][ok] = np.maximum(d[ok], floor)
    return mu, sd


def border_bins(h: int, w: int, nbin: int = 8, q: int = 8) -> np.ndarray:
    """int [h, w]: a bin per (distance to the nearer of top/bottom, to the nearer of left/right), sides apart."""
    def side(n: int) -> np.ndarray:
        a = np.arange(n)
        return np.where(a < n / 2, np.minimum(a // q, nbin), -np.minimum((n - 1 - a) // q, nbin) - 1) + nbin + 1
    return side(h)[:, None] * (2 * nbin + 2) + side(w)[None, :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--tiles", default="", help="tile sides in working px (default: the bundle's)")
    ap.add_argument("--scales", default="", help="working scales (default: the bundle's); several: also averaged")
    ap.add_argument("--overlap", type=int, default=None, help="minimum tile overlap, working px (default: the bundle's)")
    ap.add_argument("--flips", default="0", help="0, 1 (horizontal) or 2 (both axes), comma-separated")
    ap.add_argument("--norms", default="pos", help="pos, raw, mean, border (comma-separated)")
    ap.add_argument("--fit-short", action="store_true",
                    help="scale an image with a side shorter than one tile up until it fills the tile, not pad it")
    ap.add_argument("--canon", action="store_true",
                    help="flip tiles touching the bottom/right border so every border lies at a tile's top/left")
    ap.add_argument("--margin", type=int, default=0,
                    help="pad each image by reflection by this many working px before tiling (ignored in maps)")
    ap.add_argument("--density", action="store_true", help="also the density-normalised distances (under pos)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    MARGIN[0] = a.margin
    CANON[0] = a.canon
    FIT[0] = a.fit_short
    sc, cal, _ = load_scorer(a.bundle, require_calibration=True)
    cfg, _, _ = load_bundle(a.bundle)
    base = input_policy(sc.data, sc.img_size)
    if not isinstance(base, TileSpec):
        sys.exit(f"error: {a.bundle}: not a tiled bundle (data.resize is not 'tile')")
    tiles = [int(v) for v in a.tiles.split(",") if v] or [base.size]
    scales = [float(v) for v in a.scales.split(",") if v] or [base.scale]
    flips = [int(v) for v in a.flips.split(",")]
    train = _bundle_training_paths(a.data, cal["holdout_images"])
    test = D.index_dataset(a.data, need_test=True).test
    y = np.array([s.label for s in test])
    kinds = [s.defect for s in test]
    masks = []
    for smp in test:
        h, w = D.image_shape(smp.path)
        masks.append(D.read_mask(smp.mask, expect_shape=(h, w)) > 0.5 if smp.mask is not None
                     else np.zeros((h, w), bool))

    def report(tag: str, maps: list[np.ndarray]) -> None:
        s = np.array([m.max() for m in maps])
        per = {k: round(M.auroc(y[sel], s[sel]), 3) for k in sorted(set(kinds) - {"good"})
               for sel in [np.array([q in ("good", k) for q in kinds])]}
        pix = {k: round(M.pixel_auroc([masks[i] for i in np.flatnonzero(sel)], [maps[i] for i in np.flatnonzero(sel)]),
                        3) for k in sorted(set(kinds) - {"good"}) for sel in [np.array([q in ("good", k) for q in kinds])]}
        print(f"{tag:44s} image AUROC {M.auroc(y, s):.3f}  pixel AUROC {M.pixel_auroc(masks, maps):.3f}  "
              f"AUPRO {M.aupro(masks, maps):.3f}  {per}  pixel {pix}", flush=True)

    for size in tiles:
        sc.img_size = size  # the kNN map is resampled to the tile; the backbone takes any multiple of its stride
        zs = []
        for scale in scales:
            spec = TileSpec(size, base.overlap if a.overlap is None else a.overlap, scale)
            c = copy.deepcopy(cfg)
            c.data.tile.scale, c.model.img_size = scale, size
            if MARGIN[0] or CANON[0] or FIT[0]:  # the memory from the same margin-padded (or flipped) tiles the maps are scored on
                toks, own = [], []
                with torch.no_grad():
                    for i, p in enumerate(train):
                        xt, _ = read_tiles(p, spec)
                        toks.append(sc.normalise_input(torch.from_numpy(xt)))
                        own.append(torch.full((len(xt),), i))
                fit_knn_memory(sc, c, train, tokens=torch.cat(toks), item_image=torch.cat(own))
            else:
                fit_knn_memory(sc, c, train)
            bank, owner = sc.knn_bank, sc.knn_owner
            r = None
            if a.density:  # each memory cell's distance to its nearest training cell of another image
                r = torch.full((bank.shape[0],), float("inf"))
            imgs = []  # each training image's tiles (the views are flipped before the backbone)
            for i, p in enumerate(train):
                xt, lay = read_tiles(p, spec)
                imgs.append((torch.from_numpy(xt), lay))
                if r is not None:
                    with torch.no_grad():
                        t = sc.normalise_input(imgs[-1][0])
                    cells = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
                    d2 = (bank * bank).sum(1, keepdim=True) - 2 * bank @ cells.t() + (cells * cells).sum(1)[None]
                    r = torch.minimum(r, d2.masked_fill((owner == i)[:, None], float("inf")).amin(1))
            rr = None if r is None else r.clamp_min(0).sqrt().clamp_min(1e-3)

            def maps_of(x: torch.Tensor, own: int | None, flip: int, bank: torch.Tensor = bank,
                        owner: torch.Tensor = owner, rr: torch.Tensor | None = rr, size: int = size
                        ) -> dict[str, np.ndarray]:
                out: dict[str, list[torch.Tensor]] = {}
                for fl in FLIPS[flip]:
                    xx = sc.normalise_input(torch.flip(x, fl) if fl else x)  # RGB tiles [T, 3, S, S] -> tokens
                    b, ch, gh, gw = xx.shape
                    q = xx.permute(0, 2, 3, 1).reshape(b, gh * gw, ch)
                    d2 = (q * q).sum(-1, keepdim=True) - 2 * q @ bank.t() + (bank * bank).sum(1)[None, None]
                    if own is not None:
                        d2 = d2.masked_fill((owner == own)[None, None], float("inf"))
                    v, j = d2.min(-1)
                    d = v.clamp_min(0).sqrt()
                    terms = {"d": d}
                    if rr is not None:
                        terms.update({"d/r": d / rr[j], "d/sqrt r": d / rr[j].sqrt(), "d-r": d - rr[j]})
                    for name, m in terms.items():
                        m = F.interpolate(m.reshape(b, 1, gh, gw), size=(size, size), mode="bilinear",
                                          align_corners=False)
                        m = gaussian_blur(m, sc.kernel)
                        out.setdefault(name, []).append(torch.flip(m, fl) if fl else m)
                return {k: torch.stack(v).mean(0)[:, 0].numpy() for k, v in out.items()}

            for flip in flips:
                with torch.no_grad():
                    trm = [(maps_of(x, i, flip), lay) for i, (x, lay) in enumerate(imgs)]
                    tem = []
                    for smp in test:
                        xt, lay = read_tiles(smp.path, spec)
                        tem.append((maps_of(torch.from_numpy(xt), None, flip), lay))
                head = f"tile {size}, scale {scale}, overlap {spec.overlap}, flips {flip}"
                for name in trm[0][0]:
                    tr = [(m[name], lay) for m, lay in trm]
                    mu, sd, allk = position_stats(tr, size)
                    for norm in (a.norms.split(",") if name == "d" else ["pos"]):
                        if norm in ("border", "hybrid"):
                            st_tr = [stitch(k, lay) for k, lay in tr]
                            nb = (2 * 8 + 2) ** 2
                            bins = np.concatenate([border_bins(*st.shape).ravel() for st in st_tr])
                            vals = np.concatenate([st.ravel() for st in st_tr])
                            cnt = np.bincount(bins, minlength=nb)
                            s1 = np.bincount(bins, vals, nb)
                            s2 = np.bincount(bins, vals ** 2, nb)
                            bm = s1 / np.maximum(cnt, 1)
                            bs = np.sqrt(np.maximum(s2 / np.maximum(cnt, 1) - bm ** 2, 0))
                            bs = np.maximum(bs, np.median(bs[cnt > 0]) * 0.25)
                            out = []
                            for m, lay in tem:
                                st = stitch(m[name], lay)
                                b = border_bins(*st.shape)
                                z = (st - bm[b]) / bs[b]
                                if norm == "hybrid":  # border statistics within 32 px of the image's border only
                                    hh, ww = st.shape
                                    d = np.minimum(np.minimum.outer(np.minimum(np.arange(hh), np.arange(hh)[::-1]),
                                                                    np.minimum(np.arange(ww), np.arange(ww)[::-1])), 99)
                                    z = np.where(d < 32, z, stitch((m[name] - mu) / sd, lay))
                                out.append(stitched_to_source(z, lay))
                        elif norm == "role":
                            rmu, rsd = role_stats(tr, size)
                            out = []
                            for m, lay in tem:
                                ro = tile_roles(lay)
                                out.append(to_source(stitch((m[name] - rmu[ro]) / rsd[ro], lay), lay))
                        else:
                            m0, s0 = {"pos": (mu, sd), "raw": (0.0, 1.0), "mean": (mu, float(allk.std()))}[norm]
                            out = [to_source(stitch(uncanon((m[name] - m0) / s0, lay), lay), lay) for m, lay in tem]
                        report(f"{head}, {name}, {norm}", out)
                        if name == "d" and norm == "pos" and flip == flips[0]:
                            zs.append(out)
        if len(zs) > 1:
            report(f"tile {size}, scales {'+'.join(map(str, scales))} averaged",
                   [np.mean([z[i] for z in zs], 0) for i in range(len(y))])


if __name__ == "__main__":
    main()
