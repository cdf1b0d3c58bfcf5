"""Pretrained encoder weights from a LOCAL file into MaskedAutoencoderViT. Nothing is downloaded, nothing unpickled.

Understood formats:
- the official MAE ImageNet checkpoints `mae_pretrain_vit_{base,large,huge}.pth`: a dict with the state under
  `model`, encoder keys only (cls_token, pos_embed, patch_embed.proj.*, blocks.N.*, norm.*); read with
  `torch.load(weights_only=True)`;
- timm VisionTransformer weights in `.safetensors` (the same key names; `head.*`/`fc_norm.*` are ignored).

What happens to each part:
- blocks.N.* and norm.* land unchanged; a base linear `blocks.N.attn.qkv.weight` lands in the loralib.Linear of the
  same name (loralib keeps the base weight under `weight`), the LoRA matrices stay freshly initialised (B = 0, so
  the adapted model starts exactly as the checkpoint).
- patch_embed.proj.weight is RESAMPLED from the checkpoint's kernel (16x16) to this model's patch size with
  timm.layers.resample_patch_embed (pseudo-inverse resize: a patch resized to the new size gives approximately the
  same token as the original patch did), never re-initialised.
- pos_embed is NOT loaded: this model uses a fixed 2-D sin-cos embedding computed for its own patch grid. For the
  official MAE checkpoints that is the very function their pos_embed was built from (sin-cos, not learned), so
  regenerating it on the new grid is the exact "interpolation". For a timm checkpoint with a LEARNED position
  embedding the pretrained positions are dropped (reported), and fine-tuning adapts the encoder to sin-cos.
- the decoder is not in these checkpoints: it trains from scratch (keep `model.lora.train_decoder: true`).

A bundle directory written by `mae-ad train` (for instance a base pretrained on the texture corpus,
configs/base-textures.yaml) is a third source: its LoRA adapters are merged first, and its decoder is loaded too
when this model's decoder has the same architecture (otherwise it trains from scratch, reported).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from timm.layers import resample_patch_embed

from .contract import UserError
from .lora import DECODER_PREFIXES
from .model import MaskedAutoencoderViT, sincos_pos_embed_2d
from .weights import read_weights_file

log = logging.getLogger(__name__)

ENCODER_PREFIXES = ("cls_token", "patch_embed.", "blocks.", "norm.")
IGNORED_PREFIXES = ("head.", "fc_norm.", "head_drop.")  # classifier parts of fine-tuned / timm checkpoints


def bundle_base_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The weights of one of our own bundles as a base for another model: built from the bundle's config, its
    LoRA adapters (if any) merged into the base weights, so the new model's fresh adapters (B = 0) start exactly
    where the bundle ended. Decoder and variant tensors are included."""
    from .bundle import load_bundle
    from .lora import has_lora, merge_lora

    _, model, _ = load_bundle(path)
    if has_lora(model):
        merge_lora(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a bundle directory (`mae-ad train` output, adapters merged), `.safetensors` or a
    torch file (weights_only); unwrap `model` / `state_dict`."""
    p = Path(path)
    if p.is_dir():
        from .contract import BUNDLE_META

        if not (p / BUNDLE_META).is_file():
            raise UserError(f"{p}: a directory given as model.pretrained must be a model bundle (no {BUNDLE_META})")
        return bundle_base_state(p)
    return read_weights_file(p)


def load_pretrained(model: MaskedAutoencoderViT, path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """Load a pretrained encoder into `model` in place. Returns what was loaded / missing / unexpected / adapted.

    Raises UserError naming the file and the first mismatched key when the checkpoint has another architecture.
    """
    p = Path(path)
    src = read_state(p)
    own = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    unexpected: list[str] = []

    # The decoder (our own base bundles carry one) loads only as a whole: all of this model's decoder tensors
    # present with the same shapes. Otherwise it trains from scratch, as with the encoder-only MAE checkpoints.
    own_dec = [k for k in own if k.startswith(DECODER_PREFIXES) and "lora_" not in k]
    src_dec = [k for k in src if k.startswith(DECODER_PREFIXES)]
    dec_fits = bool(own_dec) and all(k in src and src[k].shape == own[k].shape for k in own_dec)
    if src_dec and not dec_fits:
        notes.append(f"decoder not loaded ({len(src_dec)} tensors): its architecture differs from this model's")
    n_backbone = 0
    for key, value in src.items():
        if key.startswith(DECODER_PREFIXES) and not dec_fits:
            continue
        if key.startswith(("backbone.", "perceptual.")):  # pretrained CNNs come from their own source weights
            n_backbone += 1
            continue
        if key == "pos_embed":
            grid = int(round((value.shape[1] - 1) ** 0.5)) if value.ndim == 3 else 0
            ref = sincos_pos_embed_2d(value.shape[-1], grid) if grid and value.shape[-1] % 4 == 0 else None
            kind = "fixed sin-cos" if ref is not None and ref.shape == value.shape and torch.allclose(
                ref, value.float(), atol=1e-4) else "learned"
            notes.append(f"pos_embed ({kind}, {grid}x{grid} grid) not loaded: the model uses its fixed sin-cos for "
                         f"its {model.grid}x{model.grid} grid")
            continue
        if key.startswith(IGNORED_PREFIXES) or key not in own:
            unexpected.append(key)
            continue
        target = own[key]
        if key == "patch_embed.proj.weight" and value.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1:
            # grayscale model: the model sees the mean of the three normalised channels, so the kernel that gives
            # the RGB model's response to a gray image is the sum of its three channel kernels
            value = value.float().sum(dim=1, keepdim=True)
            notes.append("patch embedding summed over RGB for the 1-channel model")
        if key == "patch_embed.proj.weight" and value.ndim == 4 and value.shape[:2] == target.shape[:2] \
                and value.shape[2:] != target.shape[2:]:
            value = resample_patch_embed(value.float(), list(target.shape[2:]))
            notes.append(f"patch embedding resampled {src[key].shape[2]}x{src[key].shape[3]} -> "
                         f"{target.shape[2]}x{target.shape[3]}")
        if value.shape != target.shape:
            raise UserError(f"{p}: checkpoint does not fit this model (another architecture?): first mismatched key "
                            f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}; "
                            "check model.preset / embed_dim / depth")
        loaded[key] = value.to(target.dtype)

    # An encoder key of ours that the checkpoint lacks (other than the new LoRA matrices) means another architecture.
    enc_missing = [k for k in own if k.startswith(ENCODER_PREFIXES) and k not in loaded and "lora_" not in k]
    enc_unexpected = [k for k in unexpected if k.startswith(ENCODER_PREFIXES)]
    if not loaded:
        raise UserError(f"{p}: no encoder weights found (expected keys like blocks.0.attn.qkv.weight)")
    if enc_missing or enc_unexpected:
        first = (enc_unexpected or enc_missing)[0]
        what = "the model has no" if enc_unexpected else "the checkpoint lacks"
        raise UserError(f"{p}: checkpoint does not fit this model (another architecture?): first mismatched key "
                        f"{first} ({what} it); check model.preset / depth")

    if n_backbone:
        notes.append(f"{n_backbone} backbone tensors not loaded (the backbone comes from model.backbone; its token "
                     "standardisation is fitted on this product's images)")
    result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    missing = list(result.missing_keys)
    lora = [k for k in missing if "lora_" in k]
    decoder = [k for k in missing if k.startswith(DECODER_PREFIXES) and k not in lora]
    other = [k for k in missing if k not in decoder and k not in lora]
    n_dec = sum(k.startswith(DECODER_PREFIXES) for k in loaded)
    log.info(
        "pretrained %s: loaded %d encoder and %d decoder tensors; %s; missing: %d decoder tensors (not in the "
        "checkpoint, trained from scratch), %d LoRA matrices (new adapters)%s; unexpected (ignored): %s",
        p, len(loaded) - n_dec, n_dec, "; ".join(notes) or "no resampling needed", len(decoder), len(lora),
        f", other: {', '.join(other)}" if other else "", ", ".join(unexpected) or "none",
    )
    return {"loaded": sorted(loaded), "missing": missing, "unexpected": unexpected, "notes": notes}
