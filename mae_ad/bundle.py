"""The model bundle: one directory with weights, resolved config, calibration and a JSON of what made it.

Bundles are written into a temporary sibling directory and renamed into place, so a crash never leaves half a
bundle, and an existing bundle is never overwritten.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import Config, config_from_dict, dump_config, read_yaml
from .contract import (
    BUNDLE_CALIB_TENSORS,
    BUNDLE_CALIBRATION,
    BUNDLE_CONFIG,
    BUNDLE_META,
    BUNDLE_WEIGHTS,
    KIND_BUNDLE,
    SCHEMA_VERSION,
    BundleMeta,
    UserError,
    dump_meta,
    read_bundle_meta,
    sha256_file,
    staged_dir,
    write_json_atomic,
)
from .lora import has_lora_state
from .model import MaskedAutoencoderViT, build_model
from .scoring import Scorer


def versions() -> dict[str, str]:
    import timm

    out = {"mae_ad": __version__, "torch": torch.__version__, "timm": timm.__version__,
           "python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    try:
        out["loralib"] = version("loralib")
    except PackageNotFoundError:  # pragma: no cover - metadata missing
        pass
    return out


def state_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def model_id(d: Path, name: str, calibration: dict[str, Any] | None, weights_sha256: str) -> str:
    """`<name>-<12 hex>`: a SHA-256 over the weights (`weights_sha256`, their file's hash) and, for a calibrated
    bundle, the threshold and the calibration tensors (position statistics, kNN memory, fusion divisors) in `d`. A
    re-calibration that changes how images are scored gets a new id (the id the agent publishes beside every score,
    and that `evaluate --engine` checks); only one that reproduces the calibration bit for bit keeps it.
    `weights_sha256` names the trained weights alone."""
    h = hashlib.sha256(weights_sha256.encode())
    if calibration is not None:
        h.update(repr(float(calibration["threshold"])).encode())
        if (d / BUNDLE_CALIB_TENSORS).exists():
            h.update(sha256_file(d / BUNDLE_CALIB_TENSORS).encode())
    return f"{name}-{h.hexdigest()[:12]}"


def write_bundle_files(
    d: Path, model: MaskedAutoencoderViT, cfg: Config, calibration: dict[str, Any] | None,
    scorer: Scorer | None = None, extra_meta: dict[str, Any] | None = None,
) -> None:
    """Write the bundle files into an existing (staging) directory."""
    save_file(state_for_save(model), str(d / BUNDLE_WEIGHTS))
    (d / BUNDLE_CONFIG).write_text(dump_config(cfg))
    if calibration is not None:
        write_json_atomic(d / BUNDLE_CALIBRATION, calibration)
        tensors = scorer.calibration_tensors() if scorer is not None else {}
        if tensors:
            save_file(tensors, str(d / BUNDLE_CALIB_TENSORS))
    from .lora import has_lora

    weights_sha = sha256_file(d / BUNDLE_WEIGHTS)
    record: dict[str, Any] = {
        "format_version": SCHEMA_VERSION,
        "kind": KIND_BUNDLE,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "name": cfg.name,
        "model_id": model_id(d, cfg.name, calibration, weights_sha),
        "weights_sha256": weights_sha,
        "lora": has_lora(model),
        "merged": False,
        "input": {"size": cfg.model.img_size, "channels": 3, "layout": "NCHW", "range": [0, 1],
                  "colour": "RGB", "mean": list(cfg.data.mean), "std": list(cfg.data.std),
                  "resize": cfg.data.resize,
                  **({"tile_scale": cfg.data.tile.scale, "tile_overlap": cfg.data.tile.overlap}
                     if cfg.data.tile is not None else {})},
        "scoring": cfg.scoring.model_dump(mode="json"),
        "calibrated": calibration is not None,
        "versions": versions(),
    }
    record.update(extra_meta or {})
    write_json_atomic(d / BUNDLE_META, dump_meta(BundleMeta.model_validate(record)))  # a record readers accept


def save_bundle(out: str | os.PathLike[str], model: MaskedAutoencoderViT, cfg: Config,
                calibration: dict[str, Any] | None, scorer: Scorer | None = None,
                extra_meta: dict[str, Any] | None = None) -> Path:
    with staged_dir(out) as d:
        write_bundle_files(d, model, cfg, calibration, scorer, extra_meta)
    return Path(out)


def load_bundle_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    read_bundle_meta(p)
    return config_from_dict(read_yaml(p / BUNDLE_CONFIG), str(p / BUNDLE_CONFIG))


def load_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read safetensors weights ({e})") from None


def load_bundle(path: str | os.PathLike[str], device: str = "cpu"
                ) -> tuple[Config, MaskedAutoencoderViT, BundleMeta]:
    """Load (config, model in eval mode, meta). The architecture is built from the bundle's own config; LoRA
    layers are built only if the weights contain adapters (a merged bundle loads into plain linears)."""
    p = Path(path)
    meta = read_bundle_meta(p)
    cfg = load_bundle_config(p)
    state = load_state(p / BUNDLE_WEIGHTS)
    mcfg = cfg.model
    if not has_lora_state(state) and mcfg.lora.rank > 0:
        mcfg = mcfg.model_copy(update={"lora": mcfg.lora.model_copy(update={"rank": 0})})
    model = build_model(mcfg)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"{p / BUNDLE_WEIGHTS}: weights do not match the architecture in {BUNDLE_CONFIG}: "
            f"missing {len(result.missing_keys)} ({', '.join(result.missing_keys[:5])}), "
            f"unexpected {len(result.unexpected_keys)} ({', '.join(result.unexpected_keys[:5])})"
        )
    return cfg, model.to(device).eval(), meta


def load_scorer(path: str | os.PathLike[str], device: str = "cpu", require_calibration: bool = False
                ) -> tuple[Scorer, dict[str, Any] | None, BundleMeta]:
    """Load a bundle as a ready Scorer. Returns (scorer, calibration or None, meta)."""
    from .contract import read_calibration

    p = Path(path)
    cfg, model, meta = load_bundle(p, device)
    scorer = Scorer(model, cfg.scoring, cfg.data).to(device).eval()
    cal = None
    if (p / BUNDLE_CALIBRATION).is_file() or require_calibration:
        cal = read_calibration(p)
    if scorer.calibration_tensors():
        tpath = p / BUNDLE_CALIB_TENSORS
        if tpath.is_file():
            try:
                scorer.load_calibration_tensors(load_state(tpath), str(tpath))
            except ValueError as e:
                raise UserError(str(e)) from None
        elif cal is not None:
            raise UserError(f"{tpath}: missing; scoring.normalize=position needs the normal statistics")
    return scorer, cal, meta
