"""Detection metrics: image/pixel AUROC, AUPRO (MVTec AD definition), F1 at a threshold and the oracle best F1.

numpy and scipy only: no plotting, no torch. Conventions used throughout:
- labels: 1 = anomalous (defect image / defect pixel), 0 = normal.
- scores: higher = more anomalous. An image is called anomalous when `score > threshold` (strictly), the rule the
  calibrated threshold (a quantile of normal scores) and the agent use.
- Undefined metrics (a single class present, no defect pixels) are returned as None, never as NaN, so they survive
  JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

# MVTec AD labels ground-truth regions with 8-connectivity (a 3x3 structuring element of ones).
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_binary(labels: Any) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype != bool:
        y = y > 0.5
    return y.reshape(-1)


def _as_scores(scores: Any) -> np.ndarray:
    s = np.asarray(scores)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    s = s.reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    return s


def auroc(labels: Any, scores: Any) -> float | None:
    """Area under the ROC curve as the Mann-Whitney statistic: the probability that a random anomalous sample
    scores higher than a random normal one, ties counting one half (average ranks). None if a class is missing."""
    y = _as_binary(labels)
    s = _as_scores(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in size")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # Sort once; per group of tied scores count positives and negatives. Each positive beats the negatives of all
    # lower groups and ties with the negatives of its own group (half a win). Integer arithmetic: exact.
    order = np.argsort(s)  # order inside a tie group does not matter
    s_sorted = s[order]
    y_sorted = y[order]
    del order
    starts = np.r_[0, np.flatnonzero(s_sorted[1:] != s_sorted[:-1]) + 1]
    del s_sorted
    pos = np.add.reduceat(y_sorted.astype(np.int64), starts)
    neg = np.diff(np.r_[starts, y.size]) - pos
    neg_below = np.cumsum(neg) - neg
    twice_u = int(np.sum(2 * pos * neg_below + pos * neg))
    return twice_u / (2.0 * n_pos * n_neg)


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr, thresholds) for every distinct score, highest first, starting at (0, 0).
    Point i flags the samples with score >= thresholds[i] (thresholds[0] is +inf: nothing flagged)."""
    y = _as_binary(labels)
    s = _as_scores(scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs both anomalous and normal samples")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp = np.cumsum(y[order], dtype=np.int64)
    fp = np.arange(1, y.size + 1, dtype=np.int64) - tp
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), y.size - 1]  # end of each tie group
    fpr = np.r_[0.0, fp[last] / n_neg]
    tpr = np.r_[0.0, tp[last] / n_pos]
    thr = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thr


def _stack_maps(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Masks and maps as [N, H, W] arrays (bool, float) of the same shape."""
    if isinstance(masks, np.ndarray) and masks.ndim == 2:
        masks = masks[None]
    if isinstance(maps, np.ndarray) and maps.ndim == 2:
        maps = maps[None]
    m = np.asarray(masks) if isinstance(masks, np.ndarray) else np.stack([np.asarray(x) for x in masks])
    a = np.asarray(maps) if isinstance(maps, np.ndarray) else np.stack([np.asarray(x) for x in maps])
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if m.shape != a.shape or m.ndim != 3:
        raise ValueError(f"masks {m.shape} and anomaly maps {a.shape} must both be [N, H, W]")
    if m.dtype != bool:
        m = m > 0.5
    return m, a


def _pairs(masks: Any, maps: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Masks and maps as lists of per-image [H_i, W_i] arrays (bool, float), each mask the shape of its map: arrays
    [N, H, W] or sequences of images of different sizes (evaluation at each image's own resolution)."""
    if isinstance(masks, np.ndarray) and isinstance(maps, np.ndarray):
        m, a = _stack_maps(masks, maps)
        return list(m), list(a)
    ms, As = [], []
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks but {len(maps)} anomaly maps")
    for mi, ai in zip(masks, maps, strict=True):
        mi, ai = np.asarray(mi), np.asarray(ai)
        mi = mi.reshape(mi.shape[-2:]) if mi.ndim == 3 and mi.shape[0] == 1 else mi
        ai = ai.reshape(ai.shape[-2:]) if ai.ndim == 3 and ai.shape[0] == 1 else ai
        if mi.shape != ai.shape or mi.ndim != 2:
            raise ValueError(f"a mask {mi.shape} and its anomaly map {ai.shape} must both be [H, W]")
        ms.append(mi if mi.dtype == bool else mi > 0.5)
        As.append(ai)
    return ms, As


def pixel_auroc(masks: Any, maps: Any) -> float | None:
    """AUROC over every pixel of every image (masks [N, H, W] in {0, 1}, maps [N, H, W], or lists of per-image
    [H_i, W_i] arrays); None without defect pixels or without normal pixels."""
    m, a = _pairs(masks, maps)
    if not m:
        return None
    return auroc(np.concatenate([x.reshape(-1) for x in m]), np.concatenate([x.reshape(-1) for x in a]))


PIXEL_HIST = "pixel_hist.npz"  # an evaluation report's `pixel_histograms` (written by evaluate, read by compare)


def pixel_histograms(masks: Any, maps: Any, bins: int = 4096, max_sample: int = 1 << 22
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image pixel counts on one shared set of bins, for resampling pixel AUROC by image (`binned_auroc`):
    (edges float64 [B + 1], normal-pixel counts int64 [N, B], defect-pixel counts int64 [N, B]). The edges are
    quantiles of the pixels' values (of at most `max_sample` of them, drawn with a fixed seed, plus the extremes), so
    each bin holds about the same number of pixels and ties inside a bin cost little; values equal to an edge go to
    the bin above it (the last bin is closed). masks/maps as `pixel_auroc`."""
    m, a = _pairs(masks, maps)
    if not m:
        return np.zeros(2), np.zeros((0, 1), np.int64), np.zeros((0, 1), np.int64)
    allv = np.concatenate([x.reshape(-1) for x in a])  # the maps' own dtype: edges equal to values stay equal
    sample = allv
    if allv.size > max_sample:  # the edges need only be about equal-frequency
        sample = np.concatenate([np.random.default_rng(0).choice(allv, max_sample, replace=False),
                                 [allv.min(), allv.max()]])
    edges = np.unique(np.quantile(sample.astype(np.float64), np.linspace(0, 1, bins + 1)))
    if edges.size < 2:
        edges = np.array([edges[0], edges[0] + 1.0])
    nb = edges.size - 1
    neg = np.zeros((len(m), nb), np.int64)
    pos = np.zeros((len(m), nb), np.int64)
    for i, (mk, mp) in enumerate(zip(m, a, strict=True)):
        idx = np.clip(np.searchsorted(edges, mp.reshape(-1), side="right") - 1, 0, nb - 1)
        d = mk.reshape(-1) > 0.5
        pos[i] = np.bincount(idx[d], minlength=nb)
        neg[i] = np.bincount(idx[~d], minlength=nb)
    return edges, neg, pos


def binned_auroc(neg: np.ndarray, pos: np.ndarray) -> float | None:
    """AUROC from binned counts (neg, pos [B] or [N, B], summed over images): the Mann-Whitney statistic with
    pixels of one bin counted as ties. None without defect or without normal pixels."""
    n = np.asarray(neg, np.float64).reshape(-1, np.shape(neg)[-1]).sum(0)
    p = np.asarray(pos, np.float64).reshape(-1, np.shape(pos)[-1]).sum(0)
    n_tot, p_tot = n.sum(), p.sum()
    if n_tot == 0 or p_tot == 0:
        return None
    below = np.cumsum(n) - n  # normal pixels in lower bins
    return float((p * (below + 0.5 * n)).sum() / (n_tot * p_tot))


def pro_curve(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region overlap curve as in the MVTec AD benchmark, computed exactly at every distinct map value.

    Regions: the 8-connected components of each image's ground truth. For a threshold t, PRO(t) is the mean over
    all regions (of all images) of the share of the region's pixels with map >= t; FPR(t) is the share of
    defect-free pixels (outside every mask, over all images, good images included) with map >= t. Returns
    (fpr, pro, thresholds), fpr non-decreasing, starting at (0, 0) with threshold +inf.
    """
    m, a = _pairs(masks, maps)
    n_img = len(m)
    weights = [np.zeros(x.shape, dtype=np.float64) for x in m]  # a region's pixels: 1 / (n_regions * its size)
    sizes: list[np.ndarray] = []
    comp_maps: list[tuple[int, np.ndarray, int]] = []
    for i in range(n_img):
        if not m[i].any():
            continue
        lab, n = ndimage.label(m[i], structure=EIGHT_CONNECTED)
        sizes.append(np.bincount(lab.reshape(-1), minlength=n + 1)[1:])
        comp_maps.append((i, lab, n))
    n_regions = int(sum(len(s) for s in sizes))
    if n_regions == 0:
        raise ValueError("PRO needs at least one ground-truth region")
    for (i, lab, _n), size in zip(comp_maps, sizes, strict=True):
        per_comp = np.r_[0.0, 1.0 / (size.astype(np.float64) * n_regions)]
        weights[i] = per_comp[lab]
    ok = ~np.concatenate([x.reshape(-1) for x in m])
    n_ok = int(ok.sum())
    if n_ok == 0:
        raise ValueError("PRO needs defect-free pixels for its false-positive rate")
    flat = np.concatenate([x.reshape(-1) for x in a])
    if not np.all(np.isfinite(flat)):
        raise ValueError("anomaly maps contain NaN or infinite values")
    order = np.argsort(flat)[::-1]  # descending; order inside a tie group does not matter
    s_sorted = flat[order]
    fp = np.cumsum(ok[order], dtype=np.int64)
    pro = np.cumsum(np.concatenate([w.reshape(-1) for w in weights])[order])
    del weights
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), flat.size - 1]
    fpr_pts = np.r_[0.0, fp[last] / n_ok]
    pro_pts = np.r_[0.0, np.minimum(pro[last], 1.0)]
    thr = np.r_[np.inf, s_sorted[last]]
    return fpr_pts, pro_pts, thr


def area_until(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) from x[0] to x_max; x non-decreasing. The curve is cut at exactly x_max by
    linear interpolation between the points either side."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    idx = int(np.searchsorted(x, x_max, side="right"))  # x[:idx] <= x_max
    xs, ys = x[:idx], y[:idx]
    if idx < x.size and (idx == 0 or xs[-1] < x_max):
        x0, y0 = (xs[-1], ys[-1]) if idx > 0 else (x[0], y[0])
        x1, y1 = x[idx], y[idx]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0) if x1 > x0 else y1
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_cut]
    if xs.size < 2:
        return 0.0
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float | None:
    """Area under the PRO curve up to `fpr_limit` (MVTec AD: 0.3), divided by `fpr_limit` so a perfect map scores
    1. None when there is no ground-truth region or no defect-free pixel."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, a = _pairs(masks, maps)
    if not any(x.any() for x in m) or all(x.all() for x in m):
        return None
    fpr, pro, _ = pro_curve(m, a)
    return area_until(fpr, pro, fpr_limit) / fpr_limit


def f1_at(labels: Any, scores: Any, threshold: float) -> dict[str, Any]:
    """Confusion counts, precision, recall and F1 when `score > threshold` means anomalous. Precision (recall)
    of an empty prediction (class) is reported as 0; F1 = 2TP / (2TP + FP + FN), 0 when that is 0/0."""
    y = _as_binary(labels)
    s = _as_scores(scores)
    pred = s > threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    denom = 2 * tp + fp + fn
    return {
        "f1": 2 * tp / denom if denom else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "threshold": float(threshold),
    }


def best_f1(labels: Any, scores: Any) -> dict[str, Any]:
    """The highest F1 over all thresholds: an ORACLE figure (the threshold is chosen on the test labels, which a
    deployed system cannot do). Returns f1_at's dict for a threshold between the chosen score and the next
    lower distinct score (so `score > threshold` reproduces it)."""
    y = _as_binary(labels)
    s = _as_scores(scores)
    n_pos = int(y.sum())
    if s.size == 0:
        raise ValueError("best_f1 needs at least one sample")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp = np.cumsum(y[order], dtype=np.int64)
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1]
    flagged = last + 1  # flagging every score >= s_sorted[last]
    f1 = 2.0 * tp[last] / (flagged + n_pos)  # 2TP / (2TP + FP + FN) with TP + FP = flagged, TP + FN = n_pos
    j = int(np.argmax(f1))  # first (highest threshold) among equal F1
    k = last[j]
    if k + 1 < s.size:
        thr = float((s_sorted[k] + s_sorted[k + 1]) / 2.0)
        if not s_sorted[k + 1] < thr < s_sorted[k]:  # adjacent floats: no midpoint between them
            thr = float(s_sorted[k + 1])
    else:
        thr = float(np.nextafter(s_sorted[k], -np.inf))
    out = f1_at(y, s, thr)
    out["oracle"] = True
    return out


def image_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                  threshold: float) -> dict[str, Any]:
    """Image-level summary: AUROC, F1 at `threshold` (with its confusion counts) and the oracle best F1."""
    at = f1_at(labels, scores, threshold)
    best = best_f1(labels, scores)
    return {
        "image_auroc": auroc(labels, scores),
        "f1": at["f1"], "precision": at["precision"], "recall": at["recall"],
        "confusion": {k: at[k] for k in ("tp", "fp", "tn", "fn")},
        "f1_oracle_best": best["f1"], "f1_oracle_threshold": best["threshold"],
    }
