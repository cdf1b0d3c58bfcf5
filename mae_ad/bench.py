"""Throughput on this machine, as a fraction of the best fp32 GEMM any installed engine reaches in the same run.

    mae-ad bench all --presets tiny-p8,small-p8 --seconds 5 --out bench_out/bench.json

- ceiling (the "peak"): FLOP/s of a 2048^3 fp32 GEMM through torch, ONNX Runtime (a one-node MatMul graph) and
  numpy's BLAS, at the start and the end of the run; the best figure of any engine is what every fraction divides
  by. Reported beside it: bf16 (torch, only where the CPU has native bf16), int8 (ONNX Runtime MatMulInteger)
  and the CPU's ISA flags from /proc/cpuinfo (avx2, avx512f, avx512_vnni, avx_vnni, avx512_bf16, amx_*);
- scoring: images/s of `Scorer` (K-mask, one batched pass) at batch 1 and 8 under torch.inference_mode, and the
  FLOP/s that reaches (`model.scoring_flops`, checked against torch.utils.flop_counter);
- training: images/s of a full step (forward, backward, AdamW) at batch 8, FLOP/s from `model.training_flops`;
- levers (what=levers or all): the same scoring measurement with one setting changed at a time (threads, fused
  attention off, no_grad instead of inference_mode, bf16 autocast, torch.compile).
Timing figures belong here and in BENCHMARKS.md, never in tests.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from .config import Config, load_config
from .contract import UserError
from .model import build_model, scoring_flops, training_flops
from .precision import cpu_isa_flags, native_bf16
from .scoring import Scorer

log = logging.getLogger(__name__)
LEVER_BATCH = 1  # levers are compared at batch 1 to keep `bench all` to a few minutes on a 2-core CPU


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Switch timm attention to its explicit matmul path (FlopCounterMode does not count CPU fused SDPA)."""
    mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
    old = [m.fused_attn for m in mods]
    for m in mods:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, o in zip(mods, old, strict=True):
            m.fused_attn = o


def counted_flops(fn: Callable[[], Any], model: nn.Module) -> float:
    """FLOPs of `fn()` as torch.utils.flop_counter counts them (matmuls, convolutions, their backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with unfused_attention(model), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def time_it(fn: Callable[[], Any], seconds: float, min_reps: int = 1) -> tuple[float, int]:
    """Seconds per call (after one warm-up call), over at least `min_reps` calls and about `seconds` of wall time."""
    fn()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        elapsed = time.perf_counter() - t0
        if reps >= min_reps and elapsed >= seconds:
            return elapsed / reps, reps


def preset_config(preset: str) -> Config:
    """A preset name, or a model config file (`.yaml`) such as configs/magnetic-tile.yaml."""
    if preset.endswith((".yaml", ".yml")):
        return load_config(preset)
    try:
        return load_config(None, [f"model.preset={preset}"])
    except UserError:
        raise
    except Exception as e:  # pragma: no cover
        raise UserError(f"--presets {preset!r}: {e}") from None


def ready_scorer(cfg: Config) -> Scorer:
    """A randomly initialised scorer of `cfg` with everything scoring touches in place (a full kNN memory)."""
    torch.manual_seed(0)
    scorer = Scorer(build_model(cfg.model), cfg.scoring, cfg.data).eval()
    if scorer.knn_weight > 0:
        scorer.set_knn_memory(torch.randn(cfg.scoring.knn_memory, scorer.model.token_chans))
    return scorer


def estimated_scoring_flops(cfg: Config, scorer: Scorer) -> float:
    """FLOPs to score one image: the MAE (`model.scoring_flops`), plus in feature space the frozen backbone
    (counted: a CNN's FLOPs are its convolutions) and the kNN distance MatMul (2 * cells * memory * channels)."""
    model = scorer.model
    total = scoring_flops(cfg.model, cfg.scoring.num_masks, model.token_chans)
    if model.backbone is not None:
        x = torch.rand(1, 3, cfg.model.img_size, cfg.model.img_size)
        with torch.no_grad():
            total += counted_flops(lambda: model.backbone(x), model.backbone)
        if scorer.knn_weight > 0:
            total += 2.0 * model.num_patches * scorer.knn_bank.shape[0] * model.token_chans
    return total


def bench_scoring(cfg: Config, batch: int, seconds: float, inference_mode: bool = True, bf16: bool = False,
                  compile_model: bool = False, fused: bool = True) -> dict[str, Any]:
    scorer = ready_scorer(cfg)
    x = torch.rand(batch, 3, cfg.model.img_size, cfg.model.img_size)
    fn: Callable[[torch.Tensor], Any] = torch.compile(scorer) if compile_model else scorer
    grad_ctx = torch.inference_mode if inference_mode else torch.no_grad

    def call() -> None:
        with grad_ctx(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fn(x)

    if fused:
        per, reps = time_it(call, seconds)
    else:
        with unfused_attention(scorer):
            per, reps = time_it(call, seconds)
    flops = estimated_scoring_flops(cfg, scorer) * batch
    return {"batch": batch, "seconds_per_batch": per, "reps": reps, "images_per_s": batch / per,
            "flop_per_image": flops / batch, "flops_per_s": flops / per}


def bench_training(cfg: Config, batch: int, seconds: float, bf16: bool = False) -> dict[str, Any]:
    """One optimizer step (forward at train.mask_ratio, backward, AdamW) per repetition; `bf16`: under bf16
    autocast, as `train.precision: bf16` trains."""
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    side = cfg.model.token_side  # model space: normalised pixels, or cached feature tokens
    x = torch.randn(batch, model.token_chans, side, side)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = model(x, cfg.train.mask_ratio)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    per, reps = time_it(step, seconds)
    flops = training_flops(cfg.model, cfg.train.mask_ratio, model.token_chans) * batch
    return {"batch": batch, "seconds_per_step": per, "reps": reps, "images_per_s": batch / per,
            "flop_per_image": flops / batch, "flops_per_s": flops / per}


def check_flop_estimates(cfg: Config, batch: int = 1) -> dict[str, float]:
    """The analytic scoring/training FLOPs next to what FlopCounterMode counts on the real modules."""
    scorer = ready_scorer(cfg)
    model = scorer.model
    x = torch.rand(batch, 3, cfg.model.img_size, cfg.model.img_size)
    with torch.no_grad():
        counted_score = counted_flops(lambda: scorer(x), scorer) / batch
    model.train()
    side = cfg.model.token_side
    xt = torch.randn(2 * batch, model.token_chans, side, side)  # model space

    def train_step() -> None:
        loss, _, _ = model(xt, cfg.train.mask_ratio)
        loss.backward()

    counted_train = counted_flops(train_step, model) / (2 * batch)
    return {"scoring_estimate": estimated_scoring_flops(cfg, scorer), "scoring_counted": counted_score,
            "training_estimate": training_flops(cfg.model, cfg.train.mask_ratio, model.token_chans),
            "training_counted": counted_train}


def _levers(cfg: Config, seconds: float, batch: int, peak: float, emit: Callable[[str], None]
            ) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    variants: list[tuple[str, dict[str, Any], int]] = [
        ("default (inference_mode, fused SDPA)", {}, threads),
        ("torch.no_grad instead of inference_mode", {"inference_mode": False}, threads),
        ("fused SDPA off (explicit softmax attention)", {"fused": False}, threads),
        ("1 thread", {}, 1),
        ("bf16 autocast", {"bf16": True}, threads),
        ("torch.compile", {"compile_model": True}, threads),
    ]
    for name, kw, n in variants:
        torch.set_num_threads(n)
        try:
            r = bench_scoring(cfg, batch, seconds, **kw)
            r.update(lever=name, fraction_of_peak=r["flops_per_s"] / peak)
        except Exception as e:  # torch.compile needs a C++ toolchain; report instead of failing the bench
            r = {"lever": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        finally:
            torch.set_num_threads(threads)
        rows.append(r)
        emit(_lever_line(r))
    return rows


def _row_line(r: dict[str, Any]) -> str:
    frac = f"{r['fraction_of_peak']:>7.1%}" if "fraction_of_peak" in r else "      -"
    return (f"{r['preset']:<10} {r['what']:<10} {r['batch']:>5} {r['images_per_s']:>8.3f} "
            f"{r['flop_per_image'] / 1e9:>10.2f} {r['flops_per_s'] / 1e9:>8.1f} {frac}")


def _lever_line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"lever {r['lever']:<45} failed: {r['error']}"
    return f"lever {r['lever']:<45} {r['images_per_s']:>7.3f} img/s {r['fraction_of_peak']:>7.1%}"


def _check_line(c: dict[str, Any]) -> str:
    tiled = c.get("per") == "tile"
    return (f"FLOP estimate vs counter ({c['preset']}): scoring {c['scoring_estimate'] / 1e9:.2f} vs "
            f"{c['scoring_counted'] / 1e9:.2f} GFLOP, training {c['training_estimate'] / 1e9:.2f} vs "
            f"{c['training_counted'] / 1e9:.2f} GFLOP per {c.get('per', 'image')}"
            + (" (data.resize=tile: an image is several tiles; its img/s and GFLOP/img figures are per tile)"
               if tiled else ""))


HEADER = f"{'preset':<10} {'what':<10} {'batch':>5} {'img/s':>8} {'GFLOP/img':>10} {'GFLOP/s':>8} {'of peak':>8}"


def format_table(res: dict[str, Any]) -> str:
    lines = [format_ceiling(res["ceiling"])] if "ceiling" in res else []
    lines += [f"peak (best fp32 GEMM, 2048^3): {res['peak_flops_per_s'] / 1e9:.1f} GFLOP/s "
              f"(start {res['peak_start'] / 1e9:.1f}, end {res['peak_end'] / 1e9:.1f}); threads {res['threads']}",
              HEADER]
    lines += [_row_line(r) for r in res["rows"]]
    lines += [_check_line(c) for c in res.get("flop_checks", [])]
    lines += [_lever_line(r) for r in res.get("levers", [])]
    return "\n".join(lines)


def _model_input(cfg: Config) -> str:
    """What one bench item is: a whole image, or (data.resize=tile) one model-size tile of an image."""
    return "tile" if cfg.data.resize == "tile" else "image"


def run_bench(what: str, presets: list[str], out: str | os.PathLike[str] | None, seconds: float,
              stream: TextIO | None = None) -> dict[str, Any]:
    """Measure and report; writes the table to `stream` (stdout) and the results as JSON to `out`."""
    if what not in ("scoring", "train", "levers", "all"):
        raise UserError(f"bench {what!r}: expected scoring, train, levers or all")
    if seconds <= 0:
        raise UserError(f"--seconds {seconds}: must be positive")
    cfgs = {p: preset_config(p) for p in presets}
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.is_dir():
        raise UserError(f"{out_path}: is a directory; --out takes a JSON file path")
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                           "machine": {"cpu": _cpu_name(), "isa_flags": cpu_isa_flags(), "cores": os.cpu_count(), "python": platform.python_version(),
                                       "torch": torch.__version__},
                           "threads": torch.get_num_threads(), "seconds": seconds, "rows": []}
    stream = stream or sys.stdout

    def emit(line: str) -> None:  # progress as it is measured; the summary table comes at the end
        stream.write(line + "\n")
        stream.flush()

    ceiling_start = gemm_ceiling(seconds)
    peak_start = ceiling_start["best_fp32"]["ops_per_s"]
    emit(format_ceiling(ceiling_start))
    emit(f"peak at start: {peak_start / 1e9:.1f} GFLOP/s ({res['threads']} threads)")
    res["flop_checks"] = []
    for p, c in cfgs.items():
        res["flop_checks"].append({"preset": p, **check_flop_estimates(c), "per": _model_input(c)})
        emit(_check_line(res["flop_checks"][-1]))
    emit(HEADER)
    for preset, cfg in cfgs.items():
        per = _model_input(cfg)
        if what in ("scoring", "all"):
            for batch in (1, 8):
                res["rows"].append({"preset": preset, "what": "scoring", "per": per,
                                    **bench_scoring(cfg, batch, seconds)})
                res["rows"][-1]["fraction_of_peak"] = res["rows"][-1]["flops_per_s"] / peak_start
                emit(_row_line(res["rows"][-1]))
        if what in ("train", "all"):
            res["rows"].append({"preset": preset, "what": "training", "per": per,
                                **bench_training(cfg, 8, seconds)})
            res["rows"][-1]["fraction_of_peak"] = res["rows"][-1]["flops_per_s"] / peak_start
            emit(_row_line(res["rows"][-1]))
            if native_bf16(ceiling_start["flags"]):  # what train.precision=auto trains with on this CPU
                res["rows"].append({"preset": preset, "what": "train-bf16", "per": per,
                                    **bench_training(cfg, 8, seconds, bf16=True)})
                res["rows"][-1]["fraction_of_peak"] = res["rows"][-1]["flops_per_s"] / peak_start
                emit(_row_line(res["rows"][-1]))
    ceiling_end = gemm_ceiling(seconds, flags=ceiling_start["flags"])
    ceiling = merge_ceilings(ceiling_start, ceiling_end)  # the box is shared: each engine's better figure counts
    peak_end, peak = ceiling_end["best_fp32"]["ops_per_s"], ceiling["best_fp32"]["ops_per_s"]
    res.update(peak_start=peak_start, peak_end=peak_end, peak_flops_per_s=peak, ceiling=ceiling)
    for r in res["rows"]:
        r["fraction_of_peak"] = r["flops_per_s"] / peak
    if what in ("levers", "all"):
        emit(f"levers: {presets[0]} scoring at batch {LEVER_BATCH}, one setting changed at a time")
        res["levers"] = _levers(cfgs[presets[0]], seconds, LEVER_BATCH, peak, emit)
    emit("\nsummary (fractions against the best fp32 GEMM of any engine, start or end)\n" + format_table(res))
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, out_path)
    return res


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---- the ceiling: the best GEMM throughput any installed engine reaches on this CPU ------------------------------

def _torch_gemm(n: int, dtype: torch.dtype) -> Callable[[], Any]:
    a, b = torch.rand(n, n).to(dtype), torch.rand(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    return lambda: torch.matmul(a, b, out=out)


def _numpy_gemm(n: int) -> Callable[[], Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    return lambda: np.matmul(a, b, out=out)


def _ort_gemm(n: int, int8: bool, threads: int) -> Callable[[], Any]:
    """A one-node ONNX graph (MatMul, or MatMulInteger u8 x s8 -> int32 for int8) run by ONNX Runtime's CPU
    provider with `threads` intra-op threads; both operands are graph inputs so nothing is folded away."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    ta, tb, to = ((TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32) if int8
                  else (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT))
    node = helper.make_node("MatMulInteger" if int8 else "MatMul", ["A", "B"], ["C"])
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", ta, [n, n]),
                                               helper.make_tensor_value_info("B", tb, [n, n])],
                              [helper.make_tensor_value_info("C", to, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.17
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds: dict[str, Any]
    if int8:
        feeds = {"A": rng.integers(0, 255, (n, n), dtype=np.uint8), "B": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    else:
        feeds = {"A": rng.random((n, n), dtype=np.float32), "B": rng.random((n, n), dtype=np.float32)}
    binding = sess.io_binding()  # inputs bound once: the timed call is the GEMM, not a copy of its operands
    for k, v in feeds.items():
        binding.bind_cpu_input(k, v)
    binding.bind_output("C")
    return lambda: sess.run_with_iobinding(binding)


def gemm_ceiling(seconds: float, n: int = 2048, flags: list[str] | None = None,
                 engines: tuple[str, ...] = ("torch", "onnxruntime", "numpy")) -> dict[str, Any]:
    """Throughput of an n x n x n GEMM (2 n^3 ops) per engine and precision, in ops/s, measured here for about
    `seconds` each. Returns {"n", "flags", "entries": [{"engine", "dtype", "ops_per_s"} or {..., "skipped"}],
    "best_fp32": {"engine", "ops_per_s"}}: the best fp32 figure over every engine is the ceiling that fractions
    of peak divide by. bf16 (torch) is measured only where the CPU has native bf16; int8 (ONNX Runtime
    MatMulInteger, u8 x s8) wherever ONNX Runtime is installed. An engine that is not installed is `skipped`."""
    flags = cpu_isa_flags() if flags is None else flags
    threads = torch.get_num_threads()
    runs: list[tuple[str, str, Callable[[], Callable[[], Any]]]] = []
    if "torch" in engines:
        runs.append(("torch", "fp32", lambda: _torch_gemm(n, torch.float32)))
    if "onnxruntime" in engines:
        runs.append(("onnxruntime", "fp32", lambda: _ort_gemm(n, False, threads)))
    if "numpy" in engines:
        runs.append(("numpy", "fp32", lambda: _numpy_gemm(n)))
    if "torch" in engines:
        runs.append(("torch", "bf16", lambda: _torch_gemm(n, torch.bfloat16)))
    if "onnxruntime" in engines:
        runs.append(("onnxruntime", "int8", lambda: _ort_gemm(n, True, threads)))
    entries: list[dict[str, Any]] = []
    for engine, dtype, make in runs:
        row: dict[str, Any] = {"engine": engine, "dtype": dtype}
        if dtype == "bf16" and not native_bf16(flags):
            row["skipped"] = "no native bf16 (avx512_bf16 or amx_bf16) on this CPU"
        else:
            try:
                per, _ = time_it(make(), seconds, min_reps=3)
                row["ops_per_s"] = 2.0 * n**3 / per
            except ImportError as e:
                row["skipped"] = f"not installed ({e.name})"
        entries.append(row)
    fp32 = [e for e in entries if e["dtype"] == "fp32" and "ops_per_s" in e]
    if not fp32:
        raise RuntimeError("no engine measured an fp32 GEMM")
    best = max(fp32, key=lambda e: e["ops_per_s"])
    return {"n": n, "threads": threads, "flags": flags, "entries": entries,
            "best_fp32": {"engine": best["engine"], "ops_per_s": best["ops_per_s"]}}


def merge_ceilings(*ceilings: dict[str, Any]) -> dict[str, Any]:
    """The best of several measurements of the same ceiling (the box is shared: the better figure of each engine
    is the closer to what it can do)."""
    out = {**ceilings[0], "entries": [dict(e) for e in ceilings[0]["entries"]]}
    for c in ceilings[1:]:
        for e, f in zip(out["entries"], c["entries"], strict=True):
            if "ops_per_s" in f and f["ops_per_s"] > e.get("ops_per_s", 0.0):
                e["ops_per_s"] = f["ops_per_s"]
    best = max((e for e in out["entries"] if e["dtype"] == "fp32" and "ops_per_s" in e), key=lambda e: e["ops_per_s"])
    out["best_fp32"] = {"engine": best["engine"], "ops_per_s": best["ops_per_s"]}
    return out


def format_ceiling(c: dict[str, Any]) -> str:
    """The ceiling block of the report: one line per engine and precision, the ISA flags, the best fp32."""
    lines = [f"ceiling: {c['n']}^3 GEMM per engine ({c['threads']} threads); CPU flags: "
             f"{' '.join(c['flags']) or 'unknown'}"]
    for e in c["entries"]:
        unit = "GOP/s " if e["dtype"] == "int8" else "GFLOP/s"
        fig = f"{e['ops_per_s'] / 1e9:>8.1f} {unit}" if "ops_per_s" in e else f"skipped: {e['skipped']}"
        lines.append(f"  {e['engine']:<12} {e['dtype']:<5} {fig}")
    lines.append(f"  best fp32: {c['best_fp32']['ops_per_s'] / 1e9:.1f} GFLOP/s ({c['best_fp32']['engine']}); "
                 "every 'of peak' divides by this")
    return "\n".join(lines)
