"""A per-user cache of bundles exported to ONNX, so that `evaluate` and `predict` can score through ONNX Runtime
(several times faster than eager torch on a CPU, BENCHMARKS.md "Precision and engine") without an export step.

The key is `bundle_sha256` (names and hashes of every file of the bundle): a re-trained or re-calibrated bundle
gets a new entry, an unchanged one is exported once. The entry is the ordinary `export_onnx` output (parity with
PyTorch verified at export, sidecar metadata), written atomically, so a crash leaves no half entry.

Location: $MAE_AD_CACHE, else $XDG_CACHE_HOME/mae-ad, else ~/.cache/mae-ad; entries under onnx/<hash[:20]>/
(about the bundle's size each). The cache is bounded: after each new export the least recently used entries are
removed until all of them together fit $MAE_AD_CACHE_MAX_MB (default 2048 MB; 0 keeps every entry); the entry just
made is never removed, and a hit marks its entry used (the folder's modification time). `rm -rf` the folder to
reclaim all of it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

from mae_ad.contract import OnnxMeta, UserError, read_bundle_meta, sha256_file

from .artifacts import bundle_sha256, read_sidecar, sidecar_path

log = logging.getLogger(__name__)

CACHE_ENV = "MAE_AD_CACHE"
CACHE_MAX_ENV = "MAE_AD_CACHE_MAX_MB"
DEFAULT_MAX_MB = 2048


def cache_limit_bytes() -> int:
    """The cache's size bound in bytes from $MAE_AD_CACHE_MAX_MB (default 2048 MB; 0: no bound, returned as 0).
    Raises UserError naming the variable for anything but a non-negative number."""
    raw = os.environ.get(CACHE_MAX_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not (math.isfinite(mb) and mb >= 0):
        raise UserError(f"${CACHE_MAX_ENV}={raw!r}: must be a number of megabytes, 0 or more (0 keeps every entry)")
    return int(mb * (1 << 20))


def _entry_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def prune(onnx_dir: Path, keep: Path, limit: int) -> list[Path]:
    """Remove the least recently used entries (folders of `onnx_dir`, oldest modification time first) until the
    entries together take at most `limit` bytes; never `keep`; `limit` 0 removes nothing. Returns what was removed.
    An entry that cannot be removed is logged and skipped."""
    if limit <= 0 or not onnx_dir.is_dir():
        return []
    entries = []
    for d in onnx_dir.iterdir():
        try:
            if d.is_dir():
                entries.append((d.stat().st_mtime, d, _entry_bytes(d)))
        except OSError:  # removed by another process meanwhile
            continue
    total = sum(b for _, _, b in entries)
    removed = []
    for mtime, d, size in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if d.resolve() == keep.resolve():
            continue
        try:
            shutil.rmtree(d)
        except OSError as e:
            log.warning("ONNX cache: cannot remove %s (%s)", d, e.strerror)
            continue
        total -= size
        removed.append(d)
        log.info("ONNX cache: removed %s (%.1f MB, last used %s) to stay under $%s = %.0f MB", d, size / 2**20,
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime)), CACHE_MAX_ENV, limit / 2**20)
    return removed


def cache_root() -> Path:
    """$MAE_AD_CACHE, else $XDG_CACHE_HOME/mae-ad, else ~/.cache/mae-ad."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mae-ad"


def _valid_entry(path: Path, sha: str, model_id: str) -> bool:
    """The entry is this bundle's export, whole: its sidecar names the bundle's hash and model, and the graph's
    bytes still hash to what the export recorded (a truncated or replaced file is exported again)."""
    if not (path.is_file() and sidecar_path(path).is_file()):
        return False
    try:
        meta = read_sidecar(path, "ONNX", OnnxMeta)
    except UserError:
        return False
    return (meta.parent is not None and meta.parent.bundle_sha256 == sha and meta.model_id == model_id
            and meta.onnx_sha256 is not None and sha256_file(path) == meta.onnx_sha256)


def cached_onnx(bundle: str | os.PathLike[str], root: Path | None = None) -> tuple[Path, bool]:
    """The fp32 ONNX export of `bundle` from the cache, exported now (`export_onnx`, verified) when missing.

    Returns (the .onnx path, whether it was exported now). Raises UserError when the bundle cannot be exported (the
    export's own errors) or the cache folder cannot be written (naming it and $MAE_AD_CACHE)."""
    from .export import export_onnx

    bundle = Path(bundle)
    limit = cache_limit_bytes()
    sha = bundle_sha256(bundle)
    model_id = read_bundle_meta(bundle).model_id
    folder = (root or cache_root()) / "onnx" / sha[:20]
    path = folder / "model.onnx"
    if _valid_entry(path, sha, model_id):
        log.info("ONNX export of %s from the cache: %s", bundle, path)
        try:
            os.utime(folder)  # used now: the last entry `prune` removes
        except OSError:
            pass
        return path, False
    try:
        if folder.exists():  # an entry from an interrupted or foreign writer: start it again
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot write the ONNX cache ({e.strerror}); set ${CACHE_ENV} to a writable "
                        "folder or use --engine torch") from None
    log.info("exporting %s to ONNX once for ONNX Runtime scoring (cached in %s)", bundle, folder)
    try:
        export_onnx(bundle, path)
    except UserError:
        if _valid_entry(path, sha, model_id):  # another process exported it at the same moment
            return path, False
        raise
    prune(folder.parent, folder, limit)
    return path, True
