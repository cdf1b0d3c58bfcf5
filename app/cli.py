"""The `mae-ad` command line: the one place that wires the stages together.

Each command imports what it needs inside its body, so `mae-ad --help` and the agent's commands never load torch.
User mistakes (UserError) print one line `error: ...` on stderr and exit with code 2, without a traceback.
The compile stage's commands (app/cli_compile.py) and the watch stage's (app/cli_watch.py) are added through
their `register(app)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mae_ad.contract import UserError

from . import cli_compile, cli_watch
from .common import setup_logging

app = typer.Typer(
    name="mae-ad",
    help="Learn what good parts look like (LoRA-MAE), compile it for the edge (ONNX/TensorRT), watch the line (MQTT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (see configs/)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")]
EngineOpt = Annotated[str, typer.Option(help="what scores the images: auto (ONNX Runtime on the bundle's cached "
                                        "ONNX export where onnxruntime is installed, else torch), torch or "
                                        "onnxruntime")]
OnnxOpt = Annotated[Path | None, typer.Option("--onnx", help="score with this ONNX graph of the bundle's model "
                                              "(e.g. an int8 one from `mae-ad quantize`) through ONNX Runtime")]
PrecisionOpt = Annotated[str | None, typer.Option(help="torch scoring precision: auto (bf16 where the CPU has "
                                                  "native bf16 and it reproduces the fp32 decisions on the "
                                                  "held-back normals), fp32 or bf16 [default: $MAE_AD_PRECISION, "
                                                  "else auto]")]
ThreadsOpt = Annotated[int | None, typer.Option(min=1, help="ONNX Runtime threads (default: its own)")]


@app.command("validate-config")
def validate_config(
    file: Annotated[Path, typer.Argument(help="config YAML to check")],
    set_: SetOpt = None,
    kind: Annotated[str, typer.Option(help="model (training config), agent (agent config) or sweep (`mae-ad "
                                            "sweep` file); auto by content")] = "auto",
    base: Annotated[Path | None, typer.Option("--base", "--config", "-c", help="sweep: the base model config its "
                                              "trials change (`mae-ad sweep --config`; default: the built-in "
                                              "defaults)")] = None,
) -> None:
    """Check a config file; print the resolved configuration or the key at fault. A sweep or ablation file has
    each of its trials validated against --base."""
    from mae_ad.config import dump_config, load_config, read_yaml

    if kind == "auto":
        from mae_ad.sweep import is_sweep_file

        data = read_yaml(file)
        kind = "agent" if ("cameras" in data or "mqtt" in data) else "sweep" if is_sweep_file(data) else "model"
    if kind == "sweep":
        from mae_ad.sweep import plan_sweep

        mode, keys, plan, _ = plan_sweep(file, base, set_)
        for p in plan:
            typer.echo(p.get("name", "") + (": " if p.get("name") else "") + (", ".join(
                f"{k}={v!r}" for k, v in p.items() if k != "name") or "(the base config)"))
        typer.echo(f"# {file}: OK ({len(plan)} trial{'s' if len(plan) != 1 else ''}, mode {mode}, over "
                   f"{', '.join(keys) or 'no key'}; each validated against {base or 'the built-in defaults'}"
                   f"{' with ' + ', '.join(set_) if set_ else ''})", err=True)
        return
    if kind == "agent":
        from agent.config import dump_agent_config, load_agent_config

        typer.echo(dump_agent_config(load_agent_config(file, set_), redacted=True))
    elif kind == "model":
        typer.echo(dump_config(load_config(file, set_)))
    else:
        raise UserError(f"--kind {kind!r}: expected auto, model, agent or sweep")
    typer.echo(f"# {file}: OK", err=True)


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", "-d", help="dataset root (MVTec, BTAD or good/bad layout)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="bundle directory to create")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option(help="resume from a run's checkpoint directory")] = None,
    verbose: Verbose = False,
) -> None:
    """Train on normal images only, calibrate on held-back normal images, write a model bundle."""
    setup_logging(verbose)
    from mae_ad.config import load_config
    from mae_ad.train import run_training

    cfg = load_config(config, set_)
    bundle = run_training(cfg, data, out, resume=resume)
    typer.echo(str(bundle))


@app.command("calibrate")
def calibrate_cmd(
    bundle: Annotated[Path, typer.Argument(help="trained model bundle")],
    data: Annotated[Path, typer.Option("--data", "-d", help="the dataset root the bundle was trained on")],
    out: Annotated[Path, typer.Option("--out", "-o", help="new bundle directory to create")],
    set_: SetOpt = None,
    verbose: Verbose = False,
) -> None:
    """Re-calibrate a bundle (new scoring.* settings or calibration.target_fpr) on its held-back normal images."""
    setup_logging(verbose)
    from mae_ad.calibrate import recalibrate

    typer.echo(str(recalibrate(bundle, data, out, set_)))


@app.command()
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="model bundle")],
    data: Annotated[Path, typer.Option("--data", "-d", help="dataset root with test/ (and ground_truth/)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="report directory to create")],
    batch_size: Annotated[int, typer.Option(help="images per scoring batch")] = 8,
    baseline: Annotated[bool, typer.Option(help="also compute the training-free baseline (kNN on the model's "
                                           "backbone features, or patch statistics) on the same split")] = True,
    eval_size: Annotated[str, typer.Option("--eval-size", help="where maps meet masks: 'original' (each image's "
                                           "own size, maps upsampled, as MVTec AD) or 'model' (the model's input "
                                           "size)")] = "original",
    engine: EngineOpt = "auto",
    onnx: OnnxOpt = None,
    precision: PrecisionOpt = None,
    threads: ThreadsOpt = None,
    verbose: Verbose = False,
) -> None:
    """Image/pixel AUROC, AUPRO, F1 at the calibrated threshold, the training-free baseline beside;
    metrics.json, report.md and plots."""
    setup_logging(verbose)
    from mae_ad.evaluate import run_evaluation

    from .scoring_engines import open_scoring_engine

    metrics = run_evaluation(bundle, data, out, batch_size=batch_size, baseline=baseline, eval_size=eval_size,
                             open_engine=lambda: open_scoring_engine(bundle, engine, onnx, precision, threads),
                             precision=precision)
    typer.echo(" ".join(f"{k}={metrics[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "aupro", "f1")
                        if isinstance(metrics.get(k), float)))


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(metavar="REPORT_A", help="evaluation A: a folder `mae-ad evaluate --out` "
                                      "wrote (or its scores.csv)")],
    b: Annotated[Path, typer.Argument(metavar="REPORT_B", help="evaluation B of the same test set")],
    resamples: Annotated[int, typer.Option(help="bootstrap resamples (at least 100)")] = 2000,
    seed: Annotated[int, typer.Option(help="seed of the resampling")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the comparison as JSON to this new "
                                                  "file")] = None,
    verbose: Verbose = False,
) -> None:
    """B against A on the same test set: each metric's difference with a 95 % paired bootstrap interval, and whether
    the test set can tell them apart."""
    setup_logging(verbose)
    from mae_ad.compare import compare as run_compare
    from mae_ad.compare import markdown
    from mae_ad.contract import write_json_atomic
    from trt.artifacts import refuse_existing

    if json_out is not None:
        refuse_existing(json_out, what="comparison", option="--json")
    r = run_compare(a, b, resamples=resamples, seed=seed)
    typer.echo(markdown(r))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)  # refuse_existing found no file in the way
        write_json_atomic(json_out, r)


@app.command()
def predict(
    bundle: Annotated[Path, typer.Argument(help="model bundle")],
    images: Annotated[list[Path], typer.Argument(help="image files or folders")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    engine: EngineOpt = "auto",
    onnx: OnnxOpt = None,
    precision: PrecisionOpt = None,
    threads: ThreadsOpt = None,
    verbose: Verbose = False,
) -> None:
    """Score images: anomaly maps, heatmap overlays and a scores.csv."""
    setup_logging(verbose)
    from mae_ad.evaluate import run_predict

    from .scoring_engines import open_scoring_engine

    run_predict(bundle, images, out, precision=precision,
                open_engine=lambda: open_scoring_engine(bundle, engine, onnx, precision, threads))


@app.command("prepare-data")
def prepare_data(
    out: Annotated[Path, typer.Option("--out", "-o", help="MVTec-layout dataset to create")],
    good: Annotated[list[Path], typer.Option("--good", help="folder of normal images (repeatable)")],
    defect: Annotated[list[str] | None, typer.Option(
        "--defect", help="TYPE=IMAGES_DIR[:MASKS_DIR] (repeatable)")] = None,
    test_fraction: Annotated[float, typer.Option(help="share of normal images kept for test/good")] = 0.2,
    seed: int = 0,
) -> None:
    """Build the MVTec layout from loose folders (clashing names renamed, masks checked)."""
    from mae_ad.prepare import prepare_dataset

    root = prepare_dataset(out, good, defect or [], test_fraction=test_fraction, seed=seed)
    typer.echo(str(root))


@app.command("make-corpus")
def make_corpus(
    out: Annotated[Path, typer.Option("--out", "-o", help="corpus directory to create (OUT/train/good/*.png)")],
    n: Annotated[int, typer.Option(help="number of images")] = 4000,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 160,
    seed: int = 0,
) -> None:
    """Draw a broad corpus of procedural surface textures for pretraining a base MAE once (docs/learn.md)."""
    from mae_ad.corpus import write_corpus

    counts = write_corpus(out, n=n, size=size, seed=seed)
    typer.echo(f"{out}: {n} images (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")


@app.command()
def bench(
    what: Annotated[str, typer.Argument(help="scoring | train | all")] = "all",
    presets: Annotated[str, typer.Option(help="comma-separated presets or model config files (.yaml)")] = "tiny-p8,small-p8",
    out: Annotated[Path | None, typer.Option(help="write results JSON here")] = None,
    seconds: Annotated[float, typer.Option(help="time per measurement")] = 10.0,
) -> None:
    """Throughput on this machine as a fraction of the best fp32 GEMM any installed engine reaches (the ceiling)."""
    from mae_ad.bench import run_bench

    run_bench(what, [p.strip() for p in presets.split(",") if p.strip()], out, seconds)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="demo output directory")] = Path("demo_out"),
    minutes: Annotated[float, typer.Option(help="training time budget")] = 2.0,
    fresh: Annotated[bool, typer.Option(help="delete a previous demo output first")] = True,
) -> None:
    """The whole product on an embedded default: synthetic data, a quickly trained model, its report."""
    setup_logging(False)
    from .demo import run_demo

    run_demo(out, minutes=minutes, fresh=fresh)


@app.command()
def sweep(
    space: Annotated[Path, typer.Argument(
        help="YAML search space (dotted config keys -> lists of values) or ablation (`trials:` list of named trials)")],
    data: Annotated[Path, typer.Option("--data", "-d", help="dataset root (train/good and test/)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="sweep directory to create")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    mode: Annotated[str, typer.Option(help="grid (every combination) or random")] = "grid",
    trials: Annotated[int | None, typer.Option(help="random: number of draws; grid: stop after this many")] = None,
    seed: Annotated[int, typer.Option(help="random-search seed")] = 0,
    verbose: Verbose = False,
) -> None:
    """Train and evaluate each trial of a small search or ablation; results in OUT/results.csv (and TensorBoard)."""
    setup_logging(verbose)
    from mae_ad.sweep import run_sweep

    rows = run_sweep(space, data, out, config=config, overrides=set_, mode=mode, trials=trials, seed=seed)
    typer.echo(f"{out / 'results.csv'}: {sum(r['status'] == 'ok' for r in rows)}/{len(rows)} trials ok")


@app.command()
def baseline(
    data: Annotated[Path, typer.Option("--data", "-d", help="dataset root (train/good and test/)")],
    size: Annotated[int, typer.Option(help="image size in pixels")] = 224,
    patch: Annotated[int, typer.Option(help="cell size of the patch statistics")] = 8,
    sigma: Annotated[float, typer.Option(help="Gaussian smoothing of the map, pixels")] = 4.0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write metrics JSON here")] = None,
    method: Annotated[str, typer.Option(help="knn (pretrained features, PatchCore-style) or patchstats")] = "knn",
    config: Annotated[Path | None, typer.Option("--config", "-c", help="knn: take model.backbone and "
                                                "model.img_size from this model config")] = None,
    coreset: Annotated[float, typer.Option(help="knn: share of memory cells kept by greedy coreset")] = 1.0,
    verbose: Verbose = False,
) -> None:
    """A training-free baseline (kNN on pretrained features, or patch statistics): image/pixel AUROC, AUPRO and F1
    on a dataset's test set, with the same training/held-back split and threshold rule as `train`."""
    setup_logging(verbose)
    from mae_ad.baseline import score_dataset
    from mae_ad.contract import write_json_atomic

    backbone = None
    if config is not None:
        from mae_ad.config import load_config

        cfg = load_config(config)
        backbone, size = cfg.model.backbone, cfg.model.img_size
        if method == "knn" and backbone is None:
            raise UserError(f"{config}: model.backbone is not set; the knn baseline needs a feature backbone")
    if out is not None and out.exists():
        raise UserError(f"{out}: already exists; refusing to overwrite")
    metrics = score_dataset(data, size=size, patch=patch, sigma=sigma, method=method, backbone=backbone,
                            coreset_fraction=coreset).metrics
    if out is not None:
        write_json_atomic(out, metrics)
    typer.echo(" ".join(f"{k}={metrics[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "aupro", "f1")
                        if isinstance(metrics.get(k), float)))


cli_compile.register(app)
cli_watch.register(app)


def main() -> None:
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
