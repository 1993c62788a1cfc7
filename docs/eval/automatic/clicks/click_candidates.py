"""Click at the reference centroid: dump every candidate (localised A + box search around the click S) with its
score, centrality, verifier probability and the Dice of its re-boxed answer, for the evaluation cells of
scripts/eval_automatic.py (``--work-dir .data/eval_verif``); then ``click_rules.py TAG`` scores selection rules.
usage: FETAL_HEAD_ENCODER_BF16=0 python click_candidates.py TAG SHARD NSHARDS [LIMIT]  (a study script, not run by CI)"""
import os
import pickle
import sys

import numpy as np
from tqdm import tqdm

from study_setup import REPO, load_cell
from fetal_head.segmentation import box_search as bs
from fetal_head.segmentation.prompts import mask_dice

tag, shard, test, pred = load_cell(sys.argv[1:])
dice = mask_dice
ver = pred.head_verifier
assert ver is not None


out = []
for t in tqdm(test, desc=f"{tag}:{shard}"):
    emb = pred.embed(t.image)
    h, w = emb.original_hw
    ch, cw = pred.low_res_hw(emb)
    prompt = t.prompt("click").validated(h, w)
    fg = prompt.points
    served = pred.predict(t.image, prompt)
    rec = {"image": t.case.image_id, "served": dice(served.mask, t.mask), "cands": []}
    found = bs.localised_candidates(pred, emb, prompt, t.image, search_too=False)
    cands = [] if found is None else list(found[1])
    # box search around the click: components holding the click, all re-prompted
    to_low = np.array([cw / w, ch / h])
    boxes = bs.boxes_around([tuple(fg[0])], bs.SEARCH_SCALES, h, w)
    logits, iou = pred.decode(emb, boxes=np.array(boxes))
    low = (logits[:, 0, :ch, :cw] > 0).cpu().numpy()
    first = bs._heads_with_boxes(low, fg * to_low, None, to_low, h, w)
    if first:
        l2, i2 = pred.decode(emb, boxes=np.array([c[2] for c in first]))
        low2 = (l2[:, 0, :ch, :cw] > 0).cpu().numpy()
        for j, (i, head, _) in enumerate(first):
            cands.append(bs.Candidate("click_search", head, low2[j], l2[j:j + 1], i2[j:j + 1], float(iou[i, 0]),
                                      (fg * to_low)[0]))
    if cands:
        p = ver.probability(bs.verifier_inputs(emb, cands))
        for c, pc in zip(cands, p):
            fin = pred.finish(emb, c.logits, c.iou)
            rb = bs.rebox(pred, emb, fin, fg)
            rec["cands"].append({"src": c.source, "score": c.score, "cent": bs.centrality(c.mask, c.centre),
                                 "p": float(pc), "dice": dice(rb.mask, t.mask), "dice_norebox": dice(fin.mask, t.mask),
                                 "area": float(c.mask.mean())})
    out.append(rec)
os.makedirs(os.path.join(REPO, ".data", "click_candidates"), exist_ok=True)
pickle.dump(out, open(os.path.join(REPO, ".data", "click_candidates", f"{tag}_{shard}.pkl"), "wb"))
