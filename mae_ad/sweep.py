"""`mae-ad sweep`: a small grid or random search over config keys; each trial trains, evaluates and adds a row.

The search space is a YAML mapping from dotted config keys to lists of values, for example

    train.mask_ratio: [0.5, 0.75]
    model.preset: [tiny-p8, tiny-p8-d2]
    scoring.sigma: [2, 4]

Every combination (grid) or `trials` random draws of one value per key (random) is one trial: the base config
plus the trial's values as `--set` overrides, trained with `mae_ad.train.run_training`, evaluated with
`mae_ad.evaluate.run_evaluation`.

An ablation (mode `list`, chosen automatically) is a file with one top-level key `trials:`, a list of named trials,
each a mapping of dotted keys to single values (`{}` is the base config itself):

    trials:
      - {name: base}
      - {name: block-masks, train.mask_mode: block}
      - {name: decoder-1, model.decoder_depth: 1}

Layout of `out`:

    out/results.csv            one row per finished trial (rewritten atomically after each trial)
    out/trial-000/bundle       the trained bundle (its logs in trial-000/bundle.run)
    out/trial-000/eval         the evaluation report
    out/tensorboard            hparams of every trial (when TensorBoard is installed)

MLflow gets a run per trial when `mlflow` is importable (its tracking URI comes from the environment as usual).
Every trial's configuration is validated before the first one trains, so a typo fails in seconds.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Config, apply_overrides, config_from_dict, read_yaml
from .contract import UserError, refuse_existing_out

log = logging.getLogger(__name__)

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1")
TrainFn = Callable[..., Path]
EvalFn = Callable[..., dict[str, Any]]


def _check_key(path: str | Path, key: Any) -> None:
    if not isinstance(key, str) or "." not in key:
        raise UserError(f"{path}: key {key!r}: expected a dotted config key such as train.mask_ratio")


def read_trial_list(path: str | Path) -> list[dict[str, Any]] | None:
    """The named trials of an ablation file (`trials: [{name: ..., dotted.key: value, ...}, ...]`), or None when
    the file is a search space. Each trial gets a `name` (default `trial-N`); names must be unique."""
    data = read_yaml(path)
    if set(data) != {"trials"}:
        if "trials" in data:
            raise UserError(f"{path}: `trials:` must be the only top-level key of an ablation file")
        return None
    items = data["trials"]
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: trials: expected a non-empty list of mappings")
    plan: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if item is None:
            item = {}
        if not isinstance(item, dict):
            raise UserError(f"{path}: trials[{i}]: expected a mapping of dotted keys to values, got {item!r}")
        name = str(item.get("name", f"trial-{i}"))
        if any(p.get("name") == name for p in plan):
            raise UserError(f"{path}: trials[{i}]: duplicate name {name!r}")
        for key in item:
            if key != "name":
                _check_key(path, key)
        plan.append({"name": name, **{k: v for k, v in item.items() if k != "name"}})
    return plan


def read_space(path: str | Path) -> dict[str, list[Any]]:
    """Read and check a search space file: {dotted.key: [values...]} with at least one value per key."""
    data = read_yaml(path)
    if not data:
        raise UserError(f"{path}: empty search space (expected keys like `train.mask_ratio: [0.5, 0.75]`)")
    space: dict[str, list[Any]] = {}
    for key, values in data.items():
        _check_key(path, key)
        if not isinstance(values, list):
            values = [values]
        if not values:
            raise UserError(f"{path}: {key}: empty list of values")
        space[key] = values
    return space


def _format(value: Any) -> str:
    """A value as a `--set` right-hand side that YAML reads back as the same value."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def make_trials(space: dict[str, list[Any]], mode: str = "grid", trials: int | None = None, seed: int = 0
                ) -> list[dict[str, Any]]:
    """The trials' parameter dicts. grid: every combination (first `trials` of them when given); random:
    `trials` distinct draws (default 8; no more than the grid holds)."""
    keys = list(space)
    grid = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(space[k] for k in keys))]
    if mode == "grid":
        return grid[:trials] if trials else grid
    if mode != "random":
        raise UserError(f"--mode {mode!r}: expected grid or random")
    n = min(trials or 8, len(grid))
    return random.Random(seed).sample(grid, n)


def trial_config(base: dict[str, Any], params: dict[str, Any], source: str) -> Config:
    sets = [f"{k}={_format(v)}" for k, v in params.items() if k != "name"]
    return config_from_dict(apply_overrides(base, sets), f"{source} (trial {', '.join(sets)})")


def _write_csv_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _train_summary(bundle: Path) -> dict[str, Any]:
    """Optimiser steps and last logged loss of a trained bundle (from the copy of its run log that training puts
    in every bundle), for a fair-budget table."""
    try:
        with open(Path(bundle) / "train_log.csv", newline="") as f:
            last = list(csv.DictReader(f))[-1]
        return {"steps": int(float(last.get("step", 0))), "final_loss": round(float(last.get("loss", "nan")), 4)}
    except (OSError, IndexError, ValueError, TypeError):
        return {"steps": None, "final_loss": None}


def _hparam_value(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) else str(v)


class _Trackers:
    """TensorBoard hparams and (if importable) MLflow, both optional; a tracker failure never stops a sweep."""

    def __init__(self, out: Path, tensorboard: bool):
        self.tb_dir = out / "tensorboard" if tensorboard else None
        try:
            import mlflow  # type: ignore[import-not-found]

            self.mlflow: Any = mlflow
        except ImportError:
            self.mlflow = None

    def log(self, name: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
        hp = {k: _hparam_value(v) for k, v in params.items()}
        if self.tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                with SummaryWriter(str(self.tb_dir / name)) as w:
                    w.add_hparams(hp, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")
            except Exception as e:  # noqa: BLE001 - tracking is optional
                log.warning("tensorboard hparams not written for %s: %s", name, e)
        if self.mlflow is not None:
            try:
                with self.mlflow.start_run(run_name=name):
                    self.mlflow.log_params(hp)
                    self.mlflow.log_metrics(metrics)
            except Exception as e:  # noqa: BLE001
                log.warning("mlflow logging failed for %s: %s", name, e)


def is_sweep_file(data: dict[str, Any]) -> bool:
    """True for the top level of an ablation (`trials:` list) or search-space file (only dotted keys), which
    `mae-ad validate-config` then checks as a sweep instead of as a model config."""
    return bool(data) and ("trials" in data or all(isinstance(k, str) and "." in k for k in data))


def plan_sweep(space_file: str | Path, config: str | Path | None = None, overrides: list[str] | None = None,
               mode: str = "grid", trials: int | None = None, seed: int = 0
               ) -> tuple[str, list[str], list[dict[str, Any]], list[Config]]:
    """(mode, swept keys, trials, each trial's validated Config) of a sweep file over the base `config` plus
    `overrides`. Raises UserError naming the file, trial and key at fault; nothing is trained or written."""
    plan = read_trial_list(space_file)
    if plan is not None:
        mode = "list"
        keys = sorted({k for p in plan for k in p if k != "name"})
    else:
        space = read_space(space_file)
        keys = list(space)
        plan = make_trials(space, mode, trials, seed)
    base = apply_overrides(read_yaml(config) if config is not None else {}, overrides)
    over = str(config) if config is not None else "the built-in defaults"
    # every trial validated up front; an error names the sweep file, the trial and the base config
    configs, errors, shown = [], [], []
    seen: dict[str, str] = {}  # an error's text after its trial -> the first trial that had it
    for i, p in enumerate(plan):
        name = repr(p.get("name", i))
        try:
            configs.append(trial_config(base, p, f"{space_file}: trial {name} over {over}"))
        except UserError as e:
            errors.append(str(e))
            why = str(e).split("): ", 1)[-1]  # "invalid configuration: key: msg", without the trial's own values
            shown.append(f"trial {name}: the same as trial {seen[why]}" if why in seen else str(e))
            seen.setdefault(why, name)
    if errors:  # every bad trial at once, not one per run; a repeated error once
        more = f" (and {len(errors) - 1} more trial(s): " + "; ".join(shown[1:]) + ")" if len(errors) > 1 else ""
        raise UserError(shown[0] + more + _list_hint(keys, plan, errors))
    return mode, keys, plan, configs


def _list_hint(keys: list[str], plan: list[dict[str, Any]], errors: list[str]) -> str:
    """A hint when a swept key takes a list and the trials gave it single values: a search space lists each key's
    values, so one list-valued value is a list inside that list."""
    bad = [k for k in keys if any(f"{k}: Input should be a valid {t}" in e for e in errors for t in ("list", "tuple"))
           and not any(isinstance(p.get(k), list) for p in plan)]
    if not bad:
        return ""
    k = bad[0]
    given = list(dict.fromkeys(p[k] for p in plan if k in p))
    return (f"; {k} takes a list, and a search space lists each key's values, so sweep it as a list of lists: "
            f"`{k}: [{_format(given)}]` is one trial with the list {_format(given)}")


def run_sweep(
    space_file: str | Path, data: str | Path, out: str | Path, config: str | Path | None = None,
    overrides: list[str] | None = None, mode: str = "grid", trials: int | None = None, seed: int = 0,
    tensorboard: bool = True, train_fn: TrainFn | None = None, eval_fn: EvalFn | None = None,
) -> list[dict[str, Any]]:
    """Run the search; returns the result rows (also in out/results.csv). A failing trial is recorded with its
    error and the sweep goes on; configuration mistakes are refused before anything trains."""
    out = Path(out)
    refuse_existing_out(out, "sweep")
    if not Path(data).is_dir():
        raise UserError(f"{data}: data folder not found")
    mode, keys, plan, configs = plan_sweep(space_file, config, overrides, mode, trials, seed)
    if train_fn is None:
        from .train import run_training as train_fn
    if eval_fn is None:
        from .evaluate import run_evaluation as eval_fn

    out.mkdir(parents=True, exist_ok=True)
    trackers = _Trackers(out, tensorboard)
    rows: list[dict[str, Any]] = []
    log.info("sweep: %d trials (%s) over %s", len(plan), mode, ", ".join(keys))
    for i, (params, cfg) in enumerate(zip(plan, configs, strict=True)):
        name = f"trial-{i:03d}"
        tdir = out / name
        tdir.mkdir()
        if mode == "list":  # an ablation row names its trial and its changes instead of a column per key
            row: dict[str, Any] = {"trial": name, "name": params["name"], "changes": ", ".join(
                f"{k}={_format(v)}" for k, v in params.items() if k != "name") or "-"}
        else:
            row = {"trial": name, **{k: _hparam_value(v) for k, v in params.items()}}
        t0 = time.monotonic()
        try:
            bundle = train_fn(cfg, data, tdir / "bundle")
            t1 = time.monotonic()
            metrics = eval_fn(bundle, data, tdir / "eval")
            row.update({k: metrics.get(k) for k in METRIC_KEYS})
            row["score_ms_per_image"] = round(1000 * float(metrics.get("seconds_per_image") or 0.0), 1)
            row.update(_train_summary(bundle))
            row.update({"train_s": round(t1 - t0, 1), "eval_s": round(time.monotonic() - t1, 1),
                        "status": "ok", "error": ""})
            trackers.log(name, params, {k: float(v) for k, v in row.items() if k in METRIC_KEYS
                                        and isinstance(v, (int, float))})
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - one bad trial must not lose the others
            log.exception("sweep %s failed", name)
            row.update({k: None for k in METRIC_KEYS})
            row.update({"train_s": round(time.monotonic() - t0, 1), "eval_s": None, "status": "failed",
                        "error": f"{type(e).__name__}: {e}".replace("\n", " ")[:300]})
        rows.append(row)
        _write_csv_atomic(out / "results.csv", rows)
        log.info("sweep %s: %s", name, {k: row.get(k) for k in (*METRIC_KEYS, "status")})
    return rows


__all__ = ["make_trials", "read_space", "read_trial_list", "run_sweep", "trial_config"]
