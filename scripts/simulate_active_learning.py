"""Simulated annotation study (issue 13; a benchmark, not a test): does any selection strategy reach a good model
with fewer labels, or less annotator effort, than random?

    FETAL_HEAD_ENCODER_BF16=0 .venv/bin/python scripts/simulate_active_learning.py \
        --strategies random,uncertainty,diversity,hybrid --seeds 0,1,2 [--report-only]

    Two processes started with the same arguments share the work (one thread each; they claim (strategy, seed)
    runs through ``<work>/runs/*.claim``), which is how the committed study ran on 2 cores.

- Pool: HC18's pool split (438 images) is the unlabelled datastore; the test split (157) is only evaluated on
  (``--test-n`` > 0: a fixed random subset of that many, the same for every strategy, round and seed).
- Each (strategy, seed) starts from ``--start`` labels drawn at random with the seed (the same for every strategy),
  then adds ``--step`` labels per round up to ``--max``. Every round retrains the mask decoder from the zero-shot
  LiteMedSAM weights with one fixed recipe (``fetal_head.segmentation.training.finetune`` on cached embeddings:
  ``--epochs`` epochs, batch 4, no validation split, the trainer's defaults otherwise: no automatic head below 10
  validation images and no head localiser, so automatic mode is the served box search over the fine-tuned decoder),
  then evaluates box Dice and HC error on the test images and automatic Dice and HC error on a fixed random
  ``--auto-n`` of them (every round with ``--auto-at all``; the box search costs ~3.6 s per image on one core)
  through ``fetal_head.evaluation.core``.
- Strategies select from the current model: ``random``; ``uncertainty`` (top ``--step`` by
  :func:`fetal_head.selection.uncertainty` among ``--candidates`` unlabelled images drawn at random each round:
  scoring all 400+ images every round is beyond 2 CPU cores); ``diversity`` (k-center greedy on pooled embeddings
  of the whole unlabelled pool, labelled images as centres); ``hybrid`` (k-center among the 3 x step most
  uncertain candidates).
- Simulated annotator effort per newly labelled image, with the model of the round that selected it: 0 if its
  automatic answer (the strategies' cheap one, :func:`fetal_head.selection.quick_automatic`) already has Dice >= 0.95
  against the reference (accepted as is), else 1 (draws a box) if the box answer reaches 0.95, else 2 (box, then
  clicks). The initial labels are charged with the zero-shot model.
- Results per round go to ``<work>/runs/<strategy>_s<seed>.json`` as they finish (an interrupted run resumes);
  ``--report-only`` writes the figures from whatever has finished: ``docs/active_learning/`` gets
  ``learning_curves.png`` (automatic and box Dice and HC error vs labels, mean +- sd over seeds), ``effort.png``
  (cumulative effort vs labels, and box Dice vs effort), ``summary.md`` (every round, the paired difference
  from random at 5/11/20 labels, AUC, labels and effort to reach random's last-round Dice), ``results.json``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))

from fetal_head.evaluation.core import evaluate, load_test_images, summarize  # noqa: E402
from fetal_head.files import atomic_json  # noqa: E402
from fetal_head.io import read_image  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.models import AUTOMATIC_DECODER  # noqa: E402
from fetal_head.segmentation.predictor import SamPredictor  # noqa: E402
from fetal_head.segmentation.prompts import AUTOMATIC, Prompt, jitter_box, mask_box, mask_dice  # noqa: E402
from fetal_head.segmentation.training import TrainConfig, finetune, label_items  # noqa: E402
from fetal_head.selection import pooled_feature, quick_automatic, select_diverse, select_hybrid, select_uncertain, uncertainty  # noqa: E402

logger = logging.getLogger("simulate_active_learning")
STRATEGIES = ("random", "uncertainty", "diversity", "hybrid")
ACCEPT = 0.95


class Study:
    def __init__(self, args):
        self.args = args
        cases = read_cases(args.hc18)
        self.pool = sorted([c for c in cases if c.split == "pool"], key=lambda c: c.image_id)
        if args.pool_n:  # the last ids: the shared precompute encodes in id order, this study from the end
            self.pool = self.pool[-args.pool_n:]
        test = sorted([c for c in cases if c.split == "test"], key=lambda c: c.image_id)
        if args.test_n and args.test_n < len(test):
            rng = np.random.default_rng(12345)
            test = [test[i] for i in sorted(rng.choice(len(test), args.test_n, replace=False))]
        self.test_cases = test
        # automatic mode (the served box search, ~4 s per image on one core) on a fixed random subset spread over the
        # test set; HC18 numbers images by gestational age, so the first N would be the smallest heads only
        rng = np.random.default_rng(54321)
        n_auto = min(args.auto_n, len(test))
        self.auto_idx = sorted(rng.choice(len(test), n_auto, replace=False).tolist())
        self.by_id = {c.image_id: c for c in self.pool}
        self.work = args.work
        os.makedirs(os.path.join(self.work, "runs"), exist_ok=True)
        os.makedirs(os.path.join(self.work, "evals"), exist_ok=True)
        self.label_dir = os.path.join(self.work, "labels")
        torch.set_num_threads(args.threads)
        self.predictor = SamPredictor.litemedsam(cache_size=len(self.test_cases) + 64)
        self.base_state = copy.deepcopy(self.predictor.model.state_dict())
        self.cache = EmbeddingCache(args.cache, self.predictor)
        self._test = None
        self._feats = None
        self.auto_at = ({args.start} | ({args.max} if args.auto_max else set())
                        | {int(n) for n in args.auto_at.split(",") if n and n != "all"})
        self.auto_all = args.auto_at == "all"

    # ---- data --------------------------------------------------------------------------------------------------
    @property
    def test(self):
        if self._test is None:
            self._test = load_test_images(self.test_cases)
        return self._test

    def features(self):
        """Pooled embeddings of every pool image (from the disk cache), saved once."""
        if self._feats is None:
            path = os.path.join(self.work, f"features_{self.predictor.encoder_key}.npz")
            if os.path.isfile(path):
                d = np.load(path)
                self._feats = {k: d[k] for k in d.files}
            else:
                self._feats = {c.image_id: pooled_feature(self.cache.get(read_image(c.image_path)))
                               for c in reversed(self.pool)}
                logger.info(f"features of {len(self._feats)} pool images ({self.cache.misses} encoded)")
                np.savez(path, **self._feats)
        return self._feats

    def embedding(self, image_id):
        return self.cache.get(read_image(self.by_id[image_id].image_path))

    # ---- one round -----------------------------------------------------------------------------------------------
    def reset(self):
        if getattr(self.predictor.model, AUTOMATIC_DECODER, None) is not None:
            delattr(self.predictor.model, AUTOMATIC_DECODER)
        self.predictor.model.load_state_dict(self.base_state)
        self.predictor.model.eval()
        self.predictor.version = "zero-shot"

    def train(self, labelled, seed):
        self.reset()
        if not labelled:
            return 0.0
        t0 = time.time()
        items = label_items([self.by_id[i] for i in labelled], self.label_dir)
        options = dict(max_epochs=self.args.epochs, train_batch_size=4, val_split=0.0, automatic_head=False, seed=seed,
                       localiser=False)  # the head localiser's cross-validated training is beyond this CPU budget
        fields = TrainConfig.__dataclass_fields__
        cfg = TrainConfig(**{k: v for k, v in options.items() if k in fields})
        finetune(self.predictor, items, cfg, self.args.cache)
        self.predictor.version = "al:" + hashlib.blake2b(",".join(sorted(labelled)).encode(), digest_size=8).hexdigest()
        return time.time() - t0

    def evaluate(self, labelled, seed):
        """Test metrics of the model trained on ``labelled`` (memoised on disk by the label set and the recipe, so
        rounds shared by several strategies, like the initial one, are trained and evaluated once)."""
        auto = self.auto_all or len(labelled) in self.auto_at
        key = hashlib.blake2b(json.dumps([sorted(labelled), seed, self.args.epochs, [c.image_id for c in self.test_cases],
                                          self.auto_idx if auto else 0]).encode(), digest_size=10).hexdigest()
        path = os.path.join(self.work, "evals", key + ".json")
        if os.path.isfile(path):
            with open(path) as f:
                d = json.load(f)
            return d, False
        train_s = self.train(labelled, seed)
        t0 = time.time()
        rows, _ = evaluate(self.predictor, self.test, modes=("box",), desc="evaluate box", cache=self.cache)
        if auto:  # the served automatic mode (full box search) costs ~4 s per image on one core: a fixed subset
            rows += evaluate(self.predictor, [self.test[i] for i in self.auto_idx], modes=(AUTOMATIC,),
                             desc="evaluate automatic", cache=self.cache)[0]
        summary = summarize(rows)
        per_image = {m: [r["dice"] for r in rows if r["mode"] == m] for m in ("box", AUTOMATIC)}
        d = {"summary": summary, "per_image_dice": per_image, "train_s": round(train_s, 1),
             "eval_s": round(time.time() - t0, 1)}
        atomic_json(d, path)
        return d, True

    def effort(self, image_id, pred_auto=None, rng=None):
        """Simulated annotator effort for labelling ``image_id`` with the current model (see the module doc)."""
        case = self.by_id[image_id]
        image = read_image(case.image_path)
        ref = case.load_mask()
        emb = self.cache.get(image)
        self.predictor.remember(image, emb)
        auto = (pred_auto if pred_auto is not None else quick_automatic(self.predictor, emb)).mask
        d_auto = mask_dice(auto, ref)
        if d_auto >= ACCEPT:
            return 0, d_auto, None
        box = jitter_box(mask_box(ref), rng, 20, *ref.shape)
        d_box = mask_dice(self.predictor.predict(image, Prompt(box=box)).mask, ref)
        return (1 if d_box >= ACCEPT else 2), d_auto, d_box

    def select(self, strategy, labelled, k, rng):
        unlabelled = [c.image_id for c in self.pool if c.image_id not in set(labelled)]
        preds = {}
        if strategy == "random":
            return [unlabelled[i] for i in rng.choice(len(unlabelled), k, replace=False)], preds, {}
        if strategy == "diversity":
            return select_diverse(self.features(), labelled, unlabelled, k), preds, {}
        cands = [unlabelled[i] for i in sorted(rng.choice(len(unlabelled), min(self.args.candidates, len(unlabelled)),
                                                           replace=False))]
        scores = {}
        for i in cands:
            s, pred = uncertainty(self.predictor, self.embedding(i))
            scores[i], preds[i] = s, pred
        flat = {i: s["score"] for i, s in scores.items()}
        picks = select_uncertain(flat, k) if strategy == "uncertainty" else select_hybrid(flat, self.features(), labelled, k)
        return picks, preds, {i: scores[i] for i in picks}

    # ---- one (strategy, seed) run --------------------------------------------------------------------------------
    def run(self, strategy, seed):
        path = os.path.join(self.work, "runs", f"{strategy}_s{seed}.json")
        state = {"strategy": strategy, "seed": seed, "rounds": []}
        if os.path.isfile(path):
            with open(path) as f:
                state = json.load(f)
        rng = np.random.default_rng(seed)
        init = [self.pool[i].image_id for i in sorted(rng.choice(len(self.pool), self.args.start, replace=False))]
        sel_rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
        eff_rng = np.random.default_rng([seed, 99])
        if not state["rounds"]:
            self.reset()
            efforts = [self.effort(i, rng=eff_rng) for i in init]
            state["rounds"].append({"n": len(init), "labelled": init, "new": init,
                                    "effort": [e[0] for e in efforts], "new_auto_dice": [e[1] for e in efforts]})
        while True:
            last = state["rounds"][-1]
            labelled = last["labelled"]
            if "metrics" not in last:
                t0 = time.time()
                d, fresh = self.evaluate(labelled, seed)
                last["metrics"] = d["summary"]
                last["train_s"], last["eval_s"] = d["train_s"], d["eval_s"]
                s = d["summary"]
                logger.info(f"{strategy} s{seed} n={len(labelled)}: auto Dice {s.get(AUTOMATIC, {}).get('dice', -1):.4f} "
                            f"box Dice {s['box']['dice']:.4f} HC err {s['box']['hc_abs_diff_mm']:.2f} mm "
                            f"({'trained+evaluated' if fresh else 'memoised'} {time.time() - t0:.0f} s)")
                atomic_json(state, path)
            if len(labelled) >= self.args.max:
                return state
            if not self._model_is(labelled, seed):
                self.train(labelled, seed)
            t0 = time.time()
            k = min(self.args.step, self.args.max - len(labelled))
            picks, preds, scores = self.select(strategy, labelled, k, sel_rng)
            efforts = [self.effort(i, preds.get(i), eff_rng) for i in picks]
            state["rounds"].append({"n": len(labelled) + len(picks), "labelled": labelled + picks, "new": picks,
                                    "effort": [e[0] for e in efforts], "new_auto_dice": [e[1] for e in efforts],
                                    "scores": scores, "select_s": round(time.time() - t0, 1)})
            atomic_json(state, path)

    def _model_is(self, labelled, seed):
        return self.predictor.version == "al:" + hashlib.blake2b(",".join(sorted(labelled)).encode(), digest_size=8).hexdigest()


def claim(work: str, strategy: str, seed: int) -> bool:
    """Claim one (strategy, seed) run for this process, so that parallel processes (one thread each: 2 cores) split
    the study between them; a claim whose process is gone is taken over (the run resumes from its file)."""
    path = os.path.join(work, "runs", f"{strategy}_s{seed}.claim")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
                os.kill(pid, 0)
                return pid == os.getpid()
            except (ProcessLookupError, ValueError):
                os.remove(path)
                continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


# ---- report ------------------------------------------------------------------------------------------------------
def load_runs(work):
    runs = {}
    d = os.path.join(work, "runs")
    for name in sorted(n for n in os.listdir(d) if n.endswith(".json")) if os.path.isdir(d) else []:
        with open(os.path.join(d, name)) as f:
            r = json.load(f)
        runs.setdefault(r["strategy"], {})[r["seed"]] = r
    return runs


def curves(runs):
    """Per strategy: n -> metric -> list over seeds, plus cumulative effort."""
    out = {}
    for strategy, seeds in runs.items():
        cur = {}
        for seed, r in seeds.items():
            cum = 0
            for rd in r["rounds"]:
                cum += sum(rd["effort"])
                if "metrics" not in rd:
                    continue
                m = rd["metrics"]
                e = cur.setdefault(rd["n"], {"auto_dice": [], "box_dice": [], "auto_hc": [], "box_hc": [], "effort": [],
                                             "seeds": []})
                e["box_dice"].append(m["box"]["dice"])
                if AUTOMATIC in m:
                    e["auto_dice"].append(m[AUTOMATIC]["dice"])
                    e["auto_hc"].append(m[AUTOMATIC]["hc_abs_diff_mm"])
                e["box_hc"].append(m["box"]["hc_abs_diff_mm"])
                e["effort"].append(cum)
                e["seeds"].append(seed)
        out[strategy] = dict(sorted(cur.items()))
    return out


def ms(v, digits=3):
    return f"{np.mean(v):.{digits}f} ± {np.std(v):.{digits}f}" if len(v) > 1 else (f"{v[0]:.{digits}f}" if v else "–")


def auc(cur, key, n_max):
    """Normalised area under the metric-vs-labels curve (trapezoid over the rounds up to ``n_max``), per seed."""
    ns = [n for n in cur if n <= n_max]
    seeds = sorted(set.intersection(*[set(cur[n]["seeds"]) for n in ns])) if ns else []
    vals = []
    for s in seeds:
        ys = [cur[n][key][cur[n]["seeds"].index(s)] for n in ns]
        vals.append(float(getattr(np, "trapezoid", getattr(np, "trapz", None))(ys, ns) / (ns[-1] - ns[0])) if len(ns) > 1 else ys[0])
    return vals


def paired_diff(cur, base, key, n):
    """Per seed that both runs have at ``n`` labels: strategy minus ``base`` (the same seed starts from the same
    labels and is scored on the same test images, so the difference is paired)."""
    if n not in cur or n not in base:
        return []
    a = dict(zip(cur[n]["seeds"], cur[n][key])) if len(cur[n][key]) == len(cur[n]["seeds"]) else {}
    b = dict(zip(base[n]["seeds"], base[n][key])) if len(base[n][key]) == len(base[n]["seeds"]) else {}
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def report(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(args.work)
    cur = curves(runs)
    out = args.out
    os.makedirs(out, exist_ok=True)
    colors = {"random": "k", "uncertainty": "tab:red", "diversity": "tab:blue", "hybrid": "tab:green"}
    n_test = args.test_n or 157
    panels = (("auto_dice", f"automatic Dice ({args.auto_n} test images)"),
              ("auto_hc", f"automatic HC abs. error, mm ({args.auto_n})"),
              ("box_dice", f"box Dice ({n_test} test images)"), ("box_hc", f"box HC abs. error, mm ({n_test})"))
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for ax, (key, label) in zip(axes, panels):
        for s, c in cur.items():
            ns = [n for n in c if c[n][key]]
            mu = np.array([np.mean(c[n][key]) for n in ns])
            sd = np.array([np.std(c[n][key]) for n in ns])
            ax.plot(ns, mu, "-o", ms=3, color=colors.get(s), label=f"{s} ({len(runs[s])} seed(s))")
            ax.fill_between(ns, mu - sd, mu + sd, color=colors.get(s), alpha=0.15)
        ax.set_xlabel("labelled images")
        ax.set_xticks(sorted({n for c in cur.values() for n in c}))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Simulated active learning on HC18 (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "learning_curves.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for s, c in cur.items():
        ns = [n for n in c if c[n]["auto_dice"]]
        eff = np.array([np.mean(c[n]["effort"]) for n in ns])
        esd = np.array([np.std(c[n]["effort"]) for n in ns])
        axes[0].plot(ns, eff, "-o", ms=3, color=colors.get(s), label=s)
        axes[0].fill_between(ns, eff - esd, eff + esd, color=colors.get(s), alpha=0.15)
        axes[1].plot(eff, [np.mean(c[n]["box_dice"]) for n in ns], "-o", ms=3, color=colors.get(s), label=s)
    axes[0].set_xlabel("labelled images")
    axes[0].set_xticks(sorted({n for c in cur.values() for n in c}))
    axes[0].set_ylabel("cumulative annotator effort")
    axes[1].set_xlabel("cumulative effort (per image: 0 accept, 1 box, 2 box + clicks)")
    axes[1].set_ylabel(f"box Dice ({n_test} test images)")  # automatic Dice barely moves with labels (summary.md)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "effort.png"), dpi=110)
    plt.close(fig)

    auto_rounds = "every round" if args.auto_at == "all" else f"{args.start}{'' if not args.auto_max else f' and {args.max}'} labels"
    lines = [f"Pool: {'all 438' if not args.pool_n else f'the last {args.pool_n}'} HC18 pool-split images; test: "
             f"{'all 157' if not args.test_n else f'a fixed random {args.test_n} of the 157'} test-split images in box mode "
             f"(GT box jittered 0-20 px), automatic mode (the served box search) on a fixed random {args.auto_n} of them at "
             f"{auto_rounds}; start {args.start} random labels, +{args.step} per round; retrain {args.epochs} epochs from "
             f"zero-shot each round (decoder only, batch 4); uncertainty/hybrid score {args.candidates} random unlabelled "
             "candidates per round. Mean ± sd over seeds.",
             "", "| strategy | seeds | labels | automatic Dice | automatic HC err (mm) | box Dice | box HC err (mm) | cumulative effort |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s, c in cur.items():
        for n in c:
            e = c[n]
            lines.append(f"| {s} | {len(e['seeds'])} | {n} | {ms(e['auto_dice'], 4)} | {ms(e['auto_hc'], 2)} | "
                         f"{ms(e['box_dice'], 4)} | {ms(e['box_hc'], 2)} | {ms(e['effort'], 1)} |")
    # the study's last round (random's): strategies still running are reported over the rounds they have
    n_max = max(cur["random"]) if "random" in cur else (min(max(c) for c in cur.values()) if cur else 0)
    if "random" in cur:
        marks = [n for n in (5, 11, 20) if n in cur["random"]]
        lines += ["", "Difference from random, paired by seed (same initial labels, same test images), in Dice points "
                  "(mean ± sd over seeds; + is better than random):", "",
                  "| strategy | labels | automatic Dice − random | box Dice − random | effort − random |",
                  "| --- | --- | --- | --- | --- |"]
        for s, c in cur.items():
            if s == "random":
                continue
            for n in marks:
                da = [100 * v for v in paired_diff(c, cur["random"], "auto_dice", n)]
                db = [100 * v for v in paired_diff(c, cur["random"], "box_dice", n)]
                de = paired_diff(c, cur["random"], "effort", n)
                if db:
                    lines.append(f"| {s} | {n} | {ms(da, 2)} ({len(da)}) | {ms(db, 2)} ({len(db)}) | {ms(de, 1)} |")
    lines += ["", f"Area under the curve, labels {args.start}-{n_max} (the curve's mean over that range; mean ± sd over the "
              "seeds that reached it):", "", "| strategy | AUC automatic Dice | AUC box Dice | seeds |", "| --- | --- | --- | --- |"]
    for s, c in cur.items():
        a_auto, a_box = auc(c, "auto_dice", n_max), auc(c, "box_dice", n_max)
        full = n_max in c and len(a_box) == len(c[n_max]["seeds"])
        lines.append(f"| {s} | {ms(a_auto, 4) if full else '–'} | {ms(a_box, 4) if full else '–'} | "
                     f"{len(c[n_max]['seeds']) if n_max in c else 0} |")
    for key, name in (("auto_dice", "automatic"), ("box_dice", "box")):
        if "random" not in cur or n_max not in cur["random"] or not cur["random"][n_max][key]:
            continue
        target = float(np.mean(cur["random"][n_max][key]))
        lines += ["", f"Labels and cumulative effort to reach random's {n_max}-label {name} Dice ({target:.4f}) on the mean "
                  "curve (the issue's aim, for automatic Dice: ≤ 12 labels and less effort):", "",
                  "| strategy | labels | effort |", "| --- | --- | --- |"]
        for s, c in cur.items():
            hit = next((n for n in c if c[n][key] and np.mean(c[n][key]) >= target), None)
            lines.append(f"| {s} | {hit if hit is not None else f'not reached by {max(c)}'} | "
                         + (f"{np.mean(c[hit]['effort']):.1f}" if hit is not None else "–") + " |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    atomic_json({"curves": cur, "args": vars(args)}, os.path.join(out, "results.json"))
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hc18", default=os.path.join(REPO, "..", "shared", "data", "hc18"))
    p.add_argument("--cache", default=os.path.join(REPO, ".data", "emb_cache"))
    p.add_argument("--work", default=os.path.join(REPO, ".data", "al_sim"))
    p.add_argument("--out", default=os.path.join(REPO, "docs", "active_learning"))
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--start", type=int, default=2)
    p.add_argument("--step", type=int, default=3)
    p.add_argument("--max", type=int, default=20)
    p.add_argument("--test-n", type=int, default=0, help="fixed random subset of the test split (0: all 157)")
    p.add_argument("--auto-n", type=int, default=32, help="automatic mode on a fixed random subset of this many of those")
    p.add_argument("--auto-at", default="all",
                   help="label counts (besides start and max) with an automatic evaluation, or 'all' (every round)")
    p.add_argument("--no-auto-max", dest="auto_max", action="store_false", help="no automatic evaluation at --max")
    p.add_argument("--pool-n", type=int, default=0, help="the last this many pool images by id (0: all 438)")
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("fetal_head", "fetal_head.segmentation.training"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not args.report_only:
        study = Study(args)
        study.features()  # every strategy's pool embeddings exist before any run (diversity needs them all)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for strategy in args.strategies.split(","):
                if not claim(args.work, strategy, seed):
                    continue  # another process of this study runs it (several may share one --work)
                t0 = time.time()
                study.run(strategy, seed)
                logger.info(f"done {strategy} seed {seed} in {time.time() - t0:.0f} s")
                report(args)
    report(args)


if __name__ == "__main__":
    main()
