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


CPUINFO_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni clwb
"""
CPUINFO_AVX2 = "model name\t: Intel Core\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_isa_flags_and_native_bf16_from_cpuinfo():
    from mae_ad.bench import cpu_isa_flags, native_bf16

    epyc = cpu_isa_flags(CPUINFO_EPYC)
    assert epyc == ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"]
    assert native_bf16(epyc)
    avx2 = cpu_isa_flags(CPUINFO_AVX2)
    assert avx2 == ["avx2", "fma"] and not native_bf16(avx2)
    assert native_bf16(["amx_tile", "amx_bf16"])
    assert cpu_isa_flags("no flags here") == []


def test_gemm_ceiling_is_the_best_fp32_engine_and_skips_emulated_bf16():
    from mae_ad.bench import format_ceiling, gemm_ceiling, merge_ceilings

    c = gemm_ceiling(0.01, n=64, flags=["avx2"])  # no native bf16 declared: bf16 is not measured
    by = {(e["engine"], e["dtype"]): e for e in c["entries"]}
    assert {("torch", "fp32"), ("onnxruntime", "fp32"), ("numpy", "fp32"), ("torch", "bf16"),
            ("onnxruntime", "int8")} == set(by)
    assert "skipped" in by["torch", "bf16"] and "ops_per_s" not in by["torch", "bf16"]
    fp32 = [e["ops_per_s"] for e in c["entries"] if e["dtype"] == "fp32"]
    assert len(fp32) == 3 and all(f > 0 for f in fp32)
    assert c["best_fp32"]["ops_per_s"] == max(fp32)
    assert by["onnxruntime", "int8"]["ops_per_s"] > 0
    # a second measurement where one engine did better: the merged ceiling takes each engine's best
    worse = {**c, "entries": [dict(e) for e in c["entries"]]}
    better = {**c, "entries": [dict(e) for e in c["entries"]]}
    better["entries"][2]["ops_per_s"] = 10 * max(fp32)  # numpy
    m = merge_ceilings(worse, better)
    assert m["best_fp32"] == {"engine": "numpy", "ops_per_s": 10 * max(fp32)}
    text = format_ceiling(m)
    assert "CPU flags: avx2" in text and "skipped: no native bf16" in text and "best fp32" in text


def test_gemm_ceiling_measures_bf16_where_declared_native():
    from mae_ad.bench import gemm_ceiling

    c = gemm_ceiling(0.01, n=64, flags=["avx512_bf16"], engines=("torch",))
    bf16 = next(e for e in c["entries"] if e["dtype"] == "bf16")
    assert bf16["ops_per_s"] > 0 and c["best_fp32"]["engine"] == "torch"


def test_bench_train_adds_a_bf16_row_only_where_the_cpu_has_native_bf16(monkeypatch):
    """`mae-ad bench train` measures what train.precision=auto trains with: a bf16 row on a native-bf16 CPU."""
    import io

    import mae_ad.bench as B

    for flags, expect in ((["avx2"], ["training"]), (["avx2", "avx512_bf16"], ["training", "train-bf16"])):
        monkeypatch.setattr(B, "cpu_isa_flags", lambda f=flags: list(f))
        res = B.run_bench("train", ["tiny-p8"], None, 0.01, stream=io.StringIO())
        assert [r["what"] for r in res["rows"]] == expect
        assert all(r["images_per_s"] > 0 and r["fraction_of_peak"] > 0 for r in res["rows"])


def test_bench_says_when_a_tiled_config_is_measured_per_tile(tmp_path):
    """A data.resize=tile config scores tiles, not images: every row and the FLOP line say so."""
    import io

    import mae_ad.bench as B

    cfg = tmp_path / "tiled.yaml"
    cfg.write_text("model: {preset: tiny-p8, img_size: 32, patch_size: 4, depth: 1, decoder_depth: 1}\n"
                   "data: {resize: tile, tile: {scale: 1.25, overlap: 8}}\n")
    out = io.StringIO()
    res = B.run_bench("train", [str(cfg), "tiny-p8"], None, 0.01, stream=out)
    assert {r["preset"]: r["per"] for r in res["rows"]} == {str(cfg): "tile", "tiny-p8": "image"}
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("FLOP estimate vs counter")]
    assert "GFLOP per tile (data.resize=tile" in lines[0] and lines[1].endswith("GFLOP per image")
