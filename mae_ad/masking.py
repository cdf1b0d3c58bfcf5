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
    # drawn where the generator lives (train.mask_mode=mixed hands a CPU generator on a CUDA run), then moved
    noise = torch.rand(batch, num_patches, device=generator.device if generator is not None else device,
                       generator=generator).to(device)
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


# --- training mask variants (train.mask_mode; docs/variants.md) ----------------------------------------------
def _ids_from_masks(masks: torch.Tensor, order_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_keep, ids_restore, mask) from boolean masks [N, L] with equal counts; `order_key` [N, L] in [0, 1)
    orders the visible patches (random order, as MAE's shuffle gives)."""
    n, length = masks.shape
    keys = masks.to(order_key.dtype) * 2.0 + order_key  # visible patches first
    ids_shuffle = torch.argsort(keys, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    len_keep = length - int(masks[0].sum())
    return ids_shuffle[:, :len_keep], ids_restore, masks.float()


def block_masks(
    batch: int, grid: int, mask_ratio: float, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None, min_side: int | None = None, max_side: int | None = None,
) -> torch.Tensor:
    """Boolean masks [N, grid*grid] made of contiguous square blocks of patches, drawn per sample.

    Squares of a random side in [min_side, max_side] (default: max(2, grid/8) .. max(that + 1, grid/4)) are placed at
    random until they cover at least round(L * mask_ratio) patches; the patches are counted in the order the
    squares added them (row-major inside a square) and exactly the first round(L * mask_ratio) are kept, so every
    sample hides the same number of patches and at most the last square is cut (to a few whole rows and part of one).
    """
    length = grid * grid
    n_mask = min(length - 1, max(1, int(round(length * mask_ratio))))
    lo = min(grid, max(1, min_side if min_side is not None else max(2, grid // 8)))
    hi = max(lo, min(grid, max_side if max_side is not None else max(lo + 1, grid // 4)))
    out = torch.zeros(batch, length, dtype=torch.bool)
    for i in range(batch):
        rank = torch.full((grid, grid), length, dtype=torch.long)  # insertion order; `length` = not masked
        count = 0
        while count < n_mask:
            side = int(torch.randint(lo, hi + 1, (1,), generator=generator))
            r0, c0 = (int(v) for v in torch.randint(0, grid - side + 1, (2,), generator=generator))
            window = rank[r0:r0 + side, c0:c0 + side]
            new = window == length
            k = int(new.sum())
            window[new] = torch.arange(count, count + k)
            count += k
        out[i] = (rank < n_mask).view(-1)
    return out.to(device)


def lattice_masks(batch: int, grid: int, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Inference-like masks [N, L] for training: one (pattern, K) drawn for the batch among stripes K = 2, 3, 4
    and the 2x2 lattice (K = 4) that fit the grid (25-50% hidden), and a random phase per sample."""
    options = [("stripes", k) for k in (2, 3, 4) if grid % k == 0]
    if grid % 2 == 0:
        options.append(("grid", 4))
    if not options:  # an odd prime grid: column stripes with a remainder cannot give equal counts; use random
        raise ValueError(f"no lattice mask fits a {grid}x{grid} patch grid")
    pattern, k = options[int(torch.randint(0, len(options), (1,), generator=generator))]
    phases = inference_masks(grid, k, pattern)  # [K, L]
    pick = torch.randint(0, k, (batch,), generator=generator)
    return phases[pick].to(device)


def training_masking_ids(
    batch: int, grid: int, mask_ratio: float, mode: str = "random", device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training masks by `mode` (train.mask_mode). Returns (ids_keep [N, L_keep], ids_restore [N, L], mask [N, L]).

    random: `random_masking_ids`. block: `block_masks` at `mask_ratio`. mixed: one of random / block at
    `mask_ratio` / `lattice_masks` (25-50%), drawn with equal odds for the whole batch (a batch needs one L_keep).
    """
    length = grid * grid
    if mode == "random":
        return random_masking_ids(batch, length, mask_ratio, device, generator)
    if generator is not None and generator.device.type != "cpu":  # the block draws run on the CPU
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        generator = torch.Generator().manual_seed(seed)
    if mode == "mixed":
        choice = int(torch.randint(0, 3, (1,), generator=generator))
        if choice == 2 and not (grid % 2 == 0 or grid % 3 == 0):
            choice = 1
        mode = ("random", "block", "lattice")[choice]
    if mode == "random":
        return random_masking_ids(batch, length, mask_ratio, device, generator)
    if mode == "block":
        masks = block_masks(batch, grid, mask_ratio, "cpu", generator)
    elif mode == "lattice":
        masks = lattice_masks(batch, grid, "cpu", generator)
    else:
        raise ValueError(f"train.mask_mode: unknown mode {mode!r}; choose random, block or mixed")
    key = torch.rand(batch, length, generator=generator)
    ids_keep, ids_restore, mask = _ids_from_masks(masks, key)
    return ids_keep.to(device), ids_restore.to(device), mask.to(device)
