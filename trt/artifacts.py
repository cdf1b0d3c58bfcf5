"""Artefact files of the compile stage (no torch): sidecar metadata, hashes, lazy imports of optional engines.

Every artefact carries a JSON sidecar named after it: `model.onnx` -> `model.onnx.meta.json`,
`model.plan` -> `model.plan.meta.json` (so an FP32 and an FP16 ONNX, or an ONNX and its plan, can share a folder).
The records are the typed ones of `mae_ad.contract` (`OnnxMeta`, `EngineMeta`), validated when they are read.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from mae_ad.contract import (
    BUNDLE_FILES,
    M,
    OnnxMeta,
    UserError,
    check_creatable,
    parse_meta,
    read_meta,
    sha256_file,
    write_bytes_atomic,  # noqa: F401  (re-exported for trt.build)
)

ONNX_META_KEY = "mae_ad.meta"  # metadata_props key holding the whole sidecar as JSON
META_SUFFIX = ".meta.json"
TRT_INSTALL_HINT = (
    "TensorRT Python bindings are not installed: on a Jetson install JetPack's python3-libnvinfer "
    "(apt install python3-libnvinfer), on an x86 CUDA machine `pip install tensorrt-cu12` (NVIDIA's index)"
)
PYCUDA_INSTALL_HINT = "pycuda is not installed: `pip install pycuda` (needs the CUDA toolkit and a GPU driver)"
ORT_INSTALL_HINT = "onnxruntime is not installed: `pip install onnxruntime` (or onnxruntime-gpu)"


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_name(p.name + META_SUFFIX)


def read_sidecar(path: str | os.PathLike[str], what: str, model: type[M]) -> M:
    """The sidecar of `path`, validated as `model`; UserError naming the sidecar (and the field) otherwise."""
    return read_meta(sidecar_path(path), model, f"{what} metadata")


def meta_from_onnx_props(props: dict[str, str], path: str | os.PathLike[str]) -> OnnxMeta:
    """The record exported into an ONNX graph's metadata_props (used when its sidecar is absent)."""
    if ONNX_META_KEY not in props:
        raise UserError(f"{path}: no mae-ad metadata (neither {sidecar_path(path).name} nor metadata_props "
                        f"{ONNX_META_KEY!r}); export it with `mae-ad export`")
    try:
        data = json.loads(props[ONNX_META_KEY])
    except json.JSONDecodeError:
        raise UserError(f"{path}: metadata_props {ONNX_META_KEY!r} is not valid JSON") from None
    return parse_meta(data, OnnxMeta, f"{path} (metadata_props {ONNX_META_KEY!r})")


def read_onnx_meta(path: str | os.PathLike[str], props: Callable[[], dict[str, str]]) -> OnnxMeta:
    """An ONNX model's record: its sidecar when there is one, else the graph's metadata_props (`props()`)."""
    if sidecar_path(path).is_file():
        return read_sidecar(path, "ONNX", OnnxMeta)
    return meta_from_onnx_props(props(), path)


def bundle_sha256(bundle: str | os.PathLike[str]) -> str:
    """A hash of a bundle directory: sha256 over the names and sha256 of its files (weights, config, calibration)."""
    d = Path(bundle)
    h = hashlib.sha256()
    names = sorted({*BUNDLE_FILES, *(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith("."))})
    for name in names:
        f = d / name
        if f.is_file():
            h.update(name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def refuse_existing(*paths: Path, what: str, option: str = "--out") -> None:
    """UserError when any of `paths` exists (a dangling symbolic link counts: writing would replace it), or when the
    first cannot be created (an ancestor is a file); `option` names the command-line option that chose them."""
    if paths:
        check_creatable(paths[0], option)
    for p in paths:
        if p.exists() or p.is_symlink():
            raise UserError(f"{p}: already exists; refusing to overwrite the {what} (choose another {option})")


@contextmanager
def staged_files(out: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; the caller writes files there under their final names, and on
    success each is renamed into `out.parent`. Nothing is left behind on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        staged = sorted(tmp.iterdir())
        refuse_existing(*(out.parent / f.name for f in staged), what="artefact")
        # the main file last, so a reader that sees it also sees its sidecar and external data
        for f in sorted(staged, key=lambda f: f.name == out.name):
            os.replace(f, out.parent / f.name)
    finally:
        for f in tmp.iterdir() if tmp.exists() else ():
            f.unlink()
        if tmp.exists():
            tmp.rmdir()


def import_optional(name: str, hint: str) -> ModuleType:
    """Import an optional engine module, or raise UserError with what to install."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"{hint} ({type(e).__name__}: {e})") from None


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
