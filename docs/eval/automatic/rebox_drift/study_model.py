"""What the scripts of this folder share: a cell's saved model as the server loads it, with fp32 embeddings from
the repository's disk cache, and the development images (pool images that are not the model's labels)."""
import json
import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
HC18 = os.environ.get("HC18_DIR", os.path.join(REPO, "..", "shared", "data", "hc18"))
DEV_SEED = 1234


def load_model(model_dir: str):
    """(predictor, embedding cache): the saved model, fp32 encoder, no box-search agreement (masks unchanged)."""
    p = ModelSource(model_dir=model_dir).load()
    p.encoder_bf16 = False
    p.refresh_encoder_key()
    p.automatic_agreement = False
    p.cache_size = 4
    return p, EmbeddingCache(os.path.join(REPO, ".data", "emb_cache"), p)


def test_cases():
    return [c for c in read_cases(HC18) if c.split == "test"]


def dev_cases(model_dir: str, n: int):
    """A seeded draw of ``n`` pool images that are not ``model_dir``'s labels: tuning here never sees the test split."""
    labels = set(json.load(open(os.path.join(model_dir, "cell_info.json")))["labels"])
    pool = [c for c in read_cases(HC18) if c.split == "pool" and c.image_id not in labels]
    return [pool[i] for i in np.random.default_rng(DEV_SEED).permutation(len(pool))[:n]]
