"""Config validation, masks, the model and the K-mask scorer."""

from __future__ import annotations

import pytest
import torch

from mae_ad.config import load_config
from mae_ad.contract import UserError
from mae_ad.masking import inference_masks, masks_to_ids, random_masking_ids
from mae_ad.model import build_model
from mae_ad.scoring import Scorer, gaussian_blur, gaussian_kernel1d

from .conftest import tiny_overrides


# --- config ------------------------------------------------------------------------------------------------
def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  lora:\n    rnak: 4\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    assert "model.lora.rnak" in str(e.value) and str(f) in str(e.value)


def test_partition_error_at_load_time(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {img_size: 40, patch_size: 4}\nscoring: {num_masks: 4, pattern: stripes}\n")
    with pytest.raises(UserError, match="num_masks"):
        load_config(f)
    f.write_text("model: {img_size: 48, patch_size: 4}\nscoring: {num_masks: 3, pattern: grid}\n")
    with pytest.raises(UserError, match="square"):
        load_config(f)


def test_override_types_and_preset():
    cfg = load_config(None, ["model.preset=small-p8", "train.epochs=7", "scoring.sigma=2.5"])
    assert cfg.model.embed_dim == 384 and cfg.train.epochs == 7 and cfg.scoring.sigma == 2.5
    with pytest.raises(UserError, match="unknown preset"):
        load_config(None, ["model.preset=huge-p3"])


# --- masks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,k,grid", [("stripes", 4, 8), ("grid", 4, 8), ("grid", 9, 12), ("stripes", 2, 6)])
def test_inference_masks_partition(pattern, k, grid):
    masks = inference_masks(grid, k, pattern)
    assert masks.shape == (k, grid * grid)
    assert torch.equal(masks.sum(0), torch.ones(grid * grid, dtype=torch.long))  # each patch masked exactly once
    assert set(masks.sum(1).tolist()) == {grid * grid // k}
    ids_keep, ids_restore = masks_to_ids(masks)
    for i in range(k):
        assert not masks[i, ids_keep[i]].any()  # kept patches are the visible ones
        seq = torch.cat([ids_keep[i], masks[i].nonzero().flatten()])
        assert torch.equal(seq[ids_restore[i]], torch.arange(grid * grid))


def test_grid_masks_have_visible_neighbours():
    g = 8
    masks = inference_masks(g, 4, "grid").view(4, g, g)
    for m in masks:
        for r, c in m.nonzero().tolist():
            for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                rr, cc = r + dr, c + dc
                if 0 <= rr < g and 0 <= cc < g:
                    assert not m[rr, cc]


def test_random_masking_restores_each_sample_with_its_own_permutation():
    torch.manual_seed(0)
    b, n = 5, 16
    ids_keep, ids_restore, mask = random_masking_ids(b, n, 0.75)
    assert ids_keep.shape == (b, 4) and mask.sum(1).tolist() == [12.0] * b
    assert len({tuple(r.tolist()) for r in ids_keep}) > 1  # permutations differ per sample
    tokens = torch.arange(n).float().view(1, n).expand(b, n)
    visible = torch.gather(tokens, 1, ids_keep)
    filler = torch.full((b, n - 4), -1.0)
    restored = torch.gather(torch.cat([visible, filler], 1), 1, ids_restore)
    for i in range(b):
        kept = mask[i] == 0
        assert torch.equal(restored[i][kept], tokens[i][kept])  # every sample's visible tokens land in place
        assert (restored[i][~kept] == -1).all()


# --- model and scorer ------------------------------------------------------------------------------------------
def test_training_forward_and_gradients(tiny_cfg):
    model = build_model(tiny_cfg.model)
    x = torch.rand(3, 3, 32, 32)
    loss, pred, mask = model(x)
    assert pred.shape == (3, 64, 48) and mask.shape == (3, 64)
    loss.backward()
    assert model.decoder_pred.weight.grad is not None and torch.isfinite(loss)
    assert model.blocks[0].attn.qkv.lora_A.grad is not None


def test_freeze_non_lora_keeps_decoder_trainable():
    cfg = load_config(None, tiny_overrides() + ["model.lora.freeze_non_lora=true"])
    model = build_model(cfg.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.0.attn.qkv.lora_A" in trainable
    assert "blocks.0.attn.qkv.weight" not in trainable and "blocks.0.mlp.fc1.weight" not in trainable
    assert "decoder_pred.weight" in trainable and "patch_embed.proj.weight" in trainable


def test_patchify_roundtrip(tiny_cfg):
    model = build_model(tiny_cfg.model)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def test_gaussian_keeps_size_and_is_batched():
    k = gaussian_kernel1d(4.0, 63)
    assert k.numel() == 25 and abs(float(k.sum()) - 1) < 1e-6
    maps = torch.zeros(3, 1, 64, 64)
    maps[1, 0, 32, 32] = 1.0
    out = gaussian_blur(maps, k)
    assert out.shape == maps.shape
    assert float(out[0].abs().max()) == 0 and abs(float(out[1].sum()) - 1) < 1e-4
    assert out[1, 0].argmax().item() == 32 * 64 + 32


@pytest.mark.parametrize("pattern", ["stripes", "grid"])
def test_scorer_batch_equals_single_and_only_masked_pixels_count(pattern):
    cfg = load_config(None, tiny_overrides() + [f"scoring.pattern={pattern}", "scoring.sigma=0"])
    torch.manual_seed(0)
    scorer = Scorer(build_model(cfg.model), cfg.scoring, cfg.data).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        maps, scores = scorer(x)
        single = torch.cat([scorer(x[i:i + 1])[0] for i in range(3)])
    assert maps.shape == (3, 1, 32, 32) and scores.shape == (3,)
    assert torch.allclose(maps, single, atol=1e-5)
    assert torch.allclose(scores, maps.flatten(1).amax(1))
    # Changing one patch's pixels changes the error map of that patch (it is compared with its reconstruction)
    x2 = x.clone()
    x2[0, :, 0:4, 0:4] = 1.0
    with torch.no_grad():
        m2, _ = scorer(x2)
    assert not torch.allclose(m2[0, :, 0:4, 0:4], maps[0, :, 0:4, 0:4])


def test_scorer_reconstruction_uses_the_mask_that_hid_each_patch():
    """Each patch's reconstruction must come from the pass where it was hidden: replace the decoder with an
    identity-like leak check by making the visible input irrelevant to the prediction of a hidden patch."""
    cfg = load_config(None, tiny_overrides() + ["scoring.sigma=0"])
    torch.manual_seed(0)
    scorer = Scorer(build_model(cfg.model), cfg.scoring, cfg.data).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        base = scorer.reconstruct_patches(scorer.normalise_input(x))
        # perturb patch 0 (row 0, col 0); its reconstruction must not change (it is hidden when predicted)
        x2 = x.clone()
        x2[0, :, 0:4, 0:4] = 0.0
        pert = scorer.reconstruct_patches(scorer.normalise_input(x2))
    assert torch.allclose(base[0, 0], pert[0, 0], atol=1e-6)
    assert not torch.allclose(base[0, 1:], pert[0, 1:], atol=1e-6)  # other patches see it


def test_topk_mean_reduce():
    cfg = load_config(None, tiny_overrides() + ["scoring.reduce=topk_mean", "scoring.topk_fraction=0.25"])
    scorer = Scorer(build_model(cfg.model), cfg.scoring, cfg.data).eval()
    m = torch.arange(32 * 32, dtype=torch.float32).view(1, 1, 32, 32)
    expected = torch.arange(32 * 32 - 256, 32 * 32, dtype=torch.float32).mean()
    assert torch.allclose(scorer.reduce_map(m), expected.view(1))


def test_time_schedule_needs_a_budget():
    with pytest.raises(UserError, match="max_minutes"):
        load_config(None, ["train.schedule=time"])
    assert load_config(None, ["train.schedule=time", "train.max_minutes=5"]).train.schedule == "time"


def test_per_image_normalisation_ignores_exposure():
    """With data.normalize=per_image, a gain/offset change of the whole image leaves the map unchanged."""
    cfg = load_config(None, tiny_overrides() + ["data.normalize=per_image", "scoring.sigma=1"])
    torch.manual_seed(0)
    scorer = Scorer(build_model(cfg.model), cfg.scoring, cfg.data).eval()
    gray = torch.rand(2, 1, 32, 32).expand(2, 3, 32, 32) * 0.5 + 0.2  # a grey part: affine changes commute
    brighter = gray * 1.3 + 0.05
    with torch.no_grad():
        m1, s1 = scorer(gray)
        m2, s2 = scorer(brighter)
        plain = Scorer.from_config(scorer.model, load_config(None, tiny_overrides() + ["scoring.sigma=1"])).eval()
        p1, _ = plain(gray)
        p2, _ = plain(brighter)
    assert torch.allclose(m1, m2, atol=1e-4) and torch.allclose(s1, s2, atol=1e-4)
    assert not torch.allclose(p1, p2, atol=1e-3)  # without it, exposure changes the map
    rec = scorer.reconstruction(brighter)
    assert rec.shape == brighter.shape and float(rec.min()) >= 0 and float(rec.max()) <= 1


def test_every_shipped_config_validates():
    """Each model/agent preset in configs/ passes `mae-ad validate-config` (the ablation file is a sweep space,
    checked in test_sweep)."""
    from pathlib import Path

    from typer.testing import CliRunner

    from app.cli import app

    files = sorted(p for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")
                   if not p.name.startswith("ablation-"))
    assert {"magnetic-tile.yaml", "magnetic-tile-pretrained.yaml", "base-textures.yaml"} <= {p.name for p in files}
    for f in files:
        r = CliRunner().invoke(app, ["validate-config", str(f)])
        assert r.exit_code == 0 and r.output.rstrip().endswith(": OK"), (f, r.output[-300:])


def test_validate_config_checks_a_sweep_file_trial_by_trial(tmp_path):
    """A sweep or ablation file is recognised by its content and each trial validated against --base; a bad key
    in one trial names the file, the trial and the key, exit 2 (it used to be read as a model config and refused
    with 'trials: unknown key')."""
    from pathlib import Path

    from typer.testing import CliRunner

    from app.cli import app

    configs = Path(__file__).parents[1] / "configs"
    r = CliRunner().invoke(app, ["validate-config", str(configs / "ablation-magnetic-tile.yaml"), "--base",
                                 str(configs / "magnetic-tile-pixel.yaml")])
    assert r.exit_code == 0, r.output
    assert "OK (15 trials, mode list" in r.output and "decoder-1: model.decoder_depth=1" in r.output
    space = tmp_path / "space.yaml"
    space.write_text("train.mask_ratio: [0.5, 0.75]\nscoring.sigma: [2, 4]\n")
    r = CliRunner().invoke(app, ["validate-config", str(space)])
    assert r.exit_code == 0 and "OK (4 trials, mode grid" in r.output, r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("trials:\n  - {name: base}\n  - {name: typo, train.mask_ratoi: 0.5}\n  - {name: neg, scoring.sigma: -1}\n")
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "app.cli", "validate-config", str(bad)], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert f"error: {bad}: trial 'typo'" in p.stderr and "train.mask_ratoi: unknown key" in p.stderr
    assert "and 1 more trial(s)" in p.stderr and "trial 'neg'" in p.stderr and "scoring.sigma" in p.stderr  # all at once
    mixed = tmp_path / "mixed.yaml"  # `trials:` beside other keys: the ablation-file rule, not 'unknown key'
    mixed.write_text("trials:\n  - {name: base}\nmode: grid\n")
    p = subprocess.run([sys.executable, "-m", "app.cli", "validate-config", str(mixed)], capture_output=True, text=True)
    assert p.returncode == 2 and "`trials:` must be the only top-level key" in p.stderr, p.stderr
    listed = tmp_path / "listed.yaml"  # a list where a preset name belongs: an error line, not a TypeError
    listed.write_text("model: {preset: [tiny-p8, tiny-p8-d2]}\n")
    p = subprocess.run([sys.executable, "-m", "app.cli", "validate-config", str(listed)], capture_output=True, text=True)
    assert p.returncode == 2 and "unknown preset ['tiny-p8', 'tiny-p8-d2']" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize(("override", "suggestion"), [
    ("train.epoch=3", "train.epoch: unknown key (did you mean 'epochs'?)"),
    ("trian.epochs=3", "trian: unknown key (did you mean 'train'?)"),
    ("model.backbone.layer=3", "model.backbone.layer: unknown key (did you mean 'layers'?)"),
    ("scoring.zzzz=1", "scoring.zzzz: unknown key"),
    ("train.lora.rank=3", "train.lora: unknown key (did you mean 'model.lora'?)"),
    ("train.knn_weight=1", "train.knn_weight: unknown key (did you mean 'scoring.knn_weight'?)"),
    ("train.mask=0.5", "train.mask: unknown key (did you mean 'mask_ratio' or 'mask_mode'?)"),
])
def test_unknown_key_names_the_nearest_known_key_of_its_section(override, suggestion):
    from mae_ad.config import load_config
    from mae_ad.contract import UserError

    with pytest.raises(UserError) as e:
        load_config(None, ["model.backbone.name=efficientnet_lite0", override]
                    if override.startswith("model.backbone") else [override])
    assert suggestion in str(e.value)
    if "did you mean" not in suggestion:
        assert "did you mean" not in str(e.value)
