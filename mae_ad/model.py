"""The masked autoencoder: a ViT encoder and a light decoder built from timm blocks, with LoRA adapters.

One step per method, as in the MAE paper's reference: `patchify`, `embed`, `encode`, `decode`, `loss`.
Shapes: B images, K masks, N = sequences in a forward pass (B for training, B*K for scoring), L patches,
L_keep visible patches, D encoder width, Dd decoder width, P = patch_size**2 * 3 pixel values per patch.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from .config import ModelConfig
from .lora import apply_lora, configure_trainable
from .masking import random_masking_ids


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding [1, (1+) grid*grid, dim]; half the channels encode the row, half
    the column (the layout of the MAE paper's code, so official checkpoints line up)."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be a multiple of 4 for 2-D sin-cos position embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def enc(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([enc(gw), enc(gh)], axis=1)  # MAE order: width (column) half first, then height
    if cls_token:
        emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


class _LayerNorm6(nn.LayerNorm):
    """LayerNorm with eps 1e-6 (the MAE / timm ViT setting), constructible the way timm blocks call norm layers."""

    def __init__(self, dim: int, **kwargs: object) -> None:
        super().__init__(dim, eps=1e-6, **kwargs)  # type: ignore[arg-type]


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        p, d, dd = cfg.patch_size, cfg.embed_dim, cfg.decoder_embed_dim
        self.patch_size = p
        self.grid = cfg.grid_size
        self.num_patches = cfg.num_patches
        block = lambda dim, heads: Block(  # noqa: E731
            dim, heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, norm_layer=_LayerNorm6
        )

        # encoder
        self.patch_embed = PatchEmbed(cfg.img_size, p, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, self.grid), persistent=False)
        self.blocks = nn.ModuleList([block(d, cfg.num_heads) for _ in range(cfg.depth)])
        self.norm = _LayerNorm6(d)

        # decoder
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(dd, self.grid), persistent=False)
        self.decoder_blocks = nn.ModuleList([block(dd, cfg.decoder_num_heads) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = _LayerNorm6(dd)
        self.decoder_pred = nn.Linear(dd, p * p * cfg.in_chans)

        self._init_weights()
        apply_lora(self, cfg.lora)
        configure_trainable(self, cfg.lora)

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # --- pixels <-> patches -------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, L, p*p*C] (row-major patches, pixel order (py, px, c))."""
        b, c, _, _ = imgs.shape
        p, g = self.patch_size, self.grid
        x = imgs.reshape(b, c, g, p, g, p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # [B, gh, gw, p, p, C]
        return x.reshape(b, g * g, p * p * c)

    def unpatchify(self, x: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """[B, L, p*p*C] -> [B, C, H, W]."""
        b = x.shape[0]
        p, g = self.patch_size, self.grid
        c = channels if channels is not None else x.shape[-1] // (p * p)
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # [B, C, gh, p, gw, p]
        return x.reshape(b, c, g * p, g * p)

    # --- encoder / decoder --------------------------------------------------------------------------------
    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] (normalised) -> patch tokens with position [B, L, D]."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Visible tokens [N, L_keep, D] -> latent [N, 1 + L_keep, D] (class token first)."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent [N, 1 + L_keep, D] and ids_restore [N, L] -> per-patch pixel predictions [N, L, P]."""
        x = self.decoder_embed(latent)  # [N, 1+L_keep, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd] visible first, then masked
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # grid order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]

    # --- training -----------------------------------------------------------------------------------------
    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        t = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean = t.mean(dim=-1, keepdim=True)
            var = t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1.0e-6) ** 0.5
        return t

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass with MAE random masking. Returns (loss, pred [B, L, P], mask [B, L])."""
        tokens = self.embed(imgs)
        b, length, d = tokens.shape
        ids_keep, ids_restore, mask = random_masking_ids(b, length, mask_ratio, imgs.device, generator)
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        pred = self.decode(self.encode(visible), ids_restore)
        loss = self.loss(imgs, pred, mask)
        return loss, pred, mask

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only."""
        per_patch = ((pred.float() - self.target(imgs)) ** 2).mean(dim=-1)  # [B, L]
        return (per_patch * mask).sum() / mask.sum()


def build_model(cfg: ModelConfig) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(cfg)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def encoder_flops_estimate(cfg: ModelConfig, tokens: int, decoder: bool = False) -> float:
    """Multiply-add FLOPs (2 per MAC) of one transformer stack over `tokens` tokens: linears plus attention."""
    d = cfg.decoder_embed_dim if decoder else cfg.embed_dim
    depth = cfg.decoder_depth if decoder else cfg.depth
    mlp = int(d * cfg.mlp_ratio)
    per_block = 2 * tokens * (3 * d * d + d * d + 2 * d * mlp) + 2 * 2 * tokens * tokens * d
    return float(depth * per_block)


def scoring_flops(cfg: ModelConfig, k: int) -> float:
    """Approximate FLOPs to score one image with K masks (patch embedding, encoder, decoder, prediction)."""
    length = cfg.num_patches
    keep = length - length // k
    p = cfg.patch_size
    embed = 2 * length * cfg.embed_dim * p * p * cfg.in_chans
    enc = encoder_flops_estimate(cfg, keep + 1)
    dec = encoder_flops_estimate(cfg, length + 1, decoder=True)
    proj = 2 * (keep + 1) * cfg.embed_dim * cfg.decoder_embed_dim + 2 * length * cfg.decoder_embed_dim * p * p * 3
    return float(embed + k * (enc + dec + proj))


def training_flops(cfg: ModelConfig, mask_ratio: float) -> float:
    """Approximate FLOPs of one training image (forward x3 for forward + backward)."""
    length = cfg.num_patches
    keep = max(1, int(round(length * (1 - mask_ratio))))
    p = cfg.patch_size
    embed = 2 * length * cfg.embed_dim * p * p * cfg.in_chans
    enc = encoder_flops_estimate(cfg, keep + 1)
    dec = encoder_flops_estimate(cfg, length + 1, decoder=True)
    proj = 2 * (keep + 1) * cfg.embed_dim * cfg.decoder_embed_dim + 2 * length * cfg.decoder_embed_dim * p * p * 3
    return float(3 * (embed + enc + dec + proj))


__all__ = [
    "MaskedAutoencoderViT",
    "build_model",
    "count_params",
    "scoring_flops",
    "training_flops",
    "sincos_pos_embed_2d",
]
