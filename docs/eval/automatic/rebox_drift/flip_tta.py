"""Test-time flip for the box decoder's last decode: does averaging the answer with the mirror image's answer
(same box, mirrored) close part of the gap between box prompts and box-free answers? It costs a second encoder run
per image (the mirror image's embedding), so it would be an option, not free.

For each test image and mode (box: the evaluation's jittered box; click: one click at the centroid; automatic) it
scores (Dice of the served ellipse against the reference):
- served: the answer as served (SamPredictor.predict);
- rebox: one more box_search.rebox of the served answer (a control: the decode the flip is added to);
- flip: that last decode (for box mode: the prompt box itself) averaged over the image and its mirror image
  (low-resolution logits, the mirror's flipped back).

usage: python flip_tta.py MODEL_DIR [LIMIT]   (writes .data/flip_tta/<cell>.json; embeddings from .data/emb_cache)"""
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from study_model import REPO, load_model, test_cases
from fetal_head.evaluation.core import load_test_images
from fetal_head.measurement import answer_mask
from fetal_head.segmentation import box_search
from fetal_head.segmentation.prompts import mask_dice


def decode_flip(p, emb, emb_f, box):
    """The box decoder's answer to ``box`` averaged with its mirror image's answer to the mirrored box."""
    w = emb.original_hw[1]
    ch, cw = p.low_res_hw(emb)
    logits, iou = p.decode(emb, boxes=np.array([box]))
    lf, iou_f = p.decode(emb_f, boxes=np.array([(w - 1 - box[2], box[1], w - 1 - box[0], box[3])]))
    back = logits.clone()
    back[..., :ch, :cw] = lf[..., :ch, :cw].flip(-1)
    return p.finish(emb, (logits + back) / 2, (iou + iou_f) / 2)


def main():
    md = sys.argv[1]
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    p, cache = load_model(md)
    cases = test_cases()
    test = load_test_images(cases[:limit] if limit else cases)
    rows = {}
    for t in tqdm(test, mininterval=30):
        emb, emb_f = cache.get(t.image), cache.get(t.image, flipped=True)
        p.remember(t.image, emb)

        def dice(pred):
            return round(mask_dice(answer_mask(pred.mask, "ellipse"), t.mask), 4)

        logits, iou = p.decode(emb, boxes=np.array([t.box]))
        r = {"box": {"served": dice(p.finish(emb, logits, iou)), "flip": dice(decode_flip(p, emb, emb_f, t.box))}}
        for mode in ("click", "automatic"):
            served = p.predict(t.image, t.prompt(mode))
            r[mode] = {"served": dice(served)}
            if served.mask.sum() >= 16:
                r[mode]["rebox"] = dice(box_search.rebox(p, emb, served))
                r[mode]["flip"] = dice(decode_flip(p, emb, emb_f, box_search.rebox_box(served.mask)))
            else:
                r[mode]["rebox"] = r[mode]["flip"] = r[mode]["served"]
        rows[t.case.image_id] = r
    out = {}
    for mode in ("box", "click", "automatic"):
        out[mode] = {k: round(100 * float(np.mean([r[mode][k] for r in rows.values()])), 2)
                     for k in rows[next(iter(rows))][mode]}
        out[mode]["below_0.8"] = {k: int(sum(r[mode][k] < 0.8 for r in rows.values())) for k in out[mode]}
    print(json.dumps(out, indent=1))
    os.makedirs(os.path.join(REPO, ".data", "flip_tta"), exist_ok=True)
    cell = os.path.basename(md.rstrip("/"))
    json.dump({"summary": out, "images": rows}, open(os.path.join(REPO, ".data", "flip_tta", cell + ".json"), "w"))


if __name__ == "__main__":
    main()
