"""One decode for every image and mask (mae_ad.data): EXIF orientation, bit depth, the mask rule and mask lookup,
on real files written by OpenCV and PIL."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from mae_ad.contract import UserError
from mae_ad.data import (
    decode_image_depth,
    image_shape,
    index_dataset,
    read_display_bgr,
    read_image,
    read_mask,
)


def _dataset(root: Path, mask_writer, n_defect: int = 3, size: int = 48) -> list[np.ndarray]:
    """MVTec layout: 3 good train/test images, `n_defect` defect images with square masks written by mask_writer."""
    rng = np.random.default_rng(0)
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(3):
        cv2.imwrite(str(root / f"train/good/{i:03d}.png"), rng.integers(100, 140, (size, size), dtype=np.uint8))
        cv2.imwrite(str(root / f"test/good/{i:03d}.png"), rng.integers(100, 140, (size, size), dtype=np.uint8))
    truth = []
    for i in range(n_defect):
        m = np.zeros((size, size), bool)
        m[5 + i:15 + i, 10:20 + i] = True
        cv2.imwrite(str(root / f"test/spot/{i:03d}.png"), np.where(m, 30, 120).astype(np.uint8))
        mask_writer(root / "ground_truth/spot", f"{i:03d}", m, i)
        truth.append(m)
    return truth


@pytest.mark.parametrize("kind", ["0/255", "0/1", "label 2", "16-bit 0/65535", "colour red", "mixed 0/1 and 0/255"])
def test_any_nonzero_mask_pixel_is_defect(tmp_path, kind):
    def write(d: Path, stem: str, m: np.ndarray, i: int) -> None:
        if kind == "0/255" or (kind.startswith("mixed") and i % 2 == 0):
            img = m.astype(np.uint8) * 255
        elif kind in ("0/1", "mixed 0/1 and 0/255"):
            img = m.astype(np.uint8)
        elif kind == "label 2":
            img = m.astype(np.uint8) * 2
        elif kind.startswith("16-bit"):
            img = m.astype(np.uint16) * 65535
        else:
            img = np.zeros((*m.shape, 3), np.uint8)
            img[m] = (0, 0, 255)
        assert cv2.imwrite(str(d / f"{stem}_mask.png"), img)

    truth = _dataset(tmp_path, write)
    index = index_dataset(tmp_path)
    defects = [s for s in index.test if s.label == 1]
    assert len(defects) == 3 and all(s.mask is not None for s in defects)
    for s, m in zip(defects, truth, strict=True):
        got = read_mask(s.mask)
        assert got.dtype == np.float32 and np.array_equal(got > 0, m), s.mask


def test_mask_on_disk_is_found_whatever_its_extension(tmp_path):
    names = iter(["{}_mask.bmp", "{}.PNG", "{}_mask.tif"])

    def write(d: Path, stem: str, m: np.ndarray, i: int) -> None:
        assert cv2.imwrite(str(d / next(names).format(stem)), m.astype(np.uint8) * 255)

    _dataset(tmp_path, write)
    defects = [s for s in index_dataset(tmp_path).test if s.label == 1]
    assert [s.mask.name for s in defects] == ["000_mask.bmp", "001.PNG", "002_mask.tif"]
    assert all(read_mask(s.mask).sum() > 0 for s in defects)


def test_unreadable_mask_is_an_error_naming_it(tmp_path):
    from mae_ad.evaluate import _load_test_set

    def write(d: Path, stem: str, m: np.ndarray, i: int) -> None:
        (d / f"{stem}_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage" if i == 1 else
                                              cv2.imencode(".png", m.astype(np.uint8))[1].tobytes())

    _dataset(tmp_path, write)
    samples = index_dataset(tmp_path, need_test=True).test
    with pytest.raises(UserError, match=r"001_mask\.png: unreadable or truncated mask"):
        _load_test_set(samples, 32)


def test_evaluation_masks_are_the_same_for_01_255_and_mixed(tmp_path):
    """What `mae-ad evaluate` compares against: 0/1, 0/255 and mixed masks give the same ground truth."""
    from mae_ad.evaluate import _load_test_set

    got = {}
    for scale in ("255", "1", "mixed"):
        def write(d: Path, stem: str, m: np.ndarray, i: int, scale=scale) -> None:
            v = 255 if scale == "255" or (scale == "mixed" and i % 2) else 1
            cv2.imwrite(str(d / f"{stem}_mask.png"), m.astype(np.uint8) * v)

        _dataset(tmp_path / scale, write)
        _, masks, has_mask, _, _ = _load_test_set(index_dataset(tmp_path / scale, need_test=True).test, 48)
        assert has_mask.all()
        got[scale] = masks
    assert got["255"].sum() > 0
    assert np.array_equal(got["255"], got["1"]) and np.array_equal(got["255"], got["mixed"])


def _exif_jpeg(path: Path, orientation: int) -> tuple[int, int]:
    """A 320x160 (stored) JPEG with one dark spot at stored (x=270, y=40) and an EXIF Orientation tag."""
    from PIL import Image

    h, w = 160, 320
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w), 150, np.uint8)
    img[(xx - 270) ** 2 + (yy - 40) ** 2 <= 144] = 20
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.repeat(img[..., None], 3, 2)).save(path, quality=95, exif=exif)
    return 270, 40


def _dark_spot(gray: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(np.argmin(cv2.GaussianBlur(gray, (0, 0), 3)), gray.shape)
    return int(x), int(y)


def test_exif_orientation_is_applied_the_same_for_scoring_and_display(tmp_path):
    from PIL import Image, ImageOps

    p = tmp_path / "exif6.jpg"
    _exif_jpeg(p, 6)
    viewer = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("L")).astype(np.float32)
    assert viewer.shape == (320, 160)  # what a viewer shows: rotated to portrait
    sx, sy = _dark_spot(viewer)
    assert (sx, sy) == pytest.approx((119, 270), abs=2)

    assert image_shape(p) == (320, 160)
    disp = read_display_bgr(p)
    assert disp.shape == (320, 160, 3)
    assert _dark_spot(disp[..., 1].astype(np.float32)) == pytest.approx((sx, sy), abs=2)
    scored = read_image(p)  # [3, H, W] RGB at native size: the same orientation as displayed
    assert scored.shape == (3, 320, 160)
    assert _dark_spot(scored[1]) == pytest.approx((sx, sy), abs=2)
    small = read_image(p, 64)[1]  # resized for the model: the spot scales with the image
    x64, y64 = _dark_spot(small)
    assert x64 == pytest.approx(sx * 64 / 160, abs=2) and y64 == pytest.approx(sy * 64 / 320, abs=2)


def _png_with_sbit(img16: np.ndarray, bits: int) -> bytes:
    png = cv2.imencode(".png", img16)[1].tobytes()
    body = b"sBIT" + bytes([bits])
    chunk = struct.pack(">I", 1) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    i = png.index(b"IDAT") - 4  # insert before the first IDAT chunk (after IHDR)
    return png[:i] + chunk + png[i:]


def test_16_bit_files_are_scaled_by_their_bit_depth(tmp_path, caplog, monkeypatch):
    import logging

    import mae_ad.data

    monkeypatch.setattr(mae_ad.data, "_depths_logged", set())
    caplog.set_level(logging.INFO, logger="mae_ad.data")
    ramp = np.tile(np.linspace(0, 1, 64), (32, 1))
    cases = {  # file -> (pixels, expected white level)
        "12bit.png": ((ramp * 4095).astype(np.uint16), 4095),
        "10bit.tif": ((ramp * 1023).astype(np.uint16), 1023),
        "16bit.png": ((ramp * 65535).astype(np.uint16), 65535),
    }
    for name, (px, _) in cases.items():
        assert cv2.imwrite(str(tmp_path / name), px)
    for name, (px, white) in cases.items():
        got = read_image(tmp_path / name)
        assert got.max() == pytest.approx(1.0, abs=1e-6), name  # not left nearly black
        assert np.allclose(got[0], px / white, atol=1e-6), name
        assert decode_image_depth(tmp_path / name)[1] == {4095: 12, 1023: 10, 65535: 16}[white]
    assert "read as 12-bit data" in caplog.text
    # a dim 12-bit image that declares its depth (PNG sBIT) keeps the 12-bit scale
    dim = (ramp * 1000).astype(np.uint16)
    (tmp_path / "dim12.png").write_bytes(_png_with_sbit(dim, 12))
    assert decode_image_depth(tmp_path / "dim12.png")[1] == 12
    assert read_image(tmp_path / "dim12.png").max() == pytest.approx(1000 / 4095, abs=1e-6)
    # 8-bit: / 255 as before; the display copy is the same image
    assert cv2.imwrite(str(tmp_path / "8bit.png"), (ramp * 255).astype(np.uint8))
    assert np.allclose(read_image(tmp_path / "8bit.png")[0], (ramp * 255).astype(np.uint8) / 255.0)
    disp12 = read_display_bgr(tmp_path / "12bit.png")
    assert disp12.dtype == np.uint8 and disp12.max() == 255


def test_unreadable_image_is_an_error_naming_it(tmp_path):
    p = tmp_path / "broken.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(UserError, match="broken.jpg: unreadable or truncated image"):
        read_image(p)
    with pytest.raises(UserError, match="missing.png: image not found"):
        image_shape(tmp_path / "missing.png")
