"""The FLOP estimates behind the benchmark fractions agree with torch's FLOP counter (no timing asserts)."""

from __future__ import annotations

import pytest

from mae_ad.bench import check_flop_estimates, unfused_attention
from mae_ad.config import load_config
from mae_ad.model import build_model

from .conftest import tiny_overrides


@pytest.mark.parametrize("extra", [[], ["model.lora.mlp=true", "model.lora.rank=8"], ["model.lora.rank=0"],
                                   ["model.lora.where=decoder", "train.mask_ratio=0.5", "scoring.num_masks=2"],
                                   ["model.in_chans=1"]])
def test_flop_estimates_match_flop_counter(extra):
    c = check_flop_estimates(load_config(None, tiny_overrides() + ["scoring.sigma=0"] + extra))
    assert c["training_estimate"] == pytest.approx(c["training_counted"], rel=0.01)
    assert c["scoring_estimate"] == pytest.approx(c["scoring_counted"], rel=0.01)


def test_unfused_attention_is_restored(tiny_cfg):
    model = build_model(tiny_cfg.model)
    attn = model.blocks[0].attn
    before = attn.fused_attn
    with unfused_attention(model):
        assert attn.fused_attn is False
    assert attn.fused_attn == before
