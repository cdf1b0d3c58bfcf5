"""`mae-ad evaluate` and `mae-ad predict`: score labelled test images (metrics, report, plots) or loose images
(maps, overlays, scores.csv).

The decision threshold always comes from the bundle's calibration (held-back NORMAL training images); test labels
are used to measure, never to fit. The one exception, the best F1 over all thresholds, is labelled as an oracle.
Outputs are written into a temporary sibling directory and renamed into place: an error leaves nothing behind.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import metrics as M
from .config import config_from_dict, read_yaml
from .contract import (
    BUNDLE_CONFIG,
    Placement,
    UserError,
    crop_valid,
    map_to_source,
    mask_fill,
    read_bundle_meta,
    read_calibration,
    refuse_existing_out,
    sha256_file,
    write_json_atomic,
)
from .data import (
    IMAGE_EXTS,
    Sample,
    index_dataset,
    list_images,
    load_stack,
    load_stack_placed,
    place_mask,
    read_display_bgr,
    read_image_placed,
    read_mask,
    warn_small_tiled,
)
from .tiling import TiledPlacements, TileSpec, input_policy, reduce_stitched, stitched_to_source

log = logging.getLogger(__name__)

EVAL_SIZES = ("original", "model")  # maps compared with masks at each image's own size, or at the model's input
FPR_LIMIT = 0.3  # AUPRO integrates the PRO curve up to this false-positive rate (MVTec AD)
N_CASES = 3  # images per case group in the report
TILED_BASELINE_MEMORY = 8192  # memory cells of the kNN baseline beside a tiled model (at least its own knn_memory)
ENGINES = ("auto", "torch", "onnxruntime")  # what scores the images: `app.scoring_engines` resolves auto


@dataclass
class ScoringEngine:
    """What scores the images of evaluate/predict when it is not the bundle's own torch scorer (the app layer builds
    it, e.g. ONNX Runtime on the bundle's exported graph). `run(images)`: float32 [B, 3, S, S] in [0, 1] ->
    (anomaly maps float32 [B, 1, S, S], scores float32 [B]), the exported graph's contract (docs/compile.md).
    `info`: what the report records (engine, file, precision, ...)."""
    name: str
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    info: dict[str, Any] = field(default_factory=dict)


EngineOpener = Callable[[], "ScoringEngine | None"]  # opens the engine (app.scoring_engines); None: torch


def _torch_engine(scorer: Any, meta: Any, cal: dict[str, Any] | None, precision: str | None,
                  data: Path | None, batch_size: int) -> ScoringEngine:
    """The bundle's torch scorer at the precision `mae_ad.precision.prepare_precision` picks and checks (bf16 only
    where the CPU has it natively and its decisions on the held-back normal images match fp32's)."""
    import torch

    from .precision import prepare_precision
    from .scoring import score_batches

    choice = prepare_precision(scorer, meta, cal, precision, data)

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = score_batches(scorer, torch.from_numpy(np.ascontiguousarray(images)), batch_size)
        return maps.float().cpu().numpy(), scores.float().cpu().numpy()

    info = {"name": "torch", "precision": choice.precision, "precision_wanted": choice.wanted,
            "precision_reason": choice.reason, "threads": torch.get_num_threads()}
    if choice.images:
        info["precision_check"] = f"{choice.agree}/{choice.images} decisions agree with fp32 on held-back normals"
    return ScoringEngine("torch", run, info)


def _score_all(engine: ScoringEngine, images: np.ndarray, batch_size: int) -> tuple[Any, Any]:
    """(maps [N, 1, S, S], scores [N]) as torch tensors, scored by `engine` in batches of `batch_size`."""
    import torch

    maps, scores = [], []
    for i in range(0, len(images), batch_size):
        m, s = engine.run(np.ascontiguousarray(images[i:i + batch_size]))
        maps.append(torch.from_numpy(np.asarray(m, np.float32)))
        scores.append(torch.from_numpy(np.asarray(s, np.float32).reshape(-1)))
    return torch.cat(maps), torch.cat(scores)


def _finite(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


# --- evaluate --------------------------------------------------------------------------------------------------
def _load_test_set(samples: list[Sample], size: int, resize: str = "squash", original: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Placement], list[np.ndarray] | None]:
    """Images [N, 3, S, S] (by the `resize` policy), masks in model-input coordinates [N, S, S] bool, has_mask [N]
    (good images: all-normal, so True), each image's Placement, and (with `original`) each mask at its image's own
    size, bool [H_i, W_i] (None without `original`)."""
    images = np.empty((len(samples), 3, size, size), np.float32)
    masks = np.zeros((len(samples), size, size), bool)
    has_mask = np.ones(len(samples), bool)
    places: list[Placement] = []
    full: list[np.ndarray] | None = [] if original else None
    for i, s in enumerate(samples):
        images[i], pl = read_image_placed(s.path, size, resize)
        assert pl is not None  # a size was given
        places.append(pl)
        m: np.ndarray = np.zeros((pl.src_h, pl.src_w), np.bool_)
        if s.label == 1 and s.mask is None:
            has_mask[i] = False
        elif s.label == 1 and s.mask is not None:
            m = read_mask(s.mask, expect_shape=(pl.src_h, pl.src_w)) > 0.5
            masks[i] = place_mask(m, pl)
            if not m.any():  # by the mask rule (any non-zero pixel is defect) this mask really is empty
                log.warning("%s: mask has no defect pixel for defect image %s", s.mask, s.path)
        if full is not None:
            full.append(m)
    return images, masks, has_mask, places, full


def _eval_pairs(maps: np.ndarray, masks: np.ndarray, full: list[np.ndarray] | None, places: list[Placement]
                ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(masks, maps) the pixel metrics compare, one pair per image. With `full` (eval size original): each map's
    valid region upsampled (bilinear) to its image's own size beside the full-resolution mask. Without: the
    model-size map and mask, cropped to the image's valid region (letterbox) or whole (squash)."""
    if full is not None:
        return list(full), [map_to_source(maps[i], p) for i, p in enumerate(places)]
    return [crop_valid(masks[i], p) for i, p in enumerate(places)], [crop_valid(maps[i], p) for i, p in enumerate(places)]


@dataclass
class _Scored:
    """Per-image results of a scored stack: scores float64 [N], model-size maps for plots [N, S, S], and the
    (mask, map) pairs the pixel metrics compare."""

    scores: np.ndarray
    maps: np.ndarray
    pair_masks: list[np.ndarray]
    pair_maps: list[np.ndarray]


def _per_image(maps_t: Any, scores_t: Any, places: list[Placement], tiles: TiledPlacements | None, scoring: Any,
               masks: np.ndarray, full: list[np.ndarray] | None) -> _Scored:
    """Maps [M, 1, S, S] and scores [M] of a scored stack -> `_Scored` per image. Untiled (M = N): scores over each
    image's valid region (letterbox) or as scored (squash), pairs by `_eval_pairs`. Tiled (`tiles`: the stack is
    their tiles): each image's stitched map gives its score (`tiling.reduce_stitched`) and, resized to the image's
    own size, its pair with the full-resolution mask (eval size original) or, resized to S x S, with the model-size
    mask (eval size model); the plots show it at S x S."""
    if tiles is not None:
        size = masks.shape[-1]
        stitched = tiles.stitched(maps_t)
        scores = np.array([reduce_stitched(a, scoring.reduce, scoring.topk_fraction) for a in stitched], np.float64)
        small = np.stack([cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA) for a in stitched])
        if full is not None:
            return _Scored(scores, small, list(full),
                           [stitched_to_source(a, lay) for a, lay in zip(stitched, tiles.layouts, strict=True)])
        return _Scored(scores, small, list(masks), list(small))
    from .scoring import valid_scores

    maps = maps_t[:, 0].float().cpu().numpy().astype(np.float32, copy=False)
    resize_fill = not all(p.full for p in places)
    scores = valid_scores(maps_t, places, scoring) if resize_fill else \
        np.asarray(scores_t.double().cpu().numpy() if hasattr(scores_t, "double") else scores_t, np.float64)
    pm, pa = _eval_pairs(maps, masks, full, places)
    if resize_fill:  # plots and cases: the letterbox fill shows the valid minimum, never a hot spot
        maps = np.stack([mask_fill(m, p) for m, p in zip(maps, places, strict=True)])
    return _Scored(scores, maps, pm, pa)


def _pick(xs: list[np.ndarray], sel: np.ndarray) -> list[np.ndarray]:
    return [xs[i] for i in np.flatnonzero(sel)]


def _pixel_metrics(masks: list[np.ndarray], maps: list[np.ndarray], curves: dict[str, Any], key: str
                   ) -> dict[str, Any]:
    """Pixel AUROC and AUPRO of the images given (per-image [H_i, W_i] masks and maps); their PRO curve goes into
    `curves[key]` for the plot."""
    if not any(m.any() for m in masks) or all(m.all() for m in masks):
        return {"pixel_auroc": None, "aupro": None}
    fpr, pro, _ = M.pro_curve(masks, maps)
    curves[key] = _thin_curve(fpr, pro, FPR_LIMIT)
    return {"pixel_auroc": _finite(M.pixel_auroc(masks, maps)),
            "aupro": _finite(M.area_until(fpr, pro, FPR_LIMIT) / FPR_LIMIT)}


def _thin_curve(x: np.ndarray, y: np.ndarray, x_max: float, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """At most ~2n points of a monotone curve up to just past x_max, for plotting (a pixel-level curve has one
    point per distinct map value: millions). Keeps the first and last point at each of n x-positions."""
    end = min(x.size, int(np.searchsorted(x, x_max, side="right")) + 1)
    x, y = x[:end], y[:end]
    if x.size <= 2 * n:
        return x, y
    grid = np.linspace(0.0, float(x[-1]), n)
    keep = np.unique(np.r_[np.searchsorted(x, grid, side="left"), np.searchsorted(x, grid, side="right") - 1,
                           0, x.size - 1].clip(0, x.size - 1))
    return x[keep], y[keep]


def _baseline_beside(scorer: Any, cal: dict[str, Any], index: Any, images: np.ndarray, masks: np.ndarray,
                     has_mask: np.ndarray, labels: np.ndarray, defects: np.ndarray, places: list[Placement],
                     full: list[np.ndarray] | None, tiles: TiledPlacements | None = None) -> dict[str, Any]:
    """The training-free baseline on the same images, fitted on the bundle's own training images (the dataset's
    train/good minus its held-back ones) and thresholded on its held-back images, so every report shows what the
    model adds: kNN on the model's own backbone features for a feature-space model (`baseline.KnnBaseline`),
    per-position patch statistics for a pixel-space one. `images`: the scored stack (under tiling its tiles,
    `tiles` telling which form which image), scored and stitched as the model's are (`_per_image`)."""
    import torch

    from .baseline import KnnBaseline, PatchStatsBaseline

    held = set(cal.get("holdout_images") or [])
    train = [p for p in index.train if str(p.relative_to(index.root)) not in held]
    hold = [p for p in index.train if str(p.relative_to(index.root)) in held]
    size = images.shape[-1]
    policy = input_policy(scorer.data, size)
    base: Any
    if scorer.features and tiles is not None:  # every tile's cells: a coreset, as a full memory would not fit
        mem = max(TILED_BASELINE_MEMORY, scorer.scoring.knn_memory)
        base = KnnBaseline(scorer.model.cfg.backbone, size, tokenizer=scorer.model.backbone, max_memory=mem)
        method = f"kNN on the model's backbone features (training-free, PatchCore-style, coreset of {mem} cells)"
    elif scorer.features:
        base = KnnBaseline(scorer.model.cfg.backbone, size, tokenizer=scorer.model.backbone)
        method = "kNN on the model's backbone features (training-free, PatchCore-style, full memory)"
    else:
        base = PatchStatsBaseline(scorer.model.patch_size)
        method = "per-position patch statistics (training-free)"
    if tiles is not None:
        method += ", on the same tiles, stitched"
    from .scoring import valid_scores

    base.fit(torch.from_numpy(load_stack(train, size, policy)))
    threshold = float("inf")
    if hold:
        hold_imgs, hold_places = load_stack_placed(hold, size, policy)
        hold_maps, hold_scores = base.score(torch.from_numpy(hold_imgs))
        hs = valid_scores(hold_maps, hold_places, scorer.scoring) if policy != "squash" else \
            hold_scores.double().numpy()
        threshold = float(np.quantile(hs, 1 - float(cal.get("target_fpr", 0.01)), method="higher"))
    maps_t, scores_t = base.score(torch.from_numpy(images))
    res = _per_image(maps_t, scores_t, places, tiles, scorer.scoring, masks, full)
    scores = res.scores
    out: dict[str, Any] = {"method": method, "n_train_images": len(train),
                           "threshold": threshold if hold else None}
    im = M.image_metrics(labels, scores, threshold)
    out.update({k: _finite(im[k]) for k in ("image_auroc", "f1")})
    if not hold:  # another dataset than the bundle's: its held-back images are not here, so no baseline threshold
        log.warning("baseline: none of the bundle's %d held-back images is in %s (another dataset than the one it "
                    "was trained on?): the baseline is fitted on all %d normal training images and has no "
                    "threshold, so no F1", len(held), index.root, len(train))
        out["f1"] = None
        out["note"] = ("the bundle's held-back images are not in this dataset: fitted on all its normal training "
                       "images, no threshold, no F1")
    out.update(_pixel_metrics(_pick(res.pair_masks, has_mask), _pick(res.pair_maps, has_mask), {}, "baseline"))
    out["per_defect_image_auroc"] = {
        t: _finite(M.auroc(labels[(defects == "good") | (defects == t)],
                           scores[(defects == "good") | (defects == t)]))
        for t in sorted(set(defects.tolist()) - {"good"})}
    return out


def run_evaluation(bundle: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str],
                   batch_size: int = 8, baseline: bool = True, eval_size: str = "original",
                   open_engine: EngineOpener | None = None, precision: str | None = None) -> dict[str, Any]:
    """Score the test images of `data` with the bundle's calibrated scorer; write metrics.json, scores.csv,
    report.md and plots/ into the new directory `out`. Returns the metrics dict. With `baseline`, the
    training-free baseline is computed on the same split and reported beside (`_baseline_beside`).
    `eval_size`: 'original' compares each map, upsampled to its image's own size, with the full-resolution mask
    (as MVTec AD does); 'model' compares them at the model's input size (masks resized nearest-neighbour).
    Under data.resize=letterbox maps are cropped to the image's valid region first, and image scores are taken
    over that region only. `open_engine()`: what scores the test images, called once every check that needs no
    model has passed (None, or it returning None: the bundle's torch scorer at `precision`, see `_torch_engine`);
    plots, reconstructions and the baseline always use the torch model."""
    bundle, data, out = Path(bundle), Path(data), Path(out)
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if eval_size not in EVAL_SIZES:
        raise UserError(f"--eval-size {eval_size!r}: choose one of {', '.join(EVAL_SIZES)}")
    # Every check that needs no model comes first (and without torch): a bad folder, image or mask fails in
    # seconds, before the model is loaded or anything is scored.
    refuse_existing_out(out, "evaluation report")
    index = index_dataset(data, need_test=True)
    read_bundle_meta(bundle)
    cal = read_calibration(bundle)
    bcfg = config_from_dict(read_yaml(bundle / BUNDLE_CONFIG), str(bundle / BUNDLE_CONFIG))
    size, resize = bcfg.model.img_size, bcfg.data.resize
    policy = input_policy(bcfg.data, size)
    samples = index.test
    t_io = time.perf_counter()
    # under tiling `images` are squashed thumbnails for the plots and `stack` the tiles that are scored
    images, masks, has_mask, places, full = _load_test_set(samples, size, "squash" if resize == "tile" else resize,
                                                           original=eval_size == "original")
    stack, tiles = images, None
    if isinstance(policy, TileSpec):
        stack, tile_places = load_stack_placed([s.path for s in samples], size, policy)
        assert isinstance(tile_places, TiledPlacements)
        tiles = tile_places
        small = [s.path for s, lay in zip(samples, tiles.layouts, strict=True)
                 if lay.padded]
        if small:
            warn_small_tiled(len(small), len(samples), policy, small[0])
    t_io = time.perf_counter() - t_io

    import torch

    from .bundle import load_scorer, staged_dir

    scorer, _, meta = load_scorer(bundle, require_calibration=True)
    engine = (open_engine() if open_engine else None) or _torch_engine(scorer, meta, cal, precision, data,
                                                                         batch_size)
    log.info("scoring with %s", _engine_line(engine.info, markdown=False))
    if scorer.img_size != size:  # pragma: no cover - the same config file read twice
        raise UserError(f"{bundle / BUNDLE_CONFIG}: changed while evaluating")
    threshold = float(cal["threshold"])
    labels = np.array([s.label for s in samples], np.int64)
    defects = np.array([s.defect for s in samples])
    n_unmasked = int(np.sum((labels == 1) & ~has_mask))
    if n_unmasked:
        log.warning("%d defect image(s) have no mask under %s: they count for the image metrics only",
                    n_unmasked, data / "ground_truth")

    t0 = time.perf_counter()
    maps_t, scores_t = _score_all(engine, stack, batch_size)
    scored = _per_image(maps_t, scores_t, places, tiles, scorer.scoring, masks, full)
    t_score = time.perf_counter() - t0
    scores, maps, pair_masks, pair_maps = scored.scores, scored.maps, scored.pair_masks, scored.pair_maps
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise UserError(f"{bundle}: the model gives non-finite scores (first for {samples[bad[0]].path}); "
                        "its weights are probably broken")

    pix = has_mask  # images whose every pixel has a known label
    result: dict[str, Any] = {}
    result.update(M.image_metrics(labels, scores, threshold))
    curves: dict[str, Any] = {}
    result.update(_pixel_metrics(_pick(pair_masks, pix), _pick(pair_maps, pix), curves, "all"))
    per_defect: dict[str, Any] = {}
    for t in index.defect_types:
        sel = (defects == "good") | (defects == t)
        im = M.image_metrics(labels[sel], scores[sel], threshold)
        pm = _pixel_metrics(_pick(pair_masks, sel & pix), _pick(pair_maps, sel & pix), curves, t)
        per_defect[t] = {
            "n": int(np.sum(defects == t)), "n_without_mask": int(np.sum((defects == t) & ~has_mask)),
            "image_auroc": _finite(im["image_auroc"]), "pixel_auroc": pm["pixel_auroc"], "aupro": pm["aupro"],
            "f1": im["f1"], "recall": im["recall"], "f1_oracle_best": im["f1_oracle_best"],
        }
    n_good = int(np.sum(labels == 0))
    result.update({
        "image_auroc": _finite(result["image_auroc"]),
        "threshold": threshold,
        "threshold_source": "bundle calibration (held-back normal training images; no test labels)",
        "calibration": cal,
        "false_alarm_rate_test_good": result["confusion"]["fp"] / n_good,
        "aupro_fpr_limit": FPR_LIMIT,
        "per_defect": per_defect,
        "n_images": len(samples),
        "n_good": n_good,
        "n_defect": int(np.sum(labels == 1)),
        "n_defect_without_mask": n_unmasked,
        "n_pixel_metric_images": int(np.sum(pix)),
        "eval_size": eval_size,
        "eval_resolution": ("each image's own size (maps upsampled bilinearly; masks at full resolution)"
                            if eval_size == "original" else f"model input, {size} px (masks nearest-neighbour)"),
        "model_size": size,
        "resize": resize,
        **({"tile": {"scale": policy.scale, "overlap": policy.overlap, "size": policy.size,
                     "n_tiles": len(tiles), "tiles_per_image_max": max(lay.n_tiles for lay in tiles.layouts)}}
           if isinstance(policy, TileSpec) and tiles is not None else {}),
        "model_id": meta.model_id,
        "bundle": str(bundle),
        "data": str(data),
        "layout": index.layout,
        "seconds_per_image": t_score / len(samples),
        "seconds_per_image_with_io": (t_score + t_io) / len(samples),
        "batch_size": batch_size,
        "engine": engine.info,
        "scoring": scoring_summary(bcfg, cal, int(scorer.knn_bank.shape[0]) if scorer.knn_weight > 0 else None),
        "torch_threads": torch.get_num_threads(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })

    if baseline:
        result["baseline"] = _baseline_beside(scorer, cal, index, stack, masks, has_mask, labels, defects, places,
                                              full, tiles)
        log.info("baseline beside: %s", ", ".join(f"{k} {v:.4g}" for k, v in result["baseline"].items()
                                                  if isinstance(v, float)))

    with staged_dir(out, "evaluation report") as d:
        write_json_atomic(d / "metrics.json", result)
        _write_scores_csv(d / "scores.csv", samples, data, scores, has_mask, threshold)
        _write_pixel_histograms(d / M.PIXEL_HIST, samples, data, _pick(pair_masks, pix), _pick(pair_maps, pix),
                                pix)
        (d / "plots").mkdir()
        plots = _write_plots(d / "plots", scorer, samples, images, masks, has_mask, maps, labels, defects,
                             scores, threshold, result, curves)
        (d / "report.md").write_text(_report_markdown(result, plots))
    log.info("evaluation written to %s", out)
    return result


def _rel_path(path: Path, root: Path) -> str:
    """How scores.csv and pixel_hist.npz name a test image: relative to the dataset root where it lies under it."""
    return str(path.relative_to(root) if path.is_relative_to(root) else path)


def _write_pixel_histograms(path: Path, samples: list[Sample], root: Path, masks: list[np.ndarray],
                            maps: list[np.ndarray], pix: np.ndarray) -> None:
    """pixel_hist.npz: each pixel-metric image's normal- and defect-pixel counts on shared bins
    (`metrics.pixel_histograms`), so `mae-ad compare` can resample pixel AUROC by image without the maps."""
    edges, neg, pos = M.pixel_histograms(masks, maps)
    rel = [_rel_path(s.path, root) for s, use in zip(samples, pix, strict=True) if use]
    np.savez_compressed(path, edges=edges, neg=neg.astype(np.uint32), pos=pos.astype(np.uint32),
                        paths=np.array(rel, dtype=str))


def _write_scores_csv(path: Path, samples: list[Sample], root: Path, scores: np.ndarray, has_mask: np.ndarray,
                      threshold: float) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "defect", "label", "has_mask", "score", "anomalous", "sha256"])
        for s, sc, hm in zip(samples, scores, has_mask, strict=True):
            w.writerow([_rel_path(s.path, root), s.defect, s.label, int(bool(hm)), repr(float(sc)),
                        int(sc > threshold), sha256_file(s.path)])  # the file's bytes: `mae-ad compare` pairs images, not just names


# --- plots (matplotlib Figure objects with the Agg canvas: no pyplot, no global state) --------------------------
def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _write_plots(d: Path, scorer: Any, samples: list[Sample], images: np.ndarray, masks: np.ndarray,
                 has_mask: np.ndarray, maps: np.ndarray, labels: np.ndarray, defects: np.ndarray,
                 scores: np.ndarray, threshold: float, result: dict[str, Any],
                 curves: dict[str, Any]) -> dict[str, str]:
    plots: dict[str, str] = {}
    types = sorted(result["per_defect"])

    fig = _figure(5.5, 5)
    ax = fig.add_subplot()
    fpr, tpr, _ = M.roc_curve(labels, scores)
    ax.plot(fpr, tpr, lw=2, color="k", label=f"all defects (AUROC {result['image_auroc']:.3f})")
    for t in types:
        sel = (defects == "good") | (defects == t)
        f, r, _ = M.roc_curve(labels[sel], scores[sel])
        ax.plot(f, r, lw=1, label=f"{t} ({result['per_defect'][t]['image_auroc']:.3f})")
    at = result["confusion"]
    ax.scatter([at["fp"] / max(1, at["fp"] + at["tn"])], [at["tp"] / max(1, at["tp"] + at["fn"])], color="red",
               zorder=5, label="calibrated threshold")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="false-positive rate (good images)", ylabel="true-positive rate (defect images)",
           title="Image-level ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(d / "roc.png")
    plots["roc"] = "plots/roc.png"

    fig = _figure(6.5, 4)
    ax = fig.add_subplot()
    lo, hi = float(min(scores.min(), threshold)), float(max(scores.max(), threshold))
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"good (n={int(np.sum(labels == 0))})", color="tab:green")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"defect (n={int(np.sum(labels == 1))})", color="tab:red")
    ax.axvline(threshold, color="k", lw=2, label=f"calibrated threshold {threshold:.4g}")
    ax.axvline(result["f1_oracle_threshold"], color="grey", ls="--", lw=1,
               label="best-F1 threshold (oracle, from test labels)")
    ax.set(xlabel="image score", ylabel="images", title="Image scores: good vs defect")
    ax.legend(fontsize=8)
    fig.savefig(d / "score_hist.png")
    plots["score_hist"] = "plots/score_hist.png"

    if "all" in curves:
        fig = _figure(5.5, 4.5)
        ax = fig.add_subplot()
        f, p = curves["all"]
        ax.plot(f, p, lw=2, color="k", label=f"all defects (AUPRO {result['aupro']:.3f})")
        for t in types:
            if t in curves:
                f, p = curves[t]
                ax.plot(f, p, lw=1, label=f"{t} ({result['per_defect'][t]['aupro']:.3f})")
        ax.set(xlabel="false-positive rate (defect-free pixels)", ylabel="per-region overlap (PRO)",
               title=f"PRO curve (AUPRO integrates up to FPR {FPR_LIMIT})", xlim=(0, FPR_LIMIT), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
        fig.savefig(d / "pro.png")
        plots["pro"] = "plots/pro.png"

    order = np.argsort(-scores, kind="stable")
    defect_idx = [int(i) for i in order if labels[i] == 1]
    good_idx = [int(i) for i in order if labels[i] == 0]
    groups = {
        "cases_defect_highest": ("Defects with the highest scores (best detected)", defect_idx[:N_CASES]),
        "cases_defect_lowest": ("Defects with the lowest scores (hardest to detect)", defect_idx[::-1][:N_CASES]),
        "cases_good_highest": ("Good images with the highest scores (closest to false alarms)", good_idx[:N_CASES]),
    }
    good_px = maps[labels == 0]
    vmin = float(np.median(good_px))
    vmax = float(max(threshold, np.percentile(maps, 99.9)))
    if vmax <= vmin:
        vmax = vmin + 1e-6
    for name, (title, idx) in groups.items():
        if not idx:
            continue
        recon = _reconstruct(scorer, images[idx])
        _case_figure(d / f"{name}.png", title, [samples[i] for i in idx], images[idx], recon, masks[idx],
                     has_mask[idx], maps[idx], scores[idx], threshold, vmin, vmax)
        plots[name] = f"plots/{name}.png"
    return plots


def _reconstruct(scorer: Any, images: np.ndarray) -> np.ndarray | None:
    """The K-mask reconstructions [N, 3, H, W], or None for a feature-space model (nothing to show as an image) or a
    tiled one (the plots' squashed thumbnails are not an input it scores)."""
    import torch

    if getattr(scorer.data, "resize", "squash") == "tile":
        return None

    rec = scorer.reconstruction(torch.from_numpy(np.ascontiguousarray(images)))
    return None if rec is None else rec.cpu().numpy()


def _case_figure(path: Path, title: str, samples: list[Sample], images: np.ndarray, recon: np.ndarray | None,
                 masks: np.ndarray, has_mask: np.ndarray, maps: np.ndarray, scores: np.ndarray, threshold: float,
                 vmin: float, vmax: float) -> None:
    n = len(samples)
    fig = _figure(11, 2.9 * n)
    fig.suptitle(title)
    axes = fig.subplots(n, 4, squeeze=False)
    for r in range(n):
        img = images[r].transpose(1, 2, 0)
        s = samples[r]
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(f"{s.defect}/{s.path.name}", fontsize=8)
        axes[r, 1].imshow(img)
        if s.label == 1 and not has_mask[r]:
            axes[r, 1].set_title("ground truth: no mask", fontsize=8)
        else:
            if masks[r].any():
                axes[r, 1].contour(masks[r].astype(float), levels=[0.5], colors="lime", linewidths=1.2)
            axes[r, 1].set_title("ground truth" + ("" if masks[r].any() else ": none (good)"), fontsize=8)
        if recon is not None:
            axes[r, 2].imshow(recon[r].transpose(1, 2, 0))
            axes[r, 2].set_title("K-mask reconstruction", fontsize=8)
        else:  # feature space: the reconstruction error itself, on its own scale
            axes[r, 2].imshow(maps[r], cmap="jet")
            axes[r, 2].set_title("feature reconstruction error", fontsize=8)
        axes[r, 3].imshow(img)
        im = axes[r, 3].imshow(maps[r], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        if (maps[r] > threshold).any():
            axes[r, 3].contour((maps[r] > threshold).astype(float), levels=[0.5], colors="white", linewidths=0.8)
        verdict = "ANOMALOUS" if scores[r] > threshold else "normal"
        axes[r, 3].set_title(f"score {scores[r]:.4g} ({verdict})", fontsize=8)
        fig.colorbar(im, ax=axes[r, 3], fraction=0.046)
        for a in axes[r]:
            a.set_axis_off()
    fig.savefig(path)


# --- report ------------------------------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def scoring_summary(cfg: Any, cal: dict[str, Any], knn_cells: int | None = None) -> dict[str, Any]:
    """What an image score of this bundle is made of, for metrics.json and report.md, in the order `Scorer.forward`
    computes it: the reconstruction error and what is mixed into it (weights as configured), the smoothing (pixels),
    the per-position normalisation, the patch-statistics and kNN terms, the fusion with the divisors calibration
    chose (calibration.json `fusion_scale_*`), and the reduction to one score; `formula` writes it out.
    `cfg`: the bundle's Config; `cal`: its calibration.json; `knn_cells`: the kNN memory's real size (cells)."""
    sc, model = cfg.scoring, cfg.model
    space = f"feature space ({model.backbone.name}, layers {list(model.backbone.layers)})" if model.backbone else \
        "pixel space"
    e = "squared error" + (f" of the residual low-passed at σ {sc.lowpass_sigma:g} px" if sc.lowpass_sigma > 0 else "")
    if sc.ssim_weight > 0:
        e = f"(1 - {sc.ssim_weight:g}) x {e} + {sc.ssim_weight:g} x (1 - SSIM) / 2"
    if sc.perceptual_weight > 0:
        e = f"(1 - {sc.perceptual_weight:g}) x [{e}] + {sc.perceptual_weight:g} x perceptual error"
    if sc.gmm_weight > 0:
        e = f"{e} + {sc.gmm_weight:g} x GMM negative log-likelihood"
    e = f"[{e}] smoothed σ {sc.sigma:g} px" if sc.sigma > 0 else f"[{e}] (no smoothing)"
    pos = sc.normalize == "position"
    recon = f"z_rec = per-position z-score of {e}" if pos else f"rec = {e}"
    terms = [f"masked reconstruction error in {space}"]
    parts = ["z_rec" if pos else "rec"]
    if sc.stats_weight > 0:
        terms.append(f"{sc.stats_weight:g} x patch-statistics z-map")
        parts.append(f"{sc.stats_weight:g} x z_stats")
    divisors = {k.removeprefix("fusion_scale_"): float(v) for k, v in cal.items() if k.startswith("fusion_scale_")}
    knn = None
    if sc.knn_weight > 0:
        knn = {"weight": float(sc.knn_weight), "memory_cells": int(knn_cells) if knn_cells is not None else None}
        cells = f"{knn_cells} cells" if knn_cells is not None else f"up to {sc.knn_memory} cells"
        terms.append(f"{sc.knn_weight:g} x nearest-normal-cell distance (kNN memory of {cells})")
        zk = "z_knn" if pos else "knn"
        if divisors:
            parts = [f"{parts[0]} / {divisors.get('reconstruction', 1.0):.4g}", *parts[1:],
                     f"{sc.knn_weight:g} x {zk} / {divisors.get('knn', 1.0):.4g}"]
        else:
            parts.append(f"{sc.knn_weight:g} x {zk}")
    fusion = sc.fusion if sc.knn_weight > 0 else "none (one term)"
    reduce = "max" if sc.reduce == "max" else f"mean of the top {sc.topk_fraction:.2%} of pixels"
    return {
        "terms": terms,
        "reconstruction": {"space": space, "lowpass_sigma_px": float(sc.lowpass_sigma),
                           "ssim_weight": float(sc.ssim_weight), "perceptual_weight": float(sc.perceptual_weight),
                           "gmm_weight": float(sc.gmm_weight)},
        "stats_weight": float(sc.stats_weight),
        "knn": knn,
        "fusion": fusion,
        "fusion_divisors": divisors,
        "normalize": sc.normalize,
        "sigma_px": float(sc.sigma),
        "reduce": sc.reduce,
        **({"topk_fraction": float(sc.topk_fraction)} if sc.reduce != "max" else {}),
        "masks": f"K={sc.num_masks} {sc.pattern}",
        "formula": f"{recon}; map = {' + '.join(parts)}; image score = {reduce} of the map",
    }


def _scoring_line(s: dict[str, Any] | None) -> str:
    if not s:
        return "not recorded"
    return f"{s['formula']} ({s['masks']} masks; fusion {s['fusion']})"


def _engine_line(e: dict[str, Any], markdown: bool = True) -> str:
    """'onnxruntime (fp32, /path/model.onnx)' or 'torch (bf16: 40/40 decisions agree ...)' for the report."""
    bits = [str(e.get("precision", "fp32"))]
    if e.get("precision_check"):
        bits[0] += f": {e['precision_check']}"
    elif e.get("precision_reason"):
        bits[0] += f" ({e['precision_reason']})"
    if e.get("onnx"):
        bits.append(f"`{e['onnx']}`" if markdown else str(e["onnx"]))
    if e.get("threads"):
        bits.append(f"{e['threads']} threads")
    return f"{e.get('name', 'torch')} ({', '.join(bits)})"


def _report_markdown(r: dict[str, Any], plots: dict[str, str]) -> str:
    cal = r["calibration"]
    conf = r["confusion"]
    L: list[str] = []
    L += [f"# Evaluation report: {r['model_id']}", ""]
    L += [f"- Bundle: `{r['bundle']}`", f"- Data: `{r['data']}` ({r['layout']} layout), model input "
          f"{r['model_size']}x{r['model_size']} px ({r['resize']}); maps compared with masks at "
          f"{r['eval_resolution']} (`--eval-size {r['eval_size']}`)",
          f"- Test images: {r['n_images']} ({r['n_good']} good, {r['n_defect']} defect in "
          f"{len(r['per_defect'])} types)",
          f"- Scoring time: {r['seconds_per_image'] * 1000:.1f} ms per image "
          f"({r['seconds_per_image_with_io'] * 1000:.1f} ms with image reading), batch {r['batch_size']}, "
          f"engine {_engine_line(r.get('engine') or {})}",
          f"- Scoring: {_scoring_line(r.get('scoring'))}",
          f"- Created: {r['created']}", ""]
    if r["n_defect_without_mask"]:
        L += [f"> {r['n_defect_without_mask']} defect image(s) have no ground-truth mask: they count for the "
              "image metrics (AUROC, F1) but not for pixel AUROC or AUPRO.", ""]
    L += ["## Results", "", "| metric | value |", "|---|---|",
          f"| image AUROC | {_fmt(r['image_auroc'])} |",
          f"| pixel AUROC | {_fmt(r['pixel_auroc'])} |",
          f"| AUPRO (FPR <= {r['aupro_fpr_limit']}) | {_fmt(r['aupro'])} |",
          f"| F1 at the calibrated threshold | {_fmt(r['f1'])} (precision {_fmt(r['precision'])}, "
          f"recall {_fmt(r['recall'])}) |",
          f"| false-alarm rate on test good images | {_fmt(r['false_alarm_rate_test_good'])} "
          f"(target {_fmt(cal.get('target_fpr'))}) |",
          f"| best F1 over all thresholds (**oracle**) | {_fmt(r['f1_oracle_best'])} at threshold "
          f"{r['f1_oracle_threshold']:.4g} |", "",
          f"Confusion at the calibrated threshold: TP {conf['tp']}, FP {conf['fp']}, TN {conf['tn']}, "
          f"FN {conf['fn']}.", ""]
    b = r.get("baseline")
    if b:
        L += ["## Beside it: the training-free baseline", "",
              f"{b['method']}, fitted on the same {b['n_train_images']} training images and thresholded on the same "
              "held-back images, so the difference is what the model adds." if not b.get("note") else
              f"{b['method']}, fitted on {b['n_train_images']} images; {b['note']}.", "",
              "| | image AUROC | pixel AUROC | AUPRO | F1 |", "|---|---|---|---|---|",
              f"| this model | {_fmt(r['image_auroc'])} | {_fmt(r['pixel_auroc'])} | {_fmt(r['aupro'])} | "
              f"{_fmt(r['f1'])} |",
              f"| baseline | {_fmt(b['image_auroc'])} | {_fmt(b['pixel_auroc'])} | {_fmt(b['aupro'])} | "
              f"{_fmt(b['f1'])} |", ""]
    L += ["## The threshold", "",
          f"Threshold **{r['threshold']:.6g}** (an image is anomalous when its score is above it) comes from the "
          "bundle's calibration: it was set on held-back NORMAL training images "
          f"({cal.get('n_threshold_images', cal.get('n_images', '?'))} images kept out of training), as "
          f"`{cal.get('method', 'quantile of normal scores')}` with target false-alarm rate "
          f"{cal.get('target_fpr', '?')}. No test image or test label was used to choose it.",
          "",
          "The *oracle* best F1 picks the threshold that maximises F1 on these test labels; a deployed system "
          "cannot do that, so it is an upper bound that shows how much a better threshold could gain, not a "
          "result.", ""]
    L += ["## Per defect type (each type against all good test images)", "",
          "| type | n | image AUROC | pixel AUROC | AUPRO | F1 | recall | best F1 (oracle) |",
          "|---|---|---|---|---|---|---|---|"]
    for t, m in r["per_defect"].items():
        n = f"{m['n']}" + (f" ({m['n_without_mask']} no mask)" if m["n_without_mask"] else "")
        L.append(f"| {t} | {n} | {_fmt(m['image_auroc'])} | {_fmt(m['pixel_auroc'])} | {_fmt(m['aupro'])} | "
                 f"{_fmt(m['f1'])} | {_fmt(m['recall'])} | {_fmt(m['f1_oracle_best'])} |")
    L.append("")
    titles = {
        "roc": "Image-level ROC (red dot: the calibrated threshold)",
        "score_hist": "Score histogram, good vs defect, with the calibrated threshold",
        "pro": "PRO curve up to the AUPRO limit",
        "cases_defect_highest": "Defects with the highest scores",
        "cases_defect_lowest": "Defects with the lowest scores",
        "cases_good_highest": "Good images with the highest scores",
    }
    L += ["## Plots", ""]
    for key, rel in plots.items():
        L += [f"### {titles.get(key, key)}", "", f"![{key}]({rel})", ""]
    L += ["Case rows: image | ground-truth contour (green) | K-mask reconstruction | anomaly map over the image "
          "(one colour scale for all cases: median of good-image pixels to the larger of the threshold and the "
          "99.9th percentile; white contour: pixels above the image threshold).", ""]
    L += ["## Definitions", "",
          "- image AUROC: probability that a random defect image scores above a random good image (ties count 1/2).",
          "- pixel AUROC: the same over all pixels of the good images and of the defect images that have a mask.",
          "- AUPRO: for each threshold, PRO = mean over ground-truth regions (8-connected components, per image) of "
          "the share of the region's pixels above the threshold; FPR = share of defect-free pixels above it. "
          f"The PRO-vs-FPR curve is integrated up to FPR {r['aupro_fpr_limit']} and divided by "
          f"{r['aupro_fpr_limit']} (MVTec AD).",
          "- F1: at the calibrated threshold, image level, 2TP / (2TP + FP + FN).",
          f"- Maps and masks are compared at {r['eval_resolution']} (`--eval-size {r['eval_size']}`); resize "
          f"policy `{r['resize']}`" + (": each map is cropped to its image's valid region first and the image "
                                       "score is taken over that region only." if r["resize"] == "letterbox" else
                                       "."),
          "- `scores.csv` lists every test image's score; `metrics.json` holds every figure above.", ""]
    return "\n".join(L)


# --- predict -----------------------------------------------------------------------------------------------------
def collect_images(inputs: list[Path]) -> list[Path]:
    files: list[Path] = []
    seen: set[Path] = set()
    for p in inputs:
        p = Path(p)
        if p.is_dir():
            found = list_images(p)
            if not found:
                subs = sorted(d for d in p.iterdir() if d.is_dir() and list_images(d))
                hint = (f"; its sub-folders {', '.join(d.name for d in subs[:4])}{', ...' if len(subs) > 4 else ''} "
                        "hold images: pass them (a shell glob such as DIR/*/ works)") if subs else ""
                raise UserError(f"{p}: no images in this folder (extensions {', '.join(sorted(IMAGE_EXTS))}){hint}")
        elif p.is_file():
            found = [p]
        else:
            raise UserError(f"{p}: image not found")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    if not files:
        raise UserError("no images given")
    return files


def _unique_stem(stem: str, used: set[str]) -> str:
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name


def _read_display_bgr(path: Path) -> np.ndarray:
    """The image as it was scored (same decode: EXIF orientation, bit depth), BGR uint8 at its own size."""
    return read_display_bgr(path)


def heatmap_u8(amap: np.ndarray, scale: float) -> np.ndarray:
    """Anomaly map -> uint8 [0, 255] as clip(map / scale, 0, 1) * 255 (scale = 2 x threshold: the threshold is
    mid-grey)."""
    return (np.clip(amap / scale, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def overlay_bgr(image_bgr: np.ndarray, amap: np.ndarray, scale: float, threshold: float | None,
                text: str) -> np.ndarray:
    """Jet heatmap of `amap` blended over the image at the image's own size, threshold contour, a caption."""
    h, w = image_bgr.shape[:2]
    amap_full = cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(heatmap_u8(amap_full, scale), cv2.COLORMAP_JET)
    out = cv2.addWeighted(image_bgr, 0.5, heat, 0.5, 0.0)
    if threshold is not None:
        above = (amap_full > threshold).astype(np.uint8)
        contours, _ = cv2.findContours(above, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), max(1, round(min(h, w) / 200)))
    fs = max(0.4, min(h, w) / 400)
    tw = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, 1)[0][0]
    fs = min(fs, fs * (w - 8) / max(1, tw))  # shrink to fit the width; too small images get no caption
    if fs >= 0.3:
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, fs, 1)
        cv2.rectangle(out, (0, 0), (tw + 8, th + base + 8), (0, 0, 0), -1)
        cv2.putText(out, text, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, fs, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def _imwrite(path: Path, img: np.ndarray, params: list[int] | None = None) -> None:
    ok, buf = cv2.imencode(path.suffix, img, params or [])
    if not ok:
        raise OSError(f"{path}: could not encode image")
    buf.tofile(str(path))


def run_predict(bundle: str | os.PathLike[str], images: list[Path], out: str | os.PathLike[str],
                batch_size: int = 8, open_engine: EngineOpener | None = None, precision: str | None = None) -> Path:
    """Score image files (or every image in given folders): write <stem>_map.png, <stem>_overlay.jpg and
    scores.csv into the new directory `out`, with run.json recording the bundle, threshold and engine. Returns
    `out`. `open_engine`/`precision`: as in `run_evaluation`."""
    out = Path(out)
    refuse_existing_out(out, "predictions")
    files = collect_images(list(images))
    read_bundle_meta(bundle)

    from .bundle import load_scorer, staged_dir
    from .scoring import valid_scores

    scorer, cal, meta = load_scorer(bundle)
    engine = (open_engine() if open_engine else None) or _torch_engine(scorer, meta, cal, precision, None,
                                                                         batch_size)
    log.info("scoring with %s", _engine_line(engine.info, markdown=False))
    threshold = float(cal["threshold"]) if cal is not None else None
    if threshold is None:
        log.warning("%s: bundle has no calibration; scores.csv will have no threshold or verdict", bundle)
    size, resize = scorer.img_size, scorer.data.resize
    rows: list[list[str]] = []
    used: set[str] = set()
    with staged_dir(out, "predictions") as d:
        scale = 2.0 * threshold if threshold is not None and threshold > 0 else None
        pending: list[tuple[Path, str, np.ndarray, float]] = []
        policy = input_policy(scorer.data, size)
        step = 1 if isinstance(policy, TileSpec) else batch_size  # tiled: one image's tiles are one batch
        for i in range(0, len(files), step):
            chunk = files[i:i + step]
            if isinstance(policy, TileSpec):  # the stitched map at working resolution
                tiles, tplaces = load_stack_placed(chunk, size, policy)
                lay = tplaces.layouts[0]  # type: ignore[attr-defined]
                if lay.padded:
                    warn_small_tiled(1, 1, policy, chunk[0])
                maps, _ = _score_all(engine, tiles, max(batch_size, len(tiles)))
                valid = tplaces.stitched(maps)  # type: ignore[attr-defined]
                sc = np.array([reduce_stitched(a, scorer.scoring.reduce, scorer.scoring.topk_fraction)
                               for a in valid])
            else:
                placed = [read_image_placed(p, size, resize) for p in chunk]
                maps, scores = _score_all(engine, np.stack([a for a, _ in placed]), batch_size)
                places = [pl for _, pl in placed if pl is not None]
                sc = valid_scores(maps, places, scorer.scoring) if resize != "squash" else \
                    scores.double().cpu().numpy()
                # the map of the image itself: its valid region (letterbox), at model resolution
                valid = [np.ascontiguousarray(crop_valid(m, pl)) for m, pl in zip(maps[:, 0].cpu().numpy(), places,
                                                                                  strict=True)]
            for p, m, s in zip(chunk, valid, sc, strict=True):
                if not np.isfinite(s):
                    raise UserError(f"{bundle}: the model gives a non-finite score for {p}")
                stem = _unique_stem(p.stem, used)
                if scale is None:  # uncalibrated: one scale for the whole run, set after scoring
                    pending.append((p, stem, m, float(s)))
                else:
                    rows.append(_write_prediction(d, p, stem, m, float(s), threshold, scale))
        if pending:
            top = max(float(np.max(m)) for _, _, m, _ in pending)
            scale = top if top > 0 else 1.0
            for p, stem, m, s in pending:
                rows.append(_write_prediction(d, p, stem, m, s, threshold, scale))
        with open(d / "scores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "score", "threshold", "anomalous", "map", "overlay"])
            w.writerows(rows)
        write_json_atomic(d / "run.json", {  # what made these scores: folders of two engines can be told apart
            "bundle": str(bundle), "model_id": meta.model_id, "threshold": threshold, "images": len(rows),
            "engine": engine.info, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    log.info("%d prediction(s) written to %s", len(rows), out)
    return out


def _write_prediction(d: Path, path: Path, stem: str, amap: np.ndarray, score: float, threshold: float | None,
                      scale: float) -> list[str]:
    anomalous = threshold is not None and score > threshold
    _imwrite(d / f"{stem}_map.png", heatmap_u8(amap, scale))
    verdict = "" if threshold is None else (" ANOMALOUS" if anomalous else " ok")
    text = f"score {score:.4g}" + (f" / thr {threshold:.4g}" if threshold is not None else "") + verdict
    _imwrite(d / f"{stem}_overlay.jpg", overlay_bgr(_read_display_bgr(path), amap, scale, threshold, text),
             [cv2.IMWRITE_JPEG_QUALITY, 90])
    return [str(path), repr(score), "" if threshold is None else repr(threshold),
            "" if threshold is None else str(int(anomalous)), f"{stem}_map.png", f"{stem}_overlay.jpg"]
