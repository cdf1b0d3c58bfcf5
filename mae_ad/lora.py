"""LoRA adapters (loralib) in the attention layers: insert, choose what trains, and merge into plain weights.

loralib.Linear computes W x + b + (alpha / r) * B A x. We build it with `merge_weights=False`, so `eval()` never
rewrites W in place: the state dict always holds the unmerged base weight and the adapters, and merging is an
explicit step (`merge_lora`) that returns plain `nn.Linear` layers.
"""

from __future__ import annotations

import logging

import loralib
import torch
from torch import nn

from .config import LoraConfig

log = logging.getLogger(__name__)

DECODER_PREFIXES = ("decoder_embed", "mask_token", "decoder_blocks", "decoder_norm", "decoder_pred")


def _lora_linear(base: nn.Linear, cfg: LoraConfig) -> loralib.Linear:
    layer = loralib.Linear(
        base.in_features, base.out_features, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        merge_weights=False, bias=base.bias is not None,
    )
    with torch.no_grad():
        layer.weight.copy_(base.weight)
        if base.bias is not None:
            layer.bias.copy_(base.bias)
    return layer


def _targets(block: nn.Module, with_mlp: bool) -> list[tuple[nn.Module, str]]:
    out: list[tuple[nn.Module, str]] = [(block.attn, "qkv"), (block.attn, "proj")]
    if with_mlp:
        out += [(block.mlp, "fc1"), (block.mlp, "fc2")]
    return out


def apply_lora(model: nn.Module, cfg: LoraConfig) -> int:
    """Replace attention qkv/proj (and MLP fc1/fc2 when cfg.mlp) linears by LoRA linears. Returns the count."""
    if cfg.rank == 0:
        return 0
    stacks = []
    if cfg.where in ("encoder", "both"):
        stacks.append(model.blocks)
    if cfg.where in ("decoder", "both"):
        stacks.append(model.decoder_blocks)
    n = 0
    for stack in stacks:
        for block in stack:
            for parent, name in _targets(block, cfg.mlp):
                base = getattr(parent, name)
                if isinstance(base, nn.Linear) and not isinstance(base, loralib.LoRALayer):
                    setattr(parent, name, _lora_linear(base, cfg))
                    n += 1
    return n


def configure_trainable(model: nn.Module, cfg: LoraConfig) -> None:
    """Set requires_grad. With freeze_non_lora, the encoder's base weights are frozen; LoRA matrices train, the
    decoder trains when `train_decoder` (a random decoder must be able to learn to reconstruct), and the patch
    embedding trains when `train_patch_embed` (it is resampled to a new patch size)."""
    for name, p in model.named_parameters():
        if not cfg.freeze_non_lora:
            p.requires_grad = True
            continue
        trainable = "lora_" in name
        if cfg.train_decoder and name.startswith(DECODER_PREFIXES):
            trainable = True
        if cfg.train_patch_embed and name.startswith("patch_embed."):
            trainable = True
        p.requires_grad = trainable


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, loralib.LoRALayer) for m in model.modules())


def has_lora_state(state: dict[str, torch.Tensor]) -> bool:
    return any(".lora_A" in k or ".lora_B" in k for k in state)


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight (W + scale * B @ A) and swap in a plain nn.Linear.
    Returns the number of merged layers; the model then equals one built with LoRA disabled."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, loralib.Linear):
                w = child.weight.data.clone()
                if child.r > 0:
                    w += (child.lora_B @ child.lora_A) * child.scaling
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight.data.copy_(w)
                if child.bias is not None:
                    plain.bias.data.copy_(child.bias.data)
                plain.to(device=w.device, dtype=w.dtype)
                setattr(parent, name, plain)
                n += 1
    return n
