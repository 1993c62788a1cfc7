"""Image embeddings on disk, keyed so that a stale one can never be used: ``<dir>/<encoder key>/<image hash>[_flip].pt``.

The encoder key hashes the encoder's weights and preprocessing (:attr:`SamPredictor.encoder_key`), the image hash
the pixels, so a decoder-only fine-tune keeps every entry valid while new encoder weights or a changed image
never hit an old one. The same key pair keys the predictor's in-memory cache. Entries are written atomically and
load with ``weights_only=True``; an unreadable entry is recomputed.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from ..files import atomic_torch_save
from .predictor import ImageEmbedding, SamPredictor

logger = logging.getLogger(__name__)


class EmbeddingCache:
    """Image embeddings on disk: ``<dir>/<encoder>/<image hash>[_flip].pt``."""

    def __init__(self, cache_dir: str, predictor: SamPredictor):
        self.predictor = predictor
        self.dir = os.path.join(cache_dir, predictor.encoder_key)  # encoder weights + preprocessing
        os.makedirs(self.dir, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def path(self, image: np.ndarray, flipped: bool) -> str:
        return os.path.join(self.dir, SamPredictor.image_key(image) + ("_flip" if flipped else "") + ".pt")

    def get(self, image: np.ndarray, flipped: bool = False) -> ImageEmbedding:
        """``image`` is the unflipped frame; the flipped embedding is of ``image[:, ::-1]``."""
        path = self.path(image, flipped)
        if os.path.isfile(path):
            try:
                d = torch.load(path, map_location="cpu", weights_only=True)
                self.hits += 1
                return ImageEmbedding(
                    features=d["features"].float(),
                    original_hw=tuple(int(v) for v in d["original_hw"]),
                    input_hw=tuple(int(v) for v in d["input_hw"]),
                )
            except Exception as e:  # an unreadable entry is recomputed, never trusted
                logger.warning(f"embedding cache entry {path} unreadable ({e}); recomputing")
        self.misses += 1
        frame = np.ascontiguousarray(image[:, ::-1]) if flipped else image
        emb = self.predictor.encode([frame])[0]
        emb = ImageEmbedding(features=emb.features.detach().cpu().clone(), original_hw=emb.original_hw, input_hw=emb.input_hw)
        # float16 halves the disk use (4 MB -> 2 MB per LiteMedSAM image); the rounding is far below label noise
        atomic_torch_save({"features": emb.features.half(), "original_hw": torch.tensor(emb.original_hw),
                           "input_hw": torch.tensor(emb.input_hw)}, path)
        return ImageEmbedding(features=emb.features.half().float(), original_hw=emb.original_hw, input_hw=emb.input_hw)
