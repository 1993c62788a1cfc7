"""The set-up this folder's study scripts share: one evaluation cell's model (``scripts/eval_automatic.py``'s work
dir, ``WORK``, default ``.data/eval_verif``) and a shard of the HC18 test split with its embeddings warm, one thread."""
import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))

import torch  # noqa: E402

from fetal_head.evaluation.core import load_test_images, warm_embeddings  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource  # noqa: E402
from fetal_head.segmentation.models import LITEMEDSAM  # noqa: E402
from fetal_head.segmentation.predictor import SamPredictor  # noqa: E402


def load_cell(argv):
    """``TAG SHARD NSHARDS [LIMIT]`` -> (tag, shard, test images of that shard, the cell's predictor)."""
    torch.set_num_threads(1)
    tag, shard, nsh = argv[0], int(argv[1]), int(argv[2])
    limit = int(argv[3]) if len(argv) > 3 else None
    work = os.environ.get("WORK", os.path.join(REPO, ".data", "eval_verif"))
    cases = read_cases(os.environ.get("HC18_DIR", os.path.join(REPO, "..", "shared", "data", "hc18")))
    sel = [c for c in cases if c.split == "test"][shard::nsh][:limit]
    holder = SamPredictor.litemedsam(version=LITEMEDSAM)
    test = load_test_images(sel, seed=0)
    warm_embeddings(holder, test, EmbeddingCache(os.path.join(REPO, ".data", "emb_cache"), holder))
    pred = ModelSource(model_dir=os.path.join(work, "models", tag)).load()
    pred.share_cache(holder)
    pred.cache_size = holder.cache_size  # it shares the holder's LRU: do not let it trim the warmed embeddings
    return tag, shard, test, pred
