"""The pool scorer behind the server's strategies: embeddings from the disk cache (the trainer's, so an image is
encoded once for training, inference and selection), uncertainty and features from :class:`.ScoreCache`, and a
background pass over the unlabelled pool.

Counters (``encoder_runs``, ``scores.computed``, ``scores.hits``) make the caching observable: a second Next Sample
over the same images and model runs neither the encoder nor the scorer.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..io import read_image
from ..segmentation.embedding_cache import EmbeddingCache
from ..segmentation.predictor import ImageEmbedding, SamPredictor
from .score_cache import ScoreCache
from .scores import pooled_feature, uncertainty

logger = logging.getLogger(__name__)

Item = Tuple[str, str]  # (image id, image path)


class PoolScorer:
    def __init__(self, get_predictor: Callable[[], SamPredictor], embedding_dir: str, score_dir: str,
                 embedding_max_bytes: Optional[int] = None):
        self.get_predictor = get_predictor
        self.embedding_dir = embedding_dir
        self.embedding_max_bytes = embedding_max_bytes  # the server's bound on that folder (None: unbounded)
        self.scores = ScoreCache(score_dir)
        self.encoder_runs = 0
        self._keys: Dict[Tuple[str, float, int], str] = {}  # (path, mtime, size) -> image hash
        self._lock = threading.RLock()  # one scoring at a time (the CPU is the limit anyway)
        self._thread: Optional[threading.Thread] = None
        self._pending: List[Item] = []

    # ---- one image --------------------------------------------------------------------------------------------
    def image_key(self, path: str) -> Tuple[str, Optional[np.ndarray]]:
        """The image hash of ``path`` (memoised by path, mtime and size) and the image when it had to be read."""
        st = os.stat(path)
        k = (path, st.st_mtime, st.st_size)
        if k in self._keys:
            return self._keys[k], None
        image = read_image(path)
        self._keys[k] = SamPredictor.image_key(image)
        return self._keys[k], image

    def embedding(self, predictor: SamPredictor, image: np.ndarray) -> ImageEmbedding:
        cache = EmbeddingCache(self.embedding_dir, predictor, self.embedding_max_bytes)
        emb = cache.get(image)
        self.encoder_runs += cache.misses
        return emb

    def cached_score(self, predictor: SamPredictor, path: str) -> Optional[dict]:
        key, _ = self.image_key(path)
        return self.scores.get_score(predictor.encoder_key, predictor.version, key)

    def cached_feature(self, predictor: SamPredictor, path: str) -> Optional[np.ndarray]:
        key, _ = self.image_key(path)
        return self.scores.get_feature(predictor.encoder_key, key)

    def score(self, path: str, predictor: Optional[SamPredictor] = None) -> dict:
        """The image's uncertainty under the current model (cached), computing its feature on the way."""
        predictor = predictor or self.get_predictor()
        with self._lock:
            key, image = self.image_key(path)
            hit = self.scores.get_score(predictor.encoder_key, predictor.version, key)
            if hit is not None and self.scores.get_feature(predictor.encoder_key, key) is not None:
                return hit
            image = read_image(path) if image is None else image
            emb = self.embedding(predictor, image)
            if self.scores.get_feature(predictor.encoder_key, key) is None:
                self.scores.put_feature(predictor.encoder_key, key, pooled_feature(emb))
            if hit is None:
                hit, _ = uncertainty(predictor, emb, image=image)
                self.scores.put_score(predictor.encoder_key, predictor.version, key, hit)
            return hit

    def preannotate(self, path: str) -> None:
        """Put the image's embedding into the served predictor's in-memory cache, so the next infer on it (Slicer's
        automatic segmentation of the handed-out sample) skips the encoder."""
        predictor = self.get_predictor()
        image = read_image(path)
        predictor.remember(image, self.embedding(predictor, image))

    # ---- the pool ---------------------------------------------------------------------------------------------
    def known(self, items: Iterable[Item]) -> Tuple[Dict[str, dict], Dict[str, np.ndarray]]:
        """Scores and features already cached for the current model, by image id (nothing computed)."""
        predictor = self.get_predictor()
        scores, feats = {}, {}
        for image_id, path in items:
            s = self.cached_score(predictor, path)
            if s is not None:
                scores[image_id] = s
            f = self.cached_feature(predictor, path)
            if f is not None:
                feats[image_id] = f
        return scores, feats

    def score_items(self, items: Iterable[Item]) -> int:
        n = 0
        predictor = self.get_predictor()
        for _, path in items:
            if predictor.version != self.get_predictor().version:  # a retrain finished: restart with the new one
                predictor = self.get_predictor()
            try:
                self.score(path, predictor)
                n += 1
            except Exception as e:  # one unreadable image must not stop the pass
                logger.warning(f"scoring {path} failed: {e}")
        return n

    def start_background(self, items: List[Item]) -> bool:
        """Score ``items`` in a daemon thread (a new list replaces the pending one); False when already running."""
        with self._lock:
            self._pending = list(items)
            if self._thread is not None and self._thread.is_alive():
                return False

            def run():
                while True:
                    with self._lock:
                        todo, self._pending = self._pending, []
                    if not todo:
                        return
                    n = self.score_items(todo)
                    logger.info(f"active learning: scored {n} unlabelled images in the background")

            self._thread = threading.Thread(target=run, name="fetal-head-al-scoring", daemon=True)
            self._thread.start()
            return True

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict:
        return {"encoder_runs": self.encoder_runs, "scores_computed": self.scores.computed,
                "score_cache_hits": self.scores.hits, "background_running": self.busy()}
