"""Training: normal images in, a calibrated model bundle out. A straight-line script that reads top to bottom.

    index data -> hold back calibration images -> model (+ pretrained) -> AdamW, warm-up + cosine
    -> epochs of masked reconstruction (accumulation, bf16, clipping, DDP) -> checkpoints and logs
    -> calibrate on the held-back normal images -> bundle (atomic)

Where things go: the bundle is `out/`; the run's logs and its resumable checkpoint live beside it in
`<out>.run/` (`train_log.csv`, `tensorboard/`, `checkpoint.safetensors` + `checkpoint.json`), because they exist
long before the bundle (which is written once, atomically, at the end). The bundle gets a copy of `train_log.csv`.

Multi-process: launched by `torchrun` (WORLD_SIZE > 1), each process trains on its DistributedSampler share under
DDP (gloo on CPU, nccl on CUDA); only rank 0 logs, checkpoints, calibrates and writes the bundle.

Determinism: every epoch reseeds its sampler, masking generator and torch RNG from (seed, epoch, rank), and
checkpoints are written at epoch ends, so a resumed run replays the same epochs as an uninterrupted one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from . import data as data_mod
from .bundle import staged_dir, write_bundle_files
from .calibrate import fit_knn_memory, training_stats_placed
from .config import Config, config_from_dict
from .contract import UserError, refuse_existing_out, write_json_atomic
from .model import MaskedAutoencoderViT, build_model, count_params
from .precision import cpu_isa_flags, training_precision
from .scoring import Scorer, calibrate, normalise_images
from .tiling import input_policy

log = logging.getLogger(__name__)

RUN_SUFFIX = ".run"
CKPT_FILE = "checkpoint.safetensors"
CKPT_JSON = "checkpoint.json"
LOG_FILE = "train_log.csv"
CKPT_KIND = "mae_ad.train_checkpoint"
# Keys that may differ between the original run and a resumed one (run control, not the learning problem).
RESUMABLE_CHANGES = {"train.epochs", "train.max_minutes", "train.log_every", "train.checkpoint_every",
                     "train.tensorboard", "data.num_workers", "data.cache"}


def run_dir_for(out: str | os.PathLike[str]) -> Path:
    """The folder of a run's logs and checkpoint: `<out>.run` beside the bundle."""
    out = Path(out)
    return out.parent / (out.name + RUN_SUFFIX)


# --- small pieces -------------------------------------------------------------------------------------------
def lr_at(step: float, total_steps: int, warmup_steps: float, base_lr: float, min_lr: float) -> float:
    """Linear warm-up over `warmup_steps` optimizer steps, then half a cosine from base_lr down to min_lr."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1.0, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices (LoRA A/B included); none on biases, norms and the cls/mask tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "mask_token"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def params_sha256(model: nn.Module) -> str:
    """A hash of every parameter and buffer (to check that DDP ranks ended identical)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank * 7_919) % (2**63 - 1)


def _reseed_worker(worker_id: int) -> None:
    """DataLoader workers each get their own augmentation RNG (derived from the loader's seeded generator)."""
    info = torch.utils.data.get_worker_info()
    if info is not None and hasattr(info.dataset, "_rng"):
        info.dataset._rng = np.random.default_rng(info.seed % 2**32)


def _config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_differences(va, vb, key + ".")
        elif va != vb:
            out.append(key)
    return out


class TokenCache(torch.utils.data.Dataset):
    """The frozen backbone's token images of every training image, computed once: item i -> [C_f, g, g]."""

    def __init__(self, images: torch.utils.data.Dataset, backbone: nn.Module, device: torch.device, batch_size: int):
        """`images`: an `ImageFolderDataset` is read through `exact_items` (the pixels scoring reads, so these tokens
        can also be the kNN memory); another dataset item by item."""
        exact = getattr(images, "exact_items", None)
        items = exact() if exact is not None else (images[j] for j in range(len(images)))  # type: ignore[arg-type]
        chunks = []

        def flush(batch: list[Any]) -> None:
            chunks.append(backbone(torch.stack([torch.as_tensor(x) for x in batch]).to(device)).cpu())

        with torch.no_grad():
            batch: list[Any] = []
            for x in items:
                batch.append(x)
                if len(batch) == batch_size:
                    flush(batch)
                    batch = []
            if batch:
                flush(batch)
        self.tokens = torch.cat(chunks)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i]


# --- checkpoints (safetensors only: no pickle) ----------------------------------------------------------------
def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """Model state and the optimizer's per-parameter state flattened into one safetensors file (written to a temp
    file, then renamed); `info` (epoch, step, config...) rides in the file's metadata and in a JSON beside it."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = t.detach().cpu().contiguous()
    info = {**info, "kind": CKPT_KIND}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"info": json.dumps(info)})
    os.replace(tmp, path)
    write_json_atomic(path.with_name(CKPT_JSON), info)


def read_checkpoint(resume: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Read `<run>/checkpoint.safetensors` (or the file itself). Returns (tensors, info, file)."""
    p = Path(resume)
    f = p / CKPT_FILE if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"{f}: no training checkpoint to resume from")
    try:
        tensors = load_file(str(f))
        from safetensors import safe_open

        with safe_open(str(f), "pt") as h:
            meta = h.metadata() or {}
        info = json.loads(meta.get("info", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{f}: not a readable training checkpoint ({e})") from None
    if info.get("kind") != CKPT_KIND or "epoch" not in info or "config" not in info:
        raise UserError(f"{f}: not a mae-ad training checkpoint (metadata 'info' missing or incomplete)")
    return tensors, info, f


def restore_checkpoint(tensors: dict[str, torch.Tensor], f: Path, model: nn.Module,
                       optimizer: torch.optim.Optimizer) -> None:
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    result = model.load_state_dict(model_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[0]
        raise UserError(f"{f}: checkpoint does not match the model (first mismatched key {bad})")
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    if opt_state and max(opt_state) >= n_params:
        raise UserError(f"{f}: optimizer state has more parameters than the model trains")
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": opt_state, "param_groups": current["param_groups"]})


# --- the run ----------------------------------------------------------------------------------------------------
def run_training(cfg: Config, data_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                 resume: str | os.PathLike[str] | None = None) -> Path:
    """Train on `data_dir/train/good`, calibrate on a held-back part of it, write the bundle `out`."""
    out = Path(out)
    run_dir = run_dir_for(out)

    # Distributed setup (torchrun sets WORLD_SIZE/RANK/LOCAL_RANK).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    rank = int(os.environ.get("RANK", "0"))
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    main = rank == 0
    try:
        return _run(cfg, Path(data_dir), out, run_dir, resume, world, rank, main, device, distributed)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: Config, data_dir: Path, out: Path, run_dir: Path, resume: str | os.PathLike[str] | None,
         world: int, rank: int, main: bool, device: torch.device, distributed: bool) -> Path:
    tc = cfg.train

    # 1. Refuse what would fail at the end, before spending an hour training.
    refuse_existing_out(out, "bundle")
    ckpt_tensors, ckpt_info, ckpt_file = None, None, None
    if resume is not None:
        ckpt_tensors, ckpt_info, ckpt_file = read_checkpoint(resume)
        saved = config_from_dict(ckpt_info["config"], f"{ckpt_file} (config)")
        diffs = [k for k in _config_differences(saved.to_dict(), cfg.to_dict()) if k not in RESUMABLE_CHANGES]
        if diffs:
            raise UserError(f"{ckpt_file}: the checkpoint was trained with a different {diffs[0]} "
                            f"({len(diffs)} key(s) differ); resume with the same --config/--set as the original run")
    if (run_dir.exists() or run_dir.is_symlink()) and not run_dir.is_dir():
        raise UserError(f"{run_dir}: exists and is not a folder; training keeps its logs and checkpoint in a folder "
                        "of this name beside --out (move the file, or choose another --out)")
    if run_dir.exists() and any(run_dir.iterdir()) and (resume is None or Path(resume).resolve() not in
                                                       (run_dir.resolve(), (run_dir / CKPT_FILE).resolve())):
        raise UserError(f"{run_dir}: a previous run's logs/checkpoint are there; continue it with --resume {run_dir} "
                        "or delete the folder")

    # 2. Data: normal images only; a deterministic part is held back for calibration.
    index = data_mod.index_dataset(data_dir)
    normal = data_mod.require_train_images(index)
    cal = cfg.calibration
    train_paths, holdout = data_mod.split_holdout(normal, cal.holdout_fraction, cal.min_holdout, seed=tc.seed)
    policy = input_policy(cfg.data, cfg.model.img_size)  # a TileSpec under data.resize=tile: items are tiles
    dataset = data_mod.ImageFolderDataset(train_paths, cfg.model.img_size, cache=cfg.data.cache,
                                          hflip=cfg.data.hflip, seed=tc.seed, resize=policy)
    image_dataset = dataset  # the images (or tiles) themselves, also when `dataset` becomes their token cache
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=tc.seed, drop_last=False)
    loader_gen = torch.Generator()
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
                        drop_last=False, generator=loader_gen, worker_init_fn=_reseed_worker,
                        pin_memory=device.type == "cuda")
    mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1)
    per_image = cfg.data.normalize == "per_image"
    gray = cfg.model.in_chans == 1  # grayscale model: the mean of the normalised channels

    # 3. Model (+ local pretrained encoder), identical on every rank.
    torch.manual_seed(tc.seed)
    model: MaskedAutoencoderViT = build_model(cfg.model)
    if ckpt_tensors is None:  # pretrained CNNs (a resumed run has them in its checkpoint)
        for cnn in model.frozen_cnns():
            cnn.load_source_weights()
    if cfg.model.pretrained and ckpt_tensors is None:
        from .checkpoint import load_pretrained

        load_pretrained(model, cfg.model.pretrained)
    model.to(device)
    if ckpt_tensors is None and model.frozen_cnns():  # their features are standardised on the training images
        std_paths = data_mod.stats_paths(train_paths, policy, data_mod.STANDARDISE_MAX_TILES)
        std_imgs = torch.from_numpy(data_mod.load_stack(std_paths, cfg.model.img_size, policy))
        for cnn in model.frozen_cnns():
            cnn.fit_standardisation(std_imgs)

    # 4. Optimizer and schedule (per optimizer step).
    eff_batch = tc.batch_size * tc.accum_iter * world
    base_lr = tc.lr if tc.lr is not None else tc.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=base_lr, betas=tc.betas)
    steps_per_epoch = math.ceil(len(loader) / tc.accum_iter)
    total_steps = tc.epochs * steps_per_epoch
    warmup_steps = tc.warmup_epochs * steps_per_epoch

    start_epoch, step = 0, 0
    if ckpt_tensors is not None:
        assert ckpt_info is not None and ckpt_file is not None
        restore_checkpoint(ckpt_tensors, ckpt_file, model, optimizer)
        start_epoch, step = int(ckpt_info["epoch"]), int(ckpt_info["step"])
        if main:
            log.info("resuming %s at epoch %d, optimizer step %d", ckpt_file, start_epoch, step)
        del ckpt_tensors
    if model.backbone is not None and not cfg.data.hflip:
        # Feature space without augmentation: the frozen backbone's tokens (the backbone is the costliest part of
        # a step) are computed once for the whole run, after a resumed run has restored the backbone's state.
        dataset = TokenCache(dataset, model.backbone, device, tc.batch_size)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=tc.seed,
                                     drop_last=False)
        loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, num_workers=0, drop_last=False,
                            generator=loader_gen)
    ddp: nn.Module = model
    if distributed:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # 5. Logs (rank 0 only): CSV and TensorBoard in the run folder.
    writer = None
    csv_file = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        new_log = not (run_dir / LOG_FILE).is_file()
        csv_file = open(run_dir / LOG_FILE, "a", newline="")  # noqa: SIM115 - closed in the finally below
        csv_writer = csv.writer(csv_file)
        if new_log:
            csv_writer.writerow(["step", "epoch", "lr", "loss", "images_per_s"])
        if tc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tensorboard"))
        log.info("training %s on %d images (%d held back for calibration), %s parameters (%s trainable), "
                 "lr %.3g (effective batch %d = %d x %d accum x %d processes), %d epochs x %d steps, logs in %s",
                 cfg.name, len(train_paths), len(holdout), f"{count_params(model):,}",
                 f"{count_params(model, trainable_only=True):,}", base_lr, eff_batch, tc.batch_size,
                 tc.accum_iter, world, tc.epochs, steps_per_epoch, run_dir)

    # 6. The loop.
    precision = training_precision(tc.precision, device.type)
    if main:
        log.info("training precision %s (train.precision=%s%s)", precision, tc.precision,
                 f", CPU flags: {' '.join(cpu_isa_flags()) or 'unknown'}" if device.type == "cpu" else "")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())
    trainable = [p for p in model.parameters() if p.requires_grad]
    mask_gen = torch.Generator(device=device)
    mask_mode = getattr(tc, "mask_mode", "random")
    mask_kw = {} if mask_mode == "random" else {"mask_mode": mask_mode}
    budget_s = tc.max_minutes * 60 if tc.max_minutes else None
    t_start = time.monotonic()
    stopped_early = False
    epoch = start_epoch
    win_loss, win_n, win_imgs, win_t = 0.0, 0, 0, time.monotonic()
    epoch_losses: list[float] = []
    try:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, disable=not main, unit="step", dynamic_ncols=True,
                   mininterval=1.0)
        for epoch in range(start_epoch, tc.epochs):
            es = epoch_seed(tc.seed, epoch, rank)
            sampler.set_epoch(epoch)
            loader_gen.manual_seed(es)
            mask_gen.manual_seed(es)
            torch.manual_seed(es)  # LoRA dropout, DropPath
            dataset._rng = np.random.default_rng(es)  # horizontal flips when num_workers == 0
            ddp.train()
            ep_loss, ep_n = 0.0, 0
            n_batches = len(loader)
            for i, batch in enumerate(loader):
                batch = batch.to(device, non_blocking=True)
                if isinstance(dataset, TokenCache):  # feature tokens, computed once
                    imgs = batch
                elif model.backbone is not None:
                    with torch.no_grad():
                        imgs = model.tokens(batch)
                else:
                    imgs = normalise_images(batch, mean, std, per_image, gray)
                last_micro = (i + 1) % tc.accum_iter == 0 or i + 1 == n_batches
                sync = ddp.no_sync() if (distributed and not last_micro) else nullcontext()
                with sync:
                    with autocast:
                        loss, _, _ = ddp(imgs, tc.mask_ratio, mask_gen, **mask_kw)
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"loss is {loss.item()} at epoch {epoch} step {step}; lower the lr")
                    (loss / tc.accum_iter).backward()
                win_loss += loss.item()
                win_n += 1
                ep_loss += loss.item()
                ep_n += 1
                win_imgs += imgs.shape[0] * world
                if not last_micro:
                    continue
                sched_step: float = step
                if budget_s is not None and tc.schedule == "time" and step >= warmup_steps:
                    frac = min(1.0, (time.monotonic() - t_start) / budget_s)
                    sched_step = warmup_steps + frac * max(1.0, total_steps - warmup_steps)
                lr = lr_at(sched_step, total_steps, warmup_steps, base_lr, tc.min_lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if tc.clip_grad:
                    nn.utils.clip_grad_norm_(trainable, tc.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % tc.log_every == 0 or i + 1 == n_batches:
                    mean_loss = win_loss / max(1, win_n)
                    if distributed:
                        t = torch.tensor([mean_loss], device=device)
                        dist.all_reduce(t)
                        mean_loss = float(t) / world
                    ips = win_imgs / max(1e-9, time.monotonic() - win_t)
                    if main:
                        csv_writer.writerow([step, epoch, f"{lr:.6g}", f"{mean_loss:.6f}", f"{ips:.2f}"])
                        csv_file.flush()
                        if writer is not None:
                            writer.add_scalar("train/loss", mean_loss, step)
                            writer.add_scalar("train/lr", lr, step)
                            writer.add_scalar("train/images_per_s", ips, step)
                    bar.set_postfix(epoch=epoch, loss=f"{mean_loss:.4f}", img_s=f"{ips:.1f}")
                    win_loss, win_n, win_imgs, win_t = 0.0, 0, 0, time.monotonic()
                bar.update(1)
                if budget_s is not None:
                    over = torch.tensor([float(time.monotonic() - t_start > budget_s)], device=device)
                    if distributed:  # all ranks stop at the same step
                        dist.all_reduce(over, op=dist.ReduceOp.MAX)
                    if over.item() > 0:
                        stopped_early = True
                        break
            epoch_losses.append(ep_loss / max(1, ep_n))
            if main:
                log.info("epoch %d/%d: mean loss %.4f", epoch + 1, tc.epochs, epoch_losses[-1])
            done = epoch + 1 == tc.epochs or stopped_early
            if main and ((epoch + 1) % tc.checkpoint_every == 0 or done):
                # A budget stop ends this epoch early; a resume continues with the next one.
                save_checkpoint(run_dir / CKPT_FILE, model, optimizer,
                                {"epoch": epoch + 1, "step": step, "stopped_early": stopped_early,
                                 "config": cfg.to_dict()})
            if stopped_early:
                if main:
                    log.info("train.max_minutes=%s reached in epoch %d, step %d: stopping", tc.max_minutes, epoch,
                             step)
                break
        bar.close()
    finally:
        if writer is not None:
            writer.close()
        if csv_file is not None:
            csv_file.close()
    train_s = time.monotonic() - t_start

    # 7. Every rank ends with the same weights: gather their hashes as a check.
    digest = params_sha256(model)
    hashes = [digest]
    if distributed:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, digest)
        hashes = [str(h) for h in gathered]
        if len(set(hashes)) != 1:
            log.warning("DDP ranks ended with different weights: %s", hashes)
    if not main:
        if distributed:
            dist.barrier()  # wait until rank 0 has calibrated and written the bundle
        return out

    # 8. Calibrate on the held-back normal images, then write the bundle atomically.
    try:
        model.eval()
        scorer = Scorer(model, cfg.scoring, cfg.data).to(device).eval()
        hold_arr, hold_places = data_mod.load_stack_placed(holdout, cfg.model.img_size, policy)
        hold_imgs = torch.from_numpy(hold_arr).to(device)
        stats_imgs, stats_places = training_stats_placed(cfg, lambda: train_paths)
        owner = fit_knn_memory(scorer, cfg, train_paths,
                               dataset.tokens.to(device) if isinstance(dataset, TokenCache) else None,
                               item_image=torch.from_numpy(image_dataset.item_image))
        calibration = calibrate(scorer, hold_imgs, cfg.calibration.target_fpr, batch_size=tc.batch_size,
                                stats_images=None if stats_imgs is None else stats_imgs.to(device), stats_owner=owner,
                                placements=hold_places, stats_placements=stats_places)
        calibration["holdout_images"] = [str(p.relative_to(index.root)) for p in holdout]
        training_meta = {
            "data": str(index.root), "layout": index.layout, "n_train_images": len(train_paths),
            "n_holdout_images": len(holdout), "epochs_done": epoch + 1 if epoch_losses else start_epoch,
            "optimizer_steps": step, "stopped_early": stopped_early, "train_seconds": round(train_s, 1),
            "world_size": world, "effective_batch": eff_batch, "lr": base_lr, "precision": precision,
            "first_epoch_loss": epoch_losses[0] if epoch_losses else None,
            "last_epoch_loss": epoch_losses[-1] if epoch_losses else None,
            "resumed_from": str(ckpt_file) if ckpt_file else None, "pretrained": cfg.model.pretrained,
            "run_dir": str(run_dir), "rank_param_sha256": hashes,
        }
        with staged_dir(out) as d:
            write_bundle_files(d, model, cfg, calibration, scorer, extra_meta={"training": training_meta})
            if (run_dir / LOG_FILE).is_file():
                (d / LOG_FILE).write_bytes((run_dir / LOG_FILE).read_bytes())
        log.info("bundle written to %s (threshold %.5g at target FPR %.3g on %d held-back normal images)",
                 out, calibration["threshold"], cfg.calibration.target_fpr, len(holdout))
    finally:
        if distributed:
            dist.barrier()
    return out
