"""Does an automatic answer's reported confidence tell a sonographer which answers to check? (issue 12)

Scores automatic mode on the HC18 test split through the served path (``SamPredictor.predict`` with no prompt, the
box-search agreement on, as the server answers) and keeps each answer's ``confidence`` JSON beside its Dice. Then,
for each numeric confidence field: how well it separates failures (Dice < 0.80) from the rest (ROC AUC, MONAI's
``compute_roc_auc``), and for thresholds on the two fields a client would use, how many answers a "check this one"
flag would mark and how many failures it would catch.

    python docs/eval/automatic/confidence/confidence.py --model-dir .data/eval_s9/models/n20_s0_loc_nogate \
        --out docs/eval/automatic/confidence

Per-image answers are appended to ``<work>/answers.jsonl`` as they are scored (a stopped run resumes).
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..")
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))

from fetal_head.evaluation.core import FAILURE_DICE, image_metrics, load_test_images  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation import Prompt  # noqa: E402
from fetal_head.segmentation.box_search import LOCALISER_REVIEW_BELOW, REVIEW_BELOW  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource  # noqa: E402

FIELDS = ("head_probability", "box_search_agreement", "candidate_score", "decoder_iou", "localiser_score",
          "localiser_decoder_dice", "localiser_head_prob", "localiser_centre_prob", "rebox_stability")


def score(args):
    os.makedirs(args.work, exist_ok=True)
    path = os.path.join(args.work, "answers.jsonl")
    done = set()
    if os.path.isfile(path):
        with open(path) as f:
            done = {json.loads(line)["image"] for line in f if line.strip()}
    cases = [c for c in read_cases(args.hc18) if c.split == "test"]
    test = load_test_images(cases, seed=0)
    predictor = ModelSource(model_dir=args.model_dir).load()
    predictor.automatic_agreement = True  # as served
    cache = EmbeddingCache(args.cache_dir, predictor)
    for t in tqdm(test, desc="automatic answers", unit="image", mininterval=30):
        if t.case.image_id in done:
            continue
        predictor.remember(t.image, cache.get(t.image))
        pred = predictor.predict(t.image, Prompt())
        row = {"image": t.case.image_id, **image_metrics(pred.mask, t.mask, t.case.pixel_size_mm, t.case.hc_mm),
               "confidence": pred.confidence}
        with open(path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")


def auc(values, failed) -> float:
    """ROC AUC of "low value = failure" (MONAI's compute_roc_auc)."""
    from monai.metrics import compute_roc_auc

    return float(compute_roc_auc(torch.as_tensor(-np.asarray(values, float)), torch.as_tensor(failed, dtype=torch.float32)))


def report(args):
    with open(os.path.join(args.work, "answers.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    dice = np.array([r["dice"] for r in rows])
    hc = np.array([r["hc_abs_diff_mm"] for r in rows])
    failed = dice < FAILURE_DICE
    lines = [f"# Automatic answers' confidence against their Dice ({len(rows)} HC18 test images)", "",
             f"Model: `{args.model_dir}`. Command: `python docs/eval/automatic/confidence/confidence.py --model-dir "
             f"{args.model_dir} --out {args.out}`. Automatic Dice {100 * dice.mean():.2f} %, {int(failed.sum())} "
             f"answers below {FAILURE_DICE:.2f}.", "",
             f"HC abs. diff. of all automatic answers: {hc.mean():.2f} mm (median {np.median(hc):.2f} mm).", "",
             "| confidence field | answers with it | ROC AUC for a failure (low value = failure) |", "| --- | --- | --- |"]
    for k in FIELDS:
        have = [r for r in rows if isinstance(r["confidence"].get(k), (int, float))]
        f = np.array([r["dice"] < FAILURE_DICE for r in have])
        a = auc([r["confidence"][k] for r in have], f) if 0 < f.sum() < len(f) else float("nan")
        lines.append(f"| `{k}` | {len(have)} | {a:.3f} |")
    lines += ["", "A client flags an answer for a look when the field is below the threshold:", "",
              "| rule | answers flagged | failures caught | automatic Dice of the unflagged answers | of the flagged "
              "| HC abs. diff. of the unflagged / flagged |",
              "| --- | --- | --- | --- | --- | --- |"]
    hp = np.array([r["confidence"].get("head_probability", np.nan) for r in rows], float)
    ag = np.array([r["confidence"].get("box_search_agreement", np.nan) for r in rows], float)
    # the served flag (needs_review: head_probability < box_search.REVIEW_BELOW) among its alternatives
    rules = [(f"head_probability < {t}", hp < t) for t in sorted({0.3, REVIEW_BELOW, 0.7})]
    rules += [(f"box_search_agreement < {t}", ag < t) for t in (0.5, 0.8, 0.9)]
    rules += [(f"head_probability < {REVIEW_BELOW} or box_search_agreement < {t}", (hp < REVIEW_BELOW) | (ag < t))
              for t in (0.8, 0.9)]
    # the wide localiser's own box (no verifier): needs_review is localiser_head_prob < LOCALISER_REVIEW_BELOW
    lh = np.array([r["confidence"].get("localiser_head_prob", np.nan) for r in rows], float)
    if np.isnan(hp).all() and not np.isnan(lh).all():
        rules = [(f"localiser_head_prob < {t}", lh < t) for t in sorted({0.95, LOCALISER_REVIEW_BELOW, 0.97})]
        rules += [(f"box_search_agreement < {t}", ag < t) for t in (0.8, 0.9)]
    for name, flag in rules:
        if not flag.any():
            lines.append(f"| {name} | 0 | 0 | - | - | - |")
            continue
        lines.append(f"| {name} | {int(flag.sum())} ({100 * flag.mean():.0f} %) | {int((flag & failed).sum())} of "
                     f"{int(failed.sum())} | {100 * dice[~flag].mean():.2f} % | {100 * dice[flag].mean():.2f} % | "
                     f"{hc[~flag].mean():.2f} / {hc[flag].mean():.2f} mm |")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, os.path.join(args.out, "confidence_vs_dice.png"))
    print("\n".join(lines))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    dice = np.array([r["dice"] for r in rows])
    wide = all(r["confidence"].get("head_probability") is None for r in rows)  # the wide localiser's own box
    for ax, k in zip(axes, ("localiser_head_prob" if wide else "head_probability", "box_search_agreement")):
        v = np.array([r["confidence"].get(k, np.nan) for r in rows], float)
        ax.scatter(v, dice, s=12, c=np.where(dice < FAILURE_DICE, "tab:red", "tab:blue"))
        ax.axhline(FAILURE_DICE, color="gray", lw=0.8, ls="--")
        ax.set_xlabel(k)
        ax.set_ylabel("automatic Dice")
        ax.set_title(f"{k} vs Dice (red: Dice < {FAILURE_DICE:.2f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--hc18", default=os.path.join(REPO, "..", "shared", "data", "hc18"))
    ap.add_argument("--cache-dir", default=".data/emb_cache")
    ap.add_argument("--work", default=".data/eval_confidence")
    ap.add_argument("--out", default="docs/eval/automatic/confidence")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.report_only:
        score(args)
    report(args)


if __name__ == "__main__":
    main()
