"""The procedural texture corpus for pretraining a base MAE (mae_ad/corpus.py, `mae-ad make-corpus`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mae_ad.contract import UserError
from mae_ad.corpus import FAMILIES, texture, write_corpus
from mae_ad.data import index_dataset, read_image

MAE_AD = str(Path(sys.executable).with_name("mae-ad"))


def test_every_family_draws_a_textured_image_and_seeds_reproduce():
    for name in FAMILIES:
        a, got = texture(np.random.default_rng(5), 64, family=name)
        b, _ = texture(np.random.default_rng(5), 64, family=name)
        assert got == name and a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)
        assert a.astype(np.float32).std() > 1.0, name  # not a flat image
    x, _ = texture(np.random.default_rng(6), 64, family="fractal")
    assert not np.array_equal(x, texture(np.random.default_rng(5), 64, family="fractal")[0])


def test_corpus_is_broad_grey_and_colour_many_families():
    rng = np.random.default_rng(0)
    imgs, names = zip(*(texture(rng, 48) for _ in range(80)), strict=True)
    assert len(set(names)) == len(FAMILIES)
    grey = [bool(np.array_equal(i[..., 0], i[..., 1]) and np.array_equal(i[..., 1], i[..., 2])) for i in imgs]
    assert 0.2 < np.mean(grey) < 0.8
    means = np.array([i.mean() for i in imgs])
    assert means.max() - means.min() > 80  # dark and bright surfaces


def test_write_corpus_layout_trains_and_refuses_to_overwrite(tmp_path):
    counts = write_corpus(tmp_path / "c", n=12, size=32, seed=1)
    assert sum(counts.values()) == 12
    index = index_dataset(tmp_path / "c")
    assert len(index.train) == 12 and read_image(index.train[0], 32).shape == (3, 32, 32)
    before = sorted(p.name for p in (tmp_path / "c/train/good").iterdir())
    with pytest.raises(UserError, match="already exists"):
        write_corpus(tmp_path / "c", n=3, size=32)
    assert sorted(p.name for p in (tmp_path / "c/train/good").iterdir()) == before
    with pytest.raises(UserError, match="--n 1"):
        write_corpus(tmp_path / "d", n=1)
    assert not (tmp_path / "d").exists()


def test_make_corpus_cli(tmp_path):
    from app.cli import app

    r = CliRunner().invoke(app, ["make-corpus", "--out", str(tmp_path / "c"), "--n", "5", "--size", "24"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "c/train/good").glob("*.png"))) == 5
    r = subprocess.run([MAE_AD, "make-corpus", "--out", str(tmp_path / "c"), "--n", "5"],
                       capture_output=True, text=True, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "already exists" in errors[0]
    assert "Traceback" not in r.stderr
