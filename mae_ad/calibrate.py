"""Re-calibrate a trained bundle: new scoring settings or a new false-alarm target, same weights, no retraining.

`mae-ad calibrate BUNDLE --data DIR --out NEW [--set scoring.sigma=2 --set calibration.target_fpr=0.005]`
re-scores the bundle's own held-back normal images (listed in its calibration.json) under the new settings and
writes a new bundle. Only `scoring.*`, `calibration.target_fpr` and `calibration.stats_source` may change:
anything else would need retraining.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .bundle import load_bundle, staged_dir, write_bundle_files
from .config import Config, apply_overrides, config_from_dict
from .contract import Placement, UserError, read_calibration, refuse_existing_out
from .data import index_dataset, load_stack_placed, stats_paths
from .scoring import Scorer, calibrate
from .tiling import TiledPlacements, TileSpec, input_policy

log = logging.getLogger(__name__)

ALLOWED_PREFIXES = ("scoring.", "calibration.target_fpr", "calibration.stats_source")


def training_stats_images(cfg: Config, train_paths: Callable[[], list[Path]]) -> torch.Tensor | None:
    """The images position statistics are fitted on when calibration.stats_source=train (None otherwise: the
    first half of the held-back images). `train_paths` is called only then."""
    return training_stats_placed(cfg, train_paths)[0]


def training_stats_placed(cfg: Config, train_paths: Callable[[], list[Path]]
                          ) -> tuple[torch.Tensor | None, list[Placement] | None]:
    """`training_stats_images` and each image's `Placement` (data.resize), or (None, None)."""
    if cfg.calibration.stats_source != "train" or cfg.scoring.normalize != "position":
        return None, None
    policy = input_policy(cfg.data, cfg.model.img_size)
    arr, places = load_stack_placed(stats_paths(train_paths(), policy), cfg.model.img_size, policy)
    return torch.from_numpy(arr), places


def fit_knn_memory(scorer: Scorer, cfg: Config, train_paths: list[Path], tokens: torch.Tensor | None = None,
                   batch_size: int = 16, item_image: torch.Tensor | None = None) -> torch.Tensor | None:
    """With scoring.knn_weight: set the scorer's kNN memory from the training images' token cells (`tokens`
    [N, C, g, g] when already computed, in `train_paths` order; under data.resize=tile one per tile, `item_image` [N]
    naming the image of each). Returns the memory owner id (index in `train_paths`) of each image
    `training_stats_images` returns (for leave-one-image-out statistics), or None when there is nothing to do."""
    if scorer.knn_weight <= 0:
        return None
    policy = input_policy(cfg.data, cfg.model.img_size)
    if tokens is None:
        dev = scorer.knn_mean.device
        chunks, owners = [], []
        with torch.no_grad():
            for i in range(0, len(train_paths), batch_size):
                arr, places = load_stack_placed(train_paths[i:i + batch_size], cfg.model.img_size, policy)
                x = torch.from_numpy(arr)
                chunks += [scorer.normalise_input(x[j:j + batch_size].to(dev)).cpu()
                           for j in range(0, x.shape[0], batch_size)]
                owners.append(torch.from_numpy(places.image_of_tile()) + i if isinstance(places, TiledPlacements)
                              else torch.arange(i, i + x.shape[0]))
        tokens, item_image = torch.cat(chunks), torch.cat(owners)
    n, c, gh, gw = tokens.shape
    cells = tokens.permute(0, 2, 3, 1).reshape(-1, c)
    owner = (torch.arange(n) if item_image is None else item_image.long()).repeat_interleave(gh * gw)
    scorer.set_knn_memory(cells, owner)
    log.info("kNN memory: %d of %d training cells (%d %s)", scorer.knn_bank.shape[0], cells.shape[0], n,
             "tiles" if isinstance(policy, TileSpec) else "images")
    if cfg.calibration.stats_source != "train" or cfg.scoring.normalize != "position":
        return None
    index = {p: i for i, p in enumerate(train_paths)}
    return torch.tensor([index[p] for p in stats_paths(train_paths, policy)])


def _bundle_training_paths(data: Path, holdout: list[str]) -> list[Path]:
    """A bundle's training images: the dataset's normal training images minus the bundle's held-back ones."""
    held = set(holdout)
    index = index_dataset(data)
    paths = [p for p in index.train if str(p.relative_to(index.root)) not in held]
    if not paths:
        raise UserError(f"{data}: no training images besides the held-back ones (calibration.stats_source=train)")
    return paths


def recalibrate(bundle: str | os.PathLike[str], data: str | os.PathLike[str], out: str | os.PathLike[str],
                overrides: list[str] | None = None, batch_size: int = 8) -> Path:
    bundle, data, out = Path(bundle), Path(data), Path(out)
    for item in overrides or []:
        if not item.split("=", 1)[0].strip().startswith(ALLOWED_PREFIXES):
            raise UserError(f"--set {item!r}: calibrate may change only scoring.*, calibration.target_fpr and "
                            "calibration.stats_source")
    refuse_existing_out(out, "bundle")
    old_cal = read_calibration(bundle)
    holdout = old_cal.get("holdout_images")
    if not holdout:
        raise UserError(f"{bundle}: calibration.json lists no holdout_images; cannot re-calibrate")
    paths = [data / p for p in holdout]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: held-back image of this bundle not found under --data {data}")
    cfg, model, meta = load_bundle(bundle)
    source = f"{bundle} (with --set {', '.join(overrides)})" if overrides else str(bundle)
    cfg = config_from_dict(apply_overrides(cfg.to_dict(), overrides), source)
    scorer = Scorer(model, cfg.scoring, cfg.data).eval()
    arr, places = load_stack_placed(paths, cfg.model.img_size, input_policy(cfg.data, cfg.model.img_size))
    images = torch.from_numpy(arr)
    stats_images, stats_places = training_stats_placed(cfg, lambda: _bundle_training_paths(data, holdout))
    owner = fit_knn_memory(scorer, cfg, _bundle_training_paths(data, holdout)) if scorer.knn_weight > 0 else None
    cal = calibrate(scorer, images, cfg.calibration.target_fpr, batch_size=batch_size, stats_images=stats_images,
                    stats_owner=owner, placements=places, stats_placements=stats_places)
    cal["holdout_images"] = holdout
    cal["recalibrated_from"] = meta.model_id
    extra: dict[str, Any] = {"training": meta.training} if meta.training is not None else {}
    extra["parent_bundle_weights_sha256"] = meta.weights_sha256
    with staged_dir(out) as d:
        write_bundle_files(d, model, cfg, cal, scorer, extra_meta=extra)
    log.info("re-calibrated %s -> %s: threshold %.5g (was %.5g)", bundle, out, cal["threshold"], old_cal["threshold"])
    return out
