"""Scores and features on disk, keyed so a stale one is never used.

``<dir>/<encoder key>/features/<image hash>.npy``: the pooled embedding (depends on the encoder only);
``<dir>/<encoder key>/scores/<model version>/<image hash>.json``: the uncertainty (depends on the decoder too, so
a retrained model re-scores). The encoder key and image hash are those of the embedding cache
(:class:`fetal_head.segmentation.embedding_cache.EmbeddingCache`). Writes are atomic; counters say how many
entries were read back (``hits``) and computed (``computed``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Optional

import numpy as np

from ..files import atomic_json, atomic_path
from .scores import SCORE_VERSION


def _slug(version: str) -> str:
    return hashlib.blake2b(f"{version}:{SCORE_VERSION}".encode(), digest_size=8).hexdigest()


class ScoreCache:
    def __init__(self, cache_dir: str):
        self.dir = cache_dir
        self.hits = 0
        self.computed = 0
        self._mem: dict = {}
        self._lock = threading.Lock()

    def _score_path(self, encoder_key: str, model_version: str, image_key: str) -> str:
        return os.path.join(self.dir, encoder_key, "scores", _slug(model_version), image_key + ".json")

    def _feature_path(self, encoder_key: str, image_key: str) -> str:
        return os.path.join(self.dir, encoder_key, "features", image_key + ".npy")

    def get_score(self, encoder_key: str, model_version: str, image_key: str) -> Optional[dict]:
        key = ("s", encoder_key, model_version, image_key)
        with self._lock:
            if key in self._mem:
                self.hits += 1
                return self._mem[key]
        path = self._score_path(encoder_key, model_version, image_key)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    d = json.load(f)
            except (OSError, ValueError):
                return None
            with self._lock:
                self._mem[key] = d
                self.hits += 1
            return d
        return None

    def put_score(self, encoder_key: str, model_version: str, image_key: str, score: dict) -> None:
        path = self._score_path(encoder_key, model_version, image_key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_json(score, path)
        with self._lock:
            self._mem[("s", encoder_key, model_version, image_key)] = score
            self.computed += 1

    def get_feature(self, encoder_key: str, image_key: str) -> Optional[np.ndarray]:
        key = ("f", encoder_key, image_key)
        with self._lock:
            if key in self._mem:
                return self._mem[key]
        path = self._feature_path(encoder_key, image_key)
        if os.path.isfile(path):
            try:
                v = np.load(path)
            except (OSError, ValueError):
                return None
            with self._lock:
                self._mem[key] = v
            return v
        return None

    def put_feature(self, encoder_key: str, image_key: str, v: np.ndarray) -> None:
        path = self._feature_path(encoder_key, image_key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, v)
        with self._lock:
            self._mem[("f", encoder_key, image_key)] = v
