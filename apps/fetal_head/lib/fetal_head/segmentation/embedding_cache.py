"""Image embeddings on disk, keyed so that a stale one can never be used: ``<dir>/<encoder key>/<image hash>[_flip].pt``.

The encoder key hashes the encoder's weights and preprocessing (:attr:`SamPredictor.encoder_key`), the image hash
the pixels, so a decoder-only fine-tune keeps every entry valid while new encoder weights or a changed image
never hit an old one. The same key pair keys the predictor's in-memory cache. Entries are written atomically and
load with ``weights_only=True``; an unreadable entry is recomputed.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np
import torch

from ..files import atomic_torch_save
from .predictor import ImageEmbedding, SamPredictor

logger = logging.getLogger(__name__)


class EmbeddingCache:
    """Image embeddings on disk: ``<dir>/<encoder>/<image hash>[_flip].pt``."""

    def __init__(self, cache_dir: str, predictor: SamPredictor):
        self.predictor = predictor
        self.root = cache_dir
        os.makedirs(self.dir, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @property
    def dir(self) -> str:
        """The current encoder's folder: read at each use, so an encoder fine-tuned in place (its key refreshed)
        never reads or writes the old encoder's entries."""
        return os.path.join(self.root, self.predictor.encoder_key)

    def path(self, image: np.ndarray, flipped: bool) -> str:
        return os.path.join(self.dir, SamPredictor.image_key(image) + ("_flip" if flipped else "") + ".pt")

    def get(self, image: np.ndarray, flipped: bool = False) -> ImageEmbedding:
        """``image`` is the unflipped frame; the flipped embedding is of ``image[:, ::-1]``."""
        emb = self.load(image, flipped)
        if emb is not None:
            return emb
        frame = np.ascontiguousarray(image[:, ::-1]) if flipped else image
        return self.store(image, self.predictor.encode([frame])[0], flipped)

    def load(self, image: np.ndarray, flipped: bool = False) -> Optional[ImageEmbedding]:
        """The stored embedding, or None (a miss: the caller encodes the frame and may :meth:`store` it)."""
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
        return None

    def store(self, image: np.ndarray, emb: ImageEmbedding, flipped: bool = False) -> ImageEmbedding:
        """Write ``emb`` (of ``image``, or of its mirror image with ``flipped``); returns it as it reads back."""
        features = emb.features.detach().cpu().half()
        # float16 halves the disk use (4 MB -> 2 MB per LiteMedSAM image); the rounding is far below label noise
        atomic_torch_save({"features": features, "original_hw": torch.tensor(emb.original_hw),
                           "input_hw": torch.tensor(emb.input_hw)}, self.path(image, flipped))
        return ImageEmbedding(features=features.float(), original_hw=emb.original_hw, input_hw=emb.input_hw)
