"""One active-learning round with the localiser recipe: does labelling u3's picks train a better model than labelling
random ones? (a probe for docs/active_learning/uncertainty_served, one seed; not the full annotation study)

From the 5-label model of the study (seed 0), 5 more labels are chosen among the 150 pool images the study scored
with it: the 5 with the highest u3 score, or 5 drawn at random (seed 0). Each 10-label set is trained from zero-shot
with ``scripts/eval_automatic.py``'s recipe (``--localiser --no-gate``, head verifier; the trainer's validation
split from 10 labels) and scored on the 157 test images in box and automatic mode.

    FETAL_HEAD_ENCODER_BF16=0 python docs/active_learning/uncertainty_served/one_round.py --arm u3     # and --arm random
    python docs/active_learning/uncertainty_served/one_round.py --report
"""

import argparse
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..", "..", "..")
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import eval_automatic as E  # noqa: E402
from fetal_head.evaluation.core import FAILURE_DICE, load_test_images, warm_embeddings  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.models import LITEMEDSAM  # noqa: E402
from fetal_head.segmentation.predictor import SamPredictor  # noqa: E402
from fetal_head.selection.scores import UNCERTAINTY_WEIGHTS  # noqa: E402

BASE = ".data/eval_s11/models/n5_s0_loc_nogate"
ROWS = ".data/al_served/n5_s0/rows.jsonl"
WORK = ".data/al_round"
K = 5


def picks(arm):
    with open(ROWS) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if arm == "random":
        return sorted(rows[i]["image"] for i in np.random.default_rng(0).choice(len(rows), K, replace=False))
    score = {r["image"]: sum(w * r["served"][k] for k, w in UNCERTAINTY_WEIGHTS.items()) for r in rows}
    return sorted(sorted(score, key=lambda i: (-score[i], i))[:K])


def run(arm, hc18, threads):
    torch.set_num_threads(threads)
    cases = read_cases(hc18)
    by_id = {c.image_id: c for c in cases}
    with open(os.path.join(BASE, "cell_info.json")) as f:
        base_labels = json.load(f)["labels"]
    chosen = [by_id[i] for i in base_labels + picks(arm)]
    args = SimpleNamespace(automatic_head=False, localiser=True, localiser_steps=300, folds=3, no_gate=True,
                           head_verifier=True, train_encoder="frozen", cache_dir=".data/emb_cache",
                           min_labels_for_validation=E.TrainConfig().min_labels_for_validation,
                           train_steps=E.TRAIN_STEPS)
    tag = f"n10_{arm}"
    found = E.trained_cell(WORK, tag)
    model_dir, info = found or E.train_cell(None, len(chosen), 0, args, WORK, tag, chosen=chosen)
    holder = SamPredictor.litemedsam(version=LITEMEDSAM)
    test = load_test_images([c for c in cases if c.split == "test"], seed=0)
    warm_embeddings(holder, test, EmbeddingCache(args.cache_dir, holder))
    os.makedirs(os.path.join(WORK, "cells"), exist_ok=True)
    E.eval_cell(model_dir, test, holder, ["box", "automatic"], None, os.path.join(WORK, "cells", f"{tag}.jsonl"))


def report():
    arms = {}  # arm -> the cell's scored rows
    for arm in ("random", "u3"):
        path = os.path.join(WORK, "cells", f"n10_{arm}.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                arms[arm] = [json.loads(line) for line in f if line.strip()]
    lines = ["| 10 labels (5 of the 5-label model + 5 picked) | picked | box Dice | automatic Dice | automatic < 0.80 "
             "| automatic HC abs. diff. |", "| --- | --- | --- | --- | --- | --- |"]
    for arm, rows in arms.items():
        box = np.array([r["dice"] for r in rows if r["mode"] == "box"])
        auto = np.array([r["dice"] for r in rows if r["mode"] == "automatic"])
        hc = np.array([r["hc_abs_diff_mm"] for r in rows if r["mode"] == "automatic"])
        lines.append(f"| {arm} ({len(auto)} test images) | {', '.join(picks(arm))} | {100 * box.mean():.2f} % | "
                     f"{100 * auto.mean():.2f} % | {int((auto < FAILURE_DICE).sum())} | {hc.mean():.2f} mm |")
    if len(arms) == 2:
        dice = {arm: {(r["image"], r["mode"]): r["dice"] for r in rows} for arm, rows in arms.items()}
        lines.append("")
        for mode in ("box", "automatic"):
            keys = sorted(k for k in dice["u3"] if k[1] == mode and k in dice["random"])
            d = np.array([dice["u3"][k] - dice["random"][k] for k in keys])
            lines.append(f"Paired on {len(keys)} test images, {mode}: u3 - random = {100 * d.mean():+.2f} points "
                         f"(better / worse by more than one point on {int((d > 0.01).sum())} / {int((d < -0.01).sum())} images).")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=("u3", "random"))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--hc18", default=os.path.join(REPO, "..", "shared", "data", "hc18"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.arm:
        run(args.arm, args.hc18, args.threads)
    if args.report or not args.arm:
        report()


if __name__ == "__main__":
    main()
