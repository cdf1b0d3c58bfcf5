"""Training end to end: the CLI, loss going down, resume, refusals, and 2-process DDP on CPU."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mae_ad.config import load_config
from mae_ad.contract import UserError
from mae_ad.train import lr_at, param_groups, run_dir_for, run_training

from .conftest import crash_after_checkpoint, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
MAE_AD = Path(sys.executable).parent / "mae-ad"
FAST = ["train.batch_size=4", "train.tensorboard=false", "train.warmup_epochs=1"]


def sets(items: list[str]) -> list[str]:
    out: list[str] = []
    for s in items:
        out += ["--set", s]
    return out


def cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(MAE_AD), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- pieces ------------------------------------------------------------------------------------------------------
def test_lr_schedule_warms_up_then_decays_to_min():
    base, lo, total, warm = 1e-3, 1e-5, 100, 10
    lrs = [lr_at(s, total, warm, base, lo) for s in range(total)]
    assert lrs[0] == pytest.approx(base / warm) and lrs[9] == pytest.approx(base)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))  # rising during warm-up
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))  # falling after
    assert lrs[-1] == pytest.approx(lo, rel=0.05) and min(lrs) >= lo
    assert lr_at(55, total, warm, base, lo) == pytest.approx(lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_only_on_weight_matrices(tiny_cfg):
    from mae_ad.model import build_model

    model = build_model(tiny_cfg.model)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    dec = {names[id(p)] for p in decay["params"]}
    nod = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.lora_A", "decoder_pred.weight"} <= dec
    assert {"blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "cls_token", "mask_token", "norm.bias"} <= nod
    assert not dec & nod and len(dec) + len(nod) == sum(1 for _ in model.parameters())


# --- the CLI end to end --------------------------------------------------------------------------------------------
def test_cli_train_writes_calibrated_bundle_and_logs(synthetic_data, tmp_path):
    out = tmp_path / "bundle"
    r = cli("train", "--data", str(synthetic_data), "--out", str(out),
            *sets(tiny_overrides() + ["train.epochs=2", "train.batch_size=4", "train.log_every=1"]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(str(out))
    for name in ("weights.safetensors", "config.yaml", "meta.json", "calibration.json", "train_log.csv"):
        assert (out / name).is_file(), name
    cal = json.loads((out / "calibration.json").read_text())
    assert isinstance(cal["threshold"], float) and cal["threshold"] > 0 and cal["n_images"] == 4
    meta = json.loads((out / "meta.json").read_text())
    assert meta["training"]["epochs_done"] == 2 and meta["training"]["n_train_images"] == 12
    run = run_dir_for(out)
    rows = read_log(run / "train_log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))  # 12 images / batch 4 = 3 steps x 2 epochs
    assert set(rows[0]) == {"step", "epoch", "lr", "loss", "images_per_s"}
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoint.safetensors").is_file()
    # the bundle loads as a scorer that agrees with its calibration
    from mae_ad.bundle import load_scorer

    scorer, cal2, _ = load_scorer(out, require_calibration=True)
    assert cal2["threshold"] == cal["threshold"]


def test_existing_bundle_dir_is_refused_and_untouched(synthetic_data, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = cli("train", "--data", str(synthetic_data), "--out", str(out), *sets(tiny_overrides() + ["train.epochs=1"]))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(out) in err[0] and "Traceback" not in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert not run_dir_for(out).exists()  # refused before anything was started


def test_a_file_where_the_run_folder_goes_is_refused_and_untouched(synthetic_data, tmp_path):
    """`OUT.run` is training's log/checkpoint folder; a file of that name (say, a log redirected there) is a user
    error before any work, not a traceback, and the file is kept."""
    out = tmp_path / "bundle"
    log = run_dir_for(out)
    log.write_text("my shell log")
    r = cli("train", "--data", str(synthetic_data), "--out", str(out), *sets(tiny_overrides() + ["train.epochs=1"]))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(log) in err[0] and "not a folder" in err[0]
    assert log.read_text() == "my shell log" and not out.exists()


def test_missing_data_folder_is_one_line_error(tmp_path):
    data, out = tmp_path / "data", tmp_path / "bundle"
    r = cli("train", "--data", str(data), "--out", str(out), *sets(tiny_overrides()))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(data) in err[0]
    assert not out.exists() and not run_dir_for(out).exists()


@pytest.mark.parametrize("case", ["empty", "no-images"])
def test_empty_data_folder_is_a_user_error(tmp_path, case):
    data, out = tmp_path / "data", tmp_path / "bundle"
    data.mkdir()
    if case == "no-images":
        (data / "train" / "good").mkdir(parents=True)
    with pytest.raises(UserError) as e:
        run_training(load_config(None, tiny_overrides()), data, out)
    msg = str(e.value)
    assert "\n" not in msg and str(data) in msg
    assert not out.exists() and not run_dir_for(out).exists()


# --- learning -----------------------------------------------------------------------------------------------------
def test_loss_decreases_over_epochs(synthetic_data, tmp_path):
    cfg = load_config(None, tiny_overrides() + FAST + ["train.epochs=30", "train.lr=2e-3", "train.log_every=1000"])
    out = run_training(cfg, synthetic_data, tmp_path / "b")
    t = json.loads((out / "meta.json").read_text())["training"]
    assert t["epochs_done"] == 30 and t["optimizer_steps"] == 90
    assert t["last_epoch_loss"] < 0.7 * t["first_epoch_loss"], t


def test_max_minutes_stops_cleanly_and_still_writes_bundle(synthetic_data, tmp_path):
    cfg = load_config(None, tiny_overrides() + FAST + ["train.epochs=100000", "train.max_minutes=0.0001"])
    out = run_training(cfg, synthetic_data, tmp_path / "b")
    t = json.loads((out / "meta.json").read_text())["training"]
    assert t["stopped_early"] is True and t["epochs_done"] < 100000
    assert "threshold" in json.loads((out / "calibration.json").read_text())
    info = json.loads((run_dir_for(out) / "checkpoint.json").read_text())
    assert info["stopped_early"] is True and info["step"] == t["optimizer_steps"]


def test_resume_continues_and_matches_uninterrupted_run(synthetic_data, tmp_path, monkeypatch):
    sets_ = tiny_overrides() + FAST + ["train.epochs=4", "train.checkpoint_every=2", "train.log_every=1",
                                       "train.lr=1e-3", "train.accum_iter=2"]
    cfg = load_config(None, sets_)
    full = run_training(cfg, synthetic_data, tmp_path / "full")

    # Interrupted run: crash right after the epoch-2 checkpoint.
    undo = crash_after_checkpoint(monkeypatch, 2)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, synthetic_data, out)
    undo()
    assert not out.exists()  # no half bundle
    run = run_dir_for(out)
    info = json.loads((run / "checkpoint.json").read_text())
    assert info["epoch"] == 2 and info["step"] == 4  # 3 batches / accum 2 -> 2 steps per epoch

    # A fresh run into the same place is refused (it would clobber the checkpoint); --resume continues it.
    with pytest.raises(UserError, match="--resume"):
        run_training(cfg, synthetic_data, out)
    changed = load_config(None, sets_ + ["train.lr=5e-4"])
    with pytest.raises(UserError, match="train.lr"):
        run_training(changed, synthetic_data, out, resume=run)
    run_training(cfg, synthetic_data, out, resume=run)

    steps = [int(r["step"]) for r in read_log(run / "train_log.csv")]
    assert steps == list(range(1, 9))  # continued at step 5, not from 0
    meta = json.loads((out / "meta.json").read_text())["training"]
    assert meta["epochs_done"] == 4 and meta["optimizer_steps"] == 8 and meta["resumed_from"]
    a, b = load_file(str(full / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


# --- two processes ------------------------------------------------------------------------------------------------
def test_torchrun_two_processes_on_cpu(synthetic_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "app.cli", "train", "--data", str(synthetic_data), "--out", str(out),
           *sets(tiny_overrides() + FAST + ["train.epochs=2", "train.log_every=1"])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "weights.safetensors").is_file() and (out / "calibration.json").is_file()
    t = json.loads((out / "meta.json").read_text())["training"]
    assert t["world_size"] == 2 and t["effective_batch"] == 8
    hashes = t["rank_param_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]  # both ranks ended with identical weights
    # 12 images over 2 ranks of batch 4: 2 steps per epoch (each rank sees 6 images), logged once by rank 0
    steps = [int(r["step"]) for r in read_log(run_dir_for(out) / "train_log.csv")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuda: no CUDA device in this torch (training on a GPU)")
def test_training_on_cuda_with_mixed_masks(synthetic_data, tmp_path):
    """A run on the GPU with every mask mode the recipes use (mixed: random, block and lattice masks)."""
    cfg = load_config(None, tiny_overrides() + FAST + ["train.epochs=4", "train.mask_mode=mixed"])
    out = run_training(cfg, synthetic_data, tmp_path / "b")
    t = json.loads((out / "meta.json").read_text())["training"]
    assert t["epochs_done"] == 4 and math.isfinite(t["last_epoch_loss"])


@pytest.mark.parametrize("flags, setting, expect", [(["avx2", "fma"], "auto", "fp32"),
                                                     (["avx2", "avx512f", "avx512_bf16"], "auto", "bf16"),
                                                     (["avx2", "avx512f", "avx512_bf16"], "fp32", "fp32")])
def test_training_precision_follows_the_cpu_and_the_config(synthetic_data, tmp_path, monkeypatch, flags, setting,
                                                           expect):
    """train.precision=auto trains under bf16 autocast only where the CPU multiplies bf16 natively (issue 14): the
    linears of the training steps compute in that dtype, the record says so, weights stay fp32."""
    import mae_ad.precision as P

    monkeypatch.setattr(P, "cpu_isa_flags", lambda cpuinfo=None: list(flags))
    dtypes: set[torch.dtype] = set()

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear) and module.training and torch.is_tensor(output):
            dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        cfg = load_config(None, tiny_overrides() + FAST + ["train.epochs=1", f"train.precision={setting}"])
        out = run_training(cfg, synthetic_data, tmp_path / "b")
    finally:
        handle.remove()
    t = json.loads((out / "meta.json").read_text())["training"]
    assert t["precision"] == expect and math.isfinite(t["last_epoch_loss"])
    assert dtypes == {torch.bfloat16 if expect == "bf16" else torch.float32}
    assert {v.dtype for v in load_file(str(out / "weights.safetensors")).values()} == {torch.float32}


def test_legacy_bf16_key_reads_as_train_precision():
    assert load_config(None, ["train.bf16=true"]).train.precision == "bf16"
    assert load_config(None, ["train.bf16=false"]).train.precision == "fp32"
    with pytest.raises(UserError, match="disagree"):
        load_config(None, ["train.bf16=true", "train.precision=fp32"])
    with pytest.raises(UserError, match="train.precision"):
        load_config(None, ["train.precision=fp16"])
