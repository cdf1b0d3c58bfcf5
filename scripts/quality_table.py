"""Scoring ablation of one trained bundle on a dataset: re-calibrate under each scoring setting (on the bundle's own
held-back normal images, never on test labels), evaluate, and print one Markdown table with the training-free
baseline beside it.

    .venv/bin/python scripts/quality_table.py BUNDLE --data DIR --out DIR \
        --variant "default=" --variant "position=scoring.normalize=position" ...

A variant is NAME=KEY=VALUE[,KEY=VALUE...]; an empty override list evaluates the bundle as it is.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variant", action="append", default=[], help="NAME=key=value[,key=value]")
    ap.add_argument("--baseline-size", type=int, default=None, help="image size of the baseline (default: bundle's)")
    args = ap.parse_args()

    from mae_ad.baseline import score_dataset
    from mae_ad.bundle import load_bundle_config
    from mae_ad.calibrate import recalibrate
    from mae_ad.evaluate import run_evaluation

    args.out.mkdir(parents=True, exist_ok=False)
    cfg = load_bundle_config(args.bundle)
    rows = []
    size = args.baseline_size or cfg.model.img_size
    t = time.perf_counter()
    base = score_dataset(args.data, size=size)
    rows.append(("training-free patch statistics", "", base.metrics, time.perf_counter() - t))
    for spec in args.variant or ["as trained="]:
        name, _, overrides = spec.partition("=")
        sets = [s for s in overrides.split(",") if s]
        bundle = args.bundle
        if sets:
            bundle = recalibrate(args.bundle, args.data, args.out / f"bundle-{name}", sets)
        t = time.perf_counter()
        m = run_evaluation(bundle, args.data, args.out / f"eval-{name}")
        rows.append((name, ", ".join(sets), m, time.perf_counter() - t))
        print(name, {k: m.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1")}, flush=True)

    lines = ["| scoring | overrides | image AUROC | pixel AUROC | AUPRO | F1 @ calibrated thr | eval s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, sets, m, secs in rows:
        cells = " | ".join(f"{m[k]:.3f}" if isinstance(m.get(k), float) else "-"
                           for k in ("image_auroc", "pixel_auroc", "aupro", "f1"))
        lines.append(f"| {name} | {sets or '-'} | {cells} | {secs:.0f} |")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "rows.json").write_text(json.dumps([{"name": n, "overrides": s, "seconds": sec,
                                                     **{k: v for k, v in m.items() if not isinstance(v, dict)}}
                                                    for n, s, m, sec in rows], indent=2, default=str))
    print(table)


if __name__ == "__main__":
    main()
