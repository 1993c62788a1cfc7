"""The answer's mask as the decoder drew it vs its fitted head ellipse, filled (the infer option ``mask_shape``),
scored side by side on the same answers: one prediction per image and mode, both shapes scored against the
reference (``fetal_head.evaluation.core``: Dice, HD95, HC absolute difference).

    .venv/bin/python scripts/bench_mask_shape.py [--model-dir DIR] [--modes box click automatic] [--limit N] \\
        [--hc18 ../shared/data/hc18] [--cache-dir .data/emb_cache] [--out docs/eval/mask_shape/NAME]

HC18's reference masks are sonographers' ellipses filled to the outer edge of the drawn outline; the decoder's
mask follows the skull's own outline, a little ragged. Without ``--hc18`` (or when it is missing) the 31 HC18
images shipped in tests/data score instead of the test split. Writes ``summary.md``, ``per_image.csv``,
``dice_scatter.png`` (per image: segmentation Dice vs ellipse Dice) and ``overlays.png`` (the first mode's three
images the ellipse changed most) under ``--out`` when given.
"""

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))
SHAPES = ("segmentation", "ellipse")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="fine-tuned model folder (default: zero-shot LiteMedSAM)")
    ap.add_argument("--modes", nargs="+", default=["box", "click", "automatic"])
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test images")
    ap.add_argument("--hc18", default=str(REPO.parent / "shared" / "data" / "hc18"))
    ap.add_argument("--cache-dir", default=None, help="embedding cache folder (read and written)")
    ap.add_argument("--seed", type=int, default=0, help="the box jitter's seed (evaluation.core)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from tqdm import tqdm

    from fetal_head.evaluation.core import FAILURE_DICE, image_metrics, load_test_images
    from fetal_head.io.hc18 import read_cases
    from fetal_head.measurement import answer_mask
    from fetal_head.segmentation import SamPredictor
    from fetal_head.segmentation.embedding_cache import EmbeddingCache
    from fetal_head.segmentation.model_store import ModelSource

    if os.path.isdir(os.path.join(args.hc18, "images")):
        cases = [c for c in read_cases(args.hc18) if c.split == "test"]
        where = f"the HC18 test split ({os.path.relpath(args.hc18, REPO)})"
    else:
        cases, where = read_cases(str(REPO / "tests" / "data" / "hc18_subset")), "the 31 HC18 images in tests/data"
    test = load_test_images(cases[: args.limit], seed=args.seed)
    predictor = ModelSource(model_dir=args.model_dir).load() if args.model_dir else SamPredictor.litemedsam()
    if args.cache_dir:
        predictor.disk_cache = EmbeddingCache(args.cache_dir, predictor)
    rows, first_mode = [], {}
    for t in tqdm(test, desc="images", unit="image"):
        for mode in args.modes:
            decoded = predictor.predict(t.image, t.prompt(mode)).mask  # one answer, scored in both shapes
            if mode == args.modes[0]:
                first_mode[t.case.image_id] = (t, decoded)
            for shape in SHAPES:
                m = image_metrics(answer_mask(decoded, shape), t.mask, t.case.pixel_size_mm, t.case.hc_mm)
                rows.append({"image": t.case.image_id, "mode": mode, "mask_shape": shape, **m})

    model = args.model_dir or "zero-shot LiteMedSAM"
    lines = [f"# Answer mask: decoder's segmentation vs fitted ellipse ({model})", "",
             f"{len(test)} images of {where}, box jitter seed {args.seed}; the same answers scored in both shapes.", "",
             f"`python scripts/bench_mask_shape.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             "| mode | mask | Dice % (mean) | Dice % (median) | HD95 mm (mean) | HC abs. diff. mm | images < 0.80 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode in args.modes:
        for shape in SHAPES:
            rs = [r for r in rows if r["mode"] == mode and r["mask_shape"] == shape]
            d = np.array([r["dice"] for r in rs])
            lines.append(f"| {mode} | {shape} | {100 * d.mean():.2f} | {100 * np.median(d):.2f} | "
                         f"{np.mean([r['hd95_mm'] for r in rs]):.2f} | {np.mean([r['hc_abs_diff_mm'] for r in rs]):.2f} | "
                         f"{int((d < FAILURE_DICE).sum())} |")
        seg, ell = ([r["dice"] for r in rows if r["mode"] == mode and r["mask_shape"] == s] for s in SHAPES)
        better = sum(e > s for s, e in zip(seg, ell))
        lines.append(f"| {mode} | ellipse - segmentation | {100 * (np.mean(ell) - np.mean(seg)):+.2f} points | | | | "
                     f"ellipse better on {better} of {len(seg)} |")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "per_image.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        plot(rows, args.modes, os.path.join(args.out, "dice_scatter.png"), model)
        plot_overlays(rows, args.modes[0], first_mode, os.path.join(args.out, "overlays.png"))
    return 0


def plot(rows, modes, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(modes), figsize=(4 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        seg, ell = (np.array([r["dice"] for r in rows if r["mode"] == mode and r["mask_shape"] == s]) for s in SHAPES)
        ax.scatter(100 * seg, 100 * ell, s=8)
        lo = max(0.0, 100 * min(seg.min(), ell.min()) - 1)
        ax.plot([lo, 100], [lo, 100], color="grey", linewidth=0.8)
        ax.set(xlabel="segmentation Dice %", ylabel="ellipse Dice %", title=f"{mode}: {len(seg)} images",
               xlim=(lo, 100), ylim=(lo, 100))
    fig.suptitle(f"answer mask: decoder's segmentation vs fitted ellipse ({title})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_overlays(rows, mode, answers, path, k=3):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fetal_head.measurement import answer_mask

    dice = {(r["image"], r["mask_shape"]): r["dice"] for r in rows if r["mode"] == mode}
    ids = sorted(answers, key=lambda i: -abs(dice[i, "ellipse"] - dice[i, "segmentation"]))[:k]
    fig, axes = plt.subplots(1, len(ids), figsize=(4.5 * len(ids), 3.6), squeeze=False)
    for ax, image_id in zip(axes[0], ids):
        t, decoded = answers[image_id]
        rr, cc = np.nonzero(t.mask | decoded)
        pad = 25
        r0, r1 = max(rr.min() - pad, 0), min(rr.max() + pad, t.mask.shape[0])
        c0, c1 = max(cc.min() - pad, 0), min(cc.max() + pad, t.mask.shape[1])
        crop = (slice(r0, r1), slice(c0, c1))
        ax.imshow(t.image[crop], cmap="gray")
        ax.contour(t.mask[crop], levels=[0.5], colors="lime", linewidths=1.0)
        ax.contour(decoded[crop], levels=[0.5], colors="red", linewidths=1.0)
        ax.contour(answer_mask(decoded, "ellipse")[crop], levels=[0.5], colors="yellow", linewidths=1.0,
                   linestyles="--")
        ax.set_title(f"{image_id}: segmentation {100 * dice[image_id, 'segmentation']:.1f} %, "
                     f"ellipse {100 * dice[image_id, 'ellipse']:.1f} %", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{mode} answers: reference (green), decoder's segmentation (red), its fitted ellipse (yellow)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
