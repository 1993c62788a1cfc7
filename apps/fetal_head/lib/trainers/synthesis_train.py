"""MONAI Label train task ``fetal_head_synthesis``: train the diffusion pair generator on the datastore's real
labelled images, then add QC-passed synthetic pairs to the datastore (or purge them).

    POST /train/fetal_head_synthesis
    {"scheme": "mask_conditioned", "config": "default", "max_steps": 50000, "num_pairs": 200, "seed": 0,
     "qc": "full", "purge": false}

- Training uses real pairs only (ids without the ``synthetic_`` prefix and without ``synthetic: true`` info).
- ``"unlabelled_images": K`` (> 0) makes the mask-conditioned generator semi-supervised: up to K real datastore
  images without a final label (never synthetic ones) train its unconditional side; ``"cond_dropout"`` (e.g.
  0.1) and ``"guidance_scale"`` (e.g. 1.5-3) are the classifier-free guidance knobs (fetal_head.synthesis.diffusion).
- The checkpoint is ``model/diffusion/<scheme>_<config>.pt``; a later request with a larger ``max_steps`` resumes
  it (``"resume": false`` starts over). ``max_steps`` at or below the checkpoint's step skips training.
- ``"qc": "shape-only"`` skips the SAM agreement gate: for tests and CPU smoke runs only (see fetal_head.synthesis.quality).
- ``"purge": true`` removes every synthetic pair and does nothing else.
The domain logic is in fetal_head.synthesis.pipeline; this file only maps the request onto it.
"""

import logging
import os

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from fetal_head.synthesis.diffusion import CONFIGS, DEFAULT_SCHEME, make_config
from fetal_head.synthesis.quality import QC_MODES, QCThresholds
from fetal_head.synthesis.sampling import SamplingOptions
from fetal_head.synthesis.pipeline import default_device, synthesize_into_datastore, train_generator
from lib.trainers.options import parse_bool, parse_float, parse_int
from fetal_head.synthesis.store import list_synthetic, purge_synthetic, real_labelled_pairs, real_unlabelled_images

logger = logging.getLogger(__name__)

TRAIN_NAME = "fetal_head_synthesis"


class SynthesisTrain(TrainTask):
    def __init__(self, model_dir: str, model_source=None):
        super().__init__("Diffusion synthesis of fetal head image-mask pairs (trains on real labels, adds synthetic_* pairs)")
        self.model_dir = model_dir
        self.model_source = model_source  # fetal_head.segmentation.model_store.ModelSource: the SAM model for QC
        self._last = {}

    def config(self):
        return {
            "scheme": DEFAULT_SCHEME,
            "config": "default",
            "max_steps": CONFIGS["default"].max_steps,
            "num_pairs": 100,
            "seed": 0,
            "qc": "full",
            "purge": False,
            "resume": True,
            "sampler": CONFIGS["default"].sampler,
            "sampling_steps": CONFIGS["default"].sampling_steps,
            "unlabelled_images": CONFIGS["default"].unlabelled_images,
            "cond_dropout": CONFIGS["default"].cond_dropout,
            "guidance_scale": CONFIGS["default"].guidance_scale,
            "min_sam_dice": QCThresholds.min_sam_dice,
            "min_sam_click_dice": QCThresholds.min_sam_click_dice,
            "device": "cuda or cpu (auto)",
        }

    def stats(self):
        return self._last

    def checkpoint_path(self, scheme: str, config_name: str) -> str:
        return os.path.join(self.model_dir, "diffusion", f"{scheme}_{config_name}.pt")

    def __call__(self, request, datastore: Datastore):
        if parse_bool(request.get("purge", False), "purge"):
            removed = purge_synthetic(datastore)
            self._last = {"purged": len(removed)}
            logger.info(f"purged {len(removed)} synthetic pairs")
            return {"purged": removed}

        scheme = request.get("scheme", DEFAULT_SCHEME)
        config_name = request.get("config", "default")
        qc = request.get("qc", "full")
        if qc not in QC_MODES:
            raise ValueError(f"qc must be one of {QC_MODES}, got {qc!r}")
        device = request.get("device")
        device = default_device() if not device or device.startswith("cuda or") else device
        config = make_config(
            config_name,
            scheme=scheme,
            max_steps=parse_int(request.get("max_steps"), "max_steps", 0),
            seed=parse_int(request.get("seed"), "seed", 0),
            sampler=request.get("sampler"),
            sampling_steps=parse_int(request.get("sampling_steps"), "sampling_steps", 0),
            unlabelled_images=parse_int(request.get("unlabelled_images"), "unlabelled_images", 0),
            cond_dropout=parse_float(request.get("cond_dropout"), "cond_dropout", 0.0),
            guidance_scale=parse_float(request.get("guidance_scale"), "guidance_scale", 0.0),
        )
        pairs = real_labelled_pairs(datastore)
        unlabelled = real_unlabelled_images(datastore) if config.unlabelled_images > 0 else []
        logger.info(f"training the {scheme} generator ({config_name}) on {len(pairs)} real pairs, to step {config.max_steps}")
        ckpt = self.checkpoint_path(scheme, config_name)
        resume = parse_bool(request.get("resume", True), "resume")
        train_summary = train_generator(pairs, config, ckpt, device=device, resume=resume,
                                        unlabelled=unlabelled)

        num_pairs = parse_int(request.get("num_pairs"), "num_pairs", 0) or 0
        synth_summary = {}
        if num_pairs > 0:
            predictor = None
            if qc == "full":
                if self.model_source is None:
                    raise ValueError("qc='full' needs the app's SAM model source")
                predictor = self.model_source.load()
            thresholds = QCThresholds(
                min_sam_dice=parse_float(request.get("min_sam_dice", QCThresholds.min_sam_dice), "min_sam_dice", 0.0, 1.0),
                min_sam_click_dice=parse_float(request.get("min_sam_click_dice", QCThresholds.min_sam_click_dice),
                                               "min_sam_click_dice", 0.0, 1.0),
            )
            synth_summary = synthesize_into_datastore(
                datastore, ckpt, num_pairs, seed=config.seed,
                options=SamplingOptions(qc=qc, predictor=predictor, thresholds=thresholds), device=device,
            )
            logger.info(f"synthetic pairs added: {len(synth_summary['added'])}; QC: {synth_summary['qc']}")
        self._last = {
            "train": train_summary,
            "synthesis": {k: v for k, v in synth_summary.items() if k != "accepted_indices"},
            "synthetic_total": len(list_synthetic(datastore)),
        }
        return self._last
