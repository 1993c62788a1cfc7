"""Dump the served automatic candidates (n20_s0) + one from the wide localiser's box, with Dice, score, verifier
probability and the box IoU with the wide localiser's box. usage: python dump_candidates.py MODEL_DIR LOC_PT W OUT"""
import os as _os
REPO = _os.path.abspath(_os.path.join(_os.path.dirname(__file__), "..", "..", "..", ".."))
OUT = _os.path.join(REPO, ".data", "wide_localiser"); _os.makedirs(OUT, exist_ok=True)
import sys, os, pickle, numpy as np, torch
sys.path.insert(0, _os.path.join(REPO, "apps", "fetal_head", "lib"))
torch.set_num_threads(2)
from tqdm import tqdm
from fetal_head.io.hc18 import read_cases
from fetal_head.evaluation.core import load_test_images
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource
from fetal_head.segmentation.localiser import Localiser, localise
from fetal_head.segmentation import box_search
from fetal_head.segmentation.prompts import grow_box, mask_box, box_iou, mask_dice
md, lp, W, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
p = ModelSource(model_dir=md).load(); p.encoder_bf16 = False
net = Localiser(width=W); net.load_state_dict(torch.load(lp, weights_only=True)); net.eval()
cache = EmbeddingCache(_os.path.join(REPO, ".data", "emb_cache"), p)
test = load_test_images([c for c in read_cases(_os.environ.get("HC18_DIR", _os.path.join(REPO, "..", "shared", "data", "hc18"))) if c.split == "test"], seed=0)
recs = []
for t in tqdm(test, mininterval=30):
    emb = cache.get(t.image); h, w = t.image.shape
    loc, cands, ring, _ = box_search.localised_candidates(p, emb, image=t.image)
    wl = localise(net, emb.features, (h, w), emb.input_hw)
    ch, cw = p.low_res_hw(emb); to_low = np.array([cw / w, ch / h])
    if wl.box is not None:
        box = grow_box(wl.box, box_search.AUTOMATIC_MARGIN_PX, h, w)
        lg, iou = p.decode(emb, boxes=np.array([box]))
        low = (lg[:, 0, :ch, :cw] > 0).cpu().numpy()
        first = box_search._heads_with_boxes(low, None, None, to_low, h, w)
        if first:
            cands += box_search._reprompted(p, emb, first, iou, ["wide_localiser"], cands[0].centre)
    X = box_search.verifier_inputs(emb, cands)
    prob = p.head_verifier.probability(X)
    rows = []
    for c, pr in zip(cands, prob):
        full = p.finish(emb, c.logits, c.iou).mask
        d = mask_dice(full, t.mask)
        mb = mask_box(full) if full.any() else (0, 0, 0, 0)
        rows.append(dict(source=c.source, score=c.score, p=float(pr), dice=d,
                         iou_wide=box_iou(mb, wl.box) if wl.box is not None else 0.0,
                         area=float(full.mean())))
    recs.append(dict(image=t.case.image_id, wide_box=wl.box, wide_iou_ref=box_iou(wl.box, mask_box(t.mask)) if wl.box else 0, cands=rows))
pickle.dump(recs, open(out, "wb"))
