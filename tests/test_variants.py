"""The optional model variants (docs/variants.md): each one's behaviour, its defaults, and its ONNX export."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mae_ad.config import load_config
from mae_ad.contract import UserError
from mae_ad.masking import block_masks, inference_masks, lattice_masks, training_masking_ids
from mae_ad.model import build_model
from mae_ad.scoring import Scorer
from mae_ad.variants import DyT, GMMHead, blur_channels, export_blockers, gaussian_window, ssim_map

from .conftest import tiny_overrides

TRT_MATRIX = Path("/work/shared/reference/onnx-tensorrt-operators-10.1.md")


def _cfg(*extra: str):
    return load_config(None, tiny_overrides() + list(extra))


def _components(mask2d: np.ndarray) -> tuple[int, int]:
    """(number of 4-connected components, number of isolated cells) of a boolean grid."""
    from scipy import ndimage

    _, n = ndimage.label(mask2d)
    padded = np.pad(mask2d, 1)
    neigh = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return int(n), int((mask2d & ~neigh).sum())


def _boundary(mask2d: np.ndarray) -> int:
    """Number of 4-neighbour pairs where a masked patch touches a visible one."""
    return int((mask2d[1:] != mask2d[:-1]).sum() + (mask2d[:, 1:] != mask2d[:, :-1]).sum())


# --- config -----------------------------------------------------------------------------------------------------
def test_variant_keys_validate_and_presets():
    with pytest.raises(UserError, match="model.multiscale"):
        _cfg("model.multiscale=[0,5]")  # depth is 2
    with pytest.raises(UserError, match="gmm_components"):
        _cfg("scoring.gmm_weight=0.5")
    with pytest.raises(UserError, match="train.mask_mode"):
        _cfg("train.mask_mode=stripes")
    assert load_config(None, ["model.preset=tiny-p8-d1"]).model.decoder_depth == 1
    d2 = load_config(None, ["model.preset=tiny-p8-d2"]).model
    assert d2.decoder_depth == 2 and d2.embed_dim == 192 and d2.depth == 12
    assert load_config(None, ["model.preset=base-p8"]).model.decoder_depth == 8  # the MAE-sized decoder


# --- block / mixed training masks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,ratio", [(8, 0.75), (16, 0.75), (16, 0.5), (14, 0.6)])
def test_block_masks_ratio_and_contiguity(grid, ratio):
    g = torch.Generator().manual_seed(0)
    masks = block_masks(12, grid, ratio, generator=g)
    n_mask = round(grid * grid * ratio)
    assert masks.shape == (12, grid * grid)
    assert masks.sum(1).tolist() == [n_mask] * 12  # exact ratio, every sample
    assert len({tuple(m.tolist()) for m in masks}) == 12  # drawn per sample
    rand = torch.rand(12, grid * grid, generator=g).argsort(1).argsort(1) < n_mask
    blk_comp = [_components(m.view(grid, grid).numpy()) for m in masks]
    rnd_comp = [_components(m.view(grid, grid).numpy()) for m in rand]
    assert max(iso for _, iso in blk_comp) <= 1  # only the cut last square may leave a lone patch
    assert sum(n for n, _ in blk_comp) <= sum(n for n, _ in rnd_comp)
    # contiguous regions: far less masked/visible border than the same number of scattered patches
    blk_border = sum(_boundary(m.view(grid, grid).numpy()) for m in masks)
    rnd_border = sum(_boundary(m.view(grid, grid).numpy()) for m in rand)
    assert blk_border < 0.6 * rnd_border


def test_training_masking_ids_are_consistent_for_each_mode():
    grid, n = 8, 6
    seen_ratios = set()
    for mode in ("block", "mixed"):
        for seed in range(12):
            g = torch.Generator().manual_seed(seed)
            ids_keep, ids_restore, mask = training_masking_ids(n, grid, 0.75, mode, generator=g)
            hidden = mask.sum(1)
            assert (hidden == hidden[0]).all()
            seen_ratios.add(round(float(hidden[0]) / (grid * grid), 3))
            for i in range(n):
                assert not mask[i, ids_keep[i]].any()  # kept = visible
                seq = torch.cat([ids_keep[i], (mask[i] > 0).nonzero().flatten()])
                assert set(seq.tolist()) == set(range(grid * grid))
                # ids_restore maps [visible..., masked...] back to grid order
                shuffled = torch.argsort(ids_restore[i])
                assert torch.equal(shuffled[: ids_keep.shape[1]], ids_keep[i])
    assert 0.75 in seen_ratios and seen_ratios & {0.25, 0.5}  # mixed draws 25-50% lattice masks too


def test_lattice_masks_are_inference_phases():
    g = torch.Generator().manual_seed(1)
    masks = lattice_masks(10, 12, generator=g)
    k = round(144 / int(masks[0].sum()))
    assert k in (2, 3, 4)
    phases = [inference_masks(12, k, p) for p in ("stripes", "grid") if not (p == "grid" and k != 4)]
    for m in masks:
        assert any(any(torch.equal(m, ph) for ph in pset) for pset in phases)


def test_forward_uses_mask_mode():
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    x = torch.rand(4, 3, 32, 32)
    _, _, mask = model(x, 0.75, torch.Generator().manual_seed(0), mask_mode="block")
    comps = [_components(m.view(8, 8).bool().numpy())[0] for m in mask]
    assert mask.sum(1).tolist() == [48.0] * 4 and max(comps) <= 4
    with pytest.raises(ValueError, match="mask_mode"):
        model(x, 0.75, mask_mode="checker")


# --- hybrid position embedding ------------------------------------------------------------------------------------
def test_hybrid_pos_embed_starts_as_sincos_and_learns():
    torch.manual_seed(0)
    plain = build_model(_cfg().model)
    hybrid = build_model(_cfg("model.pos_embed=hybrid").model)
    missing = hybrid.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["decoder_pos_embed_learned", "pos_embed_learned"]
    x = torch.rand(2, 3, 32, 32)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    l1, p1, _ = plain(x, 0.75, g())
    l2, p2, _ = hybrid(x, 0.75, g())
    assert torch.allclose(p1, p2, atol=1e-6)  # zero-initialised learnable term
    l2.backward()
    assert hybrid.pos_embed_learned.grad.abs().sum() > 0 and hybrid.decoder_pos_embed_learned.grad.abs().sum() > 0
    with torch.no_grad():
        hybrid.pos_embed_learned.add_(torch.randn_like(hybrid.pos_embed_learned))
    assert not torch.allclose(hybrid(x, 0.75, g())[1], p2, atol=1e-4)


# --- DyT ----------------------------------------------------------------------------------------------------------
def test_dyt_formula_and_replaces_every_layernorm():
    norm = DyT(6, alpha_init=0.7)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(6.0))
        norm.bias.fill_(0.25)
    x = torch.randn(3, 6)
    assert torch.allclose(norm(x), torch.arange(6.0) * torch.tanh(0.7 * x) + 0.25)
    model = build_model(_cfg("model.norm=dyt").model)
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    n_dyt = sum(isinstance(m, DyT) for m in model.modules())
    assert n_dyt == 2 * 2 + 1 * 2 + 2  # two per block (2 encoder + 1 decoder) plus the two final norms
    loss, _, _ = model(torch.rand(2, 3, 32, 32))
    loss.backward()
    assert model.blocks[0].norm1.alpha.grad is not None and model.blocks[0].norm1.alpha.grad.abs() > 0


# --- multi-scale encoder features ---------------------------------------------------------------------------------
def test_multiscale_mean_and_linear_fusion():
    torch.manual_seed(0)
    model = build_model(_cfg("model.multiscale=[0,1]").model).eval()
    tokens = torch.randn(2, 5, 32)
    with torch.no_grad():
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1)
        h0 = model.blocks[0](torch.cat([cls, tokens], 1))
        expected = (model.ms_norms["0"](h0) + model.norm(model.blocks[1](h0))) / 2
        assert torch.allclose(model.encode(tokens), expected, atol=1e-6)
    torch.manual_seed(0)
    lin = build_model(_cfg("model.multiscale=[0,1]", "model.multiscale_fusion=linear").model).eval()
    lin.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.allclose(lin.encode(tokens), expected, atol=1e-5)  # starts as the mean
    shallow = build_model(_cfg("model.multiscale=[0]").model).eval()
    with torch.no_grad():
        before = shallow.encode(tokens)
        shallow.blocks[1].mlp.fc2.weight.add_(1.0)  # blocks after the deepest level are not run
        assert torch.equal(shallow.encode(tokens), before)


# --- SSIM --------------------------------------------------------------------------------------------------------
def test_ssim_map_properties():
    w = gaussian_window(1.5, 31)
    a = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ssim_map(a, a, w), torch.ones_like(a), atol=1e-5)
    noisy = a + 0.5 * torch.randn_like(a)
    s = ssim_map(a, noisy, w)
    assert s.shape == a.shape and float(s.mean()) < 0.9
    local = a.clone()
    local[:, :, 4:8, 4:8] = 0
    d = 1 - ssim_map(a, local, w).mean(1)
    assert float(d[:, 4:8, 4:8].mean()) > 5 * float(d[:, 20:, 20:].mean())


def test_ssim_loss_term_added_on_masked_pixels():
    torch.manual_seed(0)
    plain = build_model(_cfg().model)
    with_ssim = build_model(_cfg("model.ssim_loss_weight=0.5").model)
    with_ssim.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    l1, pred, mask = plain(x, 0.75, torch.Generator().manual_seed(1))
    l2, _, _ = with_ssim(x, 0.75, torch.Generator().manual_seed(1))
    extra = with_ssim.ssim_loss(x, pred, mask)
    assert 0 < float(extra) <= 2 and torch.allclose(l2, l1 + 0.5 * extra, atol=1e-6)
    perfect = with_ssim.patchify(x)  # a perfect prediction has no SSIM loss
    assert float(with_ssim.ssim_loss(x, perfect, mask)) < 1e-5


def test_scorer_ssim_map_combination():
    torch.manual_seed(0)
    cfg0 = _cfg("scoring.sigma=0")
    cfg1 = _cfg("scoring.sigma=0", "scoring.ssim_weight=1")
    cfgh = _cfg("scoring.sigma=0", "scoring.ssim_weight=0.5")
    model = build_model(cfg0.model).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        mse = Scorer(model, cfg0.scoring, cfg0.data)(x)[0]
        ds = Scorer(model, cfg1.scoring, cfg1.data)(x)[0]
        half = Scorer(model, cfgh.scoring, cfgh.data)(x)[0]
        xn = (x - Scorer(model, cfg0.scoring, cfg0.data).pix_mean) / Scorer(model, cfg0.scoring, cfg0.data).pix_std
        rec = model.unpatchify(Scorer(model, cfg0.scoring, cfg0.data).reconstruct_patches(xn), channels=3)
        expected = (1 - ssim_map(rec, xn, gaussian_window(1.5, 31)).mean(1, keepdim=True)) / 2
    assert torch.allclose(ds, expected, atol=1e-5) and float(ds.min()) >= 0 and float(ds.max()) <= 1
    assert torch.allclose(half, 0.5 * mse + 0.5 * ds, atol=1e-5)


def test_lowpass_residual_cancels_texture_and_keeps_a_coherent_blob():
    """The low-pass map equals the blurred residual squared; on a reconstruction that misses zero-mean texture
    everywhere and a dark blob in one place, it suppresses the texture far more than the blob."""
    torch.manual_seed(0)
    cfg0, cfg_lp = _cfg("scoring.sigma=0"), _cfg("scoring.sigma=0", "scoring.lowpass_sigma=2")
    model = build_model(cfg0.model).eval()
    plain, lp = Scorer(model, cfg0.scoring, cfg0.data).eval(), Scorer(model, cfg_lp.scoring, cfg_lp.data).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        xn = plain.normalise_input(x)
        rec = model.unpatchify(plain.reconstruct_patches(xn), channels=3)
        expected = (blur_channels(rec - xn, gaussian_window(2.0, 31)) ** 2).mean(1, keepdim=True)
        assert torch.allclose(lp.raw_map(x), expected, atol=1e-6)
    # the residual model: texture = +-1 checkerboard noise everywhere, blob = -1 over an 8x8 square
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    texture = ((yy + xx) % 2 * 2 - 1).float().expand(1, 3, 32, 32)
    blob = torch.zeros(1, 3, 32, 32)
    blob[..., 12:20, 12:20] = -1.0
    w = gaussian_window(2.0, 31)
    tex_energy = float((blur_channels(texture, w) ** 2).mean() / (texture ** 2).mean())
    blob_energy = float((blur_channels(blob, w) ** 2)[..., 14:18, 14:18].mean())
    assert tex_energy < 0.01 and blob_energy > 0.5


# --- registers ---------------------------------------------------------------------------------------------------
def test_registers_are_learned_parameters_dropped_before_decoder():
    torch.manual_seed(0)
    model = build_model(_cfg("model.num_registers=3").model).eval()
    assert "register_tokens" in model.state_dict() and model.register_tokens.shape == (1, 3, 32)
    tokens = torch.randn(2, 5, 32)
    with torch.no_grad():
        a, b = model.encode(tokens), model.encode(tokens)
    assert torch.equal(a, b) and a.shape == (2, 6, 32)  # the same tokens every call; registers gone
    with torch.no_grad():
        model.register_tokens.add_(1.0)
        assert not torch.allclose(model.encode(tokens), a)  # they take part in attention
    model.train()
    loss, _, _ = model(torch.rand(2, 3, 32, 32))
    loss.backward()
    assert model.register_tokens.grad is not None and model.register_tokens.grad.abs().sum() > 0
    frozen = build_model(_cfg("model.num_registers=2", "model.lora.freeze_non_lora=true").model)
    assert frozen.register_tokens.requires_grad and not frozen.blocks[0].attn.qkv.weight.requires_grad


# --- GMM density head ---------------------------------------------------------------------------------------------
def test_gmm_head_nll_matches_mixture_density():
    torch.manual_seed(0)
    head = GMMHead(5, 3)
    with torch.no_grad():
        head.logits.copy_(torch.tensor([0.2, -1.0, 0.5]))
        head.log_var.copy_(torch.randn(3, 5) * 0.3)
    z = torch.randn(4, 7, 5)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=head.logits),
        torch.distributions.Independent(torch.distributions.Normal(head.means, torch.exp(0.5 * head.log_var)), 1))
    assert torch.allclose(head(z), -mix.log_prob(z.unsqueeze(-2).squeeze(-2)) / 5, atol=1e-5)


def test_gmm_loss_trains_head_not_encoder():
    torch.manual_seed(0)
    model = build_model(_cfg("model.gmm_components=4", "model.gmm_loss_weight=1").model)
    x = torch.rand(2, 3, 32, 32)
    latent = model.encode(model.embed(x)[:, :10])
    model.patch_nll(latent).mean().backward()
    assert model.gmm_head.means.grad.abs().sum() > 0
    assert model.blocks[0].attn.qkv.lora_A.grad is None  # embeddings are detached
    plain_loss = model.loss(x, *model(x, 0.75, torch.Generator().manual_seed(2))[1:])
    total, _, _ = model(x, 0.75, torch.Generator().manual_seed(2))
    assert not torch.allclose(total, plain_loss)


def test_scorer_gmm_nll_is_mean_over_visible_passes():
    torch.manual_seed(0)
    cfg = _cfg("model.gmm_components=3", "scoring.gmm_weight=0.5", "scoring.sigma=0")
    model = build_model(cfg.model).eval()
    scorer = Scorer(model, cfg.scoring, cfg.data).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        xn = scorer.normalise_input(x)
        pred, nll = scorer.reconstruct_with_nll(xn)
        tokens = model.embed(xn)
        manual = torch.zeros(2, 64)
        for k in range(scorer.num_masks):
            keep = scorer.ids_keep[k]
            manual[:, keep] += model.patch_nll(model.encode(tokens[:, keep]))
        manual /= scorer.num_masks - 1
        assert torch.allclose(nll, manual, atol=1e-5)
        plain = Scorer.from_config(model, _cfg("model.gmm_components=3", "scoring.sigma=0")).eval()
        nll_map = model.unpatchify(nll.unsqueeze(-1).expand(-1, -1, 16), channels=1)
        assert torch.allclose(scorer(x)[0], plain(x)[0] + 0.5 * nll_map, atol=1e-5)


# --- grayscale model (model.in_chans=1) ---------------------------------------------------------------------------
def test_grayscale_config_and_model_shapes():
    cfg = _cfg("model.in_chans=1")
    model = build_model(cfg.model)
    assert model.patch_embed.proj.weight.shape[1] == 1
    assert model.decoder_pred.out_features == cfg.model.patch_size ** 2
    with pytest.raises(UserError, match="model.in_chans: 2"):
        _cfg("model.in_chans=2")


@pytest.mark.parametrize("per_image", [False, True])
def test_grayscale_scorer_sees_channel_mean_and_report_inverts_it(per_image):
    from mae_ad.scoring import normalise_images

    extra = ["data.normalize=per_image"] if per_image else []
    cfg = _cfg("model.in_chans=1", *extra)
    torch.manual_seed(0)
    scorer = Scorer(build_model(cfg.model), cfg.scoring, cfg.data).eval()
    g = torch.rand(2, 1, 32, 32)
    img = g.expand(-1, 3, -1, -1).contiguous()
    x = scorer.normalise_input(img)
    assert x.shape == (2, 1, 32, 32)
    manual = ((img - scorer.pix_mean) / scorer.pix_std).mean(dim=1, keepdim=True)
    if per_image:
        manual = (manual - manual.mean(dim=(2, 3), keepdim=True)) / manual.std(dim=(2, 3), keepdim=True,
                                                                              unbiased=False)
    assert torch.allclose(x, manual, atol=1e-4)
    assert torch.allclose(normalise_images(img, scorer.pix_mean, scorer.pix_std, per_image, gray=True), x)
    # A perfect reconstruction must come back as the input gray image, in all three channels.
    scorer.reconstruct_with_nll = (  # type: ignore[method-assign]
        lambda z, with_nll=True: (scorer.model.patchify(z), None))
    rec = scorer.reconstruction(img)
    assert rec.shape == (2, 3, 32, 32)
    assert torch.allclose(rec, img, atol=1e-4)
    with torch.no_grad():
        amap, _ = scorer(img)  # and the error map of that perfect reconstruction is zero
    assert amap.shape == (2, 1, 32, 32) and float(amap.abs().max()) < 1e-8


def test_grayscale_model_ignores_colour_of_equal_luminance_inputs():
    """A 1-channel model scores an image by the mean of its normalised channels: two colourings with the same mean
    score the same, while an RGB model tells them apart."""
    cfg = _cfg("model.in_chans=1", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]")
    rgb_cfg = _cfg("data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]")
    torch.manual_seed(0)
    gray, rgb = Scorer(build_model(cfg.model), cfg.scoring, cfg.data).eval(), Scorer(build_model(rgb_cfg.model), rgb_cfg.scoring, rgb_cfg.data).eval()
    a = torch.rand(1, 3, 32, 32) * 0.5 + 0.25
    shift = torch.tensor([0.1, -0.05, -0.05]).view(1, 3, 1, 1)  # sums to zero: same channel mean
    with torch.no_grad():
        assert torch.allclose(gray(a)[0], gray(a + shift)[0], atol=1e-5)
        assert not torch.allclose(rgb(a)[0], rgb(a + shift)[0], atol=1e-3)


# --- fusion with the training-free patch statistics (scoring.stats_weight) ---------------------------------------
def test_stats_weight_needs_position_normalisation():
    with pytest.raises(UserError, match="scoring.stats_weight"):
        _cfg("scoring.stats_weight=0.5")


def test_stats_map_is_the_patch_statistics_baseline_and_is_added_to_the_map():
    """With identity pixel normalisation the in-graph statistics map is PatchStatsBaseline's z-map (fitted on the
    same normal images, the calibration's statistics half; spread over each cell instead of bilinear), and the final
    map is the normalised map plus w times it."""
    from mae_ad.baseline import PatchStatsBaseline
    from mae_ad.scoring import calibrate, gaussian_blur

    ident = ["data.mean=[0,0,0]", "data.std=[1,1,1]", "scoring.normalize=position", "scoring.sigma=2"]
    cfg = _cfg(*ident, "scoring.stats_weight=0.5")
    plain_cfg = _cfg(*ident)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    normals = torch.rand(8, 3, 32, 32) * 0.2 + 0.4
    scorer, plain = Scorer(model, cfg.scoring, cfg.data).eval(), Scorer(model, plain_cfg.scoring, plain_cfg.data).eval()
    cal = calibrate(scorer, normals, target_fpr=0.1)
    calibrate(plain, normals, target_fpr=0.1)
    assert cal["n_stats_images"] == 4
    test = normals[:2].clone()
    test[1, :, 8:12, 8:12] = 1.0  # a bright square
    base = PatchStatsBaseline(patch=cfg.model.patch_size, sigma=2.0, std_floor=0.1).fit(normals[:4])
    z = ((base.features(test) - base.mean) / base.std).abs().amax(dim=1, keepdim=True)
    p = cfg.model.patch_size
    ref_maps = gaussian_blur(z.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3), scorer.kernel)
    with torch.no_grad():
        got = scorer.stats_map(test)
        assert torch.allclose(got, ref_maps, atol=1e-3, rtol=1e-4)
        amap, score = scorer(test)
        assert torch.allclose(amap, plain(test)[0] + 0.5 * got, atol=1e-4)
    assert float(score[1]) > float(score[0])


def test_stats_fusion_bundle_roundtrip_and_missing_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from mae_ad.bundle import load_scorer, save_bundle
    from mae_ad.contract import BUNDLE_CALIB_TENSORS
    from mae_ad.scoring import calibrate

    cfg = _cfg("scoring.normalize=position", "scoring.stats_weight=1.0")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    scorer = Scorer(model, cfg.scoring, cfg.data).eval()
    cal = calibrate(scorer, torch.rand(6, 3, 32, 32), target_fpr=0.2)
    save_bundle(tmp_path / "b", model, cfg, cal, scorer=scorer)
    loaded, _, _ = load_scorer(tmp_path / "b")
    assert torch.equal(loaded.cell_std, scorer.cell_std) and float(scorer.cell_std.min()) > 0
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x)[0], scorer(x)[0])
    tpath = tmp_path / "b" / BUNDLE_CALIB_TENSORS
    t = load_file(str(tpath))
    del t["cell_mean"]
    save_file(t, str(tpath))
    with pytest.raises(UserError, match="cell_mean"):
        load_scorer(tmp_path / "b")


# --- export ------------------------------------------------------------------------------------------------------
VARIANTS = {
    "grayscale": ["model.in_chans=1", "data.normalize=per_image"],
    "hybrid": ["model.pos_embed=hybrid"],
    "dyt": ["model.norm=dyt"],
    "multiscale-mean": ["model.multiscale=[0,1]"],
    "multiscale-linear": ["model.multiscale=[0,1]", "model.multiscale_fusion=linear"],
    "ssim": ["scoring.ssim_weight=0.3", "model.ssim_loss_weight=0.5"],
    "registers": ["model.num_registers=4"],
    "gmm": ["model.gmm_components=3", "scoring.gmm_weight=0.2"],
    "block-masks": ["train.mask_mode=mixed"],
    "stats-fusion": ["scoring.normalize=position", "scoring.stats_weight=0.5", "model.in_chans=1"],
    "lowpass": ["scoring.lowpass_sigma=2", "scoring.ssim_weight=0.3"],
    "all": ["model.pos_embed=hybrid", "model.norm=dyt", "model.multiscale=[0,1]", "model.num_registers=2",
            "model.gmm_components=2", "scoring.gmm_weight=0.1", "scoring.ssim_weight=0.5",
            "scoring.normalize=position", "scoring.pattern=grid"],
}


def _trt_ops() -> set[str] | None:
    if not TRT_MATRIX.is_file():
        return None
    return {m.group(1) for m in re.finditer(r"^\|\s*(\w+)\s*\|\s*Y\s*\|", TRT_MATRIX.read_text(), re.M)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_exports_to_onnx_with_parity(name, tmp_path):
    import onnx
    import onnxruntime as ort

    cfg = _cfg(*VARIANTS[name])
    assert export_blockers(cfg) == []
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for prm in model.parameters():  # move every learnable term off its neutral start so it shows in the output
        if prm.dim() <= 2 and prm.numel() < 5000:
            with torch.no_grad():
                prm.add_(0.05 * torch.randn_like(prm))
    scorer = Scorer(model, cfg.scoring, cfg.data).eval()
    if scorer.normalize:
        scorer.set_normal_stats(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32) + 0.5)
    x = torch.rand(2, 3, 32, 32)
    path = tmp_path / "scorer.onnx"
    torch.onnx.export(scorer, (x,), str(path), input_names=["image"], output_names=["anomaly_map", "score"],
                      dynamic_axes={"image": {0: "batch"}}, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.rand(3, 3, 32, 32)
    amap, score = sess.run(None, {"image": x3.numpy()})
    with torch.no_grad():
        ref_map, ref_score = scorer(x3)
    assert np.abs(amap - ref_map.numpy()).max() < 1e-4
    assert np.abs(score - ref_score.numpy()).max() < 1e-4 * max(1.0, float(ref_score.abs().max()))
    supported = _trt_ops()
    if supported is not None:
        ops = {n.op_type for n in onnx.load(str(path)).graph.node} - {"Constant", "Identity"}
        assert ops <= supported, f"ops outside TensorRT's matrix: {sorted(ops - supported)}"
    from trt.opcheck import check_graph  # and inside the compile stage's own (stricter) op table

    bad = [r.op for r in check_graph(onnx.load(str(path))) if r.status == "unsupported"]
    assert not bad, f"ops the compile stage would refuse: {bad}"


def test_export_blockers_name_the_key():
    cfg = _cfg("model.gmm_components=2", "scoring.gmm_weight=0.5")
    bad = cfg.model_copy(update={"model": cfg.model.model_copy(update={"gmm_components": 0})})
    reasons = export_blockers(bad)
    assert len(reasons) == 1 and "scoring.gmm_weight" in reasons[0]


def test_variant_bundle_roundtrip(tmp_path):
    from mae_ad.bundle import load_bundle, save_bundle

    cfg = _cfg(*VARIANTS["all"][:6])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    save_bundle(tmp_path / "b", model, cfg, None)
    cfg2, model2, _ = load_bundle(tmp_path / "b")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(Scorer(model, cfg.scoring, cfg.data)(x)[0], Scorer(model2, cfg2.scoring, cfg2.data)(x)[0])
    assert math.isclose(cfg2.scoring.gmm_weight, cfg.scoring.gmm_weight)


def test_every_mask_mode_draws_on_the_generator_device(monkeypatch):
    """CUDA refuses a CPU generator for a draw on the GPU (and vice versa). train.mask_mode=mixed hands its block and
    lattice draws a CPU generator, also on a CUDA run; its random branch then drew on the GPU with that generator
    and the first CUDA training step failed. The rule is enforced here with a strict torch.rand, the target device
    played by 'meta' (this machine has no GPU; tests/test_train.py::test_training_on_cuda runs the real thing)."""
    import mae_ad.masking as masking

    real_rand = torch.rand

    def strict_rand(*size, generator=None, device=None, **kw):
        if generator is not None and device is not None and torch.device(device) != generator.device:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator but found "
                               f"'{generator.device.type}'")
        return real_rand(*size, generator=generator, device=device, **kw)

    monkeypatch.setattr(masking.torch, "rand", strict_rand)
    for mode in ("random", "block", "mixed"):
        for seed in range(6):  # mixed: each of random / block / lattice is drawn within a few seeds
            g = torch.Generator().manual_seed(seed)
            ids_keep, ids_restore, mask = training_masking_ids(4, 8, 0.75, mode, device="meta", generator=g)
            assert ids_keep.device.type == ids_restore.device.type == mask.device.type == "meta"
