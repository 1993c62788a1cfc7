"""The few-labels + synthetic-pairs benchmark (issue 5): does fine-tuning on N real labels, with or without
synthetic pairs from a generator trained on the same N labels, reach state-of-the-art Dice and HC error?

The experiment, cell by cell:

- A *cell* is (arm, N, seed). ``zero-shot`` is the baseline (LiteMedSAM as shipped, one cell). ``real``: N labels
  drawn from the HC18 pool split with ``seed`` (the same draw as ``scripts/train_sam.py``), SAM's mask decoder
  fine-tuned on them (:func:`fetal_head.segmentation.training.finetune`, 20 % of the N held out for its best-epoch selection).
  ``real+synthetic``: the same N labels, plus synthetic pairs from a diffusion generator trained on those N pairs
  only (:func:`fetal_head.synthesis.pipeline.train_generator`), sampled and quality-controlled by the synthesis API
  (QC's SAM gate uses the zero-shot model, which never saw a test image) and mixed in with the trainer's
  ``synthetic_share``. Both arms of a (N, seed) get the same number of optimizer steps, so synthetic pairs
  compete on data, not on compute.
- Every cell is evaluated on the test split (157 images) at full resolution through ``SamPredictor.predict``
  (the served path, loaded from the saved checkpoint as the server would), in two modes: ``box`` (Slicer-style
  box from the reference mask, each side grown by 0-20 px, the same boxes for every cell) and ``automatic``.
- Per image: Dice (MONAI ``compute_dice``), HD95 in mm (MONAI ``compute_hausdorff_distance``, percentile 95,
  the image's pixel size as spacing) and the HC absolute difference in mm (ellipse fit,
  :func:`fetal_head.biometry.measure_head`, against the HC18 CSV). An empty prediction scores Dice 0, HD95 = the
  image diagonal and an HC error equal to the reference HC (a measurement of 0), so failures stay in the means
  instead of being dropped; ``head_found`` says which rows these are.
- Cells are written to ``<work>/cells/<config key>/`` as soon as they finish and are skipped when present, so an
  interrupted run resumes and :func:`write_report` can report whatever has finished at any time. Cells of the
  grid that were not run are listed as such in the table (``needs GPU`` for the synthetic cells a configuration
  leaves to a GPU), never filled in.

- ``real+synthetic-semi`` (configurations with ``"semi"`` in ``generator_variants``): as ``real+synthetic``, but
  the generator is the semi-supervised mask-conditioned one: it also learns the image distribution from
  ``unlabelled_pool`` pool images that are not among the N labels (never a test image), with classifier-free
  guidance at sampling.
- Each synthetic cell also records FD/KID of its QC-passed images in SAM feature space against the real-vs-real
  yardstick (two disjoint halves of ``realism_images`` pool images) and gets a sample grid.

Outputs (:func:`write_report`): ``per_image.csv``, ``cells.csv`` (one row per (arm, N, seed, mode)),
``summary.md`` (mean +- sd over seeds), ``dice_vs_n.png``, ``hc_error_vs_n.png`` and ``best_worst.png``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ..biometry import BiometryError, ellipse_mask, measure_head
from ..files import atomic_json
from ..io import read_image
from ..io.hc18 import HC18Case, read_cases
from ..segmentation.embedding_cache import EmbeddingCache
from ..segmentation.model_store import ModelSource, save_finetuned
from ..segmentation.models import LITEMEDSAM
from ..segmentation.predictor import SamPredictor
from ..segmentation.prompts import AUTOMATIC
from ..segmentation.training import LabelledImage, TrainConfig, checkpoint_meta, finetune, label_items
from .core import METRICS, TestImage, evaluate, load_test_images, warm_embeddings

logger = logging.getLogger(__name__)

ZERO_SHOT, REAL, REAL_SYNTHETIC = "zero-shot", "real", "real+synthetic"
REAL_SYNTHETIC_SEMI = "real+synthetic-semi"
ARMS = (REAL, REAL_SYNTHETIC, REAL_SYNTHETIC_SEMI)
SYNTHETIC_ARMS = (REAL_SYNTHETIC, REAL_SYNTHETIC_SEMI)
MODES = ("box", AUTOMATIC)  # the benchmark's modes (the core also has "click")
NOT_RUN_GPU = "needs GPU"
NOT_RUN = "not run"
MIN_GENERATOR_PAIRS = 3
# the aims, checked in the summary: (metric, mode, N, arm, bound, direction)
AIMS = (
    ("box Dice with 20 real labels", "dice", "box", 20, "best", 0.975, ">="),
    ("automatic Dice with 20 real labels", "dice", "automatic", 20, "best", 0.97, ">="),
    ("box HC mean abs. diff. with 20 real labels", "hc_abs_diff_mm", "box", 20, "best", 2.0, "<="),
)


# ---- configuration -------------------------------------------------------------------------------------------
@dataclass
class BenchmarkConfig:
    name: str
    n_labels: Tuple[int, ...]  # N real labels; a value >= the pool size means the whole pool
    seeds: Tuple[int, ...]
    # which (N, seed) run the real+synthetic arm here; None: all of the grid. The rest is reported as NOT_RUN_GPU.
    synthetic_n: Optional[Tuple[int, ...]] = None
    synthetic_seeds: Optional[Tuple[int, ...]] = None
    # fine-tuning: a fixed number of optimizer steps per cell (epochs derived from the training set size)
    train_steps: int = 300
    min_epochs: int = 1
    max_epochs: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-4
    val_split: float = 0.2
    max_val_images: int = 0  # cap on the held-out labels (validation costs time every epoch); 0: no cap
    # generator (fetal_head.synthesis.diffusion.make_config name and overrides) and synthesis
    diffusion_config: str = "default"
    diffusion_overrides: Dict[str, object] = field(default_factory=dict)
    synthetic_per_label: float = 4.0  # synthetic pairs generated per real training label
    max_synthetic_pairs: int = 2000
    qc: str = "full"
    max_candidates_factor: float = 4.0
    sampler: Optional[str] = None  # None: the generator config's
    sampling_steps: Optional[int] = None
    # generator variants: "labelled" (the real+synthetic arm) and/or "semi" (real+synthetic-semi)
    generator_variants: Tuple[str, ...] = ("labelled",)
    unlabelled_pool: int = 200  # unlabelled pool images (not among the N labels) for the semi-supervised generator
    semi_overrides: Dict[str, object] = field(default_factory=lambda: {"cond_dropout": 0.1, "guidance_scale": 1.5})
    realism_images: int = 0  # pool images for FD/KID (two halves: the yardstick); 0: no FD/KID
    # evaluation
    test_limit: int = 0  # 0: the whole test split
    modes: Tuple[str, ...] = MODES
    eval_seed: int = 0
    max_jitter: int = 20
    device: str = "cpu"
    figure_cell: Optional[Tuple[str, int, int]] = None  # (arm, N, seed) drawn in best_worst.png; default: near N=20

    EVAL_KEYS = ("test_limit", "modes", "eval_seed", "max_jitter")
    TRAIN_KEYS = ("train_steps", "min_epochs", "max_epochs", "batch_size", "learning_rate", "val_split", "max_val_images",
                  "diffusion_config", "diffusion_overrides", "synthetic_per_label", "max_synthetic_pairs", "qc",
                  "max_candidates_factor", "sampler", "sampling_steps", "generator_variants", "unlabelled_pool",
                  "semi_overrides", "realism_images")
    # keys added after cells were first written: hashed only when they differ from their default, so the cells
    # of the existing configurations keep their key
    LATER_KEYS = {"sampler": None, "sampling_steps": None, "generator_variants": ("labelled",), "unlabelled_pool": 200,
                  "semi_overrides": {"cond_dropout": 0.1, "guidance_scale": 1.5}, "realism_images": 0}

    def _key(self, keys) -> str:
        values = {k: getattr(self, k) for k in keys}
        values = {k: v for k, v in values.items() if k not in self.LATER_KEYS or v != self.LATER_KEYS[k]}
        blob = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    def eval_key(self) -> str:
        """What the zero-shot cell depends on (shared by configurations that evaluate alike)."""
        return self._key(self.EVAL_KEYS)

    def training_key(self) -> str:
        """What a finished fine-tuned cell depends on: cells with another key are not reused."""
        return self._key(self.EVAL_KEYS + self.TRAIN_KEYS)

    def synthetic_arms(self) -> Tuple[str, ...]:
        return tuple(arm for arm, v in ((REAL_SYNTHETIC, "labelled"), (REAL_SYNTHETIC_SEMI, "semi"))
                     if v in self.generator_variants)

    def runs_synthetic(self, n: int, seed: int) -> bool:
        return (self.synthetic_n is None or n in self.synthetic_n) and (
            self.synthetic_seeds is None or seed in self.synthetic_seeds)


POOL_ALL = 438  # HC18 pool split size; N >= the pool size uses every pool image

CONFIGS: Dict[str, BenchmarkConfig] = {
    # CI: every code path in about 40 s on 2 CPU cores (N = 3, one test image). The tiny generator's samples are
    # noise, so its pairs pass the shape gate only (qc="shape-only"); the numbers mean nothing, the outputs' form does.
    "smoke": BenchmarkConfig(
        name="smoke", n_labels=(3,), seeds=(0,), train_steps=2, max_epochs=1, diffusion_config="tiny",
        diffusion_overrides={"max_steps": 10, "sampling_steps": 4}, synthetic_per_label=2.0, max_synthetic_pairs=4,
        qc="shape-only", test_limit=1,
    ),
    # The largest run 2 shared CPU cores allow in about 40 minutes: the whole real-only grid with a modest step
    # budget, and the synthetic arm only at N=5, seed 0, with a 64 px generator trained for a few minutes.
    "cpu": BenchmarkConfig(
        name="cpu", n_labels=(5, 10, 20, 50, POOL_ALL), seeds=(0, 1, 2), synthetic_n=(5,), synthetic_seeds=(0,),
        train_steps=100, max_epochs=40, max_val_images=20, diffusion_config="tiny",
        diffusion_overrides={"image_size": 64, "block_out_channels": (32, 64, 64), "attention_levels": (False,) * 3,
                             "layers_per_block": 1, "max_steps": 300, "batch_size": 8, "learning_rate": 1e-3,
                             "sampling_steps": 20, "checkpoint_every": 200},
        synthetic_per_label=4.0, max_synthetic_pairs=16, qc="full",
    ),
    # Issue 14: one run in <= 9 min on one H100. N = 5 and 20, seed 0, both generator variants (labelled-only and
    # semi-supervised with 200 unlabelled pool images), 128 px generator, 600 steps each, DPM-Solver++ 20 steps,
    # full QC, 100 decoder steps per cell, all 157 test images. Sized from the measured "now" rates (H200,
    # old code): generator 12.4 steps/s at batch 16 -> 4 x 600 steps = 194 s; decoder 3.3 steps/s -> 6 x 100 steps
    # = 182 s; synthesis 1.4 accepted pairs/s (DDIM 50; DPM 20 + batched QC needs fewer UNet calls) -> 2 x (16 + 32)
    # pairs = 69 s at most; evaluation of 7 cells x 157 images x 2 modes, assumed ~10 s a cell on a GPU = 70 s;
    # total ~ 515 s before any of the loop's speed-ups. If the profile shows the new loop at >= 3x, raise
    # diffusion max_steps (--gen-steps is not a flag: edit here) rather than adding cells.
    "gpu": BenchmarkConfig(
        name="gpu", n_labels=(5, 20), seeds=(0,), train_steps=100, max_epochs=100, max_val_images=4,
        diffusion_config="fast128", diffusion_overrides={"max_steps": 600, "batch_size": 16, "checkpoint_every": 600},
        synthetic_per_label=4.0, max_synthetic_pairs=32, qc="full", max_candidates_factor=3.0,
        sampler="dpm", sampling_steps=20, generator_variants=("labelled", "semi"), unlabelled_pool=200,
        realism_images=64, device="cuda",
    ),
    # The grid on a GPU: a 256 px generator per (N, seed), 4 synthetic pairs per real training label.
    "full": BenchmarkConfig(
        name="full", n_labels=(5, 10, 20, 50, POOL_ALL), seeds=(0, 1, 2), train_steps=1000, max_epochs=200,
        diffusion_config="default", diffusion_overrides={"max_steps": 20_000}, synthetic_per_label=4.0,
        max_synthetic_pairs=1000, qc="full", device="cuda",
    ),
}


def make_config(name: str, **overrides) -> BenchmarkConfig:
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {tuple(CONFIGS)}, got {name!r}")
    return replace(CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})


def evaluate_cell(predictor: SamPredictor, test: Sequence[TestImage], modes: Sequence[str], desc: str = "evaluate"):
    """The core's rows, and the predicted masks bit-packed for the cell's file."""
    rows, masks = evaluate(predictor, test, modes, desc=desc)
    return rows, {k: np.packbits(m) for k, m in masks.items()}


# ---- labels --------------------------------------------------------------------------------------------------
def select_labels(pool: Sequence[HC18Case], n: int, seed: int) -> List[HC18Case]:
    """N pool cases drawn with ``seed`` (as scripts/train_sam.py draws them); N >= the pool: all of it."""
    rng = np.random.default_rng(seed)
    n = min(n, len(pool))
    return [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False))]


# ---- cells ---------------------------------------------------------------------------------------------------
def cell_name(arm: str, n: int, seed: int) -> str:
    return "zero-shot" if arm == ZERO_SHOT else f"{arm.replace('+', '_')}_n{n}_s{seed}"


def planned_cells(cfg: BenchmarkConfig, pool_size: int) -> List[Tuple[str, int, int, str]]:
    """(arm, N, seed, status) of the whole grid; status "" for cells this configuration runs."""
    cells = [(ZERO_SHOT, 0, 0, "")]
    for n in cfg.n_labels:
        n_eff = min(n, pool_size)
        for seed in cfg.seeds:
            cells.append((REAL, n_eff, seed, ""))
            if n_eff < MIN_GENERATOR_PAIRS:  # the shape model behind the generator's masks needs 3 heads
                status = f"needs >= {MIN_GENERATOR_PAIRS} labels"
            else:
                status = "" if cfg.runs_synthetic(n, seed) else NOT_RUN_GPU
            for arm in cfg.synthetic_arms():
                cells.append((arm, n_eff, seed, status))
    return cells


class Benchmark:
    """Runs the cells of one configuration into ``work_dir`` (resumable)."""

    def __init__(self, cfg: BenchmarkConfig, hc18_dir: str, work_dir: str, cache_dir: str):
        self.cfg = cfg
        self.work_dir = work_dir
        self.cells_dir = os.path.join(work_dir, "cells", cfg.training_key())
        self.cache_dir = cache_dir
        os.makedirs(self.cells_dir, exist_ok=True)
        cases = read_cases(hc18_dir)
        self.pool = [c for c in cases if c.split == "pool" and (c.mask_path or c.annotation_path)]
        test = [c for c in cases if c.split == "test"]
        self.test_cases = test[: cfg.test_limit] if cfg.test_limit else test
        self._test: Optional[List[TestImage]] = None
        self._eval_holder: Optional[SamPredictor] = None
        with open(os.path.join(self.cells_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1, default=str)

    def cells(self):
        return planned_cells(self.cfg, len(self.pool))

    def cell_path(self, arm: str, n: int, seed: int) -> str:
        if arm == ZERO_SHOT:
            folder = os.path.join(self.work_dir, "cells", "eval-" + self.cfg.eval_key())
            os.makedirs(folder, exist_ok=True)
            return os.path.join(folder, cell_name(arm, n, seed) + ".json")
        return os.path.join(self.cells_dir, cell_name(arm, n, seed) + ".json")

    def done(self, arm: str, n: int, seed: int) -> bool:
        return os.path.isfile(self.cell_path(arm, n, seed))

    # -- evaluation side
    def test_images(self) -> List[TestImage]:
        if self._test is None:
            self._test = load_test_images(self.test_cases, self.cfg.eval_seed, self.cfg.max_jitter)
        return self._test

    def eval_holder(self) -> SamPredictor:
        """The zero-shot predictor; its in-memory cache holds the test embeddings and is shared by every cell."""
        if self._eval_holder is None:
            p = SamPredictor.litemedsam(device=self.cfg.device, version=LITEMEDSAM)
            warm_embeddings(p, self.test_images(), EmbeddingCache(self.cache_dir, p))
            self._eval_holder = p
        return self._eval_holder

    def _save_cell(self, arm, n, seed, rows, packed, info):
        np.savez_compressed(self.cell_path(arm, n, seed)[:-5] + "_pred.npz", **packed)
        record = {"arm": arm, "n_labels": n, "seed": seed, "rows": rows, **info}
        atomic_json(record, self.cell_path(arm, n, seed))  # a cell exists only when complete

    def run_zero_shot(self) -> None:
        if self.done(ZERO_SHOT, 0, 0):
            return
        t0 = time.time()
        rows, packed = evaluate_cell(self.eval_holder(), self.test_images(), self.cfg.modes, desc="evaluate zero-shot")
        self._save_cell(ZERO_SHOT, 0, 0, rows, packed, {"seconds_eval": round(time.time() - t0, 1)})

    def run_cell(self, arm: str, n: int, seed: int) -> None:
        if self.done(arm, n, seed):
            return
        cfg = self.cfg
        t0 = time.time()
        chosen = select_labels(self.pool, n, seed)
        items = label_items(chosen, os.path.join(self.work_dir, "labels"))
        predictor = SamPredictor.litemedsam(device=cfg.device, version=LITEMEDSAM)  # fresh base weights
        info: dict = {"labels": [c.image_id for c in chosen]}
        val_split = cfg.val_split
        if cfg.max_val_images and len(items) * val_split > cfg.max_val_images:
            val_split = cfg.max_val_images / len(items)
        n_val = int(round(len(items) * val_split)) if len(items) > 1 else 0  # as training.split_items counts
        n_val = min(n_val, len(items) - 1)
        n_train_real = len(items) - n_val
        share = 0.0
        if arm in SYNTHETIC_ARMS:
            synthetic, synth_info = self.synthesize(items, n, seed, n_train_real, predictor,
                                                    semi=arm == REAL_SYNTHETIC_SEMI, chosen=chosen)
            info["synthesis"] = synth_info
            items = items + synthetic
            if synthetic:  # the trainer's share: n_syn = n_train * share / (1 - share)
                share = len(synthetic) / (len(synthetic) + n_train_real)
        n_train = n_train_real + (len(items) - len(chosen))
        steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size))
        epochs = int(np.clip(math.ceil(cfg.train_steps / steps_per_epoch), cfg.min_epochs, cfg.max_epochs))
        tcfg = TrainConfig(max_epochs=epochs, train_batch_size=cfg.batch_size, val_split=val_split,
                           learning_rate=cfg.learning_rate, synthetic_share=share, seed=seed,
                           localiser=False)  # a box-Dice benchmark: the localiser only answers automatic/click requests
        t1 = time.time()
        summary = finetune(predictor, items, tcfg, self.cache_dir)
        info.update({"epochs": epochs, "steps": epochs * steps_per_epoch, "best_epoch": summary["best_epoch"],
                     "train_images": len(summary["train_images"]), "val_images": len(summary["val_images"]),
                     "synthetic_in_training": sum(i.startswith("synthetic") for i in summary["train_images"]),
                     "seconds_train": round(time.time() - t1, 1)})
        # evaluate what the server would serve: the saved checkpoint, loaded with its metadata
        model_dir = os.path.join(self.work_dir, "models", cell_name(arm, n, seed))
        save_finetuned(predictor.model, LITEMEDSAM, model_dir, checkpoint_meta(summary, LITEMEDSAM))
        del predictor
        tuned = ModelSource(model_dir=model_dir, device=cfg.device).load()
        tuned.share_cache(self.eval_holder())
        t2 = time.time()
        rows, packed = evaluate_cell(tuned, self.test_images(), cfg.modes, desc=f"evaluate {cell_name(arm, n, seed)}")
        info["seconds_eval"] = round(time.time() - t2, 1)
        info["seconds_total"] = round(time.time() - t0, 1)
        self._save_cell(arm, n, seed, rows, packed, info)
        shutil.rmtree(model_dir, ignore_errors=True)  # ~40 MB each; the cell records how to remake it

    def synthetic_folder(self, n: int, seed: int, arm: str = REAL_SYNTHETIC) -> str:
        variant = "" if arm == REAL_SYNTHETIC else "_semi"
        return os.path.join(self.work_dir, "synthetic", self.cfg.training_key(), f"n{n}_s{seed}{variant}", "pairs")

    def unlabelled_for(self, chosen: Sequence[HC18Case], seed: int) -> List[Tuple[str, str]]:
        """Pool images that are not among the N labels (a seeded draw of ``unlabelled_pool``): the semi-supervised
        generator's unlabelled images. Pool split only: a test image never reaches a generator."""
        taken = {c.image_id for c in chosen}
        rest = [c for c in self.pool if c.image_id not in taken]
        pick = np.random.default_rng(seed + 10_000).permutation(len(rest))[: self.cfg.unlabelled_pool]
        return [(rest[i].image_id, rest[i].image_path) for i in sorted(pick)]

    def realism(self, folder: str, ids: Sequence[str], predictor: SamPredictor, seed: int) -> Optional[dict]:
        """FD/KID in SAM feature space: real half A vs real half B (the yardstick) and real half A vs the
        synthetic images (at most as many as a half, so the estimators' small-sample bias is comparable)."""
        from ..synthesis.realism import compare, feature_scale, sam_features

        m = self.cfg.realism_images // 2
        if m < 2 or len(ids) < 2:
            return None
        pick = np.random.default_rng(seed + 20_000).permutation(len(self.pool))[: 2 * m]
        real = sam_features(predictor, [read_image(self.pool[i].image_path) for i in pick], progress=False)
        syn = sam_features(predictor, [read_image(os.path.join(folder, "images", f"{i}.png")) for i in ids[:m]],
                           progress=False)
        scale = feature_scale(real)
        subsets = 20
        return {"real_vs_real": compare(real[:m], real[m:], scale, kid_subsets=subsets),
                "real_vs_synthetic": compare(real[:m], syn, scale, kid_subsets=subsets)}

    def synthesize(self, items: List[LabelledImage], n: int, seed: int, n_train_real: int, qc_predictor: SamPredictor,
                   semi: bool = False, chosen: Sequence[HC18Case] = ()):
        """Train a generator on these N real pairs only (plus unlabelled pool images when ``semi``), then sample
        QC-passed pairs: (items, info)."""
        from ..synthesis.diffusion import make_config as make_diffusion_config
        from ..synthesis.pipeline import synthesize_into_folder, train_generator
        from ..synthesis.sampling import SamplingOptions

        cfg = self.cfg
        folder = self.synthetic_folder(n, seed, REAL_SYNTHETIC_SEMI if semi else REAL_SYNTHETIC)
        root = os.path.dirname(folder)
        shutil.rmtree(folder, ignore_errors=True)  # a half-written folder from a killed run
        overrides = dict(cfg.diffusion_overrides)
        unlabelled: List[Tuple[str, str]] = []
        if semi:
            unlabelled = self.unlabelled_for(chosen, seed)
            overrides.update(cfg.semi_overrides, unlabelled_images=len(unlabelled))
        dconf = make_diffusion_config(cfg.diffusion_config, seed=seed, **overrides)
        t0 = time.time()
        train_summary = train_generator([(i.image_id, i.image_path, i.label_path) for i in items], dconf,
                                        os.path.join(root, "generator.pt"), device=cfg.device, unlabelled=unlabelled)
        t1 = time.time()
        target = int(min(cfg.max_synthetic_pairs, math.ceil(cfg.synthetic_per_label * n_train_real)))
        options = SamplingOptions(qc=cfg.qc, predictor=qc_predictor if cfg.qc == "full" else None,
                                  max_candidates_factor=cfg.max_candidates_factor)
        result = synthesize_into_folder(folder, os.path.join(root, "generator.pt"), target, seed=seed,
                                        options=options, device=cfg.device, sampler=cfg.sampler,
                                        steps=cfg.sampling_steps)
        qc = result["qc"]
        t2 = time.time()
        realism = self.realism(folder, result["added"], qc_predictor, seed) if cfg.realism_images else None
        info = {"variant": "semi" if semi else "labelled", "generator_unlabelled": len(unlabelled),
                "guidance_scale": dconf.guidance_scale, "sampler": cfg.sampler or dconf.sampler,
                "sampling_steps": cfg.sampling_steps or dconf.sampling_steps, "realism": realism,
                "seconds_realism": round(time.time() - t2, 1),
                "generator_pairs": len(items), "generator_steps": train_summary["step"],
                "generator_image_size": dconf.image_size, "generator_final_loss": train_summary["final_loss"],
                "seconds_generator": round(t1 - t0, 1), "seconds_synthesis": round(t2 - t1, 1),
                "target_pairs": target, "accepted": len(result["added"]), "qc": qc, "qc_mode": cfg.qc}
        synthetic = [LabelledImage(sid, os.path.join(folder, "images", f"{sid}.png"),
                                   os.path.join(folder, "masks", f"{sid}_Mask.png"), synthetic=True)
                     for sid in result["added"]]
        return synthetic, info

    def run(self, progress: bool = True) -> None:
        # seed by seed, so an interrupted CPU run has covered every N once before it repeats any; the baseline
        # last (it is one cell, and its automatic mode is the slow box search)
        todo = sorted([(a, n, s) for a, n, s, status in self.cells() if not status],
                      key=lambda c: (c[0] == ZERO_SHOT, c[2], c[1], c[0]))
        bar = tqdm(todo, desc=f"benchmark {self.cfg.name}", unit="cell", disable=not progress)
        for arm, n, seed in bar:
            bar.set_postfix(cell=cell_name(arm, n, seed))
            if arm == ZERO_SHOT:
                self.run_zero_shot()
            else:
                self.run_cell(arm, n, seed)

    def load_cells(self) -> Dict[Tuple[str, int, int], dict]:
        out = {}
        for arm, n, seed, _ in self.cells():
            if self.done(arm, n, seed):
                with open(self.cell_path(arm, n, seed)) as f:
                    out[(arm, n, seed)] = json.load(f)
        return out


# ---- aggregation and report ----------------------------------------------------------------------------------
def cell_means(rows: Sequence[dict], mode: str) -> Dict[str, float]:
    sel = [r for r in rows if r["mode"] == mode]
    out = {m: float(np.mean([r[m] for r in sel])) for m in METRICS}
    out["hd95_mm_median"] = float(np.median([r["hd95_mm"] for r in sel]))
    out["failures"] = int(sum(not r["head_found"] for r in sel))
    out["images"] = len(sel)
    return out


def aggregate(bench: Benchmark, results: Dict[Tuple[str, int, int], dict]):
    """cells.csv rows (one per planned (arm, N, seed, mode)) and summary rows (mean/sd over seeds per (arm, N, mode))."""
    cell_rows, summary = [], []
    groups: Dict[Tuple[str, int, str], List[dict]] = {}
    status_of: Dict[Tuple[str, int, str], set] = {}
    for arm, n, seed, status in bench.cells():
        res = results.get((arm, n, seed))
        for mode in bench.cfg.modes:
            row = {"arm": arm, "n_labels": n, "seed": seed, "mode": mode}
            if res is None:
                row["status"] = status or NOT_RUN
            else:
                means = cell_means(res["rows"], mode)
                syn = res.get("synthesis") or {}
                row.update({"status": "done", **means, "epochs": res.get("epochs", ""), "steps": res.get("steps", ""),
                            "synthetic_in_training": res.get("synthetic_in_training", 0),
                            "qc_candidates": syn.get("qc", {}).get("candidates", ""),
                            "qc_accepted": syn.get("accepted", ""),
                            "seconds": res.get("seconds_total", res.get("seconds_eval", ""))})
                groups.setdefault((arm, n, mode), []).append(means)
            status_of.setdefault((arm, n, mode), set()).add(row["status"])
            cell_rows.append(row)
    for (arm, n, mode), statuses in status_of.items():
        got = groups.get((arm, n, mode), [])
        entry = {"arm": arm, "n_labels": n, "mode": mode, "seeds_done": len(got),
                 "seeds_planned": 1 if arm == ZERO_SHOT else len(bench.cfg.seeds),
                 "status": "done" if got else sorted(statuses - {"done"})[0]}
        for m in METRICS + ("hd95_mm_median",):
            vals = np.array([g[m] for g in got])
            entry[m] = float(vals.mean()) if len(vals) else None
            entry[m + "_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else None
        summary.append(entry)
    return cell_rows, summary


def _fmt(entry: dict, m: str, scale: float = 1.0, digits: int = 2) -> str:
    if entry[m] is None:
        return entry["status"] if entry["status"] != "done" else "-"
    s = f"{scale * entry[m]:.{digits}f}"
    if entry[m + "_sd"] is not None:
        s += f" ± {scale * entry[m + '_sd']:.{digits}f}"
    return s


def markdown_table(summary: Sequence[dict], n_test: int) -> str:
    lines = [
        "| arm | N real labels | mode | seeds | Dice % | HD95 mm (mean) | HD95 mm (median) | HC abs. diff. mm |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in summary:
        n = "-" if e["arm"] == ZERO_SHOT else str(e["n_labels"])
        seeds = f"{e['seeds_done']}/{e['seeds_planned']}"
        lines.append(f"| {e['arm']} | {n} | {e['mode']} | {seeds} | {_fmt(e, 'dice', 100)} | {_fmt(e, 'hd95_mm')} | "
                     f"{_fmt(e, 'hd95_mm_median')} | {_fmt(e, 'hc_abs_diff_mm')} |")
    return "\n".join(lines)


def aims_lines(summary: Sequence[dict]) -> List[str]:
    out = []
    by = {(e["arm"], e["n_labels"], e["mode"]): e for e in summary}
    for label, metric, mode, n, _, bound, op in AIMS:
        cands = [by.get((arm, n, mode)) for arm in ARMS]
        vals = [(e[metric], e["arm"]) for e in cands if e and e[metric] is not None]
        if not vals:
            out.append(f"- {label}: not measured")
            continue
        val, arm = (max if op == ">=" else min)(vals)
        ok = val >= bound if op == ">=" else val <= bound
        shown = f"{100 * val:.2f} %" if metric == "dice" else f"{val:.2f} mm"
        bound_s = f"{100 * bound:.1f} %" if metric == "dice" else f"{bound:.1f} mm"
        out.append(f"- {label}: {shown} ({arm}) — aim {op} {bound_s}: {'met' if ok else 'not met'}")
    r = by.get((REAL, 5, "box"))
    measured = False
    for syn_arm in SYNTHETIC_ARMS:
        s = by.get((syn_arm, 5, "box"))
        if r and s and r["dice"] is not None and s["dice"] is not None:
            measured = True
            gain = 100 * (s["dice"] - r["dice"])
            out.append(f"- {syn_arm} at N = 5 (box Dice): {gain:+.2f} points ({s['seeds_done']} seed(s) with "
                       f"synthetic vs {r['seeds_done']} without) — aim >= +1: {'met' if gain >= 1 else 'not met'}")
    if not measured:
        out.append("- synthetic pairs at N = 5: not measured")
    return out


def synthesis_lines(results: Dict[Tuple[str, int, int], dict]) -> List[str]:
    out = []
    for (arm, n, seed), res in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        syn = res.get("synthesis")
        if not syn:
            continue
        qc = syn["qc"]
        rej = ", ".join(f"{k} {v}" for k, v in (qc.get("rejected") or {}).items()) or "none"
        variant = syn.get("variant", "labelled")
        unl = (f" + {syn['generator_unlabelled']} unlabelled, guidance {syn.get('guidance_scale', 1.0):g}"
               if variant == "semi" else "")
        out.append(f"- {arm}, N = {n}, seed {seed}: generator {syn['generator_image_size']} px{unl}, {syn['generator_steps']} "
                   f"steps on {syn['generator_pairs']} real pairs ({syn['seconds_generator']:.0f} s); "
                   f"{syn['accepted']} of {qc.get('candidates', '?')} candidates passed QC ({syn['qc_mode']}; "
                   f"target {syn['target_pairs']}; rejected: {rej}); {res.get('synthetic_in_training', 0)} "
                   f"synthetic pairs in training")
        rl = syn.get("realism")
        if rl:
            a, b = rl["real_vs_synthetic"], rl["real_vs_real"]
            out.append(f"  - realism (SAM features, {a['n'][0]} real vs {a['n'][1]} synthetic): FD {a['fd']:.1f}, "
                       f"KID {a['kid']:.3f}; real-vs-real yardstick FD {b['fd']:.1f}, KID {b['kid']:.3f}")
    return out


def plot_vs_n(summary: Sequence[dict], metric: str, ylabel: str, path: str, scale: float = 1.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({e["mode"] for e in summary}, key=lambda m: MODES.index(m) if m in MODES else 9)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for arm, style in ((REAL, "o-"), (REAL_SYNTHETIC, "s--"), (REAL_SYNTHETIC_SEMI, "^:")):
            pts = sorted((e["n_labels"], e[metric], e[metric + "_sd"] or 0.0) for e in summary
                         if e["arm"] == arm and e["mode"] == mode and e[metric] is not None)
            if pts:
                x, y, sd = (np.array(v, dtype=float) for v in zip(*pts))
                ax.errorbar(x, scale * y, yerr=scale * sd, fmt=style, capsize=3, label=arm)
        zs = [e for e in summary if e["arm"] == ZERO_SHOT and e["mode"] == mode and e[metric] is not None]
        if zs:
            ax.axhline(scale * zs[0][metric], color="gray", ls=":", label="zero-shot")
        ax.set_xscale("log")
        ns = sorted({e["n_labels"] for e in summary if e["arm"] != ZERO_SHOT})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("N real labels")
        ax.set_ylabel(ylabel)
        ax.set_title(mode.replace("_", "-"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def case_figure(bench: Benchmark, results, cell: Tuple[str, int, int], path: str) -> None:
    """Best two and worst two test images (by Dice) of ``cell``, one row per mode, with outlines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = results[cell]
    packed = np.load(bench.cell_path(*cell)[:-5] + "_pred.npz")
    test = {t.case.image_id: t for t in bench.test_images()}
    modes = bench.cfg.modes
    fig, axes = plt.subplots(len(modes), 4, figsize=(16.8, 3.9 * len(modes)), squeeze=False)
    for row_axes, mode in zip(axes, modes):
        ranked = sorted([r for r in res["rows"] if r["mode"] == mode], key=lambda r: r["dice"])
        picks = (ranked[-2:][::-1] + ranked[:2]) if len(ranked) >= 4 else ranked
        for ax in row_axes:
            ax.axis("off")
        for ax, r in zip(row_axes, picks):
            t = test[r["image"]]
            pred = np.unpackbits(packed[f"{mode}/{r['image']}"])[: t.mask.size].reshape(t.mask.shape).astype(bool)
            ax.imshow(t.image, cmap="gray")
            ax.contour(t.mask, levels=[0.5], colors="lime", linewidths=1.2)
            if pred.any():
                ax.contour(pred, levels=[0.5], colors="red", linewidths=1.0)
            if mode == "box":
                x0, y0, x1, y1 = t.box
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="cyan", lw=0.8, ls=":"))
            try:
                bio = measure_head(pred, t.case.pixel_size_mm)
                ax.contour(ellipse_mask(pred.shape, bio), levels=[0.5], colors="yellow", linewidths=0.8,
                           linestyles="--")
            except BiometryError:
                pass
            ax.set_title(f"{mode.replace('_', '-')}: {r['image']}  Dice {r['dice']:.3f}\n"
                         f"HC {r['hc_mm']:.1f} mm (ref {r['hc_ref_mm']:.1f}), HD95 {r['hd95_mm']:.1f} mm", fontsize=8)
    arm, n, seed = cell
    fig.suptitle(f"{cell_name(arm, n, seed)}: best two and worst two test images per mode.   green: reference, "
                 f"red: prediction, yellow: fitted ellipse (HC), cyan: box prompt", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def synthetic_sample_grid(bench: Benchmark, res: dict, path: str) -> None:
    """The cell's real labels over the synthetic pairs its generator made from them (realism.sample_grid)."""
    from ..io import read_mask
    from ..synthesis.realism import sample_grid

    real = [(read_image(c.image_path), c.load_mask()) for c in bench.pool if c.image_id in set(res["labels"][:4])]
    folder = bench.synthetic_folder(res["n_labels"], res["seed"], res.get("arm", REAL_SYNTHETIC))
    names = sorted(os.listdir(os.path.join(folder, "images")))[:4]
    synthetic = [(read_image(os.path.join(folder, "images", f)),
                  read_mask(os.path.join(folder, "masks", f[:-4] + "_Mask.png"))) for f in names]
    syn = res["synthesis"]
    semi = (f" and {syn['generator_unlabelled']} unlabelled images"
            if syn.get("variant") == "semi" else "")
    sample_grid(real, synthetic, path, title=f"N = {res['n_labels']}, seed {res['seed']}: real labels (top) and "
                f"QC-passed synthetic pairs from a {syn['generator_image_size']} px generator trained on them{semi} "
                f"for {syn['generator_steps']} steps (bottom)")


def default_figure_cell(bench: Benchmark, results) -> Optional[Tuple[str, int, int]]:
    if bench.cfg.figure_cell and tuple(bench.cfg.figure_cell) in results:
        return tuple(bench.cfg.figure_cell)
    trained = [k for k in results if k[0] != ZERO_SHOT]
    if not trained:
        return next(iter(results), None)
    # the N closest to 20 (the aims), real arm first, lowest seed
    return min(trained, key=lambda k: (abs(math.log(k[1] / 20)), k[0] != REAL, k[2]))


def write_report(bench: Benchmark, out_dir: str, command: str = "", started: Optional[float] = None) -> dict:
    """per_image.csv, cells.csv, summary.md, the plots and the case figure from the finished cells."""
    os.makedirs(out_dir, exist_ok=True)
    results = bench.load_cells()
    per_image = [{"arm": arm, "n_labels": n, "seed": seed, **r} for (arm, n, seed), res in results.items()
                 for r in res["rows"]]
    fields = ["arm", "n_labels", "seed", "mode", "image", "mask_shape", "dice", "hd95_mm", "hc_mm", "hc_ref_mm",
              "hc_abs_diff_mm", "head_found"]
    with open(os.path.join(out_dir, "per_image.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="segmentation")  # cells scored before mask_shape existed
        w.writeheader()
        w.writerows(per_image)
    cell_rows, summary = aggregate(bench, results)
    cell_fields = ["arm", "n_labels", "seed", "mode", "status", "images", "dice", "hd95_mm", "hd95_mm_median",
                   "hc_abs_diff_mm", "failures", "epochs", "steps", "synthetic_in_training", "qc_candidates",
                   "qc_accepted", "seconds"]
    with open(os.path.join(out_dir, "cells.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cell_fields, restval="")
        w.writeheader()
        w.writerows(cell_rows)
    plot_vs_n(summary, "dice", "Dice %", os.path.join(out_dir, "dice_vs_n.png"), scale=100)
    plot_vs_n(summary, "hc_abs_diff_mm", "HC abs. difference, mm (mean)", os.path.join(out_dir, "hc_error_vs_n.png"))
    fig_cell = default_figure_cell(bench, results)
    if fig_cell:
        case_figure(bench, results, fig_cell, os.path.join(out_dir, "best_worst.png"))
    for (arm, n, seed), res in results.items():
        if res.get("synthesis", {}).get("accepted"):
            prefix = "synthetic" if arm == REAL_SYNTHETIC else "synthetic-semi"
            synthetic_sample_grid(bench, res, os.path.join(out_dir, f"{prefix}_n{n}_s{seed}.png"))
    cfg = bench.cfg
    seconds = [r.get("seconds_total", r.get("seconds_eval", 0)) for r in results.values()]
    header = [
        f"# Benchmark `{cfg.name}`: few real labels + synthetic pairs",
        "",
        f"- command: `{command}`" if command else "- command: (library call)",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{torch.cuda.get_device_name(0) if cfg.device.startswith('cuda') and torch.cuda.is_available() else 'no GPU'}"
        f" (device `{cfg.device}`)",
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; cells finished: "
        f"{len(results)} of {sum(1 for c in bench.cells() if not c[3])} planned here "
        f"({sum(seconds) / 60:.0f} min of cell time)",
        f"- test: {len(bench.test_cases)} HC18 test-split images at full resolution; box = reference box, each side "
        f"grown 0-{cfg.max_jitter} px (seed {cfg.eval_seed}); automatic = no prompt",
        f"- fine-tuning: mask decoder, {cfg.train_steps} optimizer steps per cell (batch {cfg.batch_size}, "
        f"epochs {cfg.min_epochs}-{cfg.max_epochs}), lr {cfg.learning_rate}, {int(100 * cfg.val_split)} % of the N "
        f"labels held out for best-epoch selection" + (f" (at most {cfg.max_val_images})" if cfg.max_val_images else ""),
        f"- synthetic arm: generator `{cfg.diffusion_config}` {json.dumps(cfg.diffusion_overrides, default=str)}, "
        f"{cfg.synthetic_per_label:g} pairs per real training label (at most {cfg.max_synthetic_pairs}), QC `{cfg.qc}`"
        + (f"; variants {', '.join(cfg.generator_variants)}" + (
            f" (semi: {cfg.unlabelled_pool} unlabelled pool images, {json.dumps(cfg.semi_overrides)})"
            if "semi" in cfg.generator_variants else "") if cfg.generator_variants != ("labelled",) else ""),
        "- Dice, HD95, HC: mean over images per seed, then mean ± sd over seeds. A missing head counts as Dice 0, "
        "HD95 = image diagonal, HC error = reference HC.",
        "",
    ]
    text = "\n".join(header + [markdown_table(summary, len(bench.test_cases)), "", "Aims (issue 5):", ""]
                     + aims_lines(summary) + ["", "Synthetic pairs:", ""]
                     + (synthesis_lines(results) or ["- none generated in this run"]) + [""])
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    return {"summary": summary, "cells": cell_rows, "markdown": text, "figure_cell": fig_cell}
