"""Feature-representation study for issue 10 (research loop, not product code): training-free kNN maps on the
frozen backbone's cells, for a grid of input sizes, backbones, levels and grids, with and without per-position
normalisation. Every figure is on the TEST split of the development set: choices made from it are tuning on its
labels (BENCHMARKS.md says so beside each figure).

    python scripts/knn_study.py --size 224 --name efficientnet_lite0 --layers 2,3 --stride 16
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mae_ad import data as D, metrics as M  # noqa: E402
from mae_ad.backbone import FeatureTokenizer  # noqa: E402
from mae_ad.config import BackboneConfig  # noqa: E402
from mae_ad.evaluate import _load_test_set  # noqa: E402
from mae_ad.gaussian import gaussian_kernel1d  # noqa: E402
from mae_ad.scoring import gaussian_blur, normal_statistics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2] / "shared/data/magnetic_tile"
RUNS = Path("runs/study")


def images(size, resize):
    RUNS.mkdir(parents=True, exist_ok=True)
    key = RUNS / f"img_{size}_{resize}.pt"
    if key.exists():
        return torch.load(key, weights_only=True)
    idx = D.index_dataset(ROOT, need_test=True)
    tr, ho = D.split_holdout(idx.train, 0.2, 4, seed=0)
    xte, masks = _load_test_set(idx.test, size, resize)[:2]
    c = dict(Xtr=torch.from_numpy(D.load_stack(tr, size, resize)), Xho=torch.from_numpy(D.load_stack(ho, size, resize)),
             Xte=torch.from_numpy(xte), masks=torch.from_numpy(masks),
             labels=torch.tensor([s.label for s in idx.test]), types=[s.defect for s in idx.test])
    torch.save(c, key)
    return c


def clahe(x, clip):
    import cv2
    op = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8))
    out = []
    for im in x:
        g = (im[0].numpy() * 255).clip(0, 255).astype(np.uint8)
        e = torch.from_numpy(op.apply(g).astype(np.float32) / 255)
        out.append(e.expand(im.shape[0], -1, -1))
    return torch.stack(out)


def flat_field(x, sigma):
    """divide out the low-frequency illumination (Gaussian of sigma px), then re-centre at mid grey"""
    k = gaussian_kernel1d(sigma, x.shape[-1] - 1)
    lo = gaussian_blur(x[:, :1], k).expand_as(x)
    r = x / lo.clamp_min(1e-3)
    return ((r - 1) * 0.5 + 0.45).clamp(0, 1)


def feats(c, size, name, layers, stride, local, resize):
    key = RUNS / f"f_{size}_{resize}_{name}_{''.join(map(str, layers))}_{stride}_{local}.pt"
    if key.exists():
        return torch.load(key, weights_only=True)
    ft = FeatureTokenizer(BackboneConfig(name=name, layers=list(layers), stride=stride, local=local), size)
    ft.load_source_weights()
    out = {}
    with torch.no_grad():
        for k in ("Xtr", "Xho", "Xte"):
            out[k] = torch.cat([ft.raw_features(c[k][i:i + 16]) for i in range(0, len(c[k]), 16)])
    torch.save(out, key)
    return out


def knn(mem_imgs, q_imgs, loo=False, chunk=8):
    """cell maps [N, 1, g, g]: each query cell's distance to the nearest memory cell; loo: query i == memory i."""
    n, c, gh, gw = mem_imgs.shape
    mem = mem_imgs.permute(0, 2, 3, 1).reshape(-1, c)
    owner = torch.arange(n).repeat_interleave(gh * gw)
    msq = (mem * mem).sum(1)
    out = []
    for i in range(0, len(q_imgs), chunk):
        q = q_imgs[i:i + chunk].permute(0, 2, 3, 1).reshape(-1, gh * gw, c)
        d2 = (q * q).sum(-1, keepdim=True) - 2 * q @ mem.t() + msq
        if loo:
            ids = torch.arange(i, i + q.shape[0]).view(-1, 1, 1)
            d2 = d2.masked_fill(owner.view(1, 1, -1) == ids, float("inf"))
        out.append(d2.amin(-1).clamp_min(0).sqrt().view(-1, 1, gh, gw))
    return torch.cat(out)


def to_map(cm, size, sigma=4.0):
    m = F.interpolate(cm, size=(size, size), mode="bilinear", align_corners=False)
    return gaussian_blur(m, gaussian_kernel1d(sigma, size - 1)) if sigma > 0 else m


def report(c, maps, tag):
    lab = c["labels"].numpy()
    mk = c["masks"].numpy()
    mp = maps.numpy()[:, 0]
    sc = mp.reshape(len(mp), -1).max(1)
    per = {}
    for t in sorted(set(c["types"]) - {"good"}):
        sel = np.array([x in ("good", t) for x in c["types"]])
        per[t] = round(M.auroc(lab[sel], sc[sel]), 3)
    r = (M.auroc(lab, sc), M.pixel_auroc(mk, mp), M.aupro(mk, mp))
    print(f"{tag:60s} img {r[0]:.3f} pix {r[1]:.3f} pro {r[2]:.3f} {per}", flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--name", default="efficientnet_lite0")
    ap.add_argument("--layers", default="2,3")
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--local", type=int, default=3)
    ap.add_argument("--resize", default="squash")
    ap.add_argument("--sigma", type=float, default=4.0)
    ap.add_argument("--dump", default="")
    ap.add_argument("--pad", type=int, default=0, help="reflect-pad images by this many pixels before the backbone")
    ap.add_argument("--imgnorm", default="none", help="none | meanstd | mean: per-image intensity standardisation")
    a = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    layers = tuple(int(x) for x in a.layers.split(","))
    c = images(a.size, a.resize)
    if a.imgnorm != "none":
        c = dict(c)
        for k in ("Xtr", "Xho", "Xte"):
            x = c[k]
            if a.imgnorm.startswith("clahe"):
                c[k] = clahe(x, float(a.imgnorm[5:] or 2.0))
                continue
            if a.imgnorm.startswith("flat"):
                c[k] = flat_field(x, float(a.imgnorm[4:] or 16.0))
                continue
            mu = x.mean((1, 2, 3), keepdim=True)
            sd = x.std((1, 2, 3), keepdim=True) if a.imgnorm == "meanstd" else 0.2
            c[k] = (x - mu) / sd * 0.2 + 0.45
        a.resize = a.resize + "-" + a.imgnorm
    if a.pad:
        p = a.pad
        c2 = {k: F.pad(c[k], (p, p, p, p), mode="reflect") for k in ("Xtr", "Xho", "Xte")}
        f = feats(c2, a.size + 2 * p, a.name, layers, a.stride, a.local, a.resize + f"-pad{p}")
        q = p // a.stride
        f = {k: v[..., q:v.shape[-2] - q, q:v.shape[-1] - q] for k, v in f.items()}
    else:
        f = feats(c, a.size, a.name, layers, a.stride, a.local, a.resize)
    mu = f["Xtr"].mean((0, 2, 3), keepdim=True)
    sd = f["Xtr"].std((0, 2, 3), keepdim=True)
    tr, te = (f["Xtr"] - mu) / sd, (f["Xte"] - mu) / sd
    tag = f"{a.name} {a.size} pad{a.pad} {a.resize} L{a.layers} s{a.stride} loc{a.local} g{tr.shape[-1]} C{tr.shape[1]}"
    te_map = to_map(knn(tr, te), a.size, a.sigma)
    report(c, te_map, tag + " raw")
    tr_map = to_map(knn(tr, tr, loo=True), a.size, a.sigma)
    m, s = normal_statistics(tr_map, 0.25, 1e-8)
    report(c, (te_map - m) / s, tag + " posnorm(LOO)")
    if a.dump:
        dump_cases(c, (te_map - m) / s, a.dump)
    print(f"  {time.time() - t0:.0f}s", flush=True)


def dump_cases(c, maps, path, n=8):
    """Montage: the n highest-scoring good and n lowest-scoring defect test images (image | mask | map)."""
    import cv2
    sc = maps.flatten(1).amax(1).numpy()
    lab = c["labels"].numpy()
    good = np.flatnonzero(lab == 0)
    bad = np.flatnonzero(lab == 1)
    picks = list(good[np.argsort(-sc[good])[:n]]) + list(bad[np.argsort(sc[bad])[:n]])
    hi = float(np.quantile(sc, 0.5))
    rows = []
    for i in picks:
        img = (c["Xte"][i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        mk = np.repeat((c["masks"][i].numpy()[..., None] * 255).astype(np.uint8), 3, 2)
        m = maps[i, 0].numpy()
        hm = cv2.applyColorMap(np.clip(m / hi * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
        row = np.concatenate([img, mk, hm], 1)
        cv2.putText(row, f"{c['types'][i]} {sc[i]:.2f}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 0), 1)
        rows.append(row)
    half = len(rows) // 2
    out = np.concatenate([np.concatenate(rows[:half], 0), np.concatenate(rows[half:], 0)], 1)
    cv2.imwrite(path, cv2.cvtColor(cv2.resize(out, None, fx=0.5, fy=0.5), cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    main()
