"""Greedy k-center coreset subsampling (PatchCore's), shared by the kNN baseline (baseline.py) and the scorer's
in-graph kNN memory (scoring.py, `scoring.knn_memory`). A leaf module: torch only, nothing of ours.
"""

from __future__ import annotations

import torch


def greedy_coreset(features: torch.Tensor, n: int, project_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices [n] of a k-center greedy coreset of `features` [M, C] (PatchCore's subsampling): start from one
    random point, then repeatedly add the point farthest from everything chosen so far. Distances are measured
    on a Gaussian random projection to `project_dim` dimensions (Johnson-Lindenstrauss), as in PatchCore."""
    m, c = features.shape
    if n >= m:
        return torch.arange(m)
    g = torch.Generator().manual_seed(seed)
    x = features.float()
    if c > project_dim:
        x = x @ (torch.randn(c, project_dim, generator=g) / project_dim ** 0.5)
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = int(torch.randint(0, m, (1,), generator=g))
    dist = ((x - x[chosen[0]]) ** 2).sum(dim=1)
    for i in range(1, n):
        chosen[i] = int(torch.argmax(dist))
        dist = torch.minimum(dist, ((x - x[chosen[i]]) ** 2).sum(dim=1))
    return chosen
