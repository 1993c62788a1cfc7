"""Does the uncertainty strategy find the images the served model gets wrong? (issue 12: confidence for active learning)

Until score version u2 the ``uncertainty`` strategy scored :func:`fetal_head.selection.quick_automatic`'s answer
(the automatic head, else a centre-only box search), not the answer a retrained model serves (the head localiser
with its verifier), and it ignored that answer's ``head_probability``, which separates the served failures well
(docs/eval/automatic/confidence). This study scores unlabelled HC18 *pool* images (never the model's labels, nor
the test split) with both answers and asks, for each candidate score, how well it ranks the images whose served
automatic answer fails (Dice < 0.80) or is poor (1 - Dice), which is what uncertainty sampling is for: labelling
where the model is wrong.

    python docs/active_learning/uncertainty_served/study.py --model-dir .data/eval_s9/models/n20_s0_loc_nogate \\
        --work .data/al_served/n20_s0 --out docs/active_learning/uncertainty_served/n20_s0

Per-image rows are appended to ``<work>/rows.jsonl`` as they are scored (a stopped run resumes).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))

from fetal_head.evaluation.core import FAILURE_DICE  # noqa: E402
from fetal_head.io import read_image  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource  # noqa: E402
from fetal_head.segmentation.prompts import mask_dice  # noqa: E402
from fetal_head.selection.scores import SCORE_VERSION, UNCERTAINTY_WEIGHTS, automatic_answer, quick_automatic, uncertainty_of  # noqa: E402

U2 = {"disagreement": 1.0, "low_iou": 0.5, "non_ellipse": 0.5}  # the u2 score's weights (shipped until this study)


def model_labels(model_dir):
    with open(os.path.join(model_dir, "cell_info.json")) as f:
        return set(json.load(f)["labels"])


def pool_images(args):
    """``args.n`` pool images, drawn with ``args.seed`` from the pool minus every label of the models compared."""
    taken = set()
    for d in args.exclude_labels_of + [args.model_dir]:
        taken |= model_labels(d)
    pool = [c for c in read_cases(args.hc18) if c.split == "pool" and c.image_id not in taken]
    idx = np.random.default_rng(args.seed).permutation(len(pool))[: args.n]
    return [pool[i] for i in sorted(idx)]


def score(args):
    os.makedirs(args.work, exist_ok=True)
    path = os.path.join(args.work, "rows.jsonl")
    done = set()
    if os.path.isfile(path):
        with open(path) as f:
            done = {json.loads(line)["image"] for line in f if line.strip()}
    predictor = ModelSource(model_dir=args.model_dir).load()
    assert predictor.localiser is not None, "the study compares answers of a model with a head localiser"
    cache = EmbeddingCache(args.cache_dir, predictor)
    for case in tqdm(pool_images(args), desc="pool images", unit="image", mininterval=30):
        if case.image_id in done:
            continue
        image, ref = read_image(case.image_path), case.load_mask()
        emb = cache.get(image)
        row = {"image": case.image_id}
        for name, answer in (("quick", lambda: quick_automatic(predictor, emb)),
                             ("served", lambda: automatic_answer(predictor, emb, image))):
            t0 = time.perf_counter()
            pred = answer()
            comps = uncertainty_of(predictor, emb, pred)
            row[name] = {"dice": mask_dice(pred.mask, ref), "seconds": round(time.perf_counter() - t0, 2), **comps,
                         "source": (pred.confidence or {}).get("source")}
        with open(path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


def auc(values, failed) -> float:
    """ROC AUC of "high value = failure" (MONAI's compute_roc_auc)."""
    from monai.metrics import compute_roc_auc

    return float(compute_roc_auc(torch.as_tensor(np.asarray(values, float)), torch.as_tensor(failed, dtype=torch.float32)))


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def weighted(row, weights):
    return sum(w * row[k] for k, w in weights.items())


def variants():
    """The candidate scores: name -> (which answer's components, weights)."""
    return {
        "u2 on the quick answer (shipped before)": ("quick", U2),
        "u2 on the served answer": ("served", U2),
        "not_head alone (1 - head_probability)": ("served", {"not_head": 1.0}),
        "u2 + 1 x not_head, served": ("served", {**U2, "not_head": 1.0}),
        "u2 + 2 x not_head, served": ("served", {**U2, "not_head": 2.0}),
        f"shipped now ({SCORE_VERSION}: {UNCERTAINTY_WEIGHTS})": ("served", UNCERTAINTY_WEIGHTS),
    }


def report(args):
    with open(os.path.join(args.work, "rows.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    dice = np.array([r["served"]["dice"] for r in rows])
    failed = dice < FAILURE_DICE
    k_top = (5, 10, 20)
    lines = [f"# Uncertainty scores against the served automatic answer ({len(rows)} unlabelled HC18 pool images)", "",
             f"Model: `{args.model_dir}`. Command: `python docs/active_learning/uncertainty_served/study.py --model-dir "
             f"{args.model_dir}" + "".join(f" --exclude-labels-of {d}" for d in args.exclude_labels_of) + f" --n {args.n}`.", "",
             f"Served automatic Dice on these images: {100 * dice.mean():.2f} % (median {100 * np.median(dice):.2f} %), "
             f"{int(failed.sum())} below {FAILURE_DICE:.2f}. The quick answer (what u2 scored): "
             f"{100 * np.mean([r['quick']['dice'] for r in rows]):.2f} %. Seconds per image (answer + its score): quick "
             f"{np.mean([r['quick']['seconds'] for r in rows]):.1f}, served {np.mean([r['served']['seconds'] for r in rows]):.1f}.", "",
             "Each score ranks the images; a good uncertainty score puts the served failures first.", "",
             "| score | ROC AUC for a served failure | Spearman with 1 - served Dice | "
             + " | ".join(f"top {k}: failures / served Dice" for k in k_top) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in k_top) + " |"]
    for name, (which, w) in variants().items():
        s = np.array([weighted(r[which], w) for r in rows])
        a = auc(s, failed) if 0 < failed.sum() < len(failed) else float("nan")
        order = np.argsort(-s, kind="stable")
        tops = [f"{int(failed[order[:k]].sum())} / {100 * dice[order[:k]].mean():.1f} %" for k in k_top]
        lines.append(f"| {name} | {a:.3f} | {spearman(s, 1 - dice):.3f} | " + " | ".join(tops) + " |")
    lines += ["", f"A random pick: {failed.mean() * 100:.0f} % failures, {100 * dice.mean():.1f} % served Dice on average."]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, os.path.join(args.out, "scores_vs_dice.png"))
    print("\n".join(lines))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dice = np.array([r["served"]["dice"] for r in rows])
    panels = [("u2 on the quick answer (shipped before)", "quick", U2),
              (f"{SCORE_VERSION} (shipped now)", "served", UNCERTAINTY_WEIGHTS)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, which, w) in zip(axes, panels):
        s = np.array([weighted(r[which], w) for r in rows])
        ax.scatter(s, dice, s=12, c=np.where(dice < FAILURE_DICE, "tab:red", "tab:blue"))
        ax.axhline(FAILURE_DICE, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("uncertainty score (higher: labelled first)")
        ax.set_ylabel("served automatic Dice")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--exclude-labels-of", action="append", default=[],
                    help="another model dir whose labels are left out too (so two models score the same images)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hc18", default=os.path.join(REPO, "..", "shared", "data", "hc18"))
    ap.add_argument("--cache-dir", default=".data/emb_cache")
    ap.add_argument("--work", default=".data/al_served")
    ap.add_argument("--out", default="docs/active_learning/uncertainty_served")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.report_only:
        score(args)
    report(args)


if __name__ == "__main__":
    main()
