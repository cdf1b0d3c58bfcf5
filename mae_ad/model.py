"""The masked autoencoder: a ViT encoder and a light decoder built from timm blocks, with LoRA adapters.

One step per method, as in the MAE paper's reference: `patchify`, `embed`, `encode`, `decode`, `loss`.
Shapes: B images, K masks, N = sequences in a forward pass (B for training, B*K for scoring), L patches,
L_keep visible patches, D encoder width, Dd decoder width, P = patch_size**2 * C values per patch.

Token space. Pixel space (the default): the MAE patchifies the normalised image [B, C, H, W], C = model.in_chans.
Feature space (model.backbone): a frozen pretrained CNN (`backbone.FeatureTokenizer`, `self.backbone`) turns the
image into a token image [B, C_f, H/s, W/s] of standardised feature cells, and the same MAE patchifies that
(patch_size then counts feature cells, usually 1). Every method below takes the token image as `imgs`.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from .backbone import FeatureTokenizer
from .config import ModelConfig
from .lora import apply_lora, configure_trainable
from .masking import random_masking_ids, training_masking_ids
from .variants import DyT, GMMHead, gaussian_window, ssim_map


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
        self.backbone: FeatureTokenizer | None = None
        if cfg.backbone is not None:  # built first: the token channels come from its feature levels
            self.backbone = FeatureTokenizer(cfg.backbone, cfg.img_size)
        self.token_chans = self.backbone.channels if self.backbone is not None else cfg.in_chans
        # pixel space: the frozen CNN of the perceptual error (scoring.perceptual_weight)
        self.perceptual = FeatureTokenizer(cfg.perceptual, cfg.img_size) if cfg.perceptual is not None else None
        norm_layer: type[nn.Module] = DyT if cfg.norm == "dyt" else _LayerNorm6
        block = lambda dim, heads: Block(  # noqa: E731
            dim, heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, norm_layer=norm_layer
        )

        # encoder
        self.patch_embed = PatchEmbed(cfg.token_side, p, self.token_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, self.grid), persistent=False)
        self.blocks = nn.ModuleList([block(d, cfg.num_heads) for _ in range(cfg.depth)])
        self.norm = norm_layer(d)

        # decoder
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(dd, self.grid), persistent=False)
        self.decoder_blocks = nn.ModuleList([block(dd, cfg.decoder_num_heads) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = norm_layer(dd)
        self.decoder_pred = nn.Linear(dd, p * p * self.token_chans)

        self._build_variants(norm_layer)
        self._init_weights()
        self._init_variants()
        apply_lora(self, cfg.lora)
        configure_trainable(self, cfg.lora)
        if cfg.lora.freeze_non_lora:  # parameters no checkpoint holds must learn, whatever else is frozen
            for name, prm in self.named_parameters():
                if name.startswith(self.VARIANT_PREFIXES):
                    prm.requires_grad = True
        for frozen in (self.backbone, self.perceptual):  # frozen, whatever the LoRA settings say
            if frozen is not None:
                for prm in frozen.parameters():
                    prm.requires_grad = False

    def frozen_cnns(self) -> list[FeatureTokenizer]:
        """The pretrained CNNs of this model (token backbone, perceptual backbone), for loading and fitting."""
        return [m for m in (self.backbone, self.perceptual) if m is not None]

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's token image [B, C_f, H/s, W/s] of RGB images [B, 3, H, W] in [0, 1] (feature space)."""
        if self.backbone is None:
            raise RuntimeError("tokens() needs model.backbone (pixel-space models patchify the image itself)")
        return self.backbone(images)

    # --- optional variants (docs/variants.md); nothing here exists with the default config ------------------
    VARIANT_PREFIXES = ("pos_embed_learned", "decoder_pos_embed_learned", "register_tokens", "ms_norms.",
                        "ms_fusion.", "gmm_head.")

    def _build_variants(self, norm_layer: type[nn.Module]) -> None:
        cfg, d, n = self.cfg, self.cfg.embed_dim, 1 + self.num_patches
        self.hybrid_pos = cfg.pos_embed == "hybrid"
        if self.hybrid_pos:  # learnable terms on top of the fixed sin-cos tables, zero at start
            self.pos_embed_learned = nn.Parameter(torch.zeros(1, n, d))
            self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, n, cfg.decoder_embed_dim))
        self.num_registers = cfg.num_registers
        if self.num_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, self.num_registers, d))
        self.ms_levels = sorted(cfg.multiscale)
        if self.ms_levels:  # the last block's output keeps the final norm; other levels get their own
            self.ms_norms = nn.ModuleDict({str(i): norm_layer(d) for i in self.ms_levels if i != cfg.depth - 1})
            if cfg.multiscale_fusion == "linear" and len(self.ms_levels) > 1:
                self.ms_fusion = nn.Linear(len(self.ms_levels) * d, d)
        if cfg.gmm_components:
            self.gmm_head = GMMHead(d, cfg.gmm_components)
        if cfg.ssim_loss_weight > 0:
            self.register_buffer("ssim_window", gaussian_window(1.5, cfg.img_size - 1), persistent=False)

    def _init_variants(self) -> None:
        if self.num_registers:
            nn.init.normal_(self.register_tokens, std=0.02)
        if hasattr(self, "ms_fusion"):  # start as the mean of the levels
            n, d = len(self.ms_levels), self.cfg.embed_dim
            with torch.no_grad():
                self.ms_fusion.weight.copy_(torch.eye(d).repeat(1, n) / n)
                self.ms_fusion.bias.zero_()

    def _enc_pos(self) -> torch.Tensor:
        return self.pos_embed + self.pos_embed_learned if self.hybrid_pos else self.pos_embed

    def _dec_pos(self) -> torch.Tensor:
        return self.decoder_pos_embed + self.decoder_pos_embed_learned if self.hybrid_pos else self.decoder_pos_embed

    def _drop_registers(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1, :], x[:, 1 + self.num_registers:, :]], dim=1) if self.num_registers else x

    def _encode_multiscale(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks up to the deepest listed level; normalise each listed level's output and fuse them."""
        feats = []
        last = self.cfg.depth - 1
        for i, blk in enumerate(self.blocks[: self.ms_levels[-1] + 1]):
            x = blk(x)
            if i in self.ms_levels:
                norm = self.norm if i == last else self.ms_norms[str(i)]
                feats.append(norm(self._drop_registers(x)))
        if hasattr(self, "ms_fusion"):
            return self.ms_fusion(torch.cat(feats, dim=-1))
        return torch.stack(feats, dim=0).mean(dim=0) if len(feats) > 1 else feats[0]

    def patch_nll(self, latent: torch.Tensor) -> torch.Tensor:
        """GMM head: latent [N, 1 + L_keep, D] -> per-visible-patch NLL [N, L_keep] (embeddings detached)."""
        return self.gmm_head(latent[:, 1:, :].detach())

    def ssim_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean (1 - SSIM) over the masked pixels, comparing the input with itself where visible and the
        prediction where masked (in the input's pixel space; norm_pix predictions are de-normalised)."""
        t = self.patchify(imgs.float())
        p = pred.float()
        if self.cfg.norm_pix_loss:
            p = p * (t.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
        m = mask.unsqueeze(-1).to(p.dtype)
        c = imgs.shape[1]
        comp = self.unpatchify(p * m + t * (1 - m), channels=c)
        pix = self.unpatchify(m.expand(-1, -1, t.shape[-1]), channels=c)
        s = ssim_map(comp, imgs.float(), self.ssim_window)
        return ((1 - s) * pix).sum() / pix.sum().clamp_min(1.0)

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith(("backbone", "perceptual")):  # pretrained, loaded separately
                continue
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
        return self.patch_embed(imgs) + self._enc_pos()[:, 1:, :]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Visible tokens [N, L_keep, D] -> latent [N, 1 + L_keep, D] (class token first)."""
        cls = (self.cls_token + self._enc_pos()[:, :1, :]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        if self.num_registers:  # [cls, registers, patches]; registers carry no position and leave before the decoder
            x = torch.cat([x[:, :1, :], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:, :]], dim=1)
        if self.ms_levels:
            return self._encode_multiscale(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(self._drop_registers(x))

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Latent [N, 1 + L_keep, D] and ids_restore [N, L] -> per-patch pixel predictions [N, L, P]."""
        x = self.decoder_embed(latent)  # [N, 1+L_keep, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd] visible first, then masked
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # grid order
        x = torch.cat([x[:, :1, :], x_], dim=1) + self._dec_pos()
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
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, generator: torch.Generator | None = None,
        mask_mode: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass. Returns (loss, pred [B, L, P], mask [B, L]).

        `mask_mode` is train.mask_mode (random | block | mixed; None = random, MAE's scattered patches). With a
        GMM head (model.gmm_components) the loss adds gmm_loss_weight * the mean NLL of the visible patches.
        """
        tokens = self.embed(imgs)
        b, length, d = tokens.shape
        if mask_mode is None or mask_mode == "random":
            ids_keep, ids_restore, mask = random_masking_ids(b, length, mask_ratio, imgs.device, generator)
        else:
            ids_keep, ids_restore, mask = training_masking_ids(b, self.grid, mask_ratio, mask_mode, imgs.device,
                                                               generator)
        visible = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        latent = self.encode(visible)
        pred = self.decode(latent, ids_restore)
        loss = self.loss(imgs, pred, mask)
        if self.cfg.gmm_components and self.cfg.gmm_loss_weight > 0:
            loss = loss + self.cfg.gmm_loss_weight * self.patch_nll(latent).float().mean()
        return loss, pred, mask

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only (+ ssim_loss_weight * (1 - SSIM) when set)."""
        per_patch = ((pred.float() - self.target(imgs)) ** 2).mean(dim=-1)  # [B, L]
        loss = (per_patch * mask).sum() / mask.sum()
        if self.cfg.ssim_loss_weight > 0:
            loss = loss + self.cfg.ssim_loss_weight * self.ssim_loss(imgs, pred, mask)
        return loss


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
    lora, r = cfg.lora, cfg.lora.rank
    if r > 0 and lora.where in ("both", "decoder" if decoder else "encoder"):  # x @ A^T @ B^T per adapted linear
        per_block += 2 * tokens * r * ((d + 3 * d) + (d + d) + ((d + mlp) + (mlp + d) if lora.mlp else 0))
    return float(depth * per_block)


def _flops_parts(cfg: ModelConfig, keep: int, token_chans: int | None = None) -> tuple[float, float]:
    """(patch embedding, one masked pass: encoder over `keep` visible tokens + decoder + projections) in FLOPs.
    `token_chans`: channels of the token image (feature space: the backbone's; default model.in_chans)."""
    length = cfg.num_patches
    p = cfg.patch_size
    c = token_chans or cfg.in_chans
    embed = 2 * length * cfg.embed_dim * p * p * c
    enc = encoder_flops_estimate(cfg, keep + 1)
    dec = encoder_flops_estimate(cfg, length + 1, decoder=True)
    proj = 2 * (keep + 1) * cfg.embed_dim * cfg.decoder_embed_dim + 2 * (length + 1) * cfg.decoder_embed_dim * p * p * c
    return float(embed), float(enc + dec + proj)


def scoring_flops(cfg: ModelConfig, k: int, token_chans: int | None = None) -> float:
    """Approximate FLOPs of the MAE part of scoring one image with K masks (patch embedding once, then K masked
    passes). Feature space: pass the token channels; the backbone and a kNN memory come on top (bench.py)."""
    embed, one_pass = _flops_parts(cfg, cfg.num_patches - cfg.num_patches // k, token_chans)
    return embed + k * one_pass


def training_flops(cfg: ModelConfig, mask_ratio: float, token_chans: int | None = None) -> float:
    """Approximate FLOPs of one training image (forward + backward, all parameters trainable; feature space: on
    cached tokens, the frozen backbone not counted)."""
    embed, one_pass = _flops_parts(cfg, max(1, int(round(cfg.num_patches * (1 - mask_ratio)))), token_chans)
    # backward costs twice the forward, except the patch embedding (no gradient w.r.t. the input image)
    return 2 * embed + 3 * one_pass


__all__ = [
    "MaskedAutoencoderViT",
    "build_model",
    "count_params",
    "scoring_flops",
    "training_flops",
    "sincos_pos_embed_2d",
]
