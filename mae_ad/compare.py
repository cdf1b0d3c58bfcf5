"""Compare two evaluations of the same test set: is model B better or worse than model A, or can this test set not
tell? (`mae-ad compare A B`, after `mae-ad evaluate` of each.)

A test set of a few hundred images leaves image AUROC uncertain by a few hundredths, and per defect type more, so a
difference of 0.01-0.02 between two recipes is often noise. This module reads both evaluations' `scores.csv` (one row
per test image: path, defect type, label, score, the decision at the model's calibrated threshold, the file's
sha256), checks that they scored the same images (by name and, where both record it, by content) with the same
labels, and reports, for each image-level metric, A, B, the difference B - A and its 95 % confidence interval
from a paired, stratified bootstrap: each of `resamples` replicates draws the normal and the anomalous images of
the comparison with replacement, each class apart so its count stays fixed (the stratified bootstrap of pROC: Robin
et al., BMC Bioinformatics 12:77, 2011), and scores the same drawn images under both models,
so what the two models share (the same hard images) cancels in the difference (Efron and Tibshirani, "An Introduction
to the Bootstrap", 1993, ch. 13: percentile intervals).

Metrics: image AUROC over all test images and per defect type (that type's images against all normal ones), and at
each model's own calibrated threshold the F1, recall (share of anomalous images flagged) and false-alarm rate (share
of normal images flagged). Pixel AUROC, overall and per type, is resampled the same way, by image, from the per-image
pixel histograms `mae-ad evaluate` writes (pixel_hist.npz, `metrics.binned_auroc`: within 1e-4 of the exact figure).
AUPRO is read from each metrics.json and shown without an interval (its regions need the maps, which are not saved).

A verdict per metric: "B better" or "B worse" when the interval excludes 0 (for the false-alarm rate, lower is
better), else "no difference detected" (the interval holds 0: this test set cannot tell the two apart at 95 %).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as M
from .contract import UserError

SCORES = "scores.csv"
PIXEL_HIST = M.PIXEL_HIST
PIXEL_NAMES = {"pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}
COLUMNS = ("path", "defect", "label", "score", "anomalous")


@dataclass
class Scored:
    """One evaluation's per-image rows, in path order: labels int [N] (1 anomalous), scores float64 [N], decisions
    int [N] (1 flagged at the calibrated threshold), defect types [N]."""

    source: Path
    paths: list[str]
    defects: list[str]
    labels: np.ndarray
    scores: np.ndarray
    flagged: np.ndarray
    metrics: dict[str, Any]
    hist: tuple[list[str], np.ndarray, np.ndarray] | None = None  # pixel_hist.npz: paths, normal / defect counts
    sha256: list[str] | None = None  # each image file's hash (reports written since the column exists)


def _scores_file(where: Path) -> Path:
    if not where.exists():
        raise UserError(f"{where}: does not exist (give the folder `mae-ad evaluate --out` wrote, or its {SCORES})")
    p = where / SCORES if where.is_dir() else where
    if not p.is_file():
        raise UserError(f"{where}: no {SCORES} there (give the folder `mae-ad evaluate --out` wrote, or its "
                        f"{SCORES})")
    if p.suffix.lower() != ".csv":
        raise UserError(f"{where}: not a {SCORES} (give the folder `mae-ad evaluate --out` wrote, or its {SCORES})")
    return p


def read_scores(where: str | Path) -> Scored:
    """An evaluation folder (or its scores.csv) -> `Scored`, rows sorted by path. Raises UserError naming the file,
    and the line, for a missing file or column, a bad number or label, or a repeated path."""
    where = Path(where)
    p = _scores_file(where)
    rows: dict[str, tuple[str, int, float, int, str]] = {}
    hashed = False
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            hashed = "sha256" in (reader.fieldnames or [])
            if missing:
                raise UserError(f"{p}: missing column(s) {', '.join(missing)} (a scores.csv of `mae-ad evaluate` "
                                f"has {', '.join(COLUMNS)})")
            for i, r in enumerate(reader, start=2):
                try:
                    label, flagged, score = int(r["label"]), int(r["anomalous"]), float(r["score"])
                except (TypeError, ValueError):
                    raise UserError(f"{p}, line {i}: label, anomalous and score must be numbers, got "
                                    f"{r['label']!r}, {r['anomalous']!r}, {r['score']!r}") from None
                if label not in (0, 1) or flagged not in (0, 1):
                    raise UserError(f"{p}, line {i}: label and anomalous must be 0 or 1, got {label}, {flagged}")
                if not math.isfinite(score):
                    raise UserError(f"{p}, line {i}: score {r['score']!r} is not a finite number")
                if r["path"] in rows:
                    raise UserError(f"{p}, line {i}: {r['path']!r} appears twice")
                rows[r["path"]] = (r["defect"], label, score, flagged, (r.get("sha256") or "") if hashed else "")
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{p}: cannot read it as a CSV file ({e})") from None
    if not rows:
        raise UserError(f"{p}: no rows")
    keys = sorted(rows)
    mfile = p.parent / "metrics.json"
    metrics: dict[str, Any] = {}
    if mfile.is_file():
        try:
            metrics = json.loads(mfile.read_text())
        except (OSError, ValueError):
            metrics = {}
    return Scored(p, keys, [rows[k][0] for k in keys], np.array([rows[k][1] for k in keys]),
                  np.array([rows[k][2] for k in keys], np.float64), np.array([rows[k][3] for k in keys]),
                  metrics if isinstance(metrics, dict) else {}, _read_hist(p.parent / PIXEL_HIST),
                  [rows[k][4] for k in keys] if hashed else None)


def _read_hist(p: Path) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """pixel_hist.npz (no pickles) -> (paths, normal counts [M, B], defect counts [M, B]); None when absent."""
    if not p.is_file():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            paths, neg, pos = [str(v) for v in z["paths"]], z["neg"].astype(np.int64), z["pos"].astype(np.int64)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{p}: cannot read it ({e}); re-run `mae-ad evaluate` or delete the file") from None
    if neg.shape != pos.shape or neg.ndim != 2 or neg.shape[0] != len(paths):
        raise UserError(f"{p}: its arrays disagree in shape; re-run `mae-ad evaluate` or delete the file")
    return paths, neg, pos


def check_same_test_set(a: Scored, b: Scored) -> None:
    """Raise UserError unless `a` and `b` scored the same images (names, and file hashes where both have them) with
    the same labels and defect types."""
    if a.paths != b.paths:
        only_a = sorted(set(a.paths) - set(b.paths))
        only_b = sorted(set(b.paths) - set(a.paths))
        which = (f"{only_a[0]!r} is in {a.source} only" if only_a else f"{only_b[0]!r} is in {b.source} only")
        raise UserError(f"{a.source} and {b.source} scored different images ({len(a.paths)} and {len(b.paths)}; "
                        f"{which}): compare evaluations of the same test set")
    for i, (la, lb, da, db) in enumerate(zip(a.labels, b.labels, a.defects, b.defects, strict=True)):
        if la != lb or da != db:
            raise UserError(f"{a.paths[i]!r}: labelled {da}/{la} in {a.source} but {db}/{lb} in {b.source}")
    if a.sha256 is not None and b.sha256 is not None:
        for i, (ha, hb) in enumerate(zip(a.sha256, b.sha256, strict=True)):
            if ha and hb and ha != hb:
                raise UserError(f"{a.paths[i]!r}: a different image file behind this name in {a.source} and in "
                                f"{b.source} (its sha256 differs): compare evaluations of the same test images")


def _metric_fns() -> dict[str, Any]:
    """name -> (fn(y, scores, flagged) -> float, higher_is_better)."""
    return {
        "image AUROC": (lambda y, s, f: M.auroc(y, s), True),
        "F1 at threshold": (lambda y, s, f: M.f1_at(y, f, 0.5)["f1"], True),  # f: the decisions, 0 or 1
        "recall at threshold": (lambda y, s, f: float(f[y == 1].mean()), True),
        "false-alarm rate": (lambda y, s, f: float(f[y == 0].mean()), False),
    }


def paired_bootstrap(y: np.ndarray, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], fn: Any,
                     resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float, float]:
    """(metric of A, metric of B, lower, upper): the percentile interval at `level` of fn(B) - fn(A) over
    `resamples` stratified paired resamples of the images (labels `y` [N], each model's (scores, flagged) [N]).
    Each class is drawn with replacement from its own images, the same draw for both models."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("a comparison needs normal and anomalous images")
    va, vb = fn(y, *a), fn(y, *b)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for r in range(resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        yy = y[idx]
        diffs[r] = fn(yy, b[0][idx], b[1][idx]) - fn(yy, a[0][idx], a[1][idx])
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(va), float(vb), float(lo), float(hi)


def _row(metric: str, subset: str, y: np.ndarray, va: float, vb: float, lo: float, hi: float, higher: bool
         ) -> dict[str, Any]:
    better = lo > 0 if higher else hi < 0
    worse = hi < 0 if higher else lo > 0
    return {"metric": metric, "subset": subset, "n_normal": int((y == 0).sum()), "n_anomalous": int((y == 1).sum()),
            "a": va, "b": vb, "diff": vb - va, "ci_low": lo, "ci_high": hi,
            "verdict": "B better" if better else "B worse" if worse else "no difference detected"}


def _pixel_auroc_rows(A: Scored, B: Scored, types: list[str], resamples: int, seed: int) -> list[dict[str, Any]]:
    """Pixel AUROC rows (all, and per type when there are several) resampled by image from the two reports' pixel
    histograms, which name the same images (in A's order)."""
    assert A.hist is not None and B.hist is not None
    label = dict(zip(A.paths, zip(A.defects, A.labels, strict=True), strict=True))
    hp = A.hist[0]
    if any(q not in label for q in hp):
        raise UserError(f"{A.source.parent / PIXEL_HIST}: names images that {A.source} does not list")
    hy = np.array([label[q][1] for q in hp])
    hd = np.array([label[q][0] for q in hp])
    if hy.min() == hy.max():
        return []
    subs = [("all", np.ones(len(hp), bool))]
    if len(types) > 1:
        subs += [(t, (hy == 0) | (hd == t)) for t in types if (hd == t).any()]
    rows = []
    for sub, sel in subs:
        va, vb, lo, hi = paired_bootstrap(hy[sel], (A.hist[1][sel], A.hist[2][sel]), (B.hist[1][sel], B.hist[2][sel]),
                                          lambda _y, neg, pos: M.binned_auroc(neg, pos), resamples, seed)
        rows.append(_row("pixel AUROC", sub, hy[sel], va, vb, lo, hi, True))
    return rows


def compare(a_dir: str | Path, b_dir: str | Path, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Compare evaluations A and B (folders of `mae-ad evaluate`, or their scores.csv). Returns {"a", "b",
    "resamples", "rows": [{metric, subset, n_normal, n_anomalous, a, b, diff, ci_low, ci_high, verdict}],
    "pixel": [{metric, a, b}], "notes": [why something was left out]}. Pixel metrics are left out when A and B
    compared maps with masks at different sizes (metrics.json `eval_size`). Raises UserError for unreadable or
    mismatched inputs."""
    if resamples < 100:
        raise UserError(f"--resamples {resamples}: use at least 100 (2000 gives stable 95 % intervals)")
    A, B = read_scores(a_dir), read_scores(b_dir)
    check_same_test_set(A, B)
    y = A.labels
    if y.min() == y.max():
        raise UserError(f"{A.source}: the test set needs normal and anomalous images to compare detection")
    types = sorted({d for d, lab in zip(A.defects, y, strict=True) if lab == 1})
    subsets = [("all", np.ones(len(y), bool))]
    if len(types) > 1:
        subsets += [(t, (y == 0) | (np.array(A.defects) == t)) for t in types]
    rows = []
    for name, (fn, higher) in _metric_fns().items():
        for sub, sel in (subsets if name == "image AUROC" else subsets[:1]):
            va, vb, lo, hi = paired_bootstrap(y[sel], (A.scores[sel], A.flagged[sel]), (B.scores[sel], B.flagged[sel]),
                                              fn, resamples, seed)
            rows.append(_row(name, sub, y[sel], va, vb, lo, hi, higher))
    pixel_keys: tuple[str, ...] = ("pixel_auroc", "aupro")
    notes = []
    if A.source.resolve() == B.source.resolve():
        notes.append("A and B are the same report")
    data = (A.metrics.get("data"), B.metrics.get("data"))
    if data[0] and data[1] and Path(str(data[0])).resolve() != Path(str(data[1])).resolve():
        notes.append(f"A was evaluated on {data[0]}, B on {data[1]}: the pairing assumes the same image behind each "
                     "name")
    sizes = (A.metrics.get("eval_size"), B.metrics.get("eval_size"))
    if sizes[0] and sizes[1] and sizes[0] != sizes[1]:  # maps met the masks at different resolutions
        pixel_keys = ()
        notes.append(f"pixel metrics left out: A compared maps and masks at the {sizes[0]} size, B at the {sizes[1]} "
                     "size (`mae-ad evaluate --eval-size`); evaluate both the same way to compare them")
    elif A.hist is not None and B.hist is not None and A.hist[0] == B.hist[0] and A.hist[0]:
        pixel_keys = ("aupro",)
        rows += _pixel_auroc_rows(A, B, types, resamples, seed)
    pixel = [{"metric": k, "a": A.metrics.get(k), "b": B.metrics.get(k)} for k in pixel_keys
             if isinstance(A.metrics.get(k), float) or isinstance(B.metrics.get(k), float)]
    return {"a": str(A.source.parent), "b": str(B.source.parent), "resamples": resamples, "seed": seed,
            "rows": rows, "pixel": pixel, "notes": notes}


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "-"


def markdown(r: dict[str, Any]) -> str:
    """The comparison as a Markdown table (one row per metric and subset) and the pixel metrics beside."""
    lines = [f"A = {r['a']}, B = {r['b']}; 95 % intervals of B - A from {r['resamples']} paired stratified "
             "bootstrap resamples of the test images.", "",
             "| metric | images (normal / anomalous) | A | B | B - A | 95 % interval | verdict |",
             "|---|---|---:|---:|---:|---|---|"]
    for row in r["rows"]:
        what = row["metric"] if row["subset"] == "all" else f"{row['metric']}, {row['subset']}"
        lo, hi, diff = row["ci_low"], row["ci_high"], row["diff"]
        small = 0 < max(abs(lo), abs(hi), abs(diff)) < 0.0005  # more digits where 3 would print +0.000
        f = "+.5f" if small else "+.3f"
        verdict = row["verdict"] + (" (by less than 0.001)" if row["verdict"] != "no difference detected"
                                    and abs(diff) < 0.001 else "")
        lines.append(f"| {what} | {row['n_normal']} / {row['n_anomalous']} | {row['a']:.3f} | {row['b']:.3f} | "
                     f"{diff:{f}} | [{lo:{f}}, {hi:{f}}] | {verdict} |")
    for p in r["pixel"]:
        a, b = p["a"], p["b"]
        diff = f"{b - a:+.3f}" if isinstance(a, float) and isinstance(b, float) else "-"
        lines.append(f"| {PIXEL_NAMES[p['metric']]} | pixels | {_num(a)} | {_num(b)} | {diff} | "
                     f"not resampled ({'maps' if p['metric'] == 'aupro' else 'pixel_hist.npz'} not saved) | |")
    lines += [f"\nNote: {n}." for n in r.get("notes", [])]
    return "\n".join(lines)
