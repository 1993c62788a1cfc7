"""MONAI Label train task ``fetal_head_sam``: fine-tunes the served SAM's mask decoder and its automatic head
(thin adapter over ``fetal_head.segmentation.training``).

MONAI Label runs ``POST /train/fetal_head_sam`` in a child process (``python -m monailabel.interfaces.utils.app
-m train -r <request json>``, see ``monailabel.utils.async_tasks.utils``), which builds the app and calls this
task; ``DELETE /train/`` kills that child. Nothing is written where the server looks until the very end, when
``save_finetuned`` renames the finished checkpoint into place, so a failed or killed run leaves the previous model
serving. The infer task notices the new file's mtime and reloads it without a restart.

Request options (MONAI Label names where they exist): ``max_epochs``, ``train_batch_size``, ``val_split``,
``multi_gpu``, ``gpus`` (data-parallel over those GPUs, DDP, as MONAI Label's BasicTrainTask: one process per
GPU through ``torch.multiprocessing.spawn``); and ``learning_rate``, ``max_real_labels`` (0 = all),
``synthetic_share``, ``train_encoder`` ("frozen", "lora", "full"), ``automatic_head`` (old name
``prompt_free_head``), ``localiser`` (the head localiser, default on), ``localiser_wide_from``,
``self_training_images`` and ``self_training_min_head_probability`` (below ``localiser_wide_from`` labels the wide
localiser learns from up to that many unlabelled datastore images pseudo-labelled by the model; 0: off),
``head_verifier`` (default on) and
``verifier_gate`` (its cross-validated check from 10 labels, default on), ``flip``, ``seed``, ``world_size`` (DDP
processes without GPUs: gloo on CPU). Every option is parsed and range-checked by ``lib.trainers.options`` before a
job starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import asdict
from typing import Any, Dict

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

from fetal_head.segmentation.model_store import ModelSource, meta_path, save_finetuned
from fetal_head.synthesis.store import is_synthetic, real_unlabelled_images
from fetal_head.segmentation.training import LabelledImage, TrainConfig, checkpoint_meta, finetune
from lib.trainers.options import parse_bool, parse_float, parse_int

logger = logging.getLogger(__name__)



class TrainOptionError(ValueError):
    """A train request option that cannot be used (the server answers 422 before any job starts)."""


TRAIN_ENCODER_MODES = ("frozen", "lora", "full")
# option -> (parser, lowest, highest); None: unbounded. Unknown keys (model, gpus, local_rank, ...) are ignored.
OPTIONS = {
    "max_epochs": (parse_int, 1, 10_000), "train_batch_size": (parse_int, 1, 1024), "max_real_labels": (parse_int, 0, None),
    "seed": (parse_int, 0, None), "max_jitter": (parse_int, 0, 1000), "world_size": (parse_int, 1, 64),
    "lora_rank": (parse_int, 1, 256), "localiser_steps": (parse_int, 1, 100_000),
    "localiser_wide_from": (parse_int, 1, None), "self_training_images": (parse_int, 0, None),
    "self_training_min_head_probability": (parse_float, 0.0, 1.0),
    "learning_rate": (parse_float, 1e-12, 1.0), "weight_decay": (parse_float, 0.0, 10.0),
    "val_split": (parse_float, 0.0, 0.99), "synthetic_share": (parse_float, 0.0, 0.99),
    "flip": (parse_bool, None, None), "automatic_head": (parse_bool, None, None), "localiser": (parse_bool, None, None),
    "head_verifier": (parse_bool, None, None), "verifier_gate": (parse_bool, None, None),
}
LEGACY_NAMES = {"prompt_free_head": "automatic_head"}  # still accepted from older clients and scripts


def config_from_request(request: Dict[str, Any]) -> TrainConfig:
    """TrainConfig from a train request (parsed by ``lib.trainers.options``, one parser for both trainers).

    Raises :class:`TrainOptionError` (a ValueError) naming the option for any value that cannot be used, so the
    server refuses the request before a job starts.
    """
    cfg = TrainConfig()
    request = {LEGACY_NAMES.get(k, k): v for k, v in request.items()}
    for name, (parse, lo, hi) in OPTIONS.items():
        value = request.get(name)
        if value is None or value == "":
            continue
        try:
            setattr(cfg, name, parse(value, name) if parse is parse_bool else parse(value, name, lo, hi))
        except ValueError as e:
            raise TrainOptionError(f"train option {e}") from None
    if request.get("train_encoder") not in (None, ""):
        cfg.train_encoder = str(request["train_encoder"])
    if cfg.train_encoder not in TRAIN_ENCODER_MODES:
        raise TrainOptionError(f"train option 'train_encoder' must be one of {TRAIN_ENCODER_MODES}, got {cfg.train_encoder!r}")
    gpus = requested_gpus(request)
    if gpus:
        cfg.world_size = len(gpus)
    return cfg


def requested_gpus(request: Dict[str, Any]) -> list:
    """The GPU ids of a ``multi_gpu`` request (``gpus``: "all" or "0,1"); [] for a one-device run."""
    if not parse_bool(request.get("multi_gpu", False), "multi_gpu"):
        return []
    import torch

    if not torch.cuda.is_available():
        logger.info("multi_gpu requested but no CUDA GPU is visible: training in one process")
        return []
    gpus = str(request.get("gpus") or "all").strip()
    ids = list(range(torch.cuda.device_count())) if gpus == "all" else [int(g) for g in gpus.split(",") if g.strip()]
    return ids if len(ids) > 1 else []


class FetalHeadSamTrain(TrainTask):
    def __init__(self, source: ModelSource, cache_dir: str = ""):
        super().__init__("Fine-tune the SAM mask decoder on the datastore's final labels (box, click, automatic)")
        self.source = source
        self.cache_dir = cache_dir or os.path.join(source.model_dir, "embedding_cache")

    def validate_request(self, request: Dict[str, Any]) -> None:
        """Refuse unusable options before a job starts (the app calls this from ``POST /train``)."""
        config_from_request(request)
        if parse_bool(request.get("multi_gpu", False), "multi_gpu"):
            gpus = str(request.get("gpus") or "all").strip()
            if gpus != "all" and not all(g.strip().isdigit() for g in gpus.split(",") if g.strip()):
                raise TrainOptionError(f"train option 'gpus' must be 'all' or GPU ids like '0,1', got {gpus!r}")

    def config(self):
        c = asdict(TrainConfig())
        c.pop("prompt_shares")
        c.update({"multi_gpu": False, "gpus": "all"})
        return c

    def stats(self):
        path = meta_path(self.source.model_dir)
        if not os.path.isfile(path):
            return {}
        import json

        with open(path) as f:
            meta = json.load(f)
        return {k: meta.get(k) for k in ("trained_at", "best_epoch", "metrics", "metrics_before")} | {
            "labels_used": len(meta.get("labels_used", [])),
            # the keys the Slicer module reads for its accuracy bar
            "best_metric": (meta.get("metrics") or {}).get("val_dice", 0),
            "total_epochs": (meta.get("options") or {}).get("max_epochs", 0),
        }

    def labelled_images(self, datastore: Datastore):
        items = []
        for image_id in datastore.get_labeled_images(DefaultLabelTag.FINAL):
            label = datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            image = datastore.get_image_uri(image_id)
            if not label or not image:
                continue
            # the id prefix survives even where a datastore rewrite dropped the image info
            synthetic = is_synthetic(image_id, datastore.get_image_info(image_id))
            items.append(LabelledImage(image_id, image, label, synthetic))
        return items

    def __call__(self, request, datastore: Datastore):
        t0 = time.time()
        cfg = config_from_request(request)
        source = self.source
        gpus = requested_gpus(request)
        if gpus:  # as BasicTrainTask: the spawned ranks see exactly these GPUs, as cuda:0..n-1
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
            source = dataclasses.replace(self.source, device="cuda")
            logger.info(f"multi_gpu: DDP over GPUs {gpus}")
        logger.info(f"train options: {asdict(cfg)}")
        base_version = self.source.version()
        predictor = source.load()  # continue from the weights being served
        items = self.labelled_images(datastore)
        logger.info(f"{len(items)} labelled images in the datastore ({sum(i.synthetic for i in items)} synthetic)")
        # the localiser's self-training pseudo-labels unlabelled real images (in memory; the datastore is not touched)
        unlabelled = [uri for _, uri in real_unlabelled_images(datastore)] if cfg.self_training_images else []
        summary = finetune(predictor, items, cfg, self.cache_dir, unlabelled=unlabelled)
        steps = sum(int(r.get("steps", 1)) for r in summary.get("history", []))
        if not summary.get("train_images") or not summary.get("history") or steps == 0:
            # nothing was learnt: the served model stays (an untrained checkpoint must never replace it)
            logger.warning("training ran zero steps (no epoch or no training image): the served model is kept")
            return {"skipped": "training ran zero steps: the served model is kept", "model": None,
                    "labels_used": len(summary.get("train_images", [])), "seconds": round(time.time() - t0, 1)}
        meta = checkpoint_meta(summary, base_version)
        meta["seconds"] = round(time.time() - t0, 1)
        path = save_finetuned(predictor.model, predictor_model_type(self.source, base_version), self.source.model_dir, meta)
        logger.info(f"saved {path}: best epoch {summary['best_epoch']} {summary['best']}")
        return {"best_epoch": summary["best_epoch"], "metrics": summary["best"], "before": summary["before"],
                "labels_used": len(summary["train_images"]), "model": path, "seconds": meta["seconds"],
                "localiser": summary.get("localiser"), "head_verifier": summary.get("head_verifier"),
                "self_training": summary.get("self_training")}


def predictor_model_type(source: ModelSource, version: str) -> str:
    """The model type to record: that of the fine-tuned checkpoint when we continued from one, else the base's."""
    if version.startswith("finetuned:") and os.path.isfile(source.finetuned_path):
        import torch

        return torch.load(source.finetuned_path, map_location="cpu", weights_only=True).get("model_type", source.base_model_type())
    return source.base_model_type()
