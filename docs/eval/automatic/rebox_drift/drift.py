"""Why does a near-right automatic or click answer score ~1 point below a box prompt (20 labels: 96.2-96.5 % against
97.3-97.6 % on the images all three modes get right)? Every automatic / click answer ends as the box decoder fed
its own mask's box plus box_search.AUTOMATIC_MARGIN_PX (box_search.rebox). This follows that fixed point from the
reference box: decode the reference box plus the margin, re-box the answer from its own mask K times, and reports
per step the Dice (the served ellipse) and how far each side of the answer's box lies outside (+) or inside (-)
the reference box. It also reports the served automatic answer's box offsets.

usage: python drift.py MODEL_DIR [K] [LIMIT]     (fp32 embeddings from .data/emb_cache)"""
import json
import sys

import numpy as np
from tqdm import tqdm

from study_model import load_model, test_cases
from fetal_head.io import read_image
from fetal_head.measurement import answer_mask
from fetal_head.segmentation import box_search
from fetal_head.segmentation.prompts import grow_box, mask_box, mask_dice


def offsets(box, ref):
    """(left, top, right, bottom) px that ``box`` reaches beyond ``ref`` (negative: inside)."""
    return np.array([ref[0] - box[0], ref[1] - box[1], box[2] - ref[2], box[3] - ref[3]])


def main():
    md = sys.argv[1]
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    p, cache = load_model(md)
    test = test_cases()
    test = test[:limit] if limit else test
    dice = np.zeros((len(test), k + 1))
    off = np.zeros((len(test), k + 1, 4))
    auto_off, auto_dice = [], []
    for i, c in enumerate(tqdm(test, mininterval=30)):
        im = read_image(c.image_path)
        emb = cache.get(im)
        ref = c.load_mask()
        rb = mask_box(ref)
        h, w = ref.shape
        logits, iou = p.decode(emb, boxes=np.array([grow_box(rb, box_search.AUTOMATIC_MARGIN_PX, h, w)]))
        pred = p.finish(emb, logits, iou)
        for step in range(k + 1):
            if step:
                pred = box_search.rebox(p, emb, pred)
            dice[i, step] = mask_dice(answer_mask(pred.mask, "ellipse"), ref)
            off[i, step] = offsets(mask_box(pred.mask), rb) if pred.mask.any() else np.nan
        a = p.predict_automatic(emb, im, agreement=False)
        d = mask_dice(answer_mask(a.mask, "ellipse"), ref)
        auto_dice.append(d)
        if d >= 0.8:
            auto_off.append(offsets(mask_box(a.mask), rb))
    good = np.array(auto_dice) >= 0.8
    out = {"images": len(test), "automatic_dice": round(float(np.mean(auto_dice)), 4),
           "automatic_good": int(good.sum()),
           "automatic_good_offsets_px_mean": np.round(np.mean(auto_off, 0), 2).tolist(),
           "steps": []}
    for s in range(k + 1):
        out["steps"].append({"rebox": s, "dice": round(float(dice[:, s].mean()), 4),
                             "dice_on_automatic_good": round(float(dice[good, s].mean()), 4),
                             "offsets_px_mean": np.round(np.nanmean(off[:, s], 0), 2).tolist(),
                             "offsets_px_median": np.round(np.nanmedian(off[:, s], 0), 2).tolist()})
    print(json.dumps(out, indent=1))
    print("automatic on its good images:", round(float(np.mean(np.array(auto_dice)[good])), 4))


if __name__ == "__main__":
    main()
