"""Feature-space MAE (model.backbone): training through the CLI, the in-graph kNN memory, calibration without
self-matches, export with ONNX Runtime parity and TensorRT's op matrix, bad configs. Random backbone weights from
a temporary file: nothing is downloaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import crash_after_checkpoint, tiny_overrides


def feature_overrides(weights: Path, img: int = 64, knn: float = 1.0) -> list[str]:
    """A tiny feature-space model: EfficientNet-Lite0 levels 1-2 (stride 4 and 8) on an 8x8 token grid."""
    return [*tiny_overrides(img, 4), "model.patch_size=1", "model.backbone.name=efficientnet_lite0",
            f"model.backbone.weights={weights}", "model.backbone.layers=[1,2]", "model.backbone.stride=8",
            "scoring.pattern=grid", "scoring.normalize=position", f"scoring.knn_weight={knn}",
            "scoring.knn_memory=200", "calibration.stats_source=train", "train.epochs=2", "train.batch_size=8",
            "train.warmup_epochs=1", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def lite_weights(tmp_path_factory) -> Path:
    """Random EfficientNet-Lite0 weights in timm's layout, as a user's local file would be."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = tmp_path_factory.mktemp("w") / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def feature_bundle(tmp_path_factory, lite_weights, synthetic_data) -> Path:
    out = tmp_path_factory.mktemp("fb") / "bundle"
    cmd = [sys.executable, "-m", "app.cli", "train", "--data", str(synthetic_data), "--out", str(out)]
    for o in feature_overrides(lite_weights):
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_feature_bundle_scores_with_its_knn_memory(feature_bundle, synthetic_data) -> None:
    from mae_ad.bundle import load_scorer
    from mae_ad.contract import read_calibration
    from mae_ad.data import index_dataset, load_stack, split_holdout

    scorer, cal, _ = load_scorer(feature_bundle, require_calibration=True)
    assert scorer.features and scorer.model.token_chans == 24 + 40
    # 16 training images -> 12 trained on (4 held back) x 64 cells = 768 > knn_memory: a 200-cell coreset
    assert tuple(scorer.knn_bank.shape) == (200, 64) and scorer.knn_bank.abs().sum() > 0
    assert cal["stats_source"] == "train" and read_calibration(feature_bundle)["n_threshold_images"] == 4
    # the backbone's token standardisation was fitted on the training images and saved in the bundle
    assert not torch.equal(scorer.model.backbone.feat_std, torch.ones_like(scorer.model.backbone.feat_std))
    index = index_dataset(synthetic_data)
    train, _ = split_holdout(index.train, 0.2, 4, seed=0)
    imgs = torch.from_numpy(load_stack(train[:3], 64))
    amap, score = scorer(imgs)
    assert amap.shape == (3, 1, 64, 64) and torch.allclose(score, amap.flatten(1).amax(1))


def test_knn_map_is_the_nearest_memory_distance(feature_bundle) -> None:
    """The MatMul form equals brute-force nearest-neighbour distances; a cell that is in the memory has distance
    0 unless its own image is excluded (leave-one-image-out calibration)."""
    from mae_ad.bundle import load_scorer

    scorer, _, _ = load_scorer(feature_bundle)
    scorer.kernel = torch.ones(1)  # no smoothing: compare cell values
    scorer.smooth = False
    torch.manual_seed(1)
    x = torch.randn(2, 64, 8, 8)
    got = scorer.knn_raw_map(x)
    cells = x.permute(0, 2, 3, 1).reshape(-1, 64)
    want = torch.cdist(cells, scorer.knn_bank).amin(1).view(2, 1, 8, 8)
    want = torch.nn.functional.interpolate(want, size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(got, want, atol=1e-3)
    # memory made of the cells of image 0 and 1: image 0 matches itself, unless excluded
    scorer.set_knn_memory(cells, torch.arange(2).repeat_interleave(64))
    scorer.scoring.knn_memory  # noqa: B018 - memory above holds 128 <= 200 cells: no coreset
    assert float(scorer.knn_raw_map(x[:1]).abs().max()) < 1e-2
    assert float(scorer.knn_raw_map(x[:1], exclude=torch.tensor([0])).min()) > 0.5


def test_feature_bundle_exports_with_parity_and_passes_check_trt(feature_bundle, tmp_path) -> None:
    import onnx
    import onnxruntime as ort

    from mae_ad.bundle import load_scorer
    from trt.export import export_onnx
    from trt.opcheck import check_graph

    out = export_onnx(feature_bundle, tmp_path / "f.onnx")  # verify=True: ORT vs torch to 1e-4 or it fails
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert {"Resize", "MatMul", "ReduceMin"} <= ops or {"Resize", "MatMul"} <= ops
    reports = check_graph(model)
    assert not [r.op for r in reports if r.status == "unsupported"]
    scorer, _, _ = load_scorer(feature_bundle)
    x = np.random.default_rng(3).random((2, 3, 64, 64), dtype=np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    amap, score = sess.run(None, {sess.get_inputs()[0].name: x})
    with torch.no_grad():
        t_map, t_score = scorer(torch.from_numpy(x))
    assert np.allclose(amap, t_map.numpy(), atol=1e-3) and np.allclose(score, t_score.numpy(), atol=1e-3)


def test_feature_bundle_fp16_export_keeps_the_backbone_in_float32(feature_bundle, tmp_path) -> None:
    """--fp16 halves the transformer only: the frozen backbone and the kNN memory stay float32, and the FP16
    graph's scores stay close to the FP32 scorer's."""
    import json

    import onnxruntime as ort

    from mae_ad.bundle import load_scorer
    from trt.export import HalfPrecisionScorer, export_onnx

    scorer, _, _ = load_scorer(feature_bundle)
    half = HalfPrecisionScorer.from_scorer(scorer)
    assert next(half.model.backbone.parameters()).dtype == torch.float32
    assert half.model.decoder_pred.weight.dtype == torch.float16
    assert torch.equal(half.model.backbone.net.conv_stem.weight, scorer.model.backbone.net.conv_stem.weight)
    out = export_onnx(feature_bundle, tmp_path / "f16.onnx", fp16=True)
    assert json.loads((tmp_path / "f16.onnx.meta.json").read_text())["precision"] == "fp16"
    x = np.random.default_rng(5).random((2, 3, 64, 64), dtype=np.float32)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    _, score = sess.run(None, {sess.get_inputs()[0].name: x})
    with torch.no_grad():
        want = scorer(torch.from_numpy(x))[1].numpy()
    assert np.allclose(score, want, rtol=0.05, atol=0.05)


def test_recalibrate_without_knn_and_back(feature_bundle, synthetic_data, tmp_path) -> None:
    """`mae-ad calibrate` can switch the kNN term off (scores change) on a trained feature bundle."""
    from mae_ad.bundle import load_scorer
    from mae_ad.calibrate import recalibrate

    out = recalibrate(feature_bundle, synthetic_data, tmp_path / "noknn", ["scoring.knn_weight=0"])
    a, _, _ = load_scorer(feature_bundle)
    b, _, _ = load_scorer(out)
    assert b.knn_weight == 0 and "knn_bank" not in b.calibration_tensors()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(a(x)[1], b(x)[1])


def test_balanced_fusion_scales_each_term_by_its_held_back_spread(feature_bundle, synthetic_data, tmp_path) -> None:
    """scoring.fusion=balanced (`mae-ad calibrate --set`, no retraining): each z-map is divided by the std of its
    image score over the held-back normal images, so both terms have unit spread there and the fused map is their
    scaled sum; the threshold is taken on the fused scores of the same images; the graph exports with parity."""
    import json

    import onnxruntime as ort

    from mae_ad.bundle import load_scorer
    from mae_ad.calibrate import recalibrate
    from mae_ad.data import load_stack
    from trt.export import export_onnx

    out = recalibrate(feature_bundle, synthetic_data, tmp_path / "bal", ["scoring.fusion=balanced"])
    scorer, cal, _ = load_scorer(out, require_calibration=True)
    assert scorer.balanced and "fuse_scale" in scorer.calibration_tensors()
    assert cal["fusion"] == "balanced" and cal["fusion_scale_knn"] == pytest.approx(float(scorer.fuse_scale[1]))
    held = torch.from_numpy(load_stack([Path(synthetic_data) / h for h in cal["holdout_images"]], 64))
    with torch.no_grad():
        recon, knn = scorer.fusion_terms(held)
        amap, score = scorer(held)
    for j, term in enumerate((recon, knn)):  # unit spread of each term's image score on the held-back normals
        assert float((term.flatten(1).amax(1) / scorer.fuse_scale[j]).std()) == pytest.approx(1.0, rel=1e-4)
    fused = recon / scorer.fuse_scale[0] + scorer.knn_weight * knn / scorer.fuse_scale[1]
    assert torch.allclose(amap, fused, atol=1e-5)
    assert cal["threshold"] == pytest.approx(float(score.max()), rel=1e-5)  # 4 images, FPR 0.01: their maximum
    # a plain-sum bundle is unchanged by the option's existence (its calibration has no fuse_scale)
    plain, _, _ = load_scorer(feature_bundle)
    assert "fuse_scale" not in plain.calibration_tensors() and not plain.balanced
    onnx_path = export_onnx(out, tmp_path / "bal.onnx")  # verify=True: ORT parity with torch or it fails
    x = np.random.default_rng(4).random((2, 3, 64, 64), dtype=np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    _, o_score = sess.run(None, {sess.get_inputs()[0].name: x})
    with torch.no_grad():
        assert np.allclose(o_score, scorer(torch.from_numpy(x))[1].numpy(), rtol=1e-3, atol=1e-3)
    assert json.loads((tmp_path / "bal.onnx.meta.json").read_text())["threshold"] == pytest.approx(cal["threshold"])


def test_inverse_variance_fusion_divides_each_term_by_its_held_back_variance(feature_bundle, synthetic_data,
                                                                              tmp_path) -> None:
    """scoring.fusion=inverse_variance: each z-map is divided by the variance of its image score over the held-back
    normal images, the square of what balanced divides by on the same images, so the noisier term counts for less;
    the fused map is what the graph computes and the threshold is taken on it."""
    from mae_ad.bundle import load_scorer
    from mae_ad.calibrate import recalibrate
    from mae_ad.data import load_stack

    bal, _, _ = load_scorer(recalibrate(feature_bundle, synthetic_data, tmp_path / "bal", ["scoring.fusion=balanced"]))
    out = recalibrate(feature_bundle, synthetic_data, tmp_path / "iv", ["scoring.fusion=inverse_variance"])
    scorer, cal, _ = load_scorer(out, require_calibration=True)
    assert cal["fusion"] == "inverse_variance" and "fuse_scale" in scorer.calibration_tensors()
    assert torch.allclose(scorer.fuse_scale, bal.fuse_scale**2, rtol=1e-4)
    assert cal["fusion_spread_knn"] == pytest.approx(float(bal.fuse_scale[1]), rel=1e-4)
    held = torch.from_numpy(load_stack([Path(synthetic_data) / h for h in cal["holdout_images"]], 64))
    with torch.no_grad():
        recon, knn = scorer.fusion_terms(held)
        amap, score = scorer(held)
    for j, term in enumerate((recon, knn)):  # a term's held-back spread after the division is 1 / its spread
        spread = float(term.flatten(1).amax(1).std())
        assert float((term.flatten(1).amax(1) / scorer.fuse_scale[j]).std()) == pytest.approx(1 / spread, rel=1e-4)
    assert torch.allclose(amap, recon / scorer.fuse_scale[0] + scorer.knn_weight * knn / scorer.fuse_scale[1],
                          atol=1e-5)
    assert cal["threshold"] == pytest.approx(float(score.max()), rel=1e-5)
    # what evaluate's metrics.json and report.md say the score is made of: both terms and these divisors
    from mae_ad.config import config_from_dict, read_yaml
    from mae_ad.evaluate import _scoring_line, scoring_summary

    cells = int(scorer.knn_bank.shape[0])
    summary = scoring_summary(config_from_dict(read_yaml(out / "config.yaml"), "config.yaml"), cal, cells)
    assert summary["fusion"] == "inverse_variance" and len(summary["terms"]) == 2 and "kNN" in summary["terms"][1]
    assert summary["knn"] == {"weight": scorer.knn_weight, "memory_cells": cells}
    assert f"kNN memory of {cells} cells" in summary["terms"][1]
    assert summary["fusion_divisors"] == pytest.approx({"reconstruction": float(scorer.fuse_scale[0]),
                                                        "knn": float(scorer.fuse_scale[1])}, rel=1e-6)
    d_r, d_k = (f"{float(v):.4g}" for v in scorer.fuse_scale)
    assert f"map = z_rec / {d_r} + {scorer.knn_weight:g} x z_knn / {d_k};" in _scoring_line(summary)


def test_weighted_fusion_without_two_z_maps_is_refused() -> None:
    from mae_ad.config import load_config
    from mae_ad.contract import UserError

    for mode in ("balanced", "inverse_variance"):
        with pytest.raises(UserError, match=f"scoring.fusion={mode} needs two maps"):
            load_config(None, [f"scoring.fusion={mode}"])


@pytest.mark.parametrize("override, message", [
    ("scoring.knn_weight=1", "scoring.knn_weight > 0 needs feature tokens: set model.backbone"),
    ("scoring.fusion=balanced", "scoring.fusion=balanced needs two maps in z-score units"),
])
def test_pixel_model_refuses_feature_options(override, message, tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "app.cli", "validate-config", "configs/tiny-p8.yaml", "--set",
                        override], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("override, message", [
    ("scoring.ssim_weight=0.5", "scoring.ssim_weight: a pixel-space option"),
    ("model.gmm_components=2", "gmm_components: a pixel-space option"),
    ("model.backbone.local=2", "model.backbone: local: 2 must be odd"),
    ("model.img_size=60", "img_size 60 is not a multiple of backbone.stride x patch_size"),
    ("model.backbone.layers=[2,7]", "layers: 7 is not a feature level of efficientnet_lite0; it has 0-4"),
])
def test_feature_model_refuses_bad_keys(override, message, lite_weights) -> None:
    cmd = [sys.executable, "-m", "app.cli", "validate-config", "configs/tiny-p8.yaml"]
    for o in [*feature_overrides(lite_weights), override]:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bad_backbone_at_train_time_writes_nothing(synthetic_data, tmp_path) -> None:
    """A backbone file of another architecture and a layer that does not exist: one error line, exit 2, no bundle
    and no run folder."""
    import timm

    wrong = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), wrong)
    for extra, message in ((["model.backbone.weights=" + str(wrong)], "r18.pth: not weights of efficientnet_lite0"),
                           (["model.backbone.layers=[2,7]"], "model.backbone: layers: 7 is not a feature level")):
        out = tmp_path / f"b{len(message)}"
        cmd = [sys.executable, "-m", "app.cli", "train", "--data", str(synthetic_data), "--out", str(out)]
        for o in [*feature_overrides(wrong), *extra]:
            cmd += ["--set", o]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not out.exists() and not Path(str(out) + ".run").exists()


def test_perceptual_error_for_pixel_space(tmp_path) -> None:
    """scoring.perceptual_weight: (1 - w) * pixel error + w * the squared difference of the perceptual CNN's
    standardised features of the input and of its K-mask reconstruction; w = 1 ignores pixels. Exported whole,
    with ONNX Runtime parity and inside TensorRT's op matrix."""
    import onnx

    from mae_ad.bundle import save_bundle
    from mae_ad.config import load_config
    from mae_ad.model import build_model
    from mae_ad.scoring import Scorer, calibrate
    from trt.export import export_onnx
    from trt.opcheck import check_graph

    over = [*tiny_overrides(64, 8), "model.perceptual.name=efficientnet_lite0", "model.perceptual.layers=[1,2]",
            "model.perceptual.stride=8", "scoring.sigma=0"]
    torch.manual_seed(0)
    cfg = load_config(None, [*over, "scoring.perceptual_weight=1.0"])
    model = build_model(cfg.model).eval()
    pure = Scorer(model, cfg.scoring, cfg.data).eval()
    plain = Scorer.from_config(model, load_config(None, over)).eval()
    half_cfg = load_config(None, [*over, "scoring.perceptual_weight=0.5"])
    half = Scorer.from_config(model, half_cfg).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        rec = pure.reconstruction(x)
        cnn = model.perceptual
        want = ((cnn(rec) - cnn(x)) ** 2).mean(dim=1, keepdim=True)
        want = torch.nn.functional.interpolate(want, size=(64, 64), mode="bilinear", align_corners=False)
        got = pure.raw_map(x)
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(half.raw_map(x), 0.5 * plain.raw_map(x) + 0.5 * want, atol=1e-5)
    cal = calibrate(half, torch.rand(4, 3, 64, 64), target_fpr=0.2)
    b = save_bundle(tmp_path / "perc", model, half_cfg, cal, scorer=half)
    out = export_onnx(b, tmp_path / "perc.onnx")  # fails unless ONNX Runtime matches torch to 1e-4
    assert not [r.op for r in check_graph(onnx.load(str(out))) if r.status == "unsupported"]


def test_perceptual_weight_needs_a_perceptual_backbone() -> None:
    r = subprocess.run([sys.executable, "-m", "app.cli", "validate-config", "configs/tiny-p8.yaml", "--set",
                        "scoring.perceptual_weight=0.5"], capture_output=True, text=True)
    assert r.returncode == 2 and "scoring.perceptual_weight > 0 needs model.perceptual" in r.stderr


def test_resumed_feature_run_matches_the_uninterrupted_one(synthetic_data, lite_weights, tmp_path, monkeypatch):
    """A resumed feature-space run restores the backbone before its tokens are cached: its weights end identical
    to an uninterrupted run's (tokens from a fresh, random backbone would make them differ)."""
    from safetensors.torch import load_file

    from mae_ad.config import load_config
    from mae_ad.train import run_dir_for, run_training

    sets_ = [*feature_overrides(lite_weights, knn=0.0), "train.epochs=2", "train.checkpoint_every=1",
             "train.lr=1e-3", "scoring.normalize=none", "calibration.stats_source=holdout"]
    cfg = load_config(None, sets_)
    full = run_training(cfg, synthetic_data, tmp_path / "full")
    undo = crash_after_checkpoint(monkeypatch, 1)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, synthetic_data, out)
    undo()
    run_training(cfg, synthetic_data, out, resume=run_dir_for(out))
    a, b = load_file(str(full / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("backbone.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed feature run differs from the uninterrupted one"
