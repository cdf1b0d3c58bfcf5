"""`mae-ad merge`: fold every LoRA adapter into its base weight and write a merged bundle.

The merged bundle holds plain `nn.Linear` weights (W + alpha/r * B @ A), so it loads into the same architecture
built without LoRA; its config is the one the model was trained with (`load_bundle` builds rank 0 when the
weights hold no adapters) and its meta.json says `merged: true` and names its parent.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from mae_ad.contract import (
    BUNDLE_CALIB_TENSORS,
    BUNDLE_CALIBRATION,
    UserError,
    read_bundle_meta,
    read_json,
    refuse_existing_out,
)

from .artifacts import bundle_sha256

log = logging.getLogger(__name__)


def merge_bundle(bundle: str | Path, out: str | Path) -> Path:
    """Write the merged copy of `bundle` to the new directory `out`. Returns `out`."""
    from mae_ad.bundle import load_bundle, staged_dir, write_bundle_files
    from mae_ad.lora import has_lora, merge_lora

    src, out = Path(bundle), Path(out)
    meta = read_bundle_meta(src)
    if meta.merged:
        raise UserError(f"{src}: bundle is already merged (meta.json merged: true); export it directly")
    if out.resolve() == src.resolve():
        raise UserError(f"{out}: --out must differ from the source bundle")
    refuse_existing_out(out, "merged bundle")
    cfg, model, _ = load_bundle(src)
    if not has_lora(model):
        raise UserError(f"{src}: bundle has no LoRA adapters to merge (model.lora.rank=0); export it directly")
    calibration = read_json(src / BUNDLE_CALIBRATION, "calibration") if (src / BUNDLE_CALIBRATION).is_file() else None
    n = merge_lora(model)
    extra: dict[str, Any] = {
        "merged": True,
        "lora": False,
        "merged_layers": n,
        "parent": {"bundle": str(src), "bundle_sha256": bundle_sha256(src), "model_id": meta.model_id,
                   "weights_sha256": meta.weights_sha256},
    }
    if meta.training is not None:  # keep what the trainer recorded about the run (precision checks find the
        extra["training"] = meta.training  # held-back images through it)
    with staged_dir(out) as d:
        write_bundle_files(d, model, cfg, calibration, scorer=None, extra_meta=extra)
        if (src / BUNDLE_CALIB_TENSORS).is_file():
            shutil.copy2(src / BUNDLE_CALIB_TENSORS, d / BUNDLE_CALIB_TENSORS)
    log.info("merged %d LoRA layers: %s -> %s", n, src, out)
    return out
