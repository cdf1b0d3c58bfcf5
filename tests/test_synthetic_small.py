"""The fine-texture product with tiny defects (mae_ad.synthetic): determinism, shapes, mask geometry, contrast,
MVTec layout and the MJPG video helper. Small images so it runs in seconds."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mae_ad.data import index_dataset
from mae_ad.synthetic import (
    SMALL_DEFECT_BORDER,
    SMALL_DEFECTS,
    add_small_defect,
    fine_texture,
    small_defect_video,
    write_small_defect_dataset,
)

H, W = 256, 384


def _grey(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)


def _contrast(img: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(mean |defect - ring mean|, mean |ring - ring mean|), the ring 2-5 px around the mask."""
    g = _grey(img)
    near = cv2.dilate(mask, np.ones((3, 3), np.uint8)) > 0
    ring = (cv2.dilate(mask, np.ones((11, 11), np.uint8)) > 0) & ~near
    ref = g[ring].mean()
    return float(np.abs(g[mask > 0] - ref).mean()), float(np.abs(g[ring] - ref).mean())


def test_fine_texture_shape_determinism_and_variation():
    a = fine_texture(np.random.default_rng(3), H, W)
    b = fine_texture(np.random.default_rng(3), H, W)
    assert a.shape == (H, W, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    rng = np.random.default_rng(4)
    imgs = [fine_texture(rng, H, W) for _ in range(4)]
    for i in range(3):  # different images ...
        assert np.abs(imgs[i].astype(int) - imgs[i + 1]).mean() > 3
    means = [_grey(x).mean() for x in imgs]
    stds = [_grey(x).std() for x in imgs]
    assert max(means) - min(means) < 20 and 90 < min(means)  # ... of the same product: similar level and texture
    assert 4 < min(stds) and max(stds) < 1.5 * min(stds)
    assert fine_texture(np.random.default_rng(0), 100, 50).shape == (100, 50, 3)
    with pytest.raises(ValueError):
        fine_texture(np.random.default_rng(0), 4, 64)


@pytest.mark.parametrize("kind", SMALL_DEFECTS)
def test_small_defect_geometry_and_contrast(kind):
    rng = np.random.default_rng(11)
    ratios = []
    for _ in range(12):
        clean = fine_texture(rng, H, W)
        img, mask = add_small_defect(clean, kind, rng)
        assert img.shape == clean.shape and img.dtype == np.uint8
        assert mask.shape == (H, W) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        ys, xs = np.nonzero(mask)
        assert len(xs) > 0
        assert 3 <= max(np.ptp(xs), np.ptp(ys)) + 1 <= 16
        b = SMALL_DEFECT_BORDER
        assert xs.min() >= b and ys.min() >= b and xs.max() < W - b and ys.max() < H - b
        assert ((img != clean).any(axis=2) <= (mask > 0)).all()  # nothing changed outside the mask
        assert len(xs) < 0.002 * H * W  # tiny
        d, texture = _contrast(img, mask)
        assert d > 2 * texture
        ratios.append(d / texture)
    assert np.median(ratios) > 3
    assert max(ratios) < 10  # visible, not a saturated blob


def test_small_defect_determinism_and_errors():
    clean = fine_texture(np.random.default_rng(0), H, W)
    a = add_small_defect(clean, "pore", np.random.default_rng(5))
    b = add_small_defect(clean, "pore", np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="unknown"):
        add_small_defect(clean, "crack", np.random.default_rng(0))
    with pytest.raises(ValueError):
        add_small_defect(clean[:40, :40], "pit", np.random.default_rng(0))
    with pytest.raises(ValueError):
        add_small_defect(clean[:, :, 0], "pit", np.random.default_rng(0))


def test_small_defect_dataset_layout_and_determinism(tmp_path):
    kw = dict(n_train=4, n_test_good=2, n_test_defect=2, height=H, width=W, seed=7)
    root = write_small_defect_dataset(tmp_path / "a", **kw)
    index = index_dataset(root, need_test=True)
    assert index.layout == "mvtec" and len(index.train) == 4
    assert sorted(s.defect for s in index.test if s.label == 1) == sorted(k for k in SMALL_DEFECTS for _ in range(2))
    assert sum(s.label == 0 for s in index.test) == 2
    for s in index.test:
        img = cv2.imread(str(s.path))
        assert img.shape == (H, W, 3)
        if s.label == 1:
            assert s.mask is not None and s.mask.name == f"{s.path.stem}_mask.png"
            mask = cv2.imread(str(s.mask), cv2.IMREAD_GRAYSCALE)
            assert mask.shape == (H, W) and mask.max() == 255
    other = write_small_defect_dataset(tmp_path / "b", **kw)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert files == sorted(p.relative_to(other) for p in other.rglob("*.png"))
    for rel in files:
        assert np.array_equal(cv2.imread(str(root / rel)), cv2.imread(str(other / rel)))
    with pytest.raises(ValueError):
        write_small_defect_dataset(tmp_path / "c", defects=("crack",), n_train=1, height=H, width=W)


def test_small_defect_video_reads_back(tmp_path):
    path = tmp_path / "line.avi"
    drawn = small_defect_video(path, frames=6, height=120, width=200, defect_frames=range(2, 5), fps=5, seed=1)
    assert [d[0] for d in drawn] == [2, 3, 4]
    for _, cx, cy in drawn:
        assert SMALL_DEFECT_BORDER <= cx < 200 - SMALL_DEFECT_BORDER and SMALL_DEFECT_BORDER <= cy < 120 - 16
    cap = cv2.VideoCapture(str(path))
    try:
        assert cap.isOpened()
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(frame)
    finally:
        cap.release()
    assert len(frames) == 6 and all(f.shape == (120, 200, 3) for f in frames)
    with pytest.raises(ValueError):
        small_defect_video(tmp_path / "bad.avi", frames=3, height=120, width=200, defect_frames=[3])


def test_small_defect_video_ffv1_is_lossless_and_mjpg_is_not(tmp_path):
    """FFV1 gives back exactly the frames drawn (the same seed draws the same frames); MJPG does not."""
    kw = dict(frames=2, height=120, width=200, defect_frames=[1], fps=5, seed=3)
    small_defect_video(tmp_path / "a.avi", codec="FFV1", **kw)
    small_defect_video(tmp_path / "b.avi", codec="MJPG", **kw)
    reads = []
    for name in ("a.avi", "b.avi"):
        cap = cv2.VideoCapture(str(tmp_path / name))
        reads.append([cap.read()[1] for _ in range(2)])
        cap.release()
    assert all(f is not None and f.shape == (120, 200, 3) for fs in reads for f in fs)
    # both decode to the same drawn frames up to MJPG's loss: lossless within 0, lossy clearly above 0
    diff = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(*reads, strict=True)]
    assert all(d > 0.3 for d in diff)
    rng = np.random.default_rng(3)
    from mae_ad.synthetic import fine_texture

    assert np.array_equal(reads[0][0], fine_texture(rng, 120, 200))  # frame 0 has no defect: exactly the texture
    with pytest.raises(ValueError, match="codec"):
        small_defect_video(tmp_path / "c.avi", frames=1, height=120, width=200, defect_frames=[], codec="H264")
