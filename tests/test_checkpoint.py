"""Pretrained loading: official MAE .pth (weights_only) and timm .safetensors, patch-embedding resampling, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from mae_ad.checkpoint import load_pretrained
from mae_ad.config import load_config
from mae_ad.contract import UserError
from mae_ad.model import build_model, sincos_pos_embed_2d

from .conftest import tiny_overrides


def timm_encoder_state(embed_dim: int = 32, depth: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny timm ViT (patch 16, 128 px -> the same 8x8 grid as the 32 px / patch 4 test model)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=128, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=2, num_classes=0)
    with torch.no_grad():
        for p in vit.parameters():  # non-trivial values everywhere, so "landed exactly" means something
            p.add_(torch.randn_like(p) * 0.02)
    return {k: v.clone() for k, v in vit.state_dict().items()}


def official_mae_file(tmp_path, **kw) -> tuple:
    state = timm_encoder_state(**kw)
    state["pos_embed"] = sincos_pos_embed_2d(state["cls_token"].shape[-1], 8)  # MAE: fixed sin-cos
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state}, path)
    return path, state


def smooth_image(size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([torch.sin(3 * xx + yy), torch.cos(2 * yy - xx), xx * yy]).unsqueeze(0)


def test_official_mae_checkpoint_loads_blocks_exactly_and_resamples_patch_embed(tmp_path, caplog):
    path, src = official_mae_file(tmp_path)
    model = build_model(load_config(None, tiny_overrides()).model)
    with caplog.at_level(logging.INFO, logger="mae_ad.checkpoint"):
        report = load_pretrained(model, path)
    own = model.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.1.attn.proj.weight", "blocks.1.mlp.fc2.bias", "norm.weight",
                "blocks.0.norm1.bias", "cls_token"):
        assert torch.equal(own[key], src[key]), key
    assert type(model.blocks[0].attn.qkv).__module__.startswith("loralib")  # base weight inside the LoRA layer
    assert torch.count_nonzero(model.blocks[0].attn.qkv.lora_B) == 0  # adapters start as a no-op
    # The resampled 4x4 kernel answers a resized smooth image about as the 16x16 kernel answered the original
    # (the pseudo-inverse property); a plain resize of the kernel is far off.
    x = smooth_image(128)
    ref = F.conv2d(x, src["patch_embed.proj.weight"], stride=16)
    small = F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True)
    got = F.conv2d(small, model.patch_embed.proj.weight, stride=4)
    naive = F.conv2d(small, F.interpolate(src["patch_embed.proj.weight"], size=(4, 4), mode="bicubic",
                                          antialias=True), stride=4)
    rel = float((got - ref).detach().norm() / ref.norm())
    naive = naive.detach()
    assert rel < 0.25 and rel < 0.3 * float((naive - ref).norm() / ref.norm())
    # One log message with the whole story.
    msgs = [r.getMessage() for r in caplog.records if r.name == "mae_ad.checkpoint"]
    assert len(msgs) == 1
    msg = msgs[0]
    assert "resampled 16x16 -> 4x4" in msg and "fixed sin-cos" in msg and "decoder" in msg and "LoRA" in msg
    assert any(k.startswith("decoder_") for k in report["missing"])
    assert not [k for k in report["missing"] if k.startswith("blocks.") and "lora_" not in k]


def test_rgb_checkpoint_into_grayscale_model_sums_the_patch_kernel(tmp_path, caplog):
    """A 1-channel model gets the RGB kernel summed over channels: on a gray image (all channels equal after
    normalisation) its patch embedding equals the RGB model's."""
    path, src = official_mae_file(tmp_path)
    rgb = build_model(load_config(None, tiny_overrides()).model)
    gray = build_model(load_config(None, tiny_overrides() + ["model.in_chans=1"]).model)
    load_pretrained(rgb, path)
    with caplog.at_level(logging.INFO, logger="mae_ad.checkpoint"):
        report = load_pretrained(gray, path)
    assert any("summed over RGB" in n for n in report["notes"])
    assert gray.patch_embed.proj.weight.shape[1] == 1
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gray.embed(x), rgb.embed(x.expand(-1, 3, -1, -1)), atol=1e-5)


def test_timm_safetensors_with_learned_pos_embed_and_head(tmp_path, caplog):
    state = timm_encoder_state(seed=3)
    state["pos_embed"] = torch.randn_like(state["pos_embed"])  # learned
    state["head.weight"], state["head.bias"] = torch.randn(10, 32), torch.zeros(10)
    path = tmp_path / "vit.safetensors"
    save_file(state, str(path))
    model = build_model(load_config(None, tiny_overrides()).model)
    pos_before = model.pos_embed.clone()
    with caplog.at_level(logging.INFO, logger="mae_ad.checkpoint"):
        report = load_pretrained(model, path)
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.pos_embed, pos_before)  # fixed sin-cos kept
    assert set(report["unexpected"]) == {"head.weight", "head.bias"}
    msg = caplog.records[-1].getMessage()
    assert "learned" in msg and "head.weight" in msg


def test_other_architecture_is_a_user_error_naming_file_and_key(tmp_path):
    model = build_model(load_config(None, tiny_overrides()).model)
    wide, _ = official_mae_file(tmp_path, embed_dim=48)
    with pytest.raises(UserError) as e:
        load_pretrained(model, wide)
    assert str(wide) in str(e.value) and "cls_token" in str(e.value) and "(1, 1, 48)" in str(e.value)

    deep = tmp_path / "deep.pth"
    torch.save({"model": timm_encoder_state(depth=3)}, deep)
    with pytest.raises(UserError, match=r"blocks\.2\.") as e:
        load_pretrained(model, deep)
    assert str(deep) in str(e.value)

    shallow = tmp_path / "shallow.pth"
    torch.save({"model": timm_encoder_state(depth=1)}, shallow)
    with pytest.raises(UserError, match=r"blocks\.1\..*lacks"):
        load_pretrained(model, shallow)


class _NotTensor:  # anything a weights-only load must refuse to build
    pass


def test_pickled_objects_are_refused_and_missing_file(tmp_path):
    model = build_model(load_config(None, tiny_overrides()).model)
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": _NotTensor()}}, evil)
    with pytest.raises(UserError, match="weights-only"):
        load_pretrained(model, evil)
    with pytest.raises(UserError, match="not found"):
        load_pretrained(model, tmp_path / "nope.pth")


def test_training_loads_model_pretrained(synthetic_data, tmp_path):
    from safetensors.torch import load_file

    from mae_ad.train import run_training

    path, src = official_mae_file(tmp_path)
    cfg = load_config(None, tiny_overrides() + [
        f"model.pretrained={path}", "train.epochs=1", "train.batch_size=4", "train.tensorboard=false",
        "model.lora.freeze_non_lora=true", "train.lr=1e-3"])
    out = run_training(cfg, synthetic_data, tmp_path / "b")
    w = load_file(str(out / "weights.safetensors"))
    # frozen base weights are still exactly the checkpoint's after training; the adapters moved
    assert torch.equal(w["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])
    assert torch.count_nonzero(w["blocks.0.attn.qkv.lora_B"]) > 0
    assert json.loads((out / "meta.json").read_text())["training"]["pretrained"] == str(path)


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial values everywhere, LoRA B included, so 'merged and loaded exactly' means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _pred(model: torch.nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(imgs, generator=torch.Generator().manual_seed(3))[1]


def test_own_bundle_as_base_merges_its_adapters_and_loads_its_decoder(tmp_path, caplog):
    """A base bundle (LoRA rank 2) as model.pretrained of a product model with fresh rank-4 adapters: the product
    model starts as exactly the base, decoder included; a non-bundle directory is a user error."""
    from mae_ad.bundle import save_bundle

    base_cfg = load_config(None, tiny_overrides() + ["model.lora.rank=2"])
    base = _perturbed(build_model(base_cfg.model), seed=1)
    assert torch.count_nonzero(base.blocks[0].attn.qkv.lora_B) > 0  # the adapters carry part of the base
    save_bundle(tmp_path / "base", base, base_cfg, calibration=None)
    imgs = smooth_image(32).repeat(2, 1, 1, 1)

    product = build_model(load_config(None, tiny_overrides() + [
        f"model.pretrained={tmp_path / 'base'}", "model.lora.rank=4"]).model).eval()
    with caplog.at_level(logging.INFO, logger="mae_ad.checkpoint"):
        report = load_pretrained(product, tmp_path / "base")
    n_dec = sum(k.startswith("decoder_") or k == "mask_token" for k in report["loaded"])
    assert n_dec > 0 and f"and {n_dec} decoder tensors" in caplog.text and "missing: 0 decoder tensors" in caplog.text
    caplog.clear()
    assert torch.count_nonzero(product.blocks[0].attn.qkv.lora_B) == 0  # fresh adapters: a no-op
    assert not [k for k in report["missing"] if "lora_" not in k]  # nothing else left untrained
    torch.testing.assert_close(_pred(product, imgs), _pred(base, imgs), rtol=1e-5, atol=1e-5)

    # another decoder: the encoder still loads, the decoder trains from scratch (said), nothing raises
    other = build_model(load_config(None, tiny_overrides() + ["model.decoder_embed_dim=48"]).model)
    with caplog.at_level(logging.INFO, logger="mae_ad.checkpoint"):
        report = load_pretrained(other, tmp_path / "base")
    assert "decoder not loaded" in caplog.text
    assert any(k.startswith("decoder_") for k in report["missing"])
    merged_qkv = base.blocks[1].attn.qkv.weight + base.blocks[1].attn.qkv.scaling * (
        base.blocks[1].attn.qkv.lora_B @ base.blocks[1].attn.qkv.lora_A)
    torch.testing.assert_close(other.blocks[1].attn.qkv.weight.detach(), merged_qkv.detach())

    (tmp_path / "notabundle").mkdir()
    with pytest.raises(UserError, match="notabundle.*must be a model bundle"):
        load_pretrained(other, tmp_path / "notabundle")
