"""The Gaussian kernel: the scorer's default smoothing of the error map (`scoring.sigma`, scoring.py owns it with
`gaussian_blur`) and the windows of the SSIM and low-pass variants. A leaf module (torch only), so the model (its
SSIM loss), the variants and the scorer share one definition without importing each other.
"""

from __future__ import annotations

import math

import torch


def gaussian_kernel1d(sigma: float, max_radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian with radius ceil(3 sigma), capped at `max_radius`."""
    radius = max(1, min(int(math.ceil(3 * sigma)), max_radius))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()
