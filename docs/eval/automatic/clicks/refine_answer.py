"""Final-answer refinements on top of the served click / automatic answer: box-margin ensembles and the click added to
the re-box prompt. usage: FETAL_HEAD_ENCODER_BF16=0 python refine_answer.py TAG SHARD NSHARDS [LIMIT] (a study script, not run by CI)"""
import os, sys, json, pickle
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
import numpy as np, torch
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
from fetal_head.evaluation.core import load_test_images, warm_embeddings
from fetal_head.io.hc18 import read_cases
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource
from fetal_head.segmentation.models import LITEMEDSAM
from fetal_head.segmentation.predictor import SamPredictor
from fetal_head.segmentation import box_search as bs
from fetal_head.segmentation.prompts import grow_box, mask_box
from tqdm import tqdm

torch.set_num_threads(1)
tag, shard, nsh = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
limit = int(sys.argv[4]) if len(sys.argv) > 4 else None
work = os.environ.get("WORK", os.path.join(REPO, ".data", "eval_verif"))
cases = read_cases(os.environ.get("HC18_DIR", os.path.join(REPO, "..", "shared", "data", "hc18")))
sel = [c for c in cases if c.split == "test"][shard::nsh][:limit]
holder = SamPredictor.litemedsam(version=LITEMEDSAM)
cache = EmbeddingCache(os.path.join(REPO, ".data", "emb_cache"), holder)
test = load_test_images(sel, seed=0)
warm_embeddings(holder, test, cache)
pred = ModelSource(model_dir=os.path.join(work, "models", tag)).load()
pred.share_cache(holder); pred.cache_size = holder.cache_size
pred.automatic_agreement = False


def dice(a, b):
    s = a.sum() + b.sum(); return float(2 * (a & b).sum() / s) if s else 0.0


def variants(emb, served, fg, box=None):
    """Dice-able masks: refinements of the served mask (or of a given box)."""
    h, w = emb.original_hw
    base = mask_box(served) if box is None else box
    out = {}
    for name, margins in {"m10": (10,), "m0_10_20": (0, 10, 20), "m5_10_15": (5, 10, 15), "m15": (15,), "m20": (20,),
                          "m0": (0,), "m5": (5,)}.items():
        boxes = np.array([grow_box(base, m, h, w) for m in margins])
        logits, iou = pred.decode(emb, boxes=boxes)
        full = pred.upscale(emb, logits[:, :1].float().mean(0, keepdim=True))
        out[name] = (full[0, 0] > 0).cpu().numpy()
    if fg is not None:
        boxes = np.array([grow_box(base, 10, h, w)])
        logits, iou = pred.decode(emb, boxes=boxes, points=fg[None].astype(np.float32), labels=np.ones((1, len(fg)), int))
        out["m10+click"] = (pred.upscale(emb, logits[:, :1])[0, 0] > 0).cpu().numpy()
    return out


rows = []
for t in tqdm(test, desc=f"{tag}:{shard}"):
    emb = pred.embed(t.image)
    rec = {"image": t.case.image_id}
    for mode in ("click", "automatic", "box"):
        p = t.prompt(mode)
        fg = p.points if mode == "click" else None
        if mode == "box":
            rec["box:served"] = dice(pred.predict(t.image, p).mask, t.mask)
            # the user's box itself: margins added to it (the user's box already holds 0-20 px of jitter)
            h, w = emb.original_hw
            for name, margins in {"b0_5_10": (0, 5, 10), "b-5_0_5": (-5, 0, 5)}.items():
                boxes = np.array([grow_box(t.box, m, h, w) for m in margins])
                logits, iou = pred.decode(emb, boxes=boxes)
                rec[f"box:{name}"] = dice((pred.upscale(emb, logits[:, :1].float().mean(0, keepdim=True))[0, 0] > 0).cpu().numpy(), t.mask)
            continue
        served = pred.predict(t.image, p).mask
        rec[f"{mode}:served"] = dice(served, t.mask)
        if served.sum() < 16:
            continue
        for k, m in variants(emb, served, fg).items():
            rec[f"{mode}:{k}"] = dice(m, t.mask)
    rows.append(rec)
os.makedirs(os.path.join(REPO, ".data", "refine_answer"), exist_ok=True)
pickle.dump(rows, open(os.path.join(REPO, ".data", "refine_answer", f"{tag}_{shard}.pkl"), "wb"))
