"""The K-mask anomaly scorer: image in, anomaly map and score out. One nn.Module that every stage runs.

Evaluation, `predict`, the ONNX graph (and so the TensorRT engine) and the agent's PyTorch backend all call
`Scorer.forward`, so they cannot drift apart. Everything data-independent (the K masks, the Gaussian kernel, the
normalisation, the calibration maps) is a buffer: the exported graph holds them as constants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, DataConfig, ScoringConfig
from .gaussian import gaussian_kernel1d
from .masking import inference_masks, masks_to_ids
from .model import MaskedAutoencoderViT
from .tiling import TiledPlacements
from .variants import blur_channels, ssim_map


def normalise_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, per_image: bool = False,
                     gray: bool = False) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> model space: (x - mean) / std; with `gray` (model.in_chans=1) the mean of the three
    normalised channels [B, 1, H, W]; then optionally each image channel standardised by its own mean and std
    (data.normalize=per_image). Training and scoring both call this, so the exported graph converts RGB to gray
    itself and its input stays [B, 3, H, W]."""
    x = (images - mean) / std
    if gray:
        x = x.mean(dim=1, keepdim=True)
    if per_image:
        x = x - x.mean(dim=(2, 3), keepdim=True)
        x = x / ((x * x).mean(dim=(2, 3), keepdim=True).sqrt() + 1e-6)  # population std: no ReduceProd in ONNX
    return x


def cell_stats(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> each p x p cell's per-channel mean and standard deviation [B, 2C, H/p, W/p]. Reshapes and
    means only (no pooling op), so it also exports inside the ops the compile stage checks."""
    b, c, h, w = x.shape
    cells = x.reshape(b, c, h // p, p, w // p, p)
    mean = cells.mean(dim=(3, 5))
    var = (cells * cells).mean(dim=(3, 5)) - mean * mean
    return torch.cat([mean, var.clamp_min(0).sqrt()], dim=1)


def normal_statistics(samples: torch.Tensor, floor_share: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position mean and std over normal samples [N, ...] -> ([1, ...], [1, ...]). The std is floored at
    `floor_share` times its median (at least `eps`), so positions where all normals agree do not divide by ~0;
    with one sample it is 1."""
    mean = samples.mean(dim=0, keepdim=True)
    if samples.shape[0] < 2:
        return mean, torch.ones_like(mean)
    std = samples.std(dim=0, keepdim=True)
    return mean, torch.maximum(std, std.flatten().median().clamp_min(eps) * floor_share)


def valid_normal_statistics(samples: torch.Tensor, valid: torch.Tensor | None, floor_share: float, eps: float,
                            min_count: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """`normal_statistics` of maps [N, 1, H, W] counting at each pixel only the samples whose `valid` [N, 1, H, W]
    (bool; data.resize=letterbox: the image, not the fill) is set there; pixels valid in fewer than `min_count`
    samples keep the statistics of all samples. `valid` None: `normal_statistics`."""
    mean0, std0 = normal_statistics(samples, floor_share, eps)
    if valid is None or bool(valid.all()):
        return mean0, std0
    w = valid.to(samples.dtype)
    n = w.sum(dim=0, keepdim=True)
    mean = (samples * w).sum(dim=0, keepdim=True) / n.clamp_min(1)
    std = (((samples - mean) ** 2 * w).sum(dim=0, keepdim=True) / (n - 1).clamp_min(1)).sqrt()
    ok = n >= min_count
    if not bool(ok.any()):
        return mean0, std0
    std = torch.maximum(std, std[ok].median().clamp_min(eps) * floor_share)
    return torch.where(ok, mean, mean0), torch.where(ok, std, std0)


def gaussian_blur(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian smoothing of [B, 1, H, W] maps with reflect padding: output keeps the input size."""
    r = kernel.numel() // 2
    x = F.pad(maps, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


class Scorer(nn.Module):
    """K-mask reconstruction scoring.

    forward(image [B, 3, H, W] float RGB in [0, 1]) -> (anomaly_map [B, 1, H, W], score [B]).
    """

    def __init__(self, model: MaskedAutoencoderViT, scoring: ScoringConfig, data: DataConfig,
                 img_size: int | None = None):
        """`scoring` and `data`: the configuration sections the scorer reads; img_size: the model's by default."""
        super().__init__()
        self.model = model
        self.scoring, self.data = scoring, data
        sc = scoring
        grid, size = model.grid, img_size or model.cfg.img_size
        masks = inference_masks(grid, sc.num_masks, sc.pattern)  # [K, L] bool
        ids_keep, ids_restore = masks_to_ids(masks)
        self.num_masks = sc.num_masks
        self.register_buffer("ids_keep", ids_keep)  # [K, L_keep]
        self.register_buffer("ids_restore", ids_restore)  # [K, L]
        self.register_buffer("assign", masks.float().view(1, sc.num_masks, -1, 1))  # [1, K, L, 1]
        self.register_buffer("pix_mean", torch.tensor(data.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pix_std", torch.tensor(data.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.per_image = data.normalize == "per_image"
        self.gray = model.cfg.in_chans == 1
        self.features = model.backbone is not None  # feature space: the error map is upsampled to the image
        self.img_size = size
        self.smooth = sc.sigma > 0
        self.register_buffer("kernel", gaussian_kernel1d(sc.sigma, size - 1) if self.smooth else torch.ones(1))
        self.normalize = sc.normalize == "position"
        self.register_buffer("map_mean", torch.zeros(1, 1, size, size))
        self.register_buffer("map_std", torch.ones(1, 1, size, size))
        self.reduce = sc.reduce
        self.topk = max(1, int(round(sc.topk_fraction * size * size)))
        # variants (docs/variants.md): structural (1 - SSIM) map and GMM-head likelihood map, both off by default
        self.ssim_weight = float(sc.ssim_weight)
        if self.ssim_weight > 0:
            self.register_buffer("ssim_window", gaussian_kernel1d(sc.ssim_sigma, size - 1))
        self.lowpass = sc.lowpass_sigma > 0
        if self.lowpass:
            self.register_buffer("lowpass_window", gaussian_kernel1d(sc.lowpass_sigma, size - 1))
        self.perceptual_weight = float(sc.perceptual_weight)
        if self.perceptual_weight > 0 and model.perceptual is None:
            raise ValueError("scoring.perceptual_weight > 0 needs model.perceptual")
        self.gmm_weight = float(sc.gmm_weight)
        if self.gmm_weight > 0 and not hasattr(model, "gmm_head"):
            raise ValueError("scoring.gmm_weight > 0 needs a model with a GMM head (model.gmm_components > 0)")
        # training-free patch statistics fused with the (position-normalised) reconstruction map
        self.stats_weight = float(sc.stats_weight)
        if self.stats_weight > 0:
            if not self.normalize:
                raise ValueError("scoring.stats_weight > 0 needs scoring.normalize=position")
            c, g = model.cfg.in_chans, model.grid
            self.register_buffer("cell_mean", torch.zeros(1, 2 * c, g, g))
            self.register_buffer("cell_std", torch.ones(1, 2 * c, g, g))
        # nearest-normal-cell distance map (feature space): the memory is set by `set_knn_memory`
        self.knn_weight = float(sc.knn_weight)
        if self.knn_weight > 0:
            if not self.features:
                raise ValueError("scoring.knn_weight > 0 needs model.backbone")
            c = model.token_chans
            self.register_buffer("knn_bank", torch.zeros(0, c))  # [M, C] standardised normal cells
            self.register_buffer("knn_bank_sq", torch.zeros(1, 0))  # [1, M] their squared norms
            self.register_buffer("knn_mean", torch.zeros(1, 1, size, size))
            self.register_buffer("knn_std", torch.ones(1, 1, size, size))
            self.knn_owner: torch.Tensor | None = None  # [M] source image of each cell (calibration only)
        # scoring.fusion=balanced / inverse_variance: [2] = divisors of the reconstruction and kNN z-maps (held-back
        # normal image-score std, or its square, of each; set by `calibrate`); 1, 1 = a plain sum
        self.balanced = sc.fusion in ("balanced", "inverse_variance")
        self.fusion_power = 2 if sc.fusion == "inverse_variance" else 1
        self.register_buffer("fuse_scale", torch.ones(2))

    # --- pieces ---------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, model: MaskedAutoencoderViT, cfg: Config) -> Scorer:
        """The scorer of a whole configuration: its scoring and data sections (the model knows its own size)."""
        return cls(model, cfg.scoring, cfg.data)

    def normalise_input(self, image: torch.Tensor) -> torch.Tensor:
        """RGB [B, 3, H, W] in [0, 1] -> the token image the MAE patchifies: normalised pixels, or (feature space)
        the backbone's standardised feature cells [B, C_f, H/s, W/s]."""
        if self.features:
            return self.model.tokens(image)
        return normalise_images(image, self.pix_mean, self.pix_std, self.per_image, self.gray)

    def reconstruct_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> each patch's reconstruction from the one mask that hid it [B, L, P],
        in the same (normalised pixel) space as the input. All K masked copies run in one batched pass."""
        return self.reconstruct_with_nll(x, with_nll=False)[0]

    def reconstruct_with_nll(self, x: torch.Tensor, with_nll: bool = True
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`reconstruct_patches`, plus (with_nll and a GMM head) each patch's GMM negative log-likelihood [B, L].

        The NLL of a patch is the mean over the K - 1 passes in which it is visible (it is hidden in exactly one),
        computed on that pass's encoder output: no extra encoder pass, and the encoder sees the same mask layout
        as for the reconstruction."""
        m = self.model
        b = x.shape[0]
        tokens = m.embed(x)  # [B, L, D]
        k, keep = self.ids_keep.shape
        visible = tokens[:, self.ids_keep].reshape(b * k, keep, tokens.shape[-1])  # [B*K, L_keep, D]
        ids_restore = self.ids_restore.unsqueeze(0).expand(b, -1, -1).reshape(b * k, -1)  # [B*K, L]
        latent = m.encode(visible)
        nll = None
        if with_nll and hasattr(m, "gmm_head"):
            vis = m.patch_nll(latent)  # [B*K, L_keep]
            full = torch.cat([vis, torch.zeros_like(vis[:, :1]).expand(-1, ids_restore.shape[1] - keep)], dim=1)
            full = torch.gather(full, 1, ids_restore)  # grid order, 0 where the pass hid the patch
            nll = full.reshape(b, k, -1).sum(dim=1) / (k - 1)  # [B, L]
        pred = m.decode(latent, ids_restore)  # [B*K, L, P]
        pred = pred.reshape(b, k, pred.shape[1], pred.shape[2])
        pred = (pred * self.assign).sum(dim=1)  # [B, L, P]: patch l from the mask that hid it
        if m.cfg.norm_pix_loss:  # predictions are per-patch normalised: undo with the patch's own statistics
            t = m.patchify(x)
            pred = pred * (t.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
        return pred, nll

    def raw_map(self, image: torch.Tensor) -> torch.Tensor:
        """Per-pixel squared error averaged over channels, smoothed; before the calibration normalisation.
        With scoring.lowpass_sigma the residual is blurred per channel before it is squared.
        With scoring.ssim_weight / scoring.gmm_weight: (1 - w_ssim) * squared error + w_ssim * (1 - SSIM) / 2
        + w_gmm * per-patch GMM NLL, then smoothed."""
        return self._raw_map(self.normalise_input(image), image)

    def _raw_map(self, x: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        c = x.shape[1]
        pred, nll = self.reconstruct_with_nll(x, with_nll=self.gmm_weight > 0)
        resid = m.unpatchify(pred - m.patchify(x), channels=c)  # [B, C, H, W]
        if self.lowpass:
            resid = blur_channels(resid, self.lowpass_window)
        err = (resid * resid).mean(dim=1, keepdim=True)  # [B, 1, H, W] (feature space: [B, 1, H/s, W/s])
        if self.features:  # one value per feature cell: bilinear up to the image (ONNX Resize, linear)
            err = F.interpolate(err, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        if self.ssim_weight > 0:
            s = ssim_map(m.unpatchify(pred, channels=c), x, self.ssim_window).mean(dim=1, keepdim=True)
            err = (1.0 - self.ssim_weight) * err + self.ssim_weight * (1.0 - s) * 0.5
        if self.perceptual_weight > 0:  # the input and its reconstruction compared in a pretrained CNN's features
            if image is None:
                raise ValueError("the perceptual error needs the RGB input image")
            cnn = m.perceptual
            rec = self.to_rgb(m.unpatchify(pred, channels=c), image)
            perc = ((cnn(rec) - cnn(image)) ** 2).mean(dim=1, keepdim=True)  # [B, 1, H/s, W/s]
            perc = F.interpolate(perc, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
            err = (1.0 - self.perceptual_weight) * err + self.perceptual_weight * perc
        if nll is not None:  # one value per patch, spread over its p x p pixels
            pp = m.patch_size * m.patch_size
            err = err + self.gmm_weight * m.unpatchify(nll.unsqueeze(-1).expand(-1, -1, pp), channels=1)
        if self.smooth:
            err = gaussian_blur(err, self.kernel)
        return err

    def cell_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, C, H, W] -> each patch cell's per-channel mean and std [B, 2C, g, g]."""
        return cell_stats(x, self.model.patch_size)

    def stats_map(self, image: torch.Tensor) -> torch.Tensor:
        """Patch-statistics map [B, 1, H, W]: per cell, the largest |z-score| of its mean/std against the same
        position in normal images, spread over the cell's pixels and smoothed like the reconstruction map."""
        return self._stats_map(self.normalise_input(image))

    def _stats_map(self, x: torch.Tensor) -> torch.Tensor:
        f = self.cell_features(x)
        z = ((f - self.cell_mean) / self.cell_std).abs().amax(dim=1, keepdim=True)  # [B, 1, g, g]
        b, _, g, _ = z.shape
        p = self.model.patch_size
        z = z.reshape(b, 1, g, 1, g, 1).expand(b, 1, g, p, g, p).reshape(b, 1, g * p, g * p)
        return gaussian_blur(z, self.kernel) if self.smooth else z

    def knn_raw_map(self, x: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Token image [B, C, g, g] -> each cell's Euclidean distance to its nearest memory cell, bilinearly
        upsampled to the image and smoothed [B, 1, H, W]. |q - m|^2 = |q|^2 - 2 q.m + |m|^2 as one MatMul and a
        ReduceMin. `exclude` [B] (calibration on training images only): memory cells of that source image are
        skipped (leave-one-image-out), so a training image is not compared with itself."""
        b, c, gh, gw = x.shape
        q = x.permute(0, 2, 3, 1).reshape(b, gh * gw, c)
        d2 = (q * q).sum(dim=-1, keepdim=True) - 2.0 * (q @ self.knn_bank.t()) + self.knn_bank_sq  # [B, g*g, M]
        if exclude is not None and self.knn_owner is not None:
            same = self.knn_owner.view(1, 1, -1) == exclude.view(-1, 1, 1)
            d2 = d2.masked_fill(same, float("inf"))
        d = d2.amin(dim=-1).clamp_min(0.0).sqrt().reshape(b, 1, gh, gw)
        d = F.interpolate(d, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return gaussian_blur(d, self.kernel) if self.smooth else d

    def set_knn_memory(self, cells: torch.Tensor, owner: torch.Tensor | None = None) -> None:
        """Normal token cells [N, C] -> the memory: all of them, or a greedy k-center coreset of
        scoring.knn_memory cells (`coreset.greedy_coreset`). `owner` [N]: source image id of each cell."""
        from .coreset import greedy_coreset

        keep = greedy_coreset(cells, self.scoring.knn_memory) if cells.shape[0] > self.scoring.knn_memory \
            else torch.arange(cells.shape[0])
        bank = cells[keep].float().contiguous().to(self.knn_mean.device)
        self.knn_bank = bank
        self.knn_bank_sq = (bank * bank).sum(dim=1).view(1, -1)
        self.knn_owner = None if owner is None else owner[keep].to(bank.device)

    def reduce_map(self, amap: torch.Tensor) -> torch.Tensor:
        flat = amap.flatten(1)
        if self.reduce == "max":
            return flat.amax(dim=1)
        return torch.topk(flat, self.topk, dim=1).values.mean(dim=1)

    # --- the graph ---------------------------------------------------------------------------------------------
    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalise_input(image)  # once, for both maps
        amap = self._raw_map(x, image)
        if self.normalize:
            amap = (amap - self.map_mean) / self.map_std
        if self.stats_weight > 0:
            amap = amap + self.stats_weight * self._stats_map(x)
        if self.knn_weight > 0:
            knn = self.knn_raw_map(x)
            if self.normalize:
                knn = (knn - self.knn_mean) / self.knn_std
            if self.balanced:
                amap = amap / self.fuse_scale[0] + self.knn_weight * knn / self.fuse_scale[1]
            else:
                amap = amap + self.knn_weight * knn
        return amap, self.reduce_map(amap)

    def fusion_terms(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two position-normalised maps the kNN fusion adds, before any fusion scale: (reconstruction z-map,
        kNN z-map), each [B, 1, H, W]."""
        x = self.normalise_input(image)
        recon = (self._raw_map(x, image) - self.map_mean) / self.map_std
        return recon, (self.knn_raw_map(x) - self.knn_mean) / self.knn_std

    @torch.no_grad()
    def reconstruction(self, image: torch.Tensor) -> torch.Tensor | None:
        """The K-mask reconstruction as an RGB image in [0, 1] (for reports); None in feature space (a
        reconstructed feature map has no image to show)."""
        if self.features:
            return None
        x = self.normalise_input(image)
        return self.to_rgb(self.model.unpatchify(self.reconstruct_patches(x), channels=x.shape[1]), image)

    def to_rgb(self, rec: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """A pixel-space reconstruction in model space [B, C, H, W] -> RGB [B, 3, H, W] in [0, 1] (per-image
        standardisation undone with the input `image`'s own statistics, gray shown in all three channels)."""
        if self.per_image:  # undo the per-image standardisation with the input's own statistics
            d = normalise_images(image, self.pix_mean, self.pix_std, gray=self.gray)
            mu = d.mean(dim=(2, 3), keepdim=True)
            rec = rec * (((d - mu) ** 2).mean(dim=(2, 3), keepdim=True).sqrt() + 1e-6) + mu
        if self.gray:  # the gray value g with mean_c((g - mean_c) / std_c) = rec, shown in all three channels
            inv = (1.0 / self.pix_std).mean()
            return ((rec + (self.pix_mean / self.pix_std).mean()) / inv).clamp(0, 1).expand(-1, 3, -1, -1)
        return (rec * self.pix_std + self.pix_mean).clamp(0, 1)

    def set_normal_stats(self, mean_map: torch.Tensor, std_map: torch.Tensor) -> None:
        self.map_mean.copy_(mean_map.view_as(self.map_mean))
        self.map_std.copy_(std_map.view_as(self.map_std))

    def set_cell_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.cell_mean.copy_(mean.view_as(self.cell_mean))
        self.cell_std.copy_(std.view_as(self.cell_std))

    def calibration_tensors(self) -> dict[str, torch.Tensor]:
        """The normal statistics fitted by `calibrate` (saved as calibration.safetensors); empty when none."""
        names = (["map_mean", "map_std"] if self.normalize else []) + \
            (["cell_mean", "cell_std"] if self.stats_weight > 0 else []) + \
            (["knn_bank", "knn_bank_sq"] + (["knn_mean", "knn_std"] if self.normalize else [])
             if self.knn_weight > 0 else []) + (["fuse_scale"] if self.balanced else [])
        return {n: getattr(self, n).detach().cpu().contiguous() for n in names}

    def load_calibration_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Set the statistics `calibration_tensors` saved; ValueError naming `source` and the key if one is missing."""
        need = list(self.calibration_tensors())
        missing = [n for n in need if n not in tensors]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)} (re-run `mae-ad calibrate`)")
        for n in need:
            if n in ("knn_bank", "knn_bank_sq"):  # sized by the training set
                setattr(self, n, tensors[n].float().contiguous().to(self.knn_mean.device))
            else:
                getattr(self, n).copy_(tensors[n].view_as(getattr(self, n)))


def _valid_masks(placements: list[Any]) -> torch.Tensor:
    """bool [N, 1, S, S]: each placement's valid region (`contract.valid_mask`)."""
    from .contract import valid_mask

    return torch.from_numpy(np.stack([valid_mask(p) for p in placements])[:, None])


def _image_scores(scorer: Scorer, maps: torch.Tensor, placements: list[Any] | None) -> np.ndarray:
    """Image scores float64 [N] of maps [N, 1, S, S] by the rule evaluation and the agent use: over each image's
    valid region when some `placements` are letterboxed (`valid_scores`), else `Scorer.reduce_map`."""
    if isinstance(placements, TiledPlacements) or (placements is not None and not all(p.full for p in placements)):
        return valid_scores(maps, placements, scorer.scoring)
    return scorer.reduce_map(maps).double().cpu().numpy()


def valid_scores(maps: torch.Tensor, placements: list[Any], scoring: Any) -> np.ndarray:
    """Image scores float64 [N] from model-size maps [N, 1, S, S], each over its image's valid region
    (`contract.score_valid` with scoring.reduce / scoring.topk_fraction); for a `tiling.TiledPlacements` the maps
    are those of its T tiles and the scores those of its N images, each from its stitched map."""
    from .contract import score_valid

    if isinstance(placements, TiledPlacements):  # tiles: each image's score from its stitched map
        return placements.scores(maps, scoring.reduce, scoring.topk_fraction)
    m = maps[:, 0].float().cpu().numpy()
    return np.array([score_valid(m[i], p, scoring.reduce, scoring.topk_fraction) for i, p in enumerate(placements)],
                    np.float64)


@torch.no_grad()
def score_batches(scorer: Scorer, images: torch.Tensor, batch_size: int = 8, raw: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score a stack of images [N, 3, H, W] in batches. Returns (maps [N, 1, H, W], scores [N])."""
    maps, scores = [], []
    for i in range(0, images.shape[0], batch_size):
        chunk = images[i:i + batch_size]
        if raw:
            m = scorer.raw_map(chunk)
            s = scorer.reduce_map(m)
        else:
            m, s = scorer(chunk)
        maps.append(m)
        scores.append(s)
    return torch.cat(maps), torch.cat(scores)


def _images_in(n_tiles: int, places: Any) -> int:
    """How many images the first `n_tiles` items of a stack hold (tiled: whole images; else items)."""
    if isinstance(places, TiledPlacements):
        return (places.starts + [len(places)]).index(n_tiles) if n_tiles in places.starts + [len(places)] else 0
    return n_tiles


def _half_on_image_boundary(places: TiledPlacements) -> int:
    """The image boundary (a tile index) nearest half the tiles, leaving at least one image on each side."""
    inner = places.starts[1:]
    return min(inner, key=lambda b: abs(b - len(places) / 2))


@torch.no_grad()
def calibrate(scorer: Scorer, images: torch.Tensor, target_fpr: float, batch_size: int = 8,
              stats_images: torch.Tensor | None = None, stats_owner: torch.Tensor | None = None,
              placements: list[Any] | None = None, stats_placements: list[Any] | None = None) -> dict[str, Any]:
    """Fit the decision threshold (and, with scoring.normalize=position, the per-pixel normal statistics) on
    normal images only. `images` are held-back normals. With position normalisation and no `stats_images` they are
    split in two halves: the statistics come from the first, the threshold from the second, so the threshold is
    not set on images the statistics saw. With `stats_images` (calibration.stats_source=train: the training
    images) the statistics come from those and every held-back image sets the threshold.
    With scoring.knn_weight the kNN memory must be set (`Scorer.set_knn_memory`); its map gets its own per-pixel
    statistics from the same images, and `stats_owner` [N] (the memory owner id of each training stats image)
    keeps each training image from matching its own cells.
    With scoring.fusion=balanced each of the two z-maps is divided by the standard deviation of its image score over
    the threshold images (`fuse_scale`) before they are added; with inverse_variance by its variance (the squared
    standard deviation); the threshold is then taken on the fused scores.
    `placements` (data.resize=letterbox: each of `images`' `contract.Placement`): threshold scores are taken over
    each image's valid region only (`contract.score_valid`), as evaluation, predict and the agent take them, and
    the per-pixel statistics count each image only where it is valid (`stats_placements`: those of `stats_images`).
    """
    n = images.shape[0]
    tiled = isinstance(placements, TiledPlacements)  # data.resize=tile: `images` are the tiles of the images
    n_images = placements.n_images if isinstance(placements, TiledPlacements) else n
    if n_images < 2:
        raise ValueError(f"calibration needs at least 2 normal images, got {n_images}")
    if isinstance(stats_placements, TiledPlacements) and stats_owner is not None \
            and len(stats_owner) == stats_placements.n_images:  # one owner per image -> one per tile
        stats_owner = stats_owner[torch.from_numpy(stats_placements.image_of_tile()).to(stats_owner.device)]
    scorer.eval()
    stats_n = n_stats = 0  # held-back images spent on the statistics; images the statistics came from
    if scorer.normalize:
        if stats_images is None:
            stats_n = _half_on_image_boundary(placements) if isinstance(placements, TiledPlacements) else n // 2
            stats_src = images[:stats_n]
        else:
            stats_src = stats_images
        raw, _ = score_batches(scorer, stats_src, batch_size, raw=True)
        src_places = placements[:stats_n] if stats_images is None and placements is not None else stats_placements
        valid = None if src_places is None else _valid_masks(src_places).to(raw.device)
        scorer.set_normal_stats(*valid_normal_statistics(raw, valid, floor_share=0.25, eps=1e-8))
        n_stats = int(stats_src.shape[0])
        if scorer.knn_weight > 0:
            if scorer.knn_bank.shape[0] == 0:
                raise ValueError("scoring.knn_weight > 0: set the kNN memory before calibrating")
            maps = []
            for i in range(0, n_stats, batch_size):
                own = None if stats_images is None or stats_owner is None else stats_owner[i:i + batch_size]
                maps.append(scorer.knn_raw_map(scorer.normalise_input(stats_src[i:i + batch_size]), own))
            km, ks = valid_normal_statistics(torch.cat(maps), valid, floor_share=0.25, eps=1e-8)
            scorer.knn_mean.copy_(km.view_as(scorer.knn_mean))
            scorer.knn_std.copy_(ks.view_as(scorer.knn_std))
        if scorer.stats_weight > 0:
            feats = torch.cat([scorer.cell_features(scorer.normalise_input(stats_src[i:i + batch_size]))
                               for i in range(0, n_stats, batch_size)])
            scorer.set_cell_stats(*normal_statistics(feats, floor_share=0.1, eps=1e-6))
    held = images[stats_n:]
    held_places = None if placements is None else placements[stats_n:]
    fusion: dict[str, Any] = {}
    if scorer.balanced:  # each term divided by the spread of its image score over the held-back normal images
        parts = [scorer.fusion_terms(held[i:i + batch_size]) for i in range(0, held.shape[0], batch_size)]
        recon, knn = (torch.cat([p[j] for p in parts]) for j in (0, 1))
        spreads = [float(np.std(sc, ddof=1)) if sc.size > 1 else 1.0
                   for sc in (_image_scores(scorer, t, held_places) for t in (recon, knn))]
        divisors = [max(v, 1e-6) ** scorer.fusion_power for v in spreads]
        scorer.fuse_scale.copy_(torch.tensor(divisors).to(scorer.fuse_scale))
        fusion = {"fusion": scorer.scoring.fusion, "fusion_scale_reconstruction": float(scorer.fuse_scale[0]),
                  "fusion_scale_knn": float(scorer.fuse_scale[1]),
                  "fusion_spread_reconstruction": spreads[0], "fusion_spread_knn": spreads[1]}
        # the fused maps of the same images, formed as `forward` forms them (no second scoring pass)
        thr_maps = recon / scorer.fuse_scale[0] + scorer.knn_weight * knn / scorer.fuse_scale[1]
    else:
        thr_maps, _ = score_batches(scorer, held, batch_size)
    s = _image_scores(scorer, thr_maps, held_places)
    from .contract import threshold_from_scores

    threshold = threshold_from_scores(s, target_fpr)
    return {
        "threshold": threshold,
        "target_fpr": target_fpr,
        "n_images": int(n_images),
        **({"n_tiles": int(n)} if tiled else {}),
        "n_threshold_images": int(len(s)),
        "n_stats_images": int(_images_in(n_stats, placements if stats_images is None else stats_placements)),
        "stats_source": "none" if not scorer.normalize else ("holdout" if stats_images is None else "train"),
        "normal_score_mean": float(s.mean()),
        "normal_score_std": float(s.std()),
        "normal_score_max": float(s.max()),
        "method": "quantile(1 - target_fpr) of held-back normal scores",
        **fusion,
    }
