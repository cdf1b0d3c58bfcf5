"""`mae-ad prepare-data`: loose folders -> MVTec layout."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from mae_ad.contract import UserError
from mae_ad.data import index_dataset, read_mask
from mae_ad.prepare import parse_defect_spec, prepare_dataset

MAE_AD = str(Path(sys.executable).with_name("mae-ad"))


def _img(path: Path, value: int, shape=(24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((*shape, 3), value, np.uint8)
    img[0, 0] = (value * 7) % 256  # make every file's bytes distinct
    cv2.imwrite(str(path), img)
    return path


def _mask(path: Path, shape=(24, 32), box=(2, 6, 3, 9), high: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros(shape, np.uint8)
    m[box[0]:box[1], box[2]:box[3]] = high
    cv2.imwrite(str(path), m)
    return path


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def loose(tmp_path):
    src = tmp_path / "src"
    for i in range(6):
        _img(src / "goodA" / f"{i:02d}.png", 10 + i)
    for i in range(4):
        _img(src / "goodB" / f"{i:02d}.png", 100 + i)  # 00..03 clash with goodA's names
    _img(src / "scr" / "s1.png", 200)
    _img(src / "scr" / "s2.jpg", 201)
    _mask(src / "scr_masks" / "s1_mask.png")  # with the _mask suffix
    _mask(src / "scr_masks" / "s2.png", high=1)  # without the suffix, 0/1 values
    _img(src / "more_scr" / "s1.png", 210)  # clashes with scr/s1.png inside test/scratch
    _mask(src / "more_scr_masks" / "s1.png", box=(10, 20, 10, 20))
    _img(src / "dent" / "d1.png", 220)  # no masks: image-level only
    return src


def test_prepare_builds_mvtec_layout(loose, tmp_path, caplog):
    out = tmp_path / "ds"
    specs = [f"scratch={loose / 'scr'}:{loose / 'scr_masks'}",
             f"scratch={loose / 'more_scr'}:{loose / 'more_scr_masks'}", f"dent={loose / 'dent'}"]
    with caplog.at_level("WARNING"):
        root = prepare_dataset(out, [loose / "goodA", loose / "goodB"], specs, test_fraction=0.3, seed=1)
    assert root == out and "image-level" in caplog.text
    train = sorted((out / "train/good").iterdir())
    test_good = sorted((out / "test/good").iterdir())
    assert len(train) + len(test_good) == 10 and len(test_good) == 3  # round(10 * 0.3)
    # every normal source file arrived exactly once, nothing overwritten
    sources = {_digest(p) for d in ("goodA", "goodB") for p in (loose / d).iterdir()}
    assert {_digest(p) for p in train + test_good} == sources
    names = sorted(p.name for p in (out / "test/scratch").iterdir())
    assert names == ["s1-2.png", "s1.png", "s2.jpg"]
    assert {_digest(p) for p in (out / "test/scratch").iterdir()} == {
        _digest(loose / "scr/s1.png"), _digest(loose / "scr/s2.jpg"), _digest(loose / "more_scr/s1.png")}
    # masks follow their (renamed) images; 0/1 masks are scaled to 0/255
    idx = index_dataset(out, need_test=True)
    by_name = {s.path.name: s for s in idx.test}
    assert by_name["s1.png"].mask.name == "s1_mask.png" and by_name["s1-2.png"].mask.name == "s1-2_mask.png"
    assert read_mask(by_name["s2.jpg"].mask).sum() == 4 * 6
    assert read_mask(by_name["s1-2.png"].mask).sum() == 100  # the more_scr mask, not scr's
    assert by_name["d1.png"].mask is None and not (out / "ground_truth/dent").exists()
    assert idx.defect_types == ["dent", "scratch"]


def test_split_is_deterministic(loose, tmp_path):
    goods = [loose / "goodA", loose / "goodB"]
    a = prepare_dataset(tmp_path / "a", goods, [], test_fraction=0.5, seed=3)
    b = prepare_dataset(tmp_path / "b", goods, [], test_fraction=0.5, seed=3)
    c = prepare_dataset(tmp_path / "c", goods, [], test_fraction=0.5, seed=4)

    def test_set(root):
        return sorted(_digest(p) for p in (root / "test/good").iterdir())

    assert test_set(a) == test_set(b) and test_set(a) != test_set(c)


def test_mask_of_wrong_size_names_both_files(loose, tmp_path):
    bad = _mask(tmp_path / "bad_masks" / "s1_mask.png", shape=(20, 32))
    _mask(tmp_path / "bad_masks" / "s2_mask.png")
    out = tmp_path / "ds"
    with pytest.raises(UserError) as e:
        prepare_dataset(out, [loose / "goodA"], [f"scratch={loose / 'scr'}:{tmp_path / 'bad_masks'}"], 0.2, 0)
    assert str(bad) in str(e.value) and str(loose / "scr" / "s1.png") in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".ds.tmp-*"))


def test_missing_mask_and_unreadable_image(loose, tmp_path):
    (loose / "scr_masks" / "s2.png").unlink()
    with pytest.raises(UserError, match="s2.*no mask"):
        prepare_dataset(tmp_path / "ds", [loose / "goodA"], [f"scratch={loose / 'scr'}:{loose / 'scr_masks'}"], 0.2, 0)
    (loose / "goodA" / "03.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(UserError, match="03.png"):
        prepare_dataset(tmp_path / "ds", [loose / "goodA"], [], 0.2, 0)
    assert not (tmp_path / "ds").exists()


def test_bad_arguments(loose, tmp_path):
    with pytest.raises(UserError, match="reserved"):
        parse_defect_spec(f"good={loose / 'scr'}")
    with pytest.raises(UserError, match="not found"):
        parse_defect_spec(f"scratch={loose / 'scr'}:{loose / 'nope'}")
    with pytest.raises(UserError, match="TYPE=IMAGES_DIR"):
        parse_defect_spec("scratch")
    with pytest.raises(UserError, match="test-fraction"):
        prepare_dataset(tmp_path / "ds", [loose / "goodA"], [], 1.0, 0)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        prepare_dataset(out, [loose / "goodA"], [], 0.2, 0)
    assert (out / "x").read_text() == "x"


def test_cli_wrong_mask_size(loose, tmp_path):
    _mask(loose / "scr_masks" / "s1_mask.png", shape=(24, 30))
    out = tmp_path / "ds"
    r = subprocess.run([MAE_AD, "prepare-data", "--out", str(out), "--good", str(loose / "goodA"),
                        "--defect", f"scratch={loose / 'scr'}:{loose / 'scr_masks'}"],
                       capture_output=True, text=True, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "s1_mask.png" in errors[0] and "30x24" in errors[0]
    assert "Traceback" not in r.stderr and not out.exists()
