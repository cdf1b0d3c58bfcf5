"""Greedy k-center coreset subsampling (PatchCore's), shared by the kNN baseline (baseline.py) and the scorer's
in-graph kNN memory (scoring.py, `scoring.knn_memory`). A leaf module: torch only, nothing of ours.
"""

from __future__ import annotations

import torch

MAX_CANDIDATES = 1 << 18  # larger sets are first subsampled uniformly at random to this many cells


def greedy_coreset(features: torch.Tensor, n: int, project_dim: int = 128, seed: int = 0,
                   max_candidates: int = MAX_CANDIDATES) -> torch.Tensor:
    """Indices [n] of a k-center greedy coreset of `features` [M, C] (PatchCore's subsampling, Roth et al. 2022):
    start from one random point, then repeatedly add the point farthest from everything chosen so far. Distances
    are measured on a Gaussian random projection to `project_dim` dimensions (Johnson-Lindenstrauss), as in
    PatchCore, each step as one matrix-vector product (|x - c|^2 = |x|^2 - 2 x.c + |c|^2). Sets of more than
    `max_candidates` cells (tiled high-resolution images give millions) are first subsampled uniformly at random to
    that many, so a step costs at most max_candidates x project_dim multiply-adds."""
    m, c = features.shape
    if n >= m:
        return torch.arange(m)
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(m)
    if m > max_candidates >= n:
        pool = torch.randperm(m, generator=g)[:max_candidates].sort().values
    x = features[pool].float()
    if c > project_dim:
        x = x @ (torch.randn(c, project_dim, generator=g) / project_dim ** 0.5)
    x = x.contiguous()
    sq = (x * x).sum(dim=1)
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = int(torch.randint(0, x.shape[0], (1,), generator=g))
    dist = (sq - 2.0 * (x @ x[chosen[0]]) + sq[chosen[0]]).clamp_min(0)
    for i in range(1, n):
        chosen[i] = int(torch.argmax(dist))
        dist = torch.minimum(dist, (sq - 2.0 * (x @ x[chosen[i]]) + sq[chosen[i]]).clamp_min(0))
    return pool[chosen]
