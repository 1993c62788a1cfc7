"""MONAI Label app for fetal head ultrasound.

    monailabel start_server --app apps/fetal_head --studies DATASTORE [--conf sam_checkpoint PATH --conf sam_model_type vit_b]

Registers the SAM infer tasks ``fetal_head_sam`` (prompted: box and clicks; Slicer's SmartEdit) and
``fetal_head_auto`` (no prompt; Slicer's Auto Segmentation), both over one model, and the active-learning
strategies of ``lib/activelearning`` (uncertainty, diversity, hybrid, random, first; real unlabelled images only).
MONAI Label's own SAM2 task is not registered: it downloads weights at start, and this app runs offline.
"""

import json
import logging
import os
import sys
from typing import Dict

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from fetal_head import __version__
from fetal_head.biometry import BiometryError
from fetal_head.io.hc18 import LABEL_NAME, PIXEL_SIZE_KEY
from fetal_head.io import ImageReadError
from fetal_head.io.common import ImageTooLargeError, set_max_pixels
from fetal_head.segmentation.model_store import ModelSource, ServedModel
from fetal_head.segmentation.prompts import PromptError
from fetal_head.selection import PoolScorer
from lib.activelearning import AutoRetrain, Diversity, FirstReal, Hybrid, RandomReal, SelectionService, Uncertainty
from lib.activelearning.auto_retrain import DEFAULT_EPOCHS
from lib.datastores.dicomweb import datastore_from_settings
from lib.datastores.local import is_valid_tag
from lib import server_guard
from lib.infers.sam_infer import FetalHeadSamInfer, RequestOptionError
from lib.trainers.options import parse_bool
from lib.trainers.sam_train import FetalHeadSamTrain
from lib.trainers.synthesis_train import TRAIN_NAME as SYNTHESIS_TRAIN_NAME, SynthesisTrain

logger = logging.getLogger(__name__)

# torch's OpenMP threads spin between parallel regions by default; beside MONAI Label's training subprocess that
# steals the other process's cores: an encode took 3.6 s instead of 2.7 s, the training 56 s instead of 39 s
# (scripts/bench_contention.py, 2 cores). The training and scoring subprocesses inherit this; OpenMP reads it when
# torch loads, so the server process itself needs it in its own environment (Makefile, README).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

INFER_NAME = "fetal_head_sam"
AUTO_INFER_NAME = "fetal_head_auto"
DEFAULT_STRATEGY = "random"  # the simulated study's pick (README "Active learning")
EMBEDDING_CACHE_MAX_GB = 20.0  # ~10,000 LiteMedSAM images at ~2 MB each


def _gigabytes(value):
    """``--conf embedding_cache_max_gb``: a size in GB as bytes; 0 or less: unbounded (None)."""
    try:
        gb = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--conf embedding_cache_max_gb must be a number of gigabytes, got {value!r}") from None
    return int(gb * 1e9) if 0 < gb < float("inf") else None


class FetalHeadApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        if conf.get("max_image_pixels"):  # checked from each file's header, before decoding
            set_max_pixels(conf["max_image_pixels"])
        self.model_dir = os.path.join(app_dir, "model")
        os.makedirs(self.model_dir, exist_ok=True)
        self.source = ModelSource(
            model_dir=self.model_dir,
            sam_checkpoint=conf.get("sam_checkpoint") or None,
            sam_model_type=conf.get("sam_model_type", "vit_b"),
            device=conf.get("device", "cpu"),
            cache_size=int(conf.get("embedding_cache_size", 16)),
            automatic_agreement=parse_bool(conf.get("automatic_agreement", "true"), "automatic_agreement"),
        )
        # one disk cache of image embeddings for inference, training and active learning (~2 MB an image), bounded:
        # the least recently used entries go first (0: unbounded)
        self.embedding_dir = conf.get("embedding_cache_dir") or os.path.join(self.model_dir, "embedding_cache")
        self.embedding_max_bytes = _gigabytes(conf.get("embedding_cache_max_gb", EMBEDDING_CACHE_MAX_GB))
        self.served_model = ServedModel(self.source, self.embedding_dir, self.embedding_max_bytes)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Fetal head ultrasound (SAM)",
            description="Fetal head segmentation and head circumference from 2D ultrasound",
            version=__version__,
            labels=[LABEL_NAME],  # a list, as MONAI Label builds it: OHIF's panel appends to /info/'s labels
        )

    def init_datastore(self):
        """A folder: MONAI Label's local datastore made safe (ids/tags checked, final labels protected, atomic JSON;
        lib/datastores/local.py). A URL: the DICOMweb datastore below."""
        from monailabel.config import settings

        from lib.datastores.local import FetalHeadDatastore, install_routes

        if self.studies.startswith(("http://", "https://")):
            datastore = super().init_datastore()
        else:
            datastore = FetalHeadDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                           auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                           read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)
        install_routes(self.datastore)  # `force` flags and label history, in a running server only
        return datastore

    def _init_dicomweb_datastore(self):
        """`--studies http://.../dicom-web`: ultrasound series from a PACS, final labels back as DICOM SEG."""
        return datastore_from_settings(self.studies)

    def _download_dcmqi_tools(self):
        """No-op: MONAI Label downloads dcmqi from GitHub here; this app writes DICOM SEG with highdicom, offline."""

    def init_infers(self) -> Dict[str, InferTask]:
        return {
            INFER_NAME: FetalHeadSamInfer(self.served_model, InferType.DEEPGROW, label=LABEL_NAME),
            AUTO_INFER_NAME: FetalHeadSamInfer(
                self.served_model, InferType.SEGMENTATION, label=LABEL_NAME,
                description="Fetal head segmentation without a prompt (automatic), with HC/BPD/OFD",
            ),
        }

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {
            INFER_NAME: FetalHeadSamTrain(self.source, cache_dir=self.embedding_dir),
            SYNTHESIS_TRAIN_NAME: SynthesisTrain(self.model_dir, self.source),
        }

    def init_strategies(self) -> Dict[str, Strategy]:
        """Active learning (lib/activelearning): the default first (the simulated study's pick, README "Active
        learning"), then the others; all return unlabelled real images only. Scores and embeddings are cached on
        disk (``--conf score_cache_dir``, ``--conf embedding_cache_dir``, shared with inference and the trainer).
        Retraining in the loop: ``--conf auto_retrain_every K`` (0: off), ``auto_retrain_epochs E``,
        ``auto_retrain_options JSON``."""
        score_dir = self.conf.get("score_cache_dir") or os.path.join(self.model_dir, "score_cache")
        service = SelectionService(PoolScorer(self.served_model.get, self.embedding_dir, score_dir,
                                              self.embedding_max_bytes))
        self._selection = service
        self._auto_retrain = AutoRetrain(
            int(self.conf.get("auto_retrain_every", 0) or 0),
            lambda params: self.async_training(INFER_NAME, params={INFER_NAME: params}, enqueue=True),
            epochs=int(self.conf.get("auto_retrain_epochs", DEFAULT_EPOCHS) or DEFAULT_EPOCHS),
            options=json.loads(self.conf.get("auto_retrain_options") or "{}"),
        )
        strategies = {
            "uncertainty": Uncertainty(service),
            "diversity": Diversity(service),
            "hybrid": Hybrid(service),
            "random": RandomReal(service),
            "first": FirstReal(service),
        }
        default = DEFAULT_STRATEGY
        strategies[default].description += " [default]"
        return {default: strategies[default], **{k: v for k, v in strategies.items() if k != default}}

    def on_save_label(self, image_id, label_id):
        """After every submitted label: auto-retrain after K new labels (when ``auto_retrain_every`` is set)."""
        res = super().on_save_label(image_id, label_id) or {}
        retrain = getattr(self, "_auto_retrain", None)
        if retrain is not None:
            res.update(retrain.on_label(self.datastore()) or {})
        return res

    def on_init_complete(self):
        super().on_init_complete()
        if "monailabel.app" in sys.modules:  # the server (not the train child process): guarded infer/train routes
            server_guard.install(sys.modules["monailabel.app"].app, self, int(self.conf.get("infer_workers", 2)))

    def train(self, request):
        """MONAI Label's train, with the options checked by the trainer's own parser first."""
        task = self._trainers.get(request.get("model"))
        validate = getattr(task, "validate_request", None)
        if validate is not None:
            validate(request)
        return super().train(request)

    def infer(self, request, datastore=None):
        """MONAI Label's infer, plus: the image's pixel size from the datastore, and 4xx answers for bad input."""
        datastore = datastore or self.datastore()
        if "label_tag" in request and not is_valid_tag(request["label_tag"]):
            raise HTTPException(status_code=422, detail=f"invalid label_tag {str(request['label_tag'])[:100]!r}: "
                                                        "letters, digits, '_' or '-'")
        if request.get("save_label") and request.get("label_tag") == DefaultLabelTag.FINAL.value:  # "false" too
            raise HTTPException(status_code=403, detail="/infer never writes a final label: review the result and "
                                                        "submit it with PUT /datastore/label")
        image_id = request.get("image")
        if isinstance(image_id, str) and image_id and not _is_uploaded_file(image_id):
            # an id, never a server path: MONAI Label would read any existing file named in `image`
            if not datastore.get_image_uri(image_id):
                raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
            if request.get("pixel_size_mm") is None:
                pixel_size = datastore.get_image_info(image_id).get(PIXEL_SIZE_KEY)
                if pixel_size:
                    request = {**request, "pixel_size_mm": pixel_size}
        if request.get("model") not in self._infers:
            raise HTTPException(status_code=404, detail=f"model '{request.get('model')}' not found")
        try:
            return super().infer(request, datastore)
        except ImageTooLargeError as e:
            raise HTTPException(status_code=413, detail=f"{type(e).__name__}: {e}") from e
        except (ImageReadError, PromptError, RequestOptionError, BiometryError) as e:
            raise HTTPException(status_code=422, detail=f"{type(e).__name__}: {e}") from e


def _is_uploaded_file(path: str) -> bool:
    """A file the current request uploaded (never any other file in a temp folder) or a session image."""
    from monailabel.config import settings

    if not os.path.isfile(path):
        return False
    real = os.path.realpath(path)
    if real in server_guard.current_uploads():
        return True
    sessions = settings.MONAI_LABEL_SESSION_PATH
    return bool(sessions) and real.startswith(os.path.realpath(sessions) + os.sep)
