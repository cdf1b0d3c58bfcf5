"""Shared fixtures: tiny models and generated images (nothing is downloaded)."""

from __future__ import annotations

import pytest


def tiny_overrides(img: int = 32, patch: int = 4) -> list[str]:
    """A model small enough for unit tests: 8x8 patches, 2+1 blocks."""
    return [
        f"model.img_size={img}", f"model.patch_size={patch}", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
    ]


@pytest.fixture
def tiny_cfg():
    from mae_ad.config import load_config

    return load_config(None, tiny_overrides())


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A small synthetic MVTec-layout dataset (written once per session)."""
    from mae_ad.synthetic import write_dataset

    root = tmp_path_factory.mktemp("synth") / "data"
    return write_dataset(root, n_train=16, n_test_good=4, n_test_defect=3, size=64, seed=1)
