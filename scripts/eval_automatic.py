"""Automatic mode from few labels: train on N pool labels (box decoder + head localiser, the trainer's recipe),
save and reload the checkpoint as the server does, and score box / one click at the centroid / automatic on the
HC18 test split through the one evaluation core (``fetal_head.evaluation.core``).

    python scripts/eval_automatic.py --n 5 20 --seeds 0 [--test-limit 0] [--new-site]

Writes ``docs/eval/automatic/summary.md``, ``per_cell.csv`` (mode x N x seed means) and ``per_image.csv``;
finished cells are kept in ``--work-dir`` and reused (delete it to rerun). Embeddings come from the disk cache
(``--cache-dir``), so only uncached images are encoded.

``--new-site``: the coarsest-pixel-size third of HC18 (pool and test, largest mm per pixel: the small heads of
early pregnancy, imaged zoomed out) is the "new site". Scoring is on its test part only. "Before" is the app as it
ships (zero-shot); "after" fine-tunes the shipped model on 5 / 10 of the site's own pool labels (``--site-n``), the
way a site that installs the app and labels a handful of its images retrains it. ``--base-n N`` instead starts
from a model first trained on N labels of the other two thirds (an app trained elsewhere), scored as well.

Automatic answers are scored with ``automatic_agreement`` off: that only adds the box search's Dice to the
answer's confidence and never changes the mask.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "apps", "fetal_head", "lib"))

from fetal_head.evaluation.benchmark import select_labels  # noqa: E402
from fetal_head.evaluation.core import FAILURE_DICE, MODES, evaluate, load_test_images, summarize, warm_embeddings  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.measurement import DEFAULT_MASK_SHAPE, MASK_SHAPES  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource, meta_path, save_finetuned  # noqa: E402
from fetal_head.segmentation.models import LITEMEDSAM  # noqa: E402
from fetal_head.segmentation.predictor import SamPredictor  # noqa: E402
from fetal_head.segmentation.training import (TrainConfig, checkpoint_meta, finetune, fit_head_verifier,  # noqa: E402
                                              label_items, split_items)

# the "cpu" benchmark configuration's schedule (what gave box 96.10 / 96.72 % at 5 / 20 labels)
TRAIN_STEPS, BATCH, LR, MAX_EPOCHS, MAX_VAL = 100, 4, 1e-4, 40, 20


def cell_config(n, seed, items, train_steps=TRAIN_STEPS, **options) -> TrainConfig:
    """A cell's TrainConfig for ``n`` labels (``items``): the schedule above, ``train_steps`` optimizer steps spread
    over the images the trainer's own split trains on; ``options``: the other TrainConfig fields."""
    val_split = 0.2 if n * 0.2 <= MAX_VAL else MAX_VAL / n
    cfg = TrainConfig(train_batch_size=BATCH, val_split=val_split, learning_rate=LR, seed=seed, **options)
    train, _ = split_items(items, cfg)
    epochs = int(np.clip(math.ceil(train_steps / max(1, math.ceil(len(train) / BATCH))), 1, MAX_EPOCHS))
    return replace(cfg, max_epochs=epochs)


def train_cell(pool, n, seed, args, work, tag, base_dir=None, chosen=None):
    """Train one cell on ``chosen`` labels (default: ``n`` of ``pool`` drawn with ``seed``, the benchmark's draw)."""
    chosen = select_labels(pool, n, seed) if chosen is None else chosen
    items = label_items(chosen, os.path.join(work, "labels"))
    cfg = cell_config(n, seed, items, args.train_steps, automatic_head=args.automatic_head,
                      localiser=args.localiser, localiser_steps=args.localiser_steps,
                      localiser_folds=args.folds, localiser_gate=not args.no_gate,
                      head_verifier=args.head_verifier, train_encoder=args.train_encoder,
                      min_labels_for_validation=args.min_labels_for_validation,
                      self_training_images=args.self_training_images)
    predictor = (ModelSource(model_dir=base_dir).load() if base_dir else SamPredictor.litemedsam(version=LITEMEDSAM))
    t0 = time.time()
    # the rest of the pool is the datastore's unlabelled images (a site's own, in the new-site simulation)
    picked = {c.image_id for c in chosen}
    unlabelled = [c.image_path for c in pool if c.image_id not in picked]
    summary = finetune(predictor, items, cfg, args.cache_dir, unlabelled=unlabelled)
    model_dir = os.path.join(work, "models", tag)
    save_finetuned(predictor.model, LITEMEDSAM, model_dir, checkpoint_meta(summary, LITEMEDSAM))
    info = {"labels": [c.image_id for c in chosen], "epochs": cfg.max_epochs, "seconds_train": round(time.time() - t0, 1),
            "localiser": summary.get("localiser"), "head_verifier": summary.get("head_verifier"),
            "best_epochs": summary.get("best_epochs"), "self_training": summary.get("self_training")}
    with open(os.path.join(model_dir, "cell_info.json"), "w") as f:
        json.dump(info, f, default=float)
    return model_dir, info


def command_args(argv):
    """The command line as recorded in a cell, without ``--out DIR``: the report is read in that folder, wherever a
    cell's report was first written."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


def trained_cell(work, tag):
    """(model_dir, info) of a cell whose model a stopped run already trained and saved, else None."""
    model_dir = os.path.join(work, "models", tag)
    if not os.path.isfile(os.path.join(model_dir, "cell_info.json")):
        return None
    with open(os.path.join(model_dir, "cell_info.json")) as f:
        return model_dir, json.load(f)


def add_head_verifier(model_dir, info, cases, seed, args, work):
    """Fit the trainer's head verifier (training.fit_head_verifier) onto a cell's saved model, on the cell's own
    labels, when it has none: how cells trained before the verifier existed were brought up to the recipe without
    retraining their decoder and localiser (both deterministic, so a retrain would give the same ones)."""
    with open(meta_path(model_dir)) as f:
        meta = json.load(f)
    if meta.get("head_verifier"):
        return info
    predictor = ModelSource(model_dir=model_dir).load()
    if predictor.localiser is None:
        return info
    by_id = {c.image_id: c for c in cases}
    items = label_items([by_id[i] for i in info["labels"]], os.path.join(work, "labels"))
    meta["head_verifier"] = fit_head_verifier(predictor, items, TrainConfig(seed=seed), args.cache_dir)
    save_finetuned(predictor.model, LITEMEDSAM, model_dir, meta)
    info = dict(info, head_verifier=meta["head_verifier"])
    with open(os.path.join(model_dir, "cell_info.json"), "w") as f:
        json.dump(info, f, default=float)
    return info


def eval_cell(model_dir, test, holder, modes, cache, inc_path, mask_shape=DEFAULT_MASK_SHAPE):
    """Rows of every test image, one image at a time in a fixed random order (``default_rng(0)``), each image's rows
    appended to ``inc_path`` (JSON lines) as soon as they are scored: a stopped run resumes there, and a partial
    file is a random subsample of the test set (on this 2-core CPU the automatic mode costs ~25 s an image). A mode
    whose rows were deleted from the file is scored again (how a changed click route was rescored)."""
    tuned = ModelSource(model_dir=model_dir).load() if model_dir else SamPredictor.litemedsam(version=LITEMEDSAM)
    tuned.share_cache(holder)
    tuned.cache_size = holder.cache_size  # it shares the holder's LRU: do not let it trim the warmed embeddings
    tuned.automatic_agreement = False
    done = {}
    if os.path.isfile(inc_path):
        with open(inc_path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done.setdefault(r["image"], []).append(r)
    rows = []
    for i in tqdm(np.random.default_rng(0).permutation(len(test)), desc="evaluate", unit="image", mininterval=30):
        t = test[i]
        # rows of another answer mask (before 2026-11-28 every row scored the decoder's segmentation) do not count
        have = [r for r in done.setdefault(t.case.image_id, []) if r.get("mask_shape", "segmentation") == mask_shape]
        missing = [m for m in modes if m not in {r["mode"] for r in have}]  # rows deleted from the file: rescored
        if missing:
            got, _ = evaluate(tuned, [t], missing, desc=t.case.image_id, mask_shape=mask_shape)
            with open(inc_path, "a") as f:
                f.writelines(json.dumps(r, default=float) + "\n" for r in got)
            have += got
        rows += [r for r in have if r["mode"] in modes]
    return rows


def run(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    cases = read_cases(args.hc18)
    pool = [c for c in cases if c.split == "pool" and (c.mask_path or c.annotation_path)]
    test_cases = [c for c in cases if c.split == "test"]
    site_pool = site_test = None
    if args.new_site:
        cut = np.quantile([c.pixel_size_mm for c in cases], 2 / 3)
        site_pool = [c for c in pool if c.pixel_size_mm > cut]
        site_test = [c for c in test_cases if c.pixel_size_mm > cut]
        pool = [c for c in pool if c.pixel_size_mm <= cut]
        test_cases = site_test
    if args.test_limit:
        test_cases = test_cases[: args.test_limit]
    work = args.work_dir
    os.makedirs(os.path.join(work, "cells"), exist_ok=True)
    if args.report_only:
        test, holder, cache = test_cases, None, None
    else:
        holder = SamPredictor.litemedsam(version=LITEMEDSAM)
        cache = EmbeddingCache(args.cache_dir, holder)
        test = load_test_images(test_cases, seed=0)
        warm_embeddings(holder, test, cache)

    plan = []  # (tag, n, seed, kind)
    suffix = ("_loc" + ("_nogate" if args.no_gate else "")) if args.localiser else ""
    suffix += "" if args.train_encoder == "frozen" else "_enc" + args.train_encoder
    default_min_val = TrainConfig().min_labels_for_validation
    suffix += "" if args.min_labels_for_validation == default_min_val else f"_minval{args.min_labels_for_validation}"
    suffix += "" if args.self_training_images else "_nost"
    if args.new_site:
        if not args.no_zero_shot:
            plan.append(("site_zero-shot", 0, 0, "zero"))
        for seed in args.seeds:
            base = f"site_base_n{args.base_n}_s{seed}{suffix}" if args.base_n else None
            if base:
                plan.append((base, args.base_n, seed, "base"))
            for k in args.site_n:
                plan.append(((base + "+" if base else "") + f"site{k}_s{seed}{suffix}", k, seed, "site:" + (base or "")))
    else:
        if args.zero_shot:
            plan.append(("zero-shot", 0, 0, "zero"))
        for n in args.n:
            for seed in args.seeds:
                plan.append((f"n{n}_s{seed}{suffix}", n, seed, "real"))
    if args.report_only:
        plan = []
    for tag, n, seed, kind in plan:
        path = os.path.join(work, "cells", tag + ".json")
        if os.path.isfile(path):  # finished earlier: the report below reads it, unless modes were added since
            with open(path) as f:
                done = json.load(f)["rows"]
            if set(args.modes) <= {r["mode"] for r in done if r.get("mask_shape", "segmentation") == args.mask_shape}:
                continue
        t0 = time.time()
        info: dict = {}
        model_dir = None
        if kind in ("real", "base"):
            model_dir, info = trained_cell(work, tag) or train_cell(pool, n, seed, args, work, tag)
            if args.head_verifier:
                info = add_head_verifier(model_dir, info, pool, seed, args, work)
        elif kind.startswith("site:"):
            base_dir = os.path.join(work, "models", kind[5:]) if kind[5:] else None  # None: the shipped model
            model_dir, info = trained_cell(work, tag) or train_cell(site_pool, n, seed, args, work, tag, base_dir)
            if args.head_verifier:
                info = add_head_verifier(model_dir, info, site_pool, seed, args, work)
        os.makedirs(os.path.join(work, "inc"), exist_ok=True)
        rows = eval_cell(model_dir, test, holder, args.modes, cache, os.path.join(work, "inc", tag + ".jsonl"),
                         args.mask_shape)
        rec = {"tag": tag, "n": n, "seed": seed, "kind": kind, "rows": rows, "info": info,
               "summary": summarize(rows), "seconds": round(time.time() - t0, 1),
               "command": "python scripts/eval_automatic.py " + " ".join(command_args(sys.argv[1:]))}
        with open(path, "w") as f:
            json.dump(rec, f, default=float)
        logging.info(f"{tag}: {json.dumps(rec['summary'])}")
    # the report covers every cell in the work dir (other runs' cells included)
    results = []
    for name in sorted(os.listdir(os.path.join(work, "cells"))):
        with open(os.path.join(work, "cells", name)) as f:
            rec = json.load(f)
        if args.new_site or rec["kind"] == "real":
            results.append(rec)
    results.sort(key=lambda r: (r["n"], r["seed"], r["tag"]))
    site = None
    if args.new_site:
        site = (f"New site = the images with pixel size > {cut:.3f} mm (the coarsest third of HC18, 2/3 quantile over "
                f"all {len(cases)} images): {len(site_pool)} pool images (its labels are drawn from these), "
                f"{len(site_test)} test images (scored); the other two thirds' pool ({len(pool)} images) only feeds "
                "`--base-n`.")
    write_report(results, args, len(test), site)


def below_080(rec, mode) -> int:
    """Images of a cell whose ``mode`` answer has Dice < 0.80 (the issue's failure count)."""
    return sum(r["dice"] < FAILURE_DICE for r in rec["rows"] if r["mode"] == mode)


def headline(results):
    """The issue-12 table: per cell, box / automatic / click (box from the localiser-off cell of the same N and seed
    when the cell did not score box: the localiser does not touch box prompts)."""
    lines = ["| N labels | localiser | box Dice % | automatic Dice % | automatic images < 0.80 | automatic HC abs diff mm "
             "| click (centroid) Dice % | images scored | cell |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_tag = {r["tag"]: r for r in results}
    for rec in results:
        s = rec["summary"]
        loc = (rec.get("info") or {}).get("localiser")
        box = s.get("box")
        box_note = ""
        if box is None:
            off = by_tag.get(f"n{rec['n']}_s{rec['seed']}")
            box = off and off["summary"].get("box")
            box_note = " (off cell)"
        auto, click = s.get("automatic"), s.get("click")
        low = below_080(rec, "automatic")
        f = lambda m: f"{100 * m['dice']:.2f}" if m else "-"
        lines.append(f"| {rec['n']} | {'on' if loc and loc.get('replaced') else 'off'} | {f(box)}{box_note} | "
                     f"{f(auto)} | {low if auto else '-'} | {auto['hc_abs_diff_mm']:.2f} | {f(click)} | {auto['images']} | "
                     f"{rec['tag']} |" if auto else f"| {rec['n']} | ? | {f(box)} | - | - | - | {f(click)} | {rec['tag']} | |")
    return lines


def over_seeds(results):
    """Mean ± sd over seeds of every cell group (the tag without its seed): the issue's 'seed 0 and two more'."""
    import re

    groups: dict = {}
    for rec in results:
        groups.setdefault((rec["n"], re.sub(r"_s\d+", "_sS", rec["tag"])), []).append(rec)
    lines = ["| cell (S = seed) | N | seeds | mode | Dice % mean ± sd | Dice < 0.80 (mean) | HC abs diff mm (mean) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (n, tag), recs in sorted(groups.items()):
        for mode in MODES:
            if not all(mode in rec["summary"] for rec in recs):
                continue
            dice = [100 * rec["summary"][mode]["dice"] for rec in recs]
            low = [below_080(rec, mode) for rec in recs]
            hc = [rec["summary"][mode]["hc_abs_diff_mm"] for rec in recs]
            sd = f" ± {np.std(dice, ddof=1):.2f}" if len(dice) > 1 else ""
            lines.append(f"| {tag} | {n} | {','.join(str(r['seed']) for r in recs)} | {mode} | {np.mean(dice):.2f}{sd} | "
                         f"{np.mean(low):.1f} | {np.mean(hc):.2f} |")
    return lines


def write_report(results, args, n_test, site=None):
    out = args.out
    os.makedirs(out, exist_ok=True)
    lines = [f"# Automatic mode from few labels ({'new-site simulation' if args.new_site else 'HC18 test split'})", "",
             f"{n_test} test images at full resolution, scored by `fetal_head.evaluation.core` (Dice, HD95, HC "
             "absolute difference; failures kept in the means). Labels: `select_labels(pool, N, seed)`.", "",
             *([site, ""] if site else []),
             *headline(results), "", "Over seeds:", "", *over_seeds(results), "",
             "Commands (per cell):", "", *sorted({f"- `{r.get('command', '?')}`" for r in results}), "",
             "| cell | N | seed | mode | Dice % | HD95 mm | HC abs diff mm | Dice < 0.80 | failures | localiser check (CV automatic Dice vs baseline) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    csv_rows = []
    for rec in results:
        loc = (rec.get("info") or {}).get("localiser") or {}
        if not loc:
            loc_s = ""
        elif loc.get("cv_automatic_dice") is None:
            loc_s = "no check: " + str(loc.get("reason", ""))
        else:
            loc_s = (f"{loc['cv_automatic_dice']} vs {loc.get('baseline')} {loc.get('baseline_automatic_dice')}"
                     f"{'' if loc.get('gate_passed') else ' (gate: not better)'}")
        for mode, m in rec["summary"].items():
            low = below_080(rec, mode)
            lines.append(f"| {rec['tag']} | {rec['n']} | {rec['seed']} | {mode} | {100 * m['dice']:.2f} | "
                         f"{m['hd95_mm']:.2f} | {m['hc_abs_diff_mm']:.2f} | {low} | {m['failures']} | {loc_s} |")
            csv_rows.append({"cell": rec["tag"], "n": rec["n"], "seed": rec["seed"], "mode": mode,
                             "dice": m["dice"], "hd95_mm": m["hd95_mm"], "hc_abs_diff_mm": m["hc_abs_diff_mm"],
                             "dice_below_0_80": low, "failures": m["failures"], "images": m["images"]})
    name = "summary_new_site" if args.new_site else "summary"
    with open(os.path.join(out, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, name + ".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(csv_rows[0]))
        w.writeheader()
        w.writerows(csv_rows)
    with open(os.path.join(out, name + "_per_image.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cell", "mode", "image", "dice", "hd95_mm", "hc_abs_diff_mm", "head_found"])
        for rec in results:
            for r in rec["rows"]:
                w.writerow([rec["tag"], r["mode"], r["image"], f"{r['dice']:.4f}", f"{r['hd95_mm']:.3f}",
                            f"{r['hc_abs_diff_mm']:.3f}", int(r["head_found"])])
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hc18", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hc18"))
    ap.add_argument("--cache-dir", default=".data/emb_cache")
    ap.add_argument("--work-dir", default=".data/eval_automatic")
    ap.add_argument("--out", default="docs/eval/automatic")
    ap.add_argument("--n", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--test-limit", type=int, default=0)
    ap.add_argument("--zero-shot", action="store_true")
    ap.add_argument("--automatic-head", action="store_true", help="also train the old automatic head")
    ap.add_argument("--train-steps", type=int, default=TRAIN_STEPS, help="box decoder optimizer steps")
    ap.add_argument("--localiser", action="store_true", help="also train the head localiser (opt-in, TrainConfig.localiser)")
    ap.add_argument("--localiser-steps", type=int, default=300, help="the trainer's default")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--no-gate", action="store_true", help="attach the localiser even when its cross-validated "
                    "automatic Dice does not beat the box search (to measure it; the gate's verdict is still reported)")
    ap.add_argument("--no-head-verifier", dest="head_verifier", action="store_false",
                    help="leave the head verifier out (TrainConfig.head_verifier); on by default, as in the trainer")
    ap.add_argument("--train-encoder", default="frozen", choices=("frozen", "lora", "full"),
                    help="TrainConfig.train_encoder: also fine-tune the image encoder (no embedding cache for training)")
    ap.add_argument("--min-labels-for-validation", type=int, default=TrainConfig().min_labels_for_validation,
                    help="TrainConfig.min_labels_for_validation: below it no validation split, the fixed schedule")
    ap.add_argument("--self-training-images", type=int, default=TrainConfig().self_training_images,
                    help="TrainConfig.self_training_images: unlabelled pool images pseudo-labelled for the localiser's "
                    "self-training (0: off; cells then end in _nost)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-site", action="store_true")
    ap.add_argument("--no-zero-shot", action="store_true", help="new site: skip the zero-shot cell (scored before)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the cells in --work-dir")
    ap.add_argument("--base-n", type=int, default=0, help="new site: first train on N labels of the other sites")
    ap.add_argument("--site-n", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--mask-shape", choices=MASK_SHAPES, default=DEFAULT_MASK_SHAPE,
                    help="the answer mask scored (the infer option mask_shape; rows before 2026-11-28: segmentation)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
