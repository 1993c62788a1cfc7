"""The worst automatic answers of one evaluation cell (scripts/eval_automatic.py), redrawn with the cell's model as
it serves now: reference (green), automatic answer (yellow, dashed), one click at the centroid (red), and which
candidate the automatic route chose (docs/eval/automatic/failures_n20_s0.png).

    python scripts/plot_failures.py --work-dir .data/eval_peaks --cell n20_s0_loc_nogate [--k 6] [--out PNG]

The worst images are read from the cell's per-image rows (``WORK/inc/CELL.jsonl``); their answers are computed again,
so the figure shows the served route even where the rows are older.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "apps", "fetal_head", "lib"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--cell", required=True)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--out", default="docs/eval/automatic/failures_n20_s0.png")
    ap.add_argument("--hc18", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hc18"))
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fetal_head.evaluation.core import AUTOMATIC, image_metrics, load_test_images
    from fetal_head.io.hc18 import read_cases
    from fetal_head.segmentation.model_store import ModelSource

    with open(os.path.join(args.work_dir, "inc", args.cell + ".jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    worst = sorted((r for r in rows if r["mode"] == AUTOMATIC), key=lambda r: r["dice"])[: args.k]
    cases = {c.image_id: c for c in read_cases(args.hc18)}
    test = load_test_images([cases[r["image"]] for r in worst])
    pred = ModelSource(model_dir=os.path.join(args.work_dir, "models", args.cell)).load()
    cols = min(len(test), 3)
    rows_ = -(-len(test) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.4 * cols, 4.0 * rows_), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, t in zip(axes.flat, test):
        auto = pred.predict(t.image, t.prompt(AUTOMATIC))
        click = pred.predict(t.image, t.prompt("click"))
        px, hc = t.case.pixel_size_mm, t.case.hc_mm
        d_auto = image_metrics(auto.mask, t.mask, px, hc)["dice"]
        d_click = image_metrics(click.mask, t.mask, px, hc)["dice"]
        ax.imshow(t.image, cmap="gray")
        ax.contour(t.mask, levels=[0.5], colors="lime", linewidths=1.2)
        if auto.mask.any():
            ax.contour(auto.mask, levels=[0.5], colors="yellow", linewidths=1.0, linestyles="--")
        if click.mask.any():
            ax.contour(click.mask, levels=[0.5], colors="red", linewidths=0.8)
        conf = auto.confidence or {}
        chosen = conf.get("chosen_candidate") or conf.get("source", "-")  # no chosen_candidate: not the localiser
        ax.set_title(f"{t.case.image_id} (HC {hc:.0f} mm)\nautomatic {d_auto:.2f} ({chosen}), click {d_click:.2f}",
                     fontsize=8)
    fig.suptitle(f"{args.cell}: the {len(test)} worst automatic answers\ngreen: reference, yellow dashed: automatic, "
                 "red: one click at the centroid", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93), h_pad=2.5)
    fig.savefig(args.out, dpi=100)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
