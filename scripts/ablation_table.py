"""Turn an ablation sweep's results.csv (`mae-ad sweep configs/ablation-*.yaml ...`) into a Markdown table and a
bar chart, with the training-free baseline beside every row.

    .venv/bin/python scripts/ablation_table.py runs/ablation/results.csv --data ../shared/data/magnetic_tile \
        --size 128 --png docs/figures/ablation.png

The baseline (`mae_ad.baseline.score_dataset`, per-position patch statistics, calibrated on held-back normal
images like the models) is computed once, at the models' input size. Several results.csv files may be given;
their rows are concatenated in order.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1")
LABELS = ("image AUROC", "pixel AUROC", "AUPRO", "F1 @ calibrated thr")


def _cell(v: str | float | None, fmt: str = "{:.3f}") -> str:
    try:
        return fmt.format(float(v))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--data", type=Path, help="dataset root: adds the training-free baseline row")
    ap.add_argument("--size", type=int, default=128, help="baseline image size (the models' input size)")
    ap.add_argument("--baseline-json", type=Path,
                    help="instead of --data: the baseline row of a scripts/quality_table.py rows.json")
    ap.add_argument("--png", type=Path, help="write a bar chart here")
    args = ap.parse_args()

    rows: list[dict[str, str]] = []
    for path in args.results:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    base = None
    if args.data is not None:
        from mae_ad.baseline import score_dataset

        base = score_dataset(args.data, size=args.size).metrics
    elif args.baseline_json is not None:
        import json

        found = [r for r in json.loads(args.baseline_json.read_text()) if r["name"].startswith("training-free")]
        if not found:
            raise SystemExit(f"{args.baseline_json}: no training-free baseline row")
        base = found[0]

    lines = ["| trial | change against the recipe | steps | final loss | " + " | ".join(LABELS) + " | score ms/img |",
             "|---|---|---:|---:|" + "---:|" * len(METRICS) + "---:|"]
    if base is not None:
        lines.append(f"| training-free patch statistics ({args.size} px) | - | - | - | "
                     + " | ".join(_cell(base.get(k)) for k in METRICS) + " | - |")
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r.get('name') or r.get('trial')} | {r.get('changes', '')} | failed: "
                         f"{r.get('error', '')[:80]} |" + " |" * (len(METRICS) + 2))
            continue
        lines.append(f"| {r.get('name') or r.get('trial')} | `{r.get('changes', '-')}` | {r.get('steps') or '-'} | "
                     f"{_cell(r.get('final_loss'), '{:.4f}')} | " + " | ".join(_cell(r.get(k)) for k in METRICS)
                     + f" | {_cell(r.get('score_ms_per_image'), '{:.0f}')} |")
    print("\n".join(lines))

    if args.png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        ok = [r for r in rows if r.get("status") == "ok"]
        names = [r.get("name") or r.get("trial") or "?" for r in ok]
        fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(ok) + 2), 4.5))
        x = np.arange(len(ok))
        w = 0.8 / len(METRICS)
        for i, (k, label) in enumerate(zip(METRICS, LABELS, strict=True)):
            vals = [float(r.get(k) or "nan") for r in ok]
            bars = ax.bar(x + (i - 1.5) * w, vals, w, label=label)
            if base is not None and base.get(k) is not None:
                ax.axhline(float(base[k]), color=bars.patches[0].get_facecolor(), ls="--", lw=1)
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("metric")
        ax.set_title("Ablation on magnetic tile, equal training time (dashed: training-free baseline)")
        ax.legend(fontsize=8, ncol=4, loc="upper left")
        fig.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=100)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
