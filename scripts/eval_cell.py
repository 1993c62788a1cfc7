"""(Benchmark, used for docs/eval/automatic.) Score one saved model on the HC18 test split with
``scripts/eval_automatic.py``'s own per-image, resumable loop (``eval_cell``): rows go to
``<work>/inc/<TAG>.jsonl`` one image at a time, in a fixed random order, so a stopped run resumes and a partial file
is a random subsample.

    python scripts/eval_cell.py MODEL_DIR TAG MODES...                 a saved model
    python scripts/eval_cell.py --localiser N TAG MODES...             <work>/models/nN_s0 (a localiser-off cell's
        decoder) plus a head localiser trained on the same N labels with the trainer's recipe for N
        (localiser.config_for: the small one below WIDE_FROM_LABELS, else the wide one that answers automatic
        requests with its own box; seed 0, no gate), saved and reloaded as <work>/models/TAG, then scored
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from eval_automatic import eval_cell  # noqa: E402  (also puts the app's lib on sys.path)

from fetal_head.evaluation.benchmark import select_labels  # noqa: E402
from fetal_head.evaluation.core import load_test_images, warm_embeddings  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation import training as T  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.localiser import config_for, train_localiser  # noqa: E402
from fetal_head.segmentation.model_store import FINETUNED_NAME, ModelSource, meta_path, save_finetuned  # noqa: E402
from fetal_head.segmentation.models import LITEMEDSAM  # noqa: E402
from fetal_head.segmentation.predictor import SamPredictor  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def add_localiser(cases, n: int, work: str, cache_dir: str, model_dir: str) -> None:
    """``models/n{n}_s0``'s decoder plus a localiser trained on its N labels, saved to ``model_dir``."""
    t0 = time.time()
    off_dir = os.path.join(work, "models", f"n{n}_s0")
    pool = [c for c in cases if c.split == "pool" and (c.mask_path or c.annotation_path)]
    items = T.label_items(select_labels(pool, n, 0), os.path.join(work, "labels"))
    pred = ModelSource(model_dir=off_dir).load()
    samples = T.localiser_samples(pred, items, cache_dir)
    lcfg = config_for(len(samples), steps=300, seed=0)
    net = train_localiser(samples, lcfg)
    setattr(pred.model, T.LOCALISER, net.to(pred.device))
    with open(meta_path(off_dir)) as f:
        meta = json.load(f)
    meta["localiser"] = {"labels": len(samples), "steps": lcfg.steps, "width": lcfg.width,
                         "automatic_route": lcfg.automatic_route,
                         "replaced": True, "reason": "gate off (CV skipped)",
                         "seconds": round(time.time() - t0, 1)}
    save_finetuned(pred.model, LITEMEDSAM, model_dir, meta)
    print(f"localiser trained in {time.time() - t0:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--localiser", type=int, metavar="N", help="train a localiser onto models/nN_s0 (see above)")
    ap.add_argument("positional", nargs="+", metavar="[MODEL_DIR] TAG MODES", help="MODEL_DIR only without --localiser")
    ap.add_argument("--work-dir", default=os.path.join(REPO, ".data", "eval_automatic"))
    ap.add_argument("--cache-dir", default=os.path.join(REPO, ".data", "emb_cache"))
    ap.add_argument("--hc18", default=os.environ.get("HC18_DIR", os.path.join(REPO, "..", "shared", "data", "hc18")))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.localiser is None:
        model_dir, tag, *modes = args.positional
    else:
        tag, *modes = args.positional
        model_dir = os.path.join(args.work_dir, "models", tag)
    if not modes:
        ap.error("give at least one mode")
    torch.set_num_threads(args.threads)

    cases = read_cases(args.hc18)
    if args.localiser is not None and not os.path.isfile(os.path.join(model_dir, FINETUNED_NAME)):
        add_localiser(cases, args.localiser, args.work_dir, args.cache_dir, model_dir)
    holder = SamPredictor.litemedsam(version=LITEMEDSAM)
    cache = EmbeddingCache(args.cache_dir, holder)
    test = load_test_images([c for c in cases if c.split == "test"], seed=0)
    warm_embeddings(holder, test, cache)
    os.makedirs(os.path.join(args.work_dir, "inc"), exist_ok=True)
    eval_cell(model_dir, test, holder, modes, cache, os.path.join(args.work_dir, "inc", tag + ".jsonl"))


if __name__ == "__main__":
    main()
