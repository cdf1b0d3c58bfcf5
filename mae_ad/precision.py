"""Scoring precision chosen by the hardware and checked by decisions.

bf16 pays only where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16: 1.6-2x fp32 GEMM); elsewhere
torch emulates it with conversions and it is several times slower than fp32. So `auto` means bf16 on such a CPU
and fp32 elsewhere, detected at run time from /proc/cpuinfo. Before bf16 is used for scoring it must reproduce the
fp32 decisions (score > threshold) on calibration images; below `min_agreement` it falls back to fp32 with a log
line.

    choice = select_precision(scorer, normal_images, threshold, setting="auto")
    with precision_context(choice.precision):
        maps, scores = scorer(x)

Settings: `auto` (the default), `fp32`, `bf16` (forced: used even without native bf16, still checked).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .contract import BundleMeta, UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
ENV_VAR = "MAE_AD_PRECISION"  # overrides the default setting `auto` for every process that reads it
DEFAULT_MIN_AGREEMENT = 0.99
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


def cpu_isa_flags(cpuinfo: str | None = None) -> list[str]:
    """The vector/matrix ISA extensions of this CPU that decide GEMM speed, from /proc/cpuinfo's `flags` line
    (`cpuinfo`: that file's text, for tests). Empty where /proc/cpuinfo is unreadable (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm64
            have = set(value.split())
            return [f for f in ISA_FLAGS if f in have]
    return []


def native_bf16(flags: list[str]) -> bool:
    """True where the CPU computes bf16 products in hardware (AVX512-BF16 or AMX-BF16)."""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_setting(setting: str | None = None) -> str:
    """The precision setting in force, unchecked: `setting`, else $MAE_AD_PRECISION, else `auto`."""
    return setting or os.environ.get(ENV_VAR) or "auto"


def resolve_precision(setting: str | None = None, flags: list[str] | None = None) -> str:
    """`fp32` or `bf16` for a setting (None: $MAE_AD_PRECISION, else `auto`). UserError on an unknown setting."""
    setting = precision_setting(setting)
    if setting not in PRECISIONS:
        raise UserError(f"precision {setting!r}: choose one of {', '.join(PRECISIONS)}")
    flags = cpu_isa_flags() if flags is None else flags
    if setting == "auto":
        return "bf16" if native_bf16(flags) else "fp32"
    if setting == "bf16" and not native_bf16(flags):
        log.warning("precision bf16 forced on a CPU without native bf16 (flags: %s): expect it slower than fp32",
                    " ".join(flags) or "unknown")
    return setting


def training_precision(setting: str, device_type: str = "cpu", flags: list[str] | None = None) -> str:
    """`fp32` or `bf16` for training (`train.precision`): `auto` is bf16 on a CPU with native bf16 (`native_bf16`)
    or a CUDA device that supports it (Ampere or newer), fp32 elsewhere; `fp32`/`bf16` are used as set (bf16 forced
    on a CPU without it is logged: torch emulates it, several times slower). Mixed precision as in
    `torch.autocast`: weights, optimizer state and the loss stay fp32."""
    if setting not in PRECISIONS:
        raise UserError(f"train.precision {setting!r}: choose one of {', '.join(PRECISIONS)}")
    if device_type == "cuda":
        import torch

        if setting == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return setting
    return resolve_precision(setting, flags)


def precision_context(precision: str) -> Any:
    """The context to score in: CPU/CUDA autocast to bfloat16 for `bf16`, nothing for `fp32`."""
    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class PrecisionChoice:
    precision: str  # what to use: fp32 or bf16
    wanted: str  # what the setting and the hardware asked for
    images: int = 0
    agree: int = 0
    reason: str = ""

    @property
    def agreement(self) -> float:
        return self.agree / self.images if self.images else 1.0


def score_batches(scorer: Any, images: np.ndarray, precision: str, batch: int = 8) -> np.ndarray:
    """Scores [N] of float32 images [N, 3, S, S] in [0, 1] at `precision` (fp32 result either way)."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            with precision_context(precision):
                _, s = scorer(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])))
            out.append(s.float().cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def select_precision(scorer: Any, images: np.ndarray, threshold: float, setting: str | None = None,
                     min_agreement: float = DEFAULT_MIN_AGREEMENT, flags: list[str] | None = None) -> PrecisionChoice:
    """The precision to score with: `resolve_precision(setting)`, and for bf16 only when its decisions
    (score > threshold) agree with fp32's on at least `min_agreement` of `images` (normal calibration images,
    float32 [N, 3, S, S]); else fp32, with a log line. The result says what was wanted, used and measured."""
    wanted = resolve_precision(setting, flags)
    if wanted == "fp32":
        return PrecisionChoice("fp32", "fp32", reason="no native bf16" if setting in (None, "auto") else "setting")
    if len(images) == 0:
        log.warning("precision bf16: no calibration images to check it on; scoring in fp32")
        return PrecisionChoice("fp32", wanted, reason="no images to check bf16")
    ref = score_batches(scorer, images, "fp32")
    low = score_batches(scorer, images, "bf16")
    agree = int(((ref > threshold) == (low > threshold)).sum())
    choice = PrecisionChoice("bf16", wanted, len(images), agree)
    if choice.agreement < min_agreement:  # a warning where bf16 was asked for; under auto an ordinary choice
        asked = precision_setting(setting) == "bf16"
        log.log(logging.WARNING if asked else logging.INFO,
                "precision bf16 refused: %d/%d decisions agree with fp32 (%.2f%% < %.2f%%); scoring in fp32",
                agree, len(images), 100 * choice.agreement, 100 * min_agreement)
        choice.precision, choice.reason = "fp32", "bf16 decisions disagree"
    else:
        log.info("precision bf16: %d/%d decisions agree with fp32 on the calibration images", agree, len(images))
        choice.reason = "native bf16, decisions agree"
    return choice


def bundle_calibration_paths(meta: BundleMeta | Mapping[str, Any], cal: dict[str, Any] | None, data: str | Path | None = None,
                             limit: int = 64) -> list[Path]:
    """A bundle's held-back normal images (calibration.json `holdout_images`, relative to the dataset root: `data`,
    else meta.json `training.data`), at most `limit` evenly spaced; [] when they cannot be found."""
    held = (cal or {}).get("holdout_images") or []
    training = meta.training if isinstance(meta, BundleMeta) else meta.get("training")
    root = Path(data) if data is not None else Path((training or {}).get("data") or "")
    if not held or not root.is_dir():
        return []
    paths = [root / h for h in held if (root / h).is_file()]
    if len(paths) > limit:
        paths = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    return paths


def install_precision(scorer: Any, precision: str) -> None:
    """Make every later `scorer(x)` run at `precision` (autocast around its forward; fp32 maps and scores out)."""
    base = type(scorer).forward

    def forward(x: Any) -> Any:
        with precision_context(precision):
            amap, score = base(scorer, x)
        return amap.float(), score.float()

    scorer.forward = forward if precision == "bf16" else base.__get__(scorer)
    scorer.precision = precision


def prepare_precision(scorer: Any, meta: BundleMeta | Mapping[str, Any], cal: dict[str, Any] | None,
                      setting: str | None = None, data: str | Path | None = None,
                      min_agreement: float = DEFAULT_MIN_AGREEMENT, flags: list[str] | None = None) -> PrecisionChoice:
    """Choose the precision of a loaded bundle's scorer (`load_scorer`'s scorer, calibration and meta), check it on
    the bundle's held-back images and install it. Where evaluate/predict call it:
        scorer, cal, meta = load_scorer(bundle); choice = prepare_precision(scorer, meta, cal, setting, data)
    (`meta`: the BundleMeta, or any mapping with its `training` record)."""
    from .data import load_stack

    if resolve_precision(setting, flags) == "fp32":
        choice = select_precision(scorer, np.zeros((0,)), 0.0, setting, min_agreement, flags)
    elif cal is None or cal.get("threshold") is None:
        log.warning("precision bf16: the bundle has no calibrated threshold to check decisions at; scoring in fp32")
        choice = PrecisionChoice("fp32", "bf16", reason="no threshold")
    else:
        paths = bundle_calibration_paths(meta, cal, data)
        from .tiling import input_policy

        # read as the model reads them (a tiled model: its tiles, so the agreement is counted over tiles)
        images = load_stack(paths, int(scorer.img_size), input_policy(scorer.data, int(scorer.img_size)))
        choice = select_precision(scorer, images, float(cal["threshold"]), setting, min_agreement, flags)
    install_precision(scorer, choice.precision)
    return choice
