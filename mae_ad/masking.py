"""Patch masks: random per-sample masks for training, deterministic partitions for inference. Pure functions.

Conventions: patches are numbered row-major over a `grid`x`grid` patch grid, l = row * grid + col.
`ids_keep` [N, L_keep] lists the visible patches of each sample (ascending for inference masks);
`ids_restore` [N, L] maps the sequence [visible..., masked...] back to grid order; `mask` [N, L] is 1 where masked.
"""

from __future__ import annotations

import math

import torch

from .config import check_partition


def random_masking_ids(
    batch: int, num_patches: int, mask_ratio: float, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE random masking with an independent permutation per sample.

    Returns (ids_keep [N, L_keep], ids_restore [N, L], mask [N, L]). Each sample's `ids_restore` inverts that
    sample's own shuffle (the reference implementation reused sample 0's permutation for the whole batch).
    """
    len_keep = max(1, int(round(num_patches * (1 - mask_ratio))))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, ids_restore, mask


def inference_masks(grid: int, k: int = 4, pattern: str = "stripes") -> torch.Tensor:
    """K boolean masks [K, grid*grid] that partition the patch grid: every patch is masked by exactly one mask.

    stripes: mask i hides patch columns c with c % K == i (the reference design).
    grid:    K = s*s phases of an s x s lattice: mask (a, b) hides patches with row % s == a and col % s == b, so
             every hidden patch has visible neighbours on all sides.
    """
    try:
        check_partition(grid, k, pattern)
    except ValueError as e:
        raise ValueError(str(e)) from None
    rows = torch.arange(grid).view(grid, 1).expand(grid, grid)
    cols = torch.arange(grid).view(1, grid).expand(grid, grid)
    if pattern == "stripes":
        phase = cols % k
    else:
        s = math.isqrt(k)
        phase = (rows % s) * s + (cols % s)
    phase = phase.reshape(-1)
    return torch.stack([phase == i for i in range(k)])  # [K, L]


def masks_to_ids(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From K boolean masks [K, L] (equal counts) to (ids_keep [K, L_keep], ids_restore [K, L]).

    Visible patches come first in ascending order, then masked ones in ascending order; `ids_restore` inverts that.
    """
    k, n = masks.shape
    counts = masks.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("inference masks must hide the same number of patches")
    order = torch.argsort(masks.to(torch.int64) * n + torch.arange(n).unsqueeze(0), dim=1)  # visible first, stable
    ids_restore = torch.argsort(order, dim=1)
    len_keep = n - int(counts[0])
    return order[:, :len_keep].contiguous(), ids_restore.contiguous()
