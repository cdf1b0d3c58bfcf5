"""`mae-ad prepare-data`: build the MVTec AD layout from loose folders of images.

    out/train/good/            normal images (share 1 - test_fraction)
    out/test/good/             normal images kept for testing (share test_fraction)
    out/test/<TYPE>/           defect images of each --defect TYPE=IMAGES_DIR[:MASKS_DIR]
    out/ground_truth/<TYPE>/   <stem>_mask.png for each defect image (when MASKS_DIR is given)

Everything is checked (readable images, a readable mask of the image's size for every defect image) while it is
written into a temporary sibling directory, which is renamed to `out` only at the end. No torch import.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .contract import UserError, refuse_existing_out, staged_dir
from .data import NORMAL_NAMES, decode_image, image_shape, list_images, mask_to_binary

log = logging.getLogger(__name__)

_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class DefectSpec:
    name: str
    images: Path
    masks: Path | None


def parse_defect_spec(spec: str) -> DefectSpec:
    """'TYPE=IMAGES_DIR[:MASKS_DIR]' -> DefectSpec (folders are checked to exist)."""
    if "=" not in spec:
        raise UserError(f"--defect {spec!r}: expected TYPE=IMAGES_DIR[:MASKS_DIR]")
    name, rest = spec.split("=", 1)
    name = name.strip()
    if not _TYPE_RE.match(name):
        raise UserError(f"--defect {spec!r}: defect type {name!r} must be a plain folder name (letters, digits, _.-)")
    if name in NORMAL_NAMES:
        raise UserError(f"--defect {spec!r}: {name!r} is reserved for normal images; use --good")
    if not rest:
        raise UserError(f"--defect {spec!r}: IMAGES_DIR missing")
    images, masks = Path(rest), None
    if not images.is_dir() and ":" in rest:  # a folder whose name holds ':' wins over the split
        img_s, mask_s = rest.rsplit(":", 1)
        images, masks = Path(img_s), Path(mask_s) if mask_s else None
    if not images.is_dir():
        raise UserError(f"--defect {spec!r}: image folder {images} not found")
    if masks is not None and not masks.is_dir():
        raise UserError(f"--defect {spec!r}: mask folder {masks} not found")
    return DefectSpec(name, images, masks)


def _unique(name: str, used: set[str]) -> str:
    """`name`, or `<stem>-2<ext>`, `<stem>-3<ext>`... if a file of the same stem (any case, any extension) was
    already placed: stems must be unique because masks are named after them."""
    p = Path(name)
    stem, k = p.stem, 2
    while stem.lower() in used:
        stem, k = f"{p.stem}-{k}", k + 1
    used.add(stem.lower())
    return stem + p.suffix


def _checked_copy(src: Path, dst: Path) -> tuple[int, int]:
    """Copy an image byte for byte after proving it decodes; returns its (H, W)."""
    shape = image_shape(src)  # raises UserError naming the file
    shutil.copyfile(src, dst)
    return shape


def _find_mask(masks_dir: Path, stem: str, index: dict[str, list[Path]]) -> Path | None:
    for key in (f"{stem}_mask", stem):
        hits = index.get(key, [])
        if len(hits) > 1:
            raise UserError(f"{masks_dir}: several masks match {stem!r}: {', '.join(p.name for p in hits)}")
        if hits:
            return hits[0]
    return None


def _write_mask(src: Path, image: Path, expect: tuple[int, int], dst: Path) -> None:
    """Check a mask against its image and write it as a 0/255 PNG, by the mask rule of mae_ad.data (any non-zero
    pixel is defect; one decode for every image and mask)."""
    try:
        m = mask_to_binary(decode_image(src, "mask"), str(src))
    except UserError as e:
        raise UserError(f"{e} (for image {image})") from None
    if m.shape[:2] != tuple(expect):
        raise UserError(f"{src}: mask is {m.shape[1]}x{m.shape[0]} but its image {image} is {expect[1]}x{expect[0]}")
    out = np.where(m, 255, 0).astype(np.uint8)
    if not out.any():
        log.warning("%s: mask is empty (no defect pixel) for defect image %s", src, image)
    ok, buf = cv2.imencode(".png", out)
    if not ok:  # pragma: no cover - PNG encoding of a uint8 array does not fail
        raise OSError(f"{dst}: could not encode mask")
    buf.tofile(str(dst))


def prepare_dataset(out: str | os.PathLike[str], good_dirs: Sequence[str | os.PathLike[str]],
                    defect_specs: Sequence[str], test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Build an MVTec-layout dataset at `out` (which must not exist or be empty). Normal images are split
    deterministically (seed) into train/good and test/good; defect folders go to test/<TYPE> with their masks
    in ground_truth/<TYPE>/<stem>_mask.png. Returns `out`."""
    out = Path(out)
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction {test_fraction}: must be between 0 and 1 (exclusive)")
    if not good_dirs:
        raise UserError("--good: give at least one folder of normal images")
    refuse_existing_out(out, "dataset")
    normals: list[Path] = []
    seen: set[Path] = set()
    for g in good_dirs:
        g = Path(g)
        if not g.is_dir():
            raise UserError(f"--good {g}: folder not found")
        found = list_images(g)
        if not found:
            raise UserError(f"--good {g}: no images in this folder")
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                normals.append(f)
    if len(normals) < 2:
        raise UserError(f"--good: found {len(normals)} normal image, need at least 2 (one to train, one to test)")
    specs = [parse_defect_spec(s) for s in defect_specs]
    for sp in specs:
        if not list_images(sp.images):
            raise UserError(f"--defect {sp.name}: no images in {sp.images}")
        if sp.masks is None:
            log.warning("--defect %s: no mask folder given; its images count for image-level metrics only", sp.name)

    position = {p: i for i, p in enumerate(normals)}
    order = list(normals)
    random.Random(seed).shuffle(order)
    n_test = min(len(order) - 1, max(1, round(len(order) * test_fraction)))
    split = {"test/good": order[:n_test], "train/good": order[n_test:]}
    counts: dict[str, int] = {}
    renamed = 0
    with staged_dir(out, what="dataset") as d:
        for folder, files in split.items():
            (d / folder).mkdir(parents=True)
            used: set[str] = set()
            for src in sorted(files, key=position.__getitem__):  # source order decides who keeps a name
                name = _unique(src.name, used)
                renamed += name != src.name
                _checked_copy(src, d / folder / name)
            counts[folder] = len(files)
        used_by_type: dict[str, set[str]] = {}
        for sp in specs:
            img_dir, gt_dir = d / "test" / sp.name, d / "ground_truth" / sp.name
            img_dir.mkdir(parents=True, exist_ok=True)
            used = used_by_type.setdefault(sp.name, set())
            mask_index: dict[str, list[Path]] = {}
            if sp.masks is not None:
                gt_dir.mkdir(parents=True, exist_ok=True)
                for m in list_images(sp.masks):
                    mask_index.setdefault(m.stem, []).append(m)
            for src in list_images(sp.images):
                name = _unique(src.name, used)
                renamed += name != src.name
                shape = _checked_copy(src, img_dir / name)
                if sp.masks is not None:
                    msrc = _find_mask(sp.masks, src.stem, mask_index)
                    if msrc is None:
                        raise UserError(f"{src}: no mask named {src.stem}_mask.* or {src.stem}.* in {sp.masks}")
                    _write_mask(msrc, src, shape, gt_dir / f"{Path(name).stem}_mask.png")
            counts[f"test/{sp.name}"] = counts.get(f"test/{sp.name}", 0) + len(list_images(sp.images))
    if renamed:
        log.warning("%d file(s) renamed because another source folder had a file of the same name", renamed)
    log.info("prepared %s: %s", out, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return out
