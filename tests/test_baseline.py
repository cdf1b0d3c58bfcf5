"""The training-free patch-statistics baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mae_ad.baseline import PatchStatsBaseline, score_dataset
from mae_ad.contract import UserError


def _normals(n: int = 12, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.8, size).view(1, 1, 1, size)  # a position-dependent normal appearance
    return (ramp + 0.03 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def test_z_scores_per_position():
    normals = _normals()
    base = PatchStatsBaseline(patch=8, sigma=0).fit(normals)
    assert base.mean.shape == (6, 4, 4)
    cell = normals[:, 1, 8:16, 16:24].numpy().reshape(len(normals), -1)  # green channel, cell (1, 2)
    assert np.isclose(float(base.mean[1, 1, 2]), cell.mean(1).mean(), atol=1e-5)
    assert np.isclose(float(base.mean[4, 1, 2]), cell.std(1).mean(), atol=1e-5)
    assert np.isclose(float(base.std[1, 1, 2]), cell.mean(1).std(ddof=1), atol=1e-5)
    x = _normals(1, seed=5)
    expected = ((base.features(x) - base.mean) / base.std).abs().amax(1)  # [1, 4, 4]
    maps, scores = base.score(x)
    assert maps.shape == (1, 1, 32, 32)
    # bilinear upsampling interpolates between cell centres: the map's max stays close below the largest cell z
    top = float(expected.max())
    assert 0.7 * top <= float(scores[0]) <= top + 1e-5
    # the left cells are dark in normal images: a bright left cell is anomalous, the same value on the right is not
    bright = x.clone()
    bright[:, :, 8:16, 0:8] = 0.75
    same_right = x.clone()
    same_right[:, :, 8:16, 24:32] = 0.75
    assert float(base.score(bright)[1]) > 5 * float(base.score(same_right)[1])


def test_map_localises_a_defect():
    base = PatchStatsBaseline(patch=8, sigma=2.0).fit(_normals(20))
    x = _normals(2, seed=9)
    x[1, :, 16:24, 8:16] = 0.0
    maps, scores = base.score(x)
    assert scores[1] > 2 * scores[0]
    r, c = divmod(int(maps[1, 0].argmax()), 32)
    assert 12 <= r <= 27 and 4 <= c <= 19


def test_errors():
    with pytest.raises(RuntimeError, match="before fit"):
        PatchStatsBaseline().score(_normals(1))
    base = PatchStatsBaseline(patch=8).fit(_normals())
    with pytest.raises(ValueError, match="fitted at 32"):
        base.score(_normals(1, size=64))
    with pytest.raises(ValueError, match="at least 2"):
        PatchStatsBaseline().fit(_normals(1))


def test_score_dataset_on_synthetic(synthetic_data):
    res = score_dataset(synthetic_data, size=64, patch=8, sigma=2.0, min_holdout=3)
    n = len(res.scores)
    assert res.maps.shape == (n, 64, 64) and res.labels.sum() == 9 and (res.labels == 0).sum() == 4
    m = res.metrics
    assert set(m) >= {"image_auroc", "pixel_auroc", "aupro", "f1", "threshold"}
    assert m["pixel_auroc"] > 0.6  # synthetic defects are local contrast changes: a map of noise gives ~0.5
    assert np.isfinite(res.threshold)
    with pytest.raises(UserError, match="multiple of the patch"):
        score_dataset(synthetic_data, size=60, patch=8)
