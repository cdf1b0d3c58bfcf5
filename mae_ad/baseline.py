"""A training-free baseline to report beside every model: per-position patch statistics.

Each image is cut into `patch` x `patch` cells; a cell is described by the mean and the standard deviation of each
colour channel (6 numbers). Fitting stores, for every cell position, the mean and standard deviation of those
numbers over the normal training images. An image's anomaly map is, per cell, the largest |z-score| of its 6
numbers against its own position's statistics, bilinearly upsampled to the image and Gaussian-smoothed; the image
score is the map's maximum. The threshold comes from held-back normal images, like the model's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .contract import UserError
from .scoring import cell_stats, gaussian_blur, gaussian_kernel1d, normal_statistics

log = logging.getLogger(__name__)


class PatchStatsBaseline:
    """fit(normal images) then score(images) -> (maps [N, 1, H, W], scores [N]). Images: float [N, 3, H, W]."""

    def __init__(self, patch: int = 8, sigma: float = 4.0, std_floor: float = 0.1):
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        self.patch = patch
        self.sigma = sigma
        self.std_floor = std_floor  # share of the median per-position std used as the floor (no division by ~0)
        self.mean: torch.Tensor | None = None  # [6, g, g]
        self.std: torch.Tensor | None = None
        self.size: int | None = None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> per-cell channel means and standard deviations [N, 6, H/p, W/p]."""
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {self.patch}")
        return cell_stats(x, self.patch)

    def fit(self, images: torch.Tensor, batch_size: int = 64) -> PatchStatsBaseline:
        if len(images) < 2:
            raise ValueError(f"the patch-statistics baseline needs at least 2 normal images, got {len(images)}")
        feats = torch.cat([self.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
        mean, std = normal_statistics(feats, floor_share=self.std_floor, eps=1e-6)
        self.mean, self.std = mean[0], std[0]
        self.size = int(images.shape[-1])
        return self

    @torch.no_grad()
    def score(self, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError("PatchStatsBaseline.score called before fit")
        maps = []
        for i in range(0, len(images), batch_size):
            chunk = torch.as_tensor(images[i:i + batch_size], dtype=torch.float32)
            if chunk.shape[-1] != self.size:
                raise ValueError(f"images are {chunk.shape[-1]} px but the baseline was fitted at {self.size} px")
            z = ((self.features(chunk) - self.mean) / self.std).abs().amax(dim=1, keepdim=True)  # [B, 1, g, g]
            m = F.interpolate(z, size=chunk.shape[-2:], mode="bilinear", align_corners=False)
            if self.sigma > 0:
                m = gaussian_blur(m, gaussian_kernel1d(self.sigma, chunk.shape[-1] - 1))
            maps.append(m)
        out = torch.cat(maps)
        return out, out.flatten(1).amax(dim=1)


@dataclass
class BaselineResult:
    """Scores of a dataset's test images (in the dataset index's order) and the calibrated threshold."""

    maps: np.ndarray  # float32 [N, H, W]
    scores: np.ndarray  # float32 [N]
    labels: np.ndarray  # int [N], 1 = defect
    defects: list[str]
    gt_masks: list[np.ndarray | None]  # {0,1} [H, W]; zeros for normal images, None for a defect without a mask
    threshold: float
    metrics: dict[str, Any] = field(default_factory=dict)


def score_dataset(data: str | Path, size: int = 224, patch: int = 8, sigma: float = 4.0,
                  holdout_fraction: float = 0.2, min_holdout: int = 4, target_fpr: float = 0.01,
                  seed: int = 0) -> BaselineResult:
    """Fit on the training split of train/good, threshold on the held-back normal images (the same split rule
    as training), score every test image and compute the metrics (mae_ad.metrics)."""
    from .data import index_dataset, load_stack, read_mask, require_train_images, split_holdout

    if size % patch:
        raise UserError(f"baseline: image size {size} is not a multiple of the patch size {patch}")
    index = index_dataset(data, need_test=True)
    train_paths, hold_paths = split_holdout(require_train_images(index), holdout_fraction, min_holdout, seed)
    base = PatchStatsBaseline(patch, sigma).fit(torch.from_numpy(load_stack(train_paths, size)))
    _, hold_scores = base.score(torch.from_numpy(load_stack(hold_paths, size)))
    threshold = float(np.quantile(hold_scores.double().numpy(), 1.0 - target_fpr, method="higher"))
    test = index.test
    maps, scores = base.score(torch.from_numpy(load_stack([s.path for s in test], size)))
    gt: list[np.ndarray | None] = []
    for s in test:
        if s.label == 0:
            gt.append(np.zeros((size, size), np.float32))
        else:
            gt.append(read_mask(s.mask, size) if s.mask is not None else None)
    result = BaselineResult(maps[:, 0].numpy(), scores.numpy(), np.array([s.label for s in test]),
                            [s.defect for s in test], gt, threshold)
    result.metrics = baseline_metrics(result)
    log.info("patch-statistics baseline on %s: %s", data,
             {k: v for k, v in result.metrics.items() if isinstance(v, float)})
    return result


def baseline_metrics(result: BaselineResult) -> dict[str, Any]:
    """image AUROC, pixel AUROC, AUPRO (images with a ground-truth mask) and F1 at the calibrated threshold."""
    from . import metrics

    out: dict[str, Any] = {"method": "patch statistics (training-free)", "threshold": result.threshold}
    out.update(metrics.image_metrics(result.labels, result.scores, result.threshold))
    with_mask = [i for i, m in enumerate(result.gt_masks) if m is not None]
    if with_mask and any(result.labels[i] for i in with_mask):
        masks = np.stack([result.gt_masks[i] for i in with_mask])  # type: ignore[misc]
        maps = result.maps[with_mask]
        out["pixel_auroc"] = metrics.pixel_auroc(masks, maps)
        out["aupro"] = metrics.aupro(masks, maps)
    else:
        out["pixel_auroc"] = out["aupro"] = None
    return out


__all__ = ["BaselineResult", "PatchStatsBaseline", "baseline_metrics", "score_dataset"]
