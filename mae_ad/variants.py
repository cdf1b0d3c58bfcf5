"""Building blocks of the optional model variants (docs/variants.md), and which of them an export must refuse.

Each variant is switched on by a config key whose default keeps the plain MAE:
- `model.norm: dyt`            -> `DyT` in place of every LayerNorm
- `model.gmm_components: C`    -> `GMMHead`, a Gaussian mixture density on the encoder's patch embeddings
- `model.ssim_loss_weight`, `scoring.ssim_weight` -> `ssim_map` (local SSIM with a Gaussian window)
The model (model.py) and the scorer (scoring.py) wire them in; the training-mask variants live in masking.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .gaussian import gaussian_kernel1d as gaussian_window  # the SSIM window (defined with the scorer's)

if TYPE_CHECKING:
    from .config import Config

# SSIM stabilising constants are (0.01 R)^2 and (0.03 R)^2 for a dynamic range R. Both the loss and the map work
# on ImageNet-normalised pixels, whose range is about 1 / 0.225.
SSIM_DATA_RANGE = 1.0 / 0.225


class DyT(nn.Module):
    """Dynamic Tanh, a drop-in for LayerNorm: weight * tanh(alpha * x) + bias, with one learnable scalar alpha.

    Constructible the way timm blocks call norm layers: DyT(dim, device=..., dtype=...). `weight` and `bias` carry
    LayerNorm's names, so LayerNorm weights of a checkpoint load into them (alpha stays at its initial value).
    """

    def __init__(self, dim: int, alpha_init: float = 0.5, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, **_: object) -> None:
        super().__init__()
        self.dim = dim
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init), device=device, dtype=dtype))
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)
            self.weight.fill_(1.0)
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    def extra_repr(self) -> str:
        return f"{self.dim}, alpha_init={self.alpha_init}"


class GMMHead(nn.Module):
    """A diagonal Gaussian mixture over patch embeddings [..., D] -> per-patch negative log-likelihood [...],
    divided by D (nats per dimension, so its scale does not grow with the width).

    The embeddings are the encoder's normalised outputs; the model detaches them before this head, so the
    likelihood cannot pull the encoder towards a collapsed, trivially likely representation (VT-ADL's mixture
    density idea without a projection that could shrink to zero).
    """

    def __init__(self, dim: int, components: int) -> None:
        super().__init__()
        self.dim = dim
        self.components = components
        self.logits = nn.Parameter(torch.zeros(components))
        self.means = nn.Parameter(torch.randn(components, dim) * 0.5)
        self.log_var = nn.Parameter(torch.zeros(components, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        inv_var = torch.exp(-self.log_var)  # [C, D]
        # sum_d (z - mu)^2 / var, expanded so nothing of size [..., C, D] is materialised
        quad = (z * z) @ inv_var.t() - 2.0 * z @ (self.means * inv_var).t() + (self.means ** 2 * inv_var).sum(-1)
        log_norm = -0.5 * (self.log_var.sum(-1) + self.dim * math.log(2.0 * math.pi))  # [C]
        a = torch.log_softmax(self.logits, dim=0) + log_norm - 0.5 * quad  # [..., C]
        peak = a.amax(dim=-1, keepdim=True).detach()
        log_p = peak.squeeze(-1) + torch.log(torch.exp(a - peak).sum(dim=-1))  # log-sum-exp in plain ops
        return -log_p / self.dim


def blur_channels(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable blur of [B, C, H, W] per channel, reflect padding, output the input size."""
    b, c, h, w = x.shape
    r = window.numel() // 2
    y = x.reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), window.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), window.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor,
             data_range: float = SSIM_DATA_RANGE) -> torch.Tensor:
    """Local SSIM of two [B, C, H, W] images with a Gaussian window; [B, C, H, W], 1 where identical."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur_channels(a, window), blur_channels(b, window)
    var_a = blur_channels(a * a, window) - mu_a * mu_a
    var_b = blur_channels(b * b, window) - mu_b * mu_b
    cov = blur_channels(a * b, window) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return num / den


def export_blockers(cfg: Config) -> list[str]:
    """Reasons why `cfg`'s scorer cannot be exported to ONNX / TensorRT; empty when it can.

    Every variant in this module is built from ops in TensorRT 10's ONNX matrix (Tanh, MatMul, Exp, Log,
    ReduceMax/Sum, Gather, Pad reflect, Conv), and each is exported and checked against onnxruntime in
    tests/test_variants.py, so for every config that passes validation the list is empty; it names the keys at
    fault for a config built around validation (e.g. with model_copy). Training-only keys (train.mask_mode,
    model.ssim_loss_weight, model.gmm_loss_weight) never block an export.
    """
    out: list[str] = []
    if cfg.scoring.gmm_weight > 0 and cfg.model.gmm_components == 0:
        out.append("scoring.gmm_weight > 0 but model.gmm_components = 0: there is no GMM head to export")
    return out


__all__ = ["DyT", "GMMHead", "SSIM_DATA_RANGE", "export_blockers", "gaussian_window", "ssim_map"]
