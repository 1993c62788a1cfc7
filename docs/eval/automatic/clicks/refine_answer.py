"""Final-answer refinements on top of the served click / automatic answer: box-margin ensembles and the click added to
the re-box prompt. usage: FETAL_HEAD_ENCODER_BF16=0 python refine_answer.py TAG SHARD NSHARDS [LIMIT] (a study script, not run by CI)"""
import os
import pickle
import sys

import numpy as np
from tqdm import tqdm

from study_setup import REPO, load_cell
from fetal_head.segmentation import box_search as bs
from fetal_head.segmentation.prompts import grow_box, mask_box, mask_dice

tag, shard, test, pred = load_cell(sys.argv[1:])
dice = mask_dice
pred.automatic_agreement = False


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
