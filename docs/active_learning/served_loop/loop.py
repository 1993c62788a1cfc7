"""An active-learning loop with the served recipe: what a site gets at 20 labels when its labels are the ones the
server's Next Sample hands out (issue 12; one seed, a probe).

Start: N0 labels drawn as the benchmark draws them (``select_labels(pool, N0, seed)``). Each round trains a cell
from zero-shot with ``scripts/eval_automatic.py``'s recipe (``--localiser --no-gate``: the self-trained wide
localiser below 100 labels, head verifier), scores every unlabelled HC18 *pool* image with the server's uncertainty
score (``fetal_head.selection.scores.uncertainty``, the served automatic answer; what the ``uncertainty`` strategy
ranks by) and adds the K highest, as K Next Samples before the next retrain would hand them out
(``select_uncertain``). ``--strategy random`` adds K drawn at random instead (seeded), the control. Every round's
model is scored on the 157 test images (automatic; the last one in every ``--modes``).

    FETAL_HEAD_ENCODER_BF16=0 python docs/active_learning/served_loop/loop.py --rounds 5 10 15 20 --seed 0
    python docs/active_learning/served_loop/loop.py --report --plot docs/active_learning/served_loop/learning_curve.png \\
        --csv docs/active_learning/served_loop/per_image.csv

Rows per scored pool image (uncertainty components and the served answer's Dice against the reference, which the
selection never reads) go to ``WORK/scores/<cell>.jsonl``; test rows to ``WORK/inc/<cell>.jsonl``; a stopped run
resumes.
"""

import argparse
import csv
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..", "..", "..")
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
sys.path.insert(0, os.path.join(REPO, "scripts"))
sys.path.insert(0, os.path.join(HERE, "..", "uncertainty_served"))

import eval_automatic as E  # noqa: E402
from fetal_head.evaluation.benchmark import select_labels  # noqa: E402
from fetal_head.evaluation.core import FAILURE_DICE, load_test_images, summarize, warm_embeddings  # noqa: E402
from fetal_head.io import read_image  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource  # noqa: E402
from fetal_head.segmentation.models import LITEMEDSAM  # noqa: E402
from fetal_head.segmentation.predictor import SamPredictor  # noqa: E402
from fetal_head.segmentation.prompts import mask_dice  # noqa: E402
from fetal_head.selection import select_uncertain  # noqa: E402
from fetal_head.selection.scores import uncertainty  # noqa: E402
from study import auc  # noqa: E402  (the uncertainty_served study's ROC AUC: MONAI's compute_roc_auc)


def cell_tag(strategy, n, seed):
    return f"{strategy}_n{n}_s{seed}"


def read_jsonl(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def score_pool(model_dir, unlabelled, cache_dir, path):
    """The uncertainty score of every unlabelled pool case under the model (resumes from ``path``): the calls of the
    server's ``PoolScorer.score``, which keeps only the score, while this also records the answer's Dice."""
    done = {r["image"]: r for r in read_jsonl(path)}
    predictor = ModelSource(model_dir=model_dir).load()
    cache = EmbeddingCache(cache_dir, predictor)
    for c in tqdm([c for c in unlabelled if c.image_id not in done], desc="score pool", unit="image", mininterval=30):
        image = read_image(c.image_path)
        emb = cache.get(image)
        parts, pred = uncertainty(predictor, emb, image=image)
        row = {"image": c.image_id, **parts, "served_dice": mask_dice(pred.mask, c.load_mask()),
               "source": (pred.confidence or {}).get("source")}
        with open(path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        done[c.image_id] = row
    return done


def run(args):
    torch.set_num_threads(args.threads)
    cases = read_cases(args.hc18)
    pool = [c for c in cases if c.split == "pool" and (c.mask_path or c.annotation_path)]
    by_id = {c.image_id: c for c in pool}
    train_args = SimpleNamespace(automatic_head=False, localiser=True, localiser_steps=300, folds=3, no_gate=True,
                                 head_verifier=True, train_encoder="frozen", cache_dir=args.cache_dir,
                                 min_labels_for_validation=E.TrainConfig().min_labels_for_validation,
                                 self_training_images=E.TrainConfig().self_training_images,
                                 train_steps=E.TRAIN_STEPS)
    holder = SamPredictor.litemedsam(version=LITEMEDSAM)
    test = load_test_images([c for c in cases if c.split == "test"], seed=0)
    warm_embeddings(holder, test, EmbeddingCache(args.cache_dir, holder))
    for sub in ("scores", "inc", "cells"):
        os.makedirs(os.path.join(args.work, sub), exist_ok=True)
    labels = [c.image_id for c in select_labels(pool, args.rounds[0], args.seed)]
    rng = np.random.default_rng(args.seed)
    for r, n in enumerate(args.rounds):
        assert len(labels) == n, (len(labels), n)
        tag = cell_tag(args.strategy, n, args.seed)
        found = E.trained_cell(args.work, tag)
        model_dir, info = found or E.train_cell(pool, n, args.seed, train_args, args.work, tag,
                                                chosen=[by_id[i] for i in labels])
        info = E.add_head_verifier(model_dir, info, pool, args.seed, train_args, args.work)
        last = r == len(args.rounds) - 1
        modes = args.modes if last else ["automatic"]
        rows = E.eval_cell(model_dir, test, holder, modes, None, os.path.join(args.work, "inc", tag + ".jsonl"))
        rec = {"tag": tag, "n": n, "seed": args.seed, "strategy": args.strategy, "labels": labels,
               "summary": summarize(rows), "info": info}
        picks = []
        if not last:
            k = args.rounds[r + 1] - n
            unlabelled = [c for c in pool if c.image_id not in set(labels)]
            if args.strategy == "uncertainty":
                scored = score_pool(model_dir, unlabelled, args.cache_dir,
                                    os.path.join(args.work, "scores", tag + ".jsonl"))
                picks = select_uncertain({i: s["score"] for i, s in scored.items()}, k)
                rec["picked"] = {i: {"score": scored[i]["score"], "served_dice": scored[i]["served_dice"]} for i in picks}
            else:
                picks = sorted(unlabelled[i].image_id for i in rng.choice(len(unlabelled), k, replace=False))
                rec["picked"] = {i: {} for i in picks}
        with open(os.path.join(args.work, "cells", tag + ".json"), "w") as f:
            json.dump(rec, f, default=float)
        labels = labels + picks


# the random 20- and 5-label cells of the shipped recipe (3 seeds each), scored on the same 157 test images
RANDOM_CELLS = [os.path.join(REPO, "docs", "eval", "automatic", "self_training", "n5", "summary.csv"),
                os.path.join(REPO, "docs", "eval", "automatic", "self_training", "summary.csv")]


def random_cells():
    """{(n, seed): {mode: (Dice, images < 0.80, HC abs. diff.)}} of the recorded random-label cells."""
    out = {}
    for path in RANDOM_CELLS:
        with open(path) as f:
            for r in csv.DictReader(f):
                out.setdefault((int(r["n"]), int(r["seed"])), {})[r["mode"]] = (
                    float(r["dice"]), int(r["dice_below_0_80"]), float(r["hc_abs_diff_mm"]))
    return out


def report(args):
    cells = []
    for name in sorted(os.listdir(os.path.join(args.work, "cells"))):
        with open(os.path.join(args.work, "cells", name)) as f:
            cells.append(json.load(f))
    cells.sort(key=lambda c: (c["strategy"] != "uncertainty", c["seed"], c["n"]))
    lines = ["| labels | chosen by | automatic Dice | < 0.80 | automatic HC abs. diff. | box | click | "
             "picked next (served automatic Dice before labelling) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    curves, starts, notes = {}, set(), []
    for c in cells:
        rows = read_jsonl(os.path.join(args.work, "inc", c["tag"] + ".jsonl"))
        auto = [r for r in rows if r["mode"] == "automatic"]
        d = np.array([r["dice"] for r in auto])
        curves.setdefault((c["strategy"], c["seed"]), []).append((c["n"], 100 * d.mean()))
        start = c["n"] == args.rounds[0]
        if start and (c["seed"], tuple(c["labels"])) in starts:  # the control arm's copy of the same start
            notes.append(f"- The {c['strategy']} arm (seed {c['seed']}) added {', '.join(c.get('picked', {}))}.")
            continue
        starts.add((c["seed"], tuple(c["labels"])))
        mean = {m: np.mean([r["dice"] for r in rows if r["mode"] == m]) for m in ("box", "click")
                if any(r["mode"] == m for r in rows)}
        picked = ", ".join(f"{i} ({v['served_dice']:.2f})" if "served_dice" in v else i
                           for i, v in c.get("picked", {}).items())
        how = f"random draw (seed {c['seed']}), the start" if start else f"+ {c['strategy']} picks (seed {c['seed']})"
        lines.append(f"| {c['n']} | {how} | {100 * d.mean():.2f} % ({len(d)} images) | "
                     f"{int((d < FAILURE_DICE).sum())} | {np.mean([r['hc_abs_diff_mm'] for r in auto]):.2f} mm | "
                     + " | ".join(f"{100 * mean[m]:.2f} %" if m in mean else "" for m in ("box", "click"))
                     + f" | {picked} |")
    ref = random_cells()
    for (n, seed), modes in sorted(ref.items()):
        dice, low, hc = modes["automatic"]
        lines.append(f"| {n} | random draw (recorded cell, seed {seed}) | {100 * dice:.2f} % | {low} | {hc:.2f} mm | "
                     f"{100 * modes['box'][0]:.2f} % | {100 * modes['click'][0]:.2f} % | |")
    lines += [""] + notes
    for c in cells:  # how well the score found the served failures among the images it ranked
        scored = read_jsonl(os.path.join(args.work, "scores", c["tag"] + ".jsonl"))
        if not scored:
            continue
        bad = np.array([r["served_dice"] < FAILURE_DICE for r in scored])
        score = np.array([r["score"] for r in scored])
        k = len(c.get("picked", {}))
        top = np.argsort(-score, kind="stable")[:k]
        lines.append(f"- {c['n']} labels: {len(scored)} unlabelled pool images scored, {int(bad.sum())} served failures "
                     f"(Dice < {FAILURE_DICE}); ROC AUC of the score for a failure {auc(score, bad):.3f}; the {k} picks hold "
                     f"{int(bad[top].sum())}; served automatic Dice on the pool {100 * np.mean([r['served_dice'] for r in scored]):.2f} %.")
    print("\n".join(lines))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["cell", "mode", "image", "dice", "hc_abs_diff_mm"])
            for c in cells:
                for r in read_jsonl(os.path.join(args.work, "inc", c["tag"] + ".jsonl")):
                    out.writerow([c["tag"], r["mode"], r["image"], f"{r['dice']:.4f}", f"{r['hc_abs_diff_mm']:.3f}"])
        print(f"wrote {args.csv}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for (strategy, seed), pts in curves.items():
            ax.plot(*zip(*sorted(pts)), "o-", label=f"{strategy} picks (start: random, seed {seed})")
        xs = [n for n, _ in ref]
        ax.plot(xs, [100 * m["automatic"][0] for m in ref.values()], "kx", label="random draws of 5 and 20 (recorded cells, 3 seeds)")
        ax.axhline(96.5, color="grey", ls="--", lw=0.8, label="issue 12 aim at 20 labels")
        ax.set_xlabel("real labels")
        ax.set_ylabel("automatic Dice, 157 test images (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, nargs="+", default=[5, 10, 15, 20], help="label counts, first drawn at random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", choices=("uncertainty", "random"), default="uncertainty")
    ap.add_argument("--modes", nargs="+", default=["box", "click", "automatic"], help="scored after the last round")
    ap.add_argument("--work", default=".data/al_loop")
    ap.add_argument("--cache-dir", default=".data/emb_cache")
    ap.add_argument("--hc18", default=os.path.join(REPO, "..", "shared", "data", "hc18"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--plot", help="also draw the learning curve to this PNG")
    ap.add_argument("--csv", help="also write every scored test row (cell, mode, image, Dice, HC) to this CSV")
    args = ap.parse_args()
    if not args.report:
        run(args)
    report(args)


if __name__ == "__main__":
    main()
