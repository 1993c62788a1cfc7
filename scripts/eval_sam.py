#!/usr/bin/env python
"""Evaluate the served SAM model on HC18 test-split images at full resolution, in the three prompt modes.

    python scripts/eval_sam.py [--hc18 ../shared/data/hc18] [--limit N] [--model-dir DIR [DIR ...]]
                               [--names NAME ...] [--out docs/eval] [--seed 0] [--cache-dir .data/emb_cache]

Several model folders are evaluated on the same prompts in one run; models with the same image encoder (a
decoder-only fine-tune and its base) share the image embeddings, so the encoder runs once per image. With
--cache-dir the embeddings come from (and go to) that on-disk cache (``fetal_head.segmentation.training.EmbeddingCache``,
keyed by pixels and encoder weights), so later runs skip the encoder altogether.

Prompts, metrics and the failure convention are the evaluation core's (``fetal_head.evaluation.core``): box prompts
are Slicer-style boxes from the reference mask with each side grown 0-20 px (fixed seed, clipped to the image); the
click is one foreground click at the mask's centroid; automatic mode has no prompt. Per image: Dice, HD95 in mm,
and the HC absolute difference in mm against the HC18 CSV; a missed head counts with finite penalties.
Writes per-image CSV, a markdown table and an overlay figure of the best and worst box-prompt cases.
"""

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))

from fetal_head.biometry import BiometryError, measure_head  # noqa: E402
from fetal_head.evaluation.core import MODES, evaluate, load_test_images  # noqa: E402
from fetal_head.io import read_image  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource  # noqa: E402


def overlay_figure(rows, cases_by_id, predictions, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fetal_head.biometry import ellipse_mask

    ranked = sorted([r for r in rows if r["mode"] == "box"], key=lambda r: r["dice"])
    picks = ranked[-2:][::-1] + ranked[:2]
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 3.4))
    for ax, r in zip(np.atleast_1d(axes), picks):
        case = cases_by_id[r["image"]]
        img = read_image(case.image_path)
        ref = case.load_mask()
        pred = predictions[r["image"]]
        ax.imshow(img, cmap="gray")
        ax.contour(ref, levels=[0.5], colors="lime", linewidths=1.2)
        ax.contour(pred, levels=[0.5], colors="red", linewidths=1.0)
        try:
            bio = measure_head(pred, case.pixel_size_mm)
            ax.contour(ellipse_mask(pred.shape, bio), levels=[0.5], colors="yellow", linewidths=0.8, linestyles="--")
            hc = f"HC {bio.hc_mm:.1f} mm (ref {case.hc_mm:.1f})"
        except BiometryError:
            hc = "no head found"
        ax.set_title(f"{case.image_id}: Dice {r['dice']:.3f}\n{hc}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title + "   green: reference, red: SAM, yellow: fitted ellipse", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hc18", default=str(REPO.parent / "shared" / "data" / "hc18"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--model-dir", nargs="+", default=[str(REPO / "apps" / "fetal_head" / "model")],
                    help="model folders (no fetal_head_sam.pt inside: the zero-shot model)")
    ap.add_argument("--names", nargs="*", help="a display name per model folder")
    ap.add_argument("--modes", nargs="*", default=list(MODES))
    ap.add_argument("--out", default=str(REPO / "docs" / "eval"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", help="on-disk embedding cache shared between runs (e.g. .data/emb_cache)")
    args = ap.parse_args()

    cases = [c for c in read_cases(args.hc18) if c.split == args.split][: args.limit]
    test = load_test_images(cases, seed=args.seed)  # the same prompts for every model
    names = args.names or [os.path.basename(os.path.normpath(d)) for d in args.model_dir]
    predictors = [ModelSource(model_dir=d, cache_size=len(cases) + 1).load() for d in args.model_dir]
    for p in predictors[1:]:
        p.share_cache(predictors[0])
    out = Path(args.out)
    summary = []
    for name, predictor in zip(names, predictors):
        disk = EmbeddingCache(args.cache_dir, predictor) if args.cache_dir else None
        rows, predictions, seconds = evaluate_model(predictor, test, args.modes, name, disk)
        sub = out / name if len(predictors) > 1 else out
        sub.mkdir(parents=True, exist_ok=True)
        with open(sub / "per_image.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        for mode in args.modes:
            sel = [r for r in rows if r["mode"] == mode]
            d = np.array([r["dice"] for r in sel])
            hd = np.array([r["hd95_mm"] for r in sel])
            hc = np.array([r["hc_abs_diff_mm"] for r in sel])
            summary.append(
                f"| {name} | {mode} | {100 * d.mean():.2f} ± {100 * d.std():.2f} % | {np.median(hd):.2f} | "
                f"{hc.mean():.2f} |"
            )
        if "box" in args.modes:
            overlay_figure(rows, {c.image_id: c for c in cases}, predictions, sub / "best_worst_box.png",
                           f"{name}, box prompt")
    table = "\n".join(
        [
            f"{len(cases)} HC18 {args.split}-split images at full resolution, seed {args.seed}.",
            "",
            "| model | mode | Dice (mean ± sd) | HD95 mm (median) | HC abs. diff. mm (mean) |",
            "| --- | --- | --- | --- | --- |",
        ]
        + summary
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")
    print(table)


def evaluate_model(predictor, test, modes, name, disk_cache=None):
    t0 = time.time()
    rows, masks = evaluate(predictor, test, modes, desc=f"evaluate {name}", cache=disk_cache)
    rows = [{k: r[k] for k in ("image", "mode", "dice", "hd95_mm", "hc_abs_diff_mm", "head_found")} for r in rows]
    predictions = {key.split("/", 1)[1]: m for key, m in masks.items() if key.startswith("box/")}
    return rows, predictions, time.time() - t0


if __name__ == "__main__":
    main()
