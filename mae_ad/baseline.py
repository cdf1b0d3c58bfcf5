"""Training-free baselines to report beside every model.

`KnnBaseline` (PatchCore-style, Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022):
the cells of a frozen ImageNet backbone's locally aggregated features (the very tokens of a feature-space model,
mae_ad/backbone.py) of the normal training images form a memory bank, optionally thinned by greedy k-center coreset
subsampling (on a random projection, as PatchCore does); a test cell's anomaly is its Euclidean distance to the
nearest memory cell; the cell map is bilinearly upsampled, Gaussian-smoothed, and its maximum is the image score.

`PatchStatsBaseline`: per-position patch statistics, described below.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .contract import UserError
from .coreset import greedy_coreset

if TYPE_CHECKING:
    from .config import BackboneConfig
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


class KnnBaseline:
    """fit(normal images) then score(images) -> (maps [N, 1, H, W], scores [N]). Images: float [N, 3, H, W] in
    [0, 1] at the size the backbone was built for. `coreset_fraction` < 1 keeps that share of the memory cells
    (greedy_coreset), `max_memory` at most that many; distances are Euclidean in the backbone's raw (unstandardised) feature space."""

    def __init__(self, backbone: BackboneConfig, size: int, coreset_fraction: float = 1.0, sigma: float = 4.0,
                 tokenizer: torch.nn.Module | None = None, max_memory: int | None = None):
        from .backbone import FeatureTokenizer

        if not 0 < coreset_fraction <= 1:
            raise ValueError(f"coreset_fraction must be in (0, 1], got {coreset_fraction}")
        if tokenizer is None:
            tokenizer = FeatureTokenizer(backbone, size)
            tokenizer.load_source_weights()
        self.tokenizer = tokenizer.eval()
        self.size = size
        self.coreset_fraction = coreset_fraction
        self.max_memory = max_memory  # a greedy coreset of at most this many cells (tiled images give millions)
        self.sigma = sigma
        self.memory: torch.Tensor | None = None  # [M, C]

    @torch.no_grad()
    def cells(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """[N, 3, H, W] -> feature cells [N, C, g, g] (raw, before the model's standardisation)."""
        x = torch.as_tensor(images, dtype=torch.float32)
        return torch.cat([self.tokenizer.raw_features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    def fit(self, images: torch.Tensor) -> KnnBaseline:
        f = self.cells(images)
        bank = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        n = max(1, int(round(bank.shape[0] * self.coreset_fraction)))
        if self.max_memory is not None:
            n = min(n, self.max_memory)
        self.memory = bank[greedy_coreset(bank, n)] if n < bank.shape[0] else bank
        log.info("kNN baseline: memory of %d of %d cells (%d images or tiles, %.0f%% kept), %d channels",
                 self.memory.shape[0], bank.shape[0], len(images), 100 * self.memory.shape[0] / bank.shape[0],
                 bank.shape[1])
        return self

    @torch.no_grad()
    def score(self, images: torch.Tensor, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory is None:
            raise RuntimeError("KnnBaseline.score called before fit")
        maps = []
        for i in range(0, len(images), batch_size):
            f = self.cells(images[i:i + batch_size])
            b, c, gh, gw = f.shape
            q = f.permute(0, 2, 3, 1).reshape(-1, c)
            rows = max(1, (1 << 27) // max(1, self.memory.shape[0]))  # at most ~512 MB of distances at a time
            d = torch.cat([torch.cdist(q[j:j + rows], self.memory).amin(dim=1) for j in range(0, q.shape[0], rows)])
            m = F.interpolate(d.view(b, 1, gh, gw), size=images.shape[-2:], mode="bilinear", align_corners=False)
            if self.sigma > 0:
                m = gaussian_blur(m, gaussian_kernel1d(self.sigma, images.shape[-1] - 1))
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
                  seed: int = 0, method: str = "patchstats", backbone: BackboneConfig | None = None,
                  coreset_fraction: float = 1.0) -> BaselineResult:
    """Fit on the training split of train/good, threshold on the held-back normal images (the same split rule
    as training), score every test image and compute the metrics (mae_ad.metrics). `method`: patchstats, or knn
    on the features of `backbone` (default: EfficientNet-Lite0, stride-8 and -16 levels on a size/8 grid)."""
    from .data import index_dataset, load_stack, read_mask, require_train_images, split_holdout

    if method not in ("patchstats", "knn"):
        raise UserError(f"baseline: unknown method {method!r}; choose patchstats or knn")
    if method == "patchstats" and size % patch:
        raise UserError(f"baseline: image size {size} is not a multiple of the patch size {patch}")
    index = index_dataset(data, need_test=True)
    train_paths, hold_paths = split_holdout(require_train_images(index), holdout_fraction, min_holdout, seed)
    base: PatchStatsBaseline | KnnBaseline
    if method == "knn":
        from .config import BackboneConfig

        bcfg = backbone or BackboneConfig()
        if size % bcfg.stride:
            raise UserError(f"baseline: image size {size} is not a multiple of the backbone stride {bcfg.stride}")
        base = KnnBaseline(bcfg, size, coreset_fraction, sigma)
    else:
        base = PatchStatsBaseline(patch, sigma)
    base.fit(torch.from_numpy(load_stack(train_paths, size)))
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
    result.metrics["method"] = ("kNN on pretrained features (training-free)" if method == "knn"
                                else "patch statistics (training-free)")
    log.info("%s baseline on %s: %s", method, data, {k: v for k, v in result.metrics.items() if isinstance(v, float)})
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


__all__ = ["BaselineResult", "KnnBaseline", "PatchStatsBaseline", "baseline_metrics", "greedy_coreset",
           "score_dataset"]
