"""Issue-10 recipe study on a GPU box (research loop, not product code; the product's model, masks and scorer).

Stage 1: training-free kNN maps (raw and position-normalised, leave-one-image-out statistics) for a list of
feature configurations (backbone, input size, levels, grid). Stage 2: feature-space MAEs trained for the step
counts a 25-minute 2-core CPU run reaches, scored alone and fused with the kNN map. Every figure is on the TEST
split of ../shared/data/magnetic_tile: picking a recipe from them is tuning on its labels (said beside each figure
in BENCHMARKS.md). Metrics: exact image AUROC (mae_ad.metrics), pixel AUROC and AUPRO (0.3) computed on the GPU by
the same definitions as mae_ad.metrics, at the model's input size.

    python scripts/gpu_study.py --data DIR --out DIR --minutes 8
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mae_ad import data as D, metrics as M  # noqa: E402
from mae_ad.backbone import FeatureTokenizer  # noqa: E402
from mae_ad.config import BackboneConfig, apply_overrides, config_from_dict  # noqa: E402
from mae_ad.evaluate import _load_test_set  # noqa: E402
from mae_ad.gaussian import gaussian_kernel1d  # noqa: E402
from mae_ad.model import build_model  # noqa: E402
from mae_ad.scoring import Scorer, gaussian_blur, normal_statistics  # noqa: E402
from mae_ad.train import lr_at, param_groups  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T0 = time.time()
OUT: Path
_IMG: dict = {}
_PRO: dict = {}


def log(rec):
    rec["t"] = round(time.time() - T0, 1)
    print(json.dumps(rec), flush=True)
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def images(root, size):
    if size in _IMG:
        return _IMG[size]
    idx = D.index_dataset(root, need_test=True)
    tr, ho = D.split_holdout(idx.train, 0.2, 4, seed=0)
    xte, masks = _load_test_set(idx.test, size)[:2]
    c = dict(Xtr=torch.from_numpy(D.load_stack(tr, size)).to(DEV), Xho=torch.from_numpy(D.load_stack(ho, size)).to(DEV),
             Xte=torch.from_numpy(xte).to(DEV), masks=masks, labels=np.array([s.label for s in idx.test]),
             types=[s.defect for s in idx.test])
    _IMG[size] = c
    return c


def pro_weights(masks):
    """Per-pixel weights 1 / (n_regions * region size) (8-connected regions) and the normal-pixel mask."""
    key = masks.shape
    if key in _PRO:
        return _PRO[key]
    w = np.zeros(masks.shape, np.float64)
    labs, sizes = [], []
    for i in range(len(masks)):
        if masks[i].any():
            lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
            labs.append((i, lab))
            sizes.append(np.bincount(lab.reshape(-1), minlength=n + 1)[1:])
    nreg = sum(len(s) for s in sizes)
    for (i, lab), s in zip(labs, sizes):
        w[i] = np.r_[0.0, 1.0 / (s * nreg)][lab]
    _PRO[key] = (torch.from_numpy(w.reshape(-1)).to(DEV), torch.from_numpy(~masks.reshape(-1)).to(DEV))
    return _PRO[key]


def gpu_pixel_metrics(masks, maps):
    """(pixel AUROC, AUPRO@0.3) of maps [N, 1, S, S] (GPU) against bool masks [N, S, S]; ties handled as groups."""
    w, ok = pro_weights(masks)
    flat = maps.reshape(-1).double()
    s, order = torch.sort(flat, descending=True)
    okd = ok[order]
    fp = torch.cumsum(okd.long(), 0)
    tp = torch.cumsum((~okd).long(), 0)
    pro = torch.cumsum(w[order], 0)
    last = torch.cat([torch.nonzero(s[1:] != s[:-1]).flatten(), torch.tensor([s.numel() - 1], device=DEV)])
    n_ok, n_def = int(ok.sum()), int((~ok).sum())
    fpr = torch.cat([torch.zeros(1, device=DEV, dtype=torch.float64), fp[last].double() / n_ok])
    tpr = torch.cat([torch.zeros(1, device=DEV, dtype=torch.float64), tp[last].double() / n_def])
    prv = torch.cat([torch.zeros(1, device=DEV, dtype=torch.float64), pro[last].clamp(max=1.0)])
    pix = float(torch.trapezoid(tpr, fpr))
    fpr, prv = fpr.cpu().numpy(), prv.cpu().numpy()
    return pix, M.area_until(fpr, prv, 0.3) / 0.3


def metrics(c, maps, tag, **extra):
    lab = c["labels"]
    sc = maps.flatten(1).amax(1).double().cpu().numpy()
    per = {}
    for t in sorted(set(c["types"]) - {"good"}):
        sel = np.array([x in ("good", t) for x in c["types"]])
        per[t] = round(M.auroc(lab[sel], sc[sel]), 3)
    pix, pro = gpu_pixel_metrics(c["masks"], maps)
    rec = dict(tag=tag, img=round(M.auroc(lab, sc), 4), pix=round(pix, 4), pro=round(pro, 4), per=per, **extra)
    log(rec)
    return rec


def to_map(cm, size, sigma=4.0):
    m = F.interpolate(cm, size=(size, size), mode="bilinear", align_corners=False)
    return gaussian_blur(m, gaussian_kernel1d(sigma, size - 1).to(cm.device)) if sigma > 0 else m


@torch.no_grad()
def knn(mem_imgs, q_imgs, loo=False):
    n, c, gh, gw = mem_imgs.shape
    mem = mem_imgs.permute(0, 2, 3, 1).reshape(-1, c)
    owner = torch.arange(n, device=DEV).repeat_interleave(gh * gw)
    msq = (mem * mem).sum(1)
    chunk = max(1, int(2e9 // (gh * gw * mem.shape[0])))
    out = []
    for i in range(0, len(q_imgs), chunk):
        q = q_imgs[i:i + chunk].permute(0, 2, 3, 1).reshape(-1, gh * gw, c)
        d2 = (q * q).sum(-1, keepdim=True) - 2 * q @ mem.t() + msq
        if loo:
            ids = torch.arange(i, i + q.shape[0], device=DEV).view(-1, 1, 1)
            d2 = d2.masked_fill(owner.view(1, 1, -1) == ids, float("inf"))
        out.append(d2.amin(-1).clamp_min(0).sqrt().view(-1, 1, gh, gw))
    return torch.cat(out)


@torch.no_grad()
def features(c, size, name, layers, stride, local):
    ft = FeatureTokenizer(BackboneConfig(name=name, layers=list(layers), stride=stride, local=local), size)
    ft.load_source_weights()
    ft.to(DEV)
    f = {k: torch.cat([ft.raw_features(c[k][i:i + 32]) for i in range(0, len(c[k]), 32)]) for k in ("Xtr", "Xho", "Xte")}
    mu = f["Xtr"].mean((0, 2, 3), keepdim=True)
    sd = f["Xtr"].std((0, 2, 3), keepdim=True)
    return {k: (v - mu) / sd for k, v in f.items()}, (mu, sd)


def fcfg_tag(fc):
    return f"{fc['name'][-5:]}-{fc['size']}-L{''.join(map(str, fc['layers']))}-s{fc['stride']}-loc{fc['local']}"


def stage1(root, fcs, deadline):
    out = []
    for fc in fcs:
        if time.time() > deadline:
            log(dict(skipped=fcfg_tag(fc)))
            continue
        c = images(root, fc["size"])
        f, _ = features(c, **fc)
        tr, te = f["Xtr"], f["Xte"]
        te_map = to_map(knn(tr, te), fc["size"])
        tr_map = to_map(knn(tr, tr, loo=True), fc["size"])
        m, s = normal_statistics(tr_map, 0.25, 1e-8)
        g = tr.shape[-1]
        metrics(c, te_map, fcfg_tag(fc) + " knn-raw", stage=1, grid=g)
        r = metrics(c, (te_map - m) / s, fcfg_tag(fc) + " knn-pos", stage=1, grid=g, chans=tr.shape[1])
        out.append((r, fc))
        del f, tr, te, te_map, tr_map
        torch.cuda.empty_cache() if DEV.type == "cuda" else None
    return out


def train_mae(cfg, T, steps, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg.model).to(DEV)
    tc = cfg.train
    bs = tc.batch_size
    lr0 = tc.lr or tc.blr * bs / 256
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=lr0, betas=tc.betas)
    warm = tc.warmup_epochs * math.ceil(len(T) / bs)
    g = torch.Generator(device=DEV).manual_seed(seed)
    gc = torch.Generator().manual_seed(seed)
    model.train()
    step, losses = 0, []
    while step < steps:
        perm = torch.randperm(len(T), generator=gc)
        for i in range(0, len(T) - bs + 1, bs):
            lr = lr_at(step, steps, warm, lr0, tc.min_lr)
            for gr in opt.param_groups:
                gr["lr"] = lr
            loss, _, _ = model(T[perm[i:i + bs].to(DEV)], tc.mask_ratio, g, mask_mode=tc.mask_mode)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item()) if step % 50 == 0 else None
            step += 1
            if step >= steps:
                break
    model.eval()
    return model, float(np.mean(losses[-5:]))


RECIPE = {"model": {"preset": "tiny-p8", "patch_size": 1, "depth": 4, "decoder_embed_dim": 128, "decoder_num_heads": 4,
                    "decoder_depth": 2},
          "scoring": {"pattern": "grid", "normalize": "position", "sigma": 4.0},
          "train": {"mask_mode": "mixed", "batch_size": 16, "blr": 3.0e-3, "warmup_epochs": 2}}


def stage2(root, fc, variants, deadline, cpu_steps):
    c = images(root, fc["size"])
    f, _ = features(c, **fc)
    tr, te = f["Xtr"], f["Xte"]
    size = fc["size"]
    te_knn = to_map(knn(tr, te), size)
    tr_knn = to_map(knn(tr, tr, loo=True), size)
    km, ks = normal_statistics(tr_knn, 0.25, 1e-8)
    kz = (te_knn - km) / ks
    for name, sets, mult in variants:
        if time.time() > deadline:
            log(dict(skipped=f"{fcfg_tag(fc)} {name}"))
            continue
        base = apply_overrides(json.loads(json.dumps(RECIPE)), [f"model.img_size={size}"] + sets)
        base["model"]["backbone"] = {"name": fc["name"], "layers": fc["layers"], "stride": fc["stride"],
                                     "local": fc["local"]}
        cfg = config_from_dict(base, "study")
        steps = int(cpu_steps * mult)
        t = time.time()
        model, loss = train_mae(cfg, tr, steps)
        sc = Scorer(model, cfg.scoring, cfg.data).to(DEV).eval()
        with torch.no_grad():
            def raw(x):
                return torch.cat([sc._raw_map(x[i:i + 32]) for i in range(0, len(x), 32)])
            rtr, rte = raw(tr), raw(te)
        rm, rs = normal_statistics(rtr, 0.25, 1e-8)
        rz = (rte - rm) / rs
        tag = f"{fcfg_tag(fc)} {name} steps={steps}"
        ex = dict(stage=2, loss=round(loss, 4), train_s=round(time.time() - t, 1))
        metrics(c, rz, tag + " mae-pos", **ex)
        for w in (0.5, 1.0, 2.0):
            metrics(c, rz + w * kz, tag + f" fuse-w{w}", **ex)


def main():
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--stage1-minutes", type=float, default=3.0)
    ap.add_argument("--picks", action="append", default=[], help='skip stage 1: JSON [name, size, layers, stride, local]')
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: one config, 20 steps")
    a = ap.parse_args()
    OUT = Path(a.out)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    end = T0 + a.minutes * 60
    L0 = "efficientnet_lite0"
    L1 = "efficientnet_lite1"
    L2 = "efficientnet_lite2"

    def fc(name, size, layers=(2, 3), stride=16, local=3):
        return dict(name=name, size=size, layers=list(layers), stride=stride, local=local)

    if a.quick:
        fcs = [fc(L0, 224)]
        stage1(a.data, fcs, end)
        stage2(a.data, fcs[0], [("recipe", [], 0.01)], end, 2000)
        return
    fcs = [fc(L0, 224), fc(L0, 256), fc(L0, 320), fc(L0, 384), fc(L0, 448), fc(L0, 512),
           fc(L0, 256, stride=8), fc(L0, 224, stride=8), fc(L0, 320, stride=8),
           fc(L2, 256), fc(L2, 320), fc(L2, 384), fc(L2, 448),
           fc(L0, 320, (1, 2, 3)), fc(L0, 320, (2, 3, 4)), fc(L0, 384, (1, 2, 3)), fc(L2, 384, (1, 2, 3)),
           fc(L0, 320, (2, 3), 16, 5), fc(L0, 320, (2, 3), 16, 1), fc(L2, 512), fc(L0, 384, stride=8)]
    if a.picks:
        fcs = [dict(zip(("name", "size", "layers", "stride", "local"), json.loads(p))) for p in a.picks]
        a.stage1_minutes = 0
    res = stage1(a.data, fcs, T0 + a.stage1_minutes * 60) if a.stage1_minutes > 0 else []
    # CPU-affordable grids only (<= 24 x 24 tokens): the best two by image AUROC + AUPRO of the position-normalised
    # kNN map, plus today's recipe features as the control
    ok = [(r["img"] + r["pro"], fc_) for r, fc_ in res if r["grid"] <= 24]
    ok.sort(key=lambda x: -x[0])
    picks = [fc(L0, 224)] + [f for _, f in ok if f != fc(L0, 224)][:2] if not a.picks else fcs
    log(dict(picks=[fcfg_tag(p) for p in picks]))
    variants = [("recipe", [], 1.0), ("recipe-x4", [], 4.0), ("depth6", ["model.depth=6"], 0.75),
                ("mask50", ["train.mask_ratio=0.5"], 1.0), ("random-mask", ["train.mask_mode=random"], 1.0),
                ("blr1e-2", ["train.blr=1.0e-2"], 1.0)]
    # CPU steps in 25 minutes scale about inversely with the token count (2495 steps at 14 x 14, 2026-11-30)
    per_fc = (end - time.time()) / len(picks)
    for p in picks:
        g = p["size"] // p["stride"]
        stage2(a.data, p, variants, time.time() + per_fc, 2495 * 196 / (g * g))


if __name__ == "__main__":
    main()
