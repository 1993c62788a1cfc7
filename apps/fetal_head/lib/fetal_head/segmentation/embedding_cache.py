"""Image embeddings on disk, keyed so that a stale one can never be used: ``<dir>/<encoder key>/<image hash>[_flip].pt``.

The encoder key hashes the encoder's weights and preprocessing (:attr:`SamPredictor.encoder_key`), the image hash
the pixels, so a decoder-only fine-tune keeps every entry valid while new encoder weights or a changed image
never hit an old one. The same key pair keys the predictor's in-memory cache. Entries are written atomically and
load with ``weights_only=True``; an unreadable entry is recomputed.

The folder can be bounded (``max_bytes``; the server's ``--conf embedding_cache_max_gb``): after a write, at most
once every :data:`PRUNE_EVERY_S` seconds per folder, the least recently used entries of every encoder go until the
folder holds 90 % of the bound (a read refreshes an entry's modification time, which is what "used" means here).
A pruned entry costs one encoder run when its image comes back; nothing else depends on it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..files import atomic_torch_save
from .predictor import ImageEmbedding, SamPredictor

logger = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0
_last_prune: Dict[str, float] = {}  # folder -> when it was last pruned (one process may hold several caches on it)
_prune_lock = threading.Lock()


def prune(root: str, max_bytes: int) -> Tuple[int, int]:
    """Remove the least recently used entries under ``root`` (every encoder's folder) until at most 90 % of
    ``max_bytes`` remain, when it holds more than ``max_bytes``. Returns (entries removed, bytes left)."""
    entries = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".pt"):
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:  # removed meanwhile (another process pruning)
                    continue
                entries.append((st.st_mtime, st.st_size, path))
    total = sum(e[1] for e in entries)
    removed = 0
    if total > max_bytes:
        for _, size, path in sorted(entries):
            if total <= 0.9 * max_bytes:
                break
            try:
                os.remove(path)
                total -= size
                removed += 1
            except OSError:
                pass
        logger.info(f"embedding cache {root}: removed {removed} least recently used entries, {total / 1e6:.0f} MB left "
                    f"(bound {max_bytes / 1e6:.0f} MB)")
    return removed, total


class EmbeddingCache:
    """Image embeddings on disk: ``<dir>/<encoder>/<image hash>[_flip].pt``."""

    def __init__(self, cache_dir: str, predictor: SamPredictor, max_bytes: Optional[int] = None):
        self.predictor = predictor
        self.root = cache_dir
        self.max_bytes = max_bytes  # None: unbounded
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
                if self.max_bytes:
                    _touch(path)  # recently used: the last to be pruned
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
        if self.max_bytes:
            self._maybe_prune()
        return ImageEmbedding(features=features.float(), original_hw=emb.original_hw, input_hw=emb.input_hw)

    def _maybe_prune(self) -> None:
        root = os.path.abspath(self.root)
        with _prune_lock:
            if time.monotonic() - _last_prune.get(root, -PRUNE_EVERY_S) < PRUNE_EVERY_S:
                return
            _last_prune[root] = time.monotonic()
        prune(root, self.max_bytes)


def _touch(path: str) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only folder still serves its entries
        pass
