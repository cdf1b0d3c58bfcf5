"""`mae-ad sweep`: trial planning, validation, the results table, and a real 2-trial run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mae_ad.contract import UserError
from mae_ad.sweep import make_trials, run_sweep

from .conftest import tiny_overrides


def _space(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "space.yaml"
    f.write_text(text)
    return f


def _fakes(fail_on: float | None = None):
    seen = []

    def train_fn(cfg, data, out):
        seen.append(cfg)
        if cfg.train.mask_ratio == fail_on:
            raise RuntimeError("diverged")
        Path(out).mkdir()
        return Path(out)

    def eval_fn(bundle, data, out):
        cfg = seen[-1]
        return {"image_auroc": cfg.train.mask_ratio, "pixel_auroc": cfg.scoring.sigma / 10, "aupro": None,
                "f1": 0.5}

    return seen, train_fn, eval_fn


def test_make_trials_grid_and_random():
    space = {"a.x": [1, 2, 3], "b.y": ["p", "q"]}
    grid = make_trials(space)
    assert len(grid) == 6 and {"a.x": 3, "b.y": "q"} in grid
    assert make_trials(space, trials=2) == grid[:2]
    rnd = make_trials(space, "random", trials=4, seed=1)
    assert len(rnd) == 4 and len({tuple(t.values()) for t in rnd}) == 4 and all(t in grid for t in rnd)
    assert make_trials(space, "random", trials=4, seed=1) == rnd  # seeded
    assert len(make_trials(space, "random", trials=50)) == 6
    with pytest.raises(UserError, match="--mode"):
        make_trials(space, "bayes")


def test_sweep_applies_params_and_writes_results(tmp_path, synthetic_data):
    space = _space(tmp_path, "train.mask_ratio: [0.5, 0.75]\nscoring.sigma: [2, 4]\n")
    seen, train_fn, eval_fn = _fakes(fail_on=0.75)
    out = tmp_path / "sweep"
    rows = run_sweep(space, synthetic_data, out, overrides=tiny_overrides(), train_fn=train_fn, eval_fn=eval_fn)
    assert [(c.train.mask_ratio, c.scoring.sigma) for c in seen] == [(0.5, 2), (0.5, 4), (0.75, 2), (0.75, 4)]
    assert all(c.model.img_size == 32 for c in seen)  # base overrides kept
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["ok", "ok", "failed", "failed"]  # a failing trial does not stop it
    assert table[1]["image_auroc"] == "0.5" and table[1]["pixel_auroc"] == "0.4" and table[1]["scoring.sigma"] == "4"
    assert "diverged" in table[2]["error"] and rows[2]["image_auroc"] is None
    assert (out / "tensorboard" / "trial-000").is_dir()


def test_ablation_list_runs_named_one_change_trials(tmp_path, synthetic_data):
    space = _space(tmp_path, "trials:\n  - {name: base}\n  - {name: low-ratio, train.mask_ratio: 0.5}\n"
                             "  - {name: both, train.mask_ratio: 0.6, scoring.sigma: 2}\n")
    seen, train_fn, eval_fn = _fakes()
    rows = run_sweep(space, synthetic_data, tmp_path / "abl", overrides=tiny_overrides() + ["train.mask_ratio=0.7"],
                     train_fn=train_fn, eval_fn=eval_fn)
    assert [(c.train.mask_ratio, c.scoring.sigma) for c in seen] == [(0.7, 4.0), (0.5, 4.0), (0.6, 2)]
    assert [r["name"] for r in rows] == ["base", "low-ratio", "both"]
    assert [r["changes"] for r in rows] == ["-", "train.mask_ratio=0.5", "train.mask_ratio=0.6, scoring.sigma=2"]
    with open(tmp_path / "abl" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert table[1]["image_auroc"] == "0.5" and table[2]["status"] == "ok"


@pytest.mark.parametrize("text,match", [
    ("trials:\n  - {name: a}\n  - {name: a, train.mask_ratio: 0.5}\n", "duplicate name 'a'"),
    ("trials:\n  - {name: a, mask_ratio: 0.5}\n", "dotted"),
    ("trials:\n  - {name: a, train.mask_ratio: 1.5}\n", "train.mask_ratio"),
    ("trials: []\n", "non-empty list"),
    ("trials:\n  - {name: a}\ntrain.mask_ratio: [0.5]\n", "only top-level key"),
    ("trials:\n  - [1, 2]\n", r"trials\[0\]"),
])
def test_ablation_list_refuses_bad_files_before_training(tmp_path, synthetic_data, text, match):
    seen, train_fn, eval_fn = _fakes()
    with pytest.raises(UserError, match=match):
        run_sweep(_space(tmp_path, text), synthetic_data, tmp_path / "o", train_fn=train_fn, eval_fn=eval_fn)
    assert seen == [] and not (tmp_path / "o").exists()


def test_sweep_refuses_bad_space_before_training(tmp_path, synthetic_data):
    seen, train_fn, eval_fn = _fakes()
    bad = _space(tmp_path, "train.mask_ratio: [0.5, 1.5]\n")
    with pytest.raises(UserError, match="train.mask_ratio"):
        run_sweep(bad, synthetic_data, tmp_path / "o1", train_fn=train_fn, eval_fn=eval_fn)
    typo = _space(tmp_path, "train.mask_ration: [0.5]\n")
    with pytest.raises(UserError, match="mask_ration"):
        run_sweep(typo, synthetic_data, tmp_path / "o2", train_fn=train_fn, eval_fn=eval_fn)
    flat = _space(tmp_path, "epochs: [1, 2]\n")
    with pytest.raises(UserError, match="dotted"):
        run_sweep(flat, synthetic_data, tmp_path / "o3", train_fn=train_fn, eval_fn=eval_fn)
    assert seen == [] and not (tmp_path / "o1").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "results.csv").write_text("x\n")
    ok = _space(tmp_path, "train.mask_ratio: [0.5]\n")
    with pytest.raises(UserError, match="refusing to overwrite"):
        run_sweep(ok, synthetic_data, busy, train_fn=train_fn, eval_fn=eval_fn)
    assert (busy / "results.csv").read_text() == "x\n"


def test_list_valued_key_swept_as_scalars_gets_the_list_of_lists_hint(tmp_path):
    """`data.mean: [0.5, 0.5, 0.5]` in a search space is three trials of one number each; the error says how to write
    one trial with that list, and a correct list of lists validates."""
    from mae_ad.sweep import plan_sweep

    bad = _space(tmp_path, "data.mean: [0.4, 0.5, 0.6]\n")
    with pytest.raises(UserError, match=r"data.mean takes a list.*`data.mean: \[\[0.4, 0.5, 0.6\]\]` is one trial"):
        plan_sweep(bad)
    good = tmp_path / "good.yaml"
    good.write_text("data.mean: [[0.4, 0.5, 0.6], [0.5, 0.5, 0.5]]\n")
    mode, keys, plan, configs = plan_sweep(good)
    assert keys == ["data.mean"] and [list(c.data.mean) for c in configs] == [[0.4, 0.5, 0.6], [0.5, 0.5, 0.5]]
    scalar = _space(tmp_path, "train.mask_ratio: [0.5, 1.5]\n")
    with pytest.raises(UserError) as e:
        plan_sweep(scalar)
    assert "list of lists" not in str(e.value)  # a plain out-of-range value gets no list hint


def test_one_mistake_in_every_trial_is_reported_once(tmp_path):
    """A typo'd key swept over three values: the error in full once, the other trials point back to it."""
    from mae_ad.sweep import plan_sweep

    with pytest.raises(UserError) as e:
        plan_sweep(_space(tmp_path, "train.epoch: [1, 2, 3]\n"))
    msg = str(e.value)
    assert msg.count("unknown key") == 1 and "trial 1: the same as trial 0; trial 2: the same as trial 0" in msg
    with pytest.raises(UserError) as e:  # different mistakes are each spelled out
        plan_sweep(_space(tmp_path, "train.mask_ratio: [1.5, -1]\n"))
    assert str(e.value).count("train.mask_ratio") >= 4 and "the same as" not in str(e.value)


def test_sweep_real_two_trials(tmp_path, synthetic_data):
    """Two real trials (train 2 epochs at 32 px + evaluate), through the CLI."""
    from typer.testing import CliRunner

    from app.cli import app

    space = _space(tmp_path, "train.mask_mode: [random, block]\n")
    out = tmp_path / "sweep"
    sets = tiny_overrides() + ["train.epochs=2", "train.batch_size=4", "train.warmup_epochs=0",
                               "train.tensorboard=false", "calibration.min_holdout=3", "scoring.sigma=1"]
    args = ["sweep", str(space), "--data", str(synthetic_data), "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["train.mask_mode"] for r in table] == ["random", "block"]
    assert [r["status"] for r in table] == ["ok", "ok"], [r["error"] for r in table]
    for r in table:
        assert 0.0 <= float(r["image_auroc"]) <= 1.0 and 0.0 <= float(r["pixel_auroc"]) <= 1.0
    assert (out / "trial-001" / "bundle" / "weights.safetensors").is_file()
    assert (out / "trial-001" / "eval").is_dir()


def test_shipped_ablation_file_validates_against_the_recipe():
    """configs/ablation-magnetic-tile.yaml: every trial is a valid config on top of the pixel recipe it ablates."""
    from mae_ad.config import read_yaml
    from mae_ad.sweep import read_trial_list, trial_config

    root = Path(__file__).resolve().parents[1] / "configs"
    plan = read_trial_list(root / "ablation-magnetic-tile.yaml")
    assert plan is not None and plan[0]["name"] == "recipe" and len(plan) >= 10
    base = read_yaml(root / "magnetic-tile-pixel.yaml")
    cfgs = [trial_config(base, p, "ablation") for p in plan]
    assert cfgs[0].model.decoder_depth == 2 and cfgs[0].train.mask_mode == "mixed"
    assert {c.train.mask_mode for c in cfgs} == {"mixed", "random", "block"}
