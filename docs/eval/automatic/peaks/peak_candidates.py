"""Dump every candidate of the automatic route (box_search.localised_candidates with search_too, as the trainer fits
the verifier) plus boxes around the localiser's next K centre peaks, each peak's candidates tagged apart (peak0,
peak1): verifier inputs, decoder score, Dice with the label at low resolution and (test split) at full resolution.
It mirrors the route as it was before the peaks were shipped; with K=1 its candidates equal the shipped route's
(checked on 3 test images). A study script, not run by CI.
usage: FETAL_HEAD_ENCODER_BF16=0 [K_PEAKS=2] python peak_candidates.py TAG labels|test SHARD NSHARDS
(TAG: a model of scripts/eval_automatic.py's work dir, WORK, default .data/eval_verif; writes .data/peaks/)"""
import os, sys, pickle, time, json
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
import numpy as np, torch, torch.nn.functional as F
from scipy import ndimage
torch.set_num_threads(1)
from fetal_head.io.hc18 import read_cases
from fetal_head.io import read_image
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource
from fetal_head.segmentation import box_search as B
from fetal_head.segmentation.prompts import mask_dice
from fetal_head.segmentation.localiser import localise
from fetal_head.segmentation.skull_ring import skull_ring
from fetal_head.segmentation.training import low_res_target
K = int(os.environ.get("K_PEAKS", 2)); MIN_D = float(os.environ.get("PEAK_MIN_D", 20))

def peaks(pred, emb, cx, cy):
    net = pred.localiser
    logits = net(emb.features.float())[0].detach()
    h, w = emb.original_hw; nh, nw = emb.input_hw
    stride = int(round(max(nh, nw) / logits.shape[-1]))
    up = F.interpolate(logits[None], scale_factor=stride, mode="bilinear", align_corners=False)[0, :, :nh, :nw]
    cp, hp = torch.sigmoid(up[1]).numpy(), torch.sigmoid(up[0]).numpy()
    mx = ndimage.maximum_filter(cp, size=9, mode="constant", cval=0)
    ok = (cp == mx) & (cp > 0.02) & (hp >= 0.3)
    ok[:3] = ok[-3:] = False; ok[:, :3] = ok[:, -3:] = False
    pk = sorted([(float(cp[y, x]), x, y) for y, x in np.argwhere(ok)], reverse=True)
    taken = [(cx * nw / w, cy * nh / h)]
    out = []
    for v, x, y in pk:
        if all(np.hypot(x - a, y - b) >= MIN_D for a, b in taken):
            taken.append((x, y)); out.append(((x + 0.5) * w / nw, (y + 0.5) * h / nh, v))
        if len(out) >= K:
            break
    return out

def candidates(pred, emb, image):
    h, w = emb.original_hw
    loc = localise(pred.localiser, emb.features, (h, w), emb.input_hw)
    if loc.box is None:
        return None
    rows, cols = np.nonzero(loc.coarse_mask); nh, nw = emb.input_hw
    cx, cy = (cols.mean() + 0.5) * w / nw, (rows.mean() + 0.5) * h / nh
    boxes = [loc.box] + B.boxes_around([(cx, cy)], B.LOCALISED_SCALES, h, w)
    ring = skull_ring(image, (cx, cy))
    if ring is not None:
        boxes.append(ring.box(B.AUTOMATIC_MARGIN_PX, h, w))
    n_loc = len(boxes)
    pks = peaks(pred, emb, cx, cy)
    for px, py, _ in pks:
        boxes += B.boxes_around([(px, py)], B.LOCALISED_SCALES, h, w)
    n_pk = len(boxes)
    boxes += B.boxes_around(B.image_centres(h, w), B.SEARCH_SCALES, h, w)
    ch, cw = pred.low_res_hw(emb); to_low = np.array([cw / w, ch / h])
    centre = np.array([[cx, cy]]) * to_low
    logits, iou = pred.decode(emb, boxes=np.array(boxes))
    low = (logits[:, 0, :ch, :cw] > 0).cpu().numpy()
    first = B._heads_with_boxes(low[:n_loc], centre, None, to_low, h, w)
    src = ["skull_ring" if ring is not None and i == n_loc - 1 else "localiser" for i, _, _ in first]
    for j, (px, py, _) in enumerate(pks):
        a = n_loc + j * len(B.LOCALISED_SCALES)
        got = B._heads_with_boxes(low[a:a + len(B.LOCALISED_SCALES)], np.array([[px, py]]) * to_low, None, to_low, h, w)
        first += [(a + i, hd, bx) for i, hd, bx in got]; src += [f"peak{j}"] * len(got)
    searched = [(n_pk + i, hd, bx) for i, hd, bx in B._heads_with_boxes(low[n_pk:], None, None, to_low, h, w)]
    top = B._best_first(searched, iou, B.SEARCH_TOP_K)
    first += top; src += ["box_search"] * len(top)
    if not first:
        return None
    return B._reprompted(pred, emb, first, iou, src, centre[0]), pks

if __name__ == "__main__":
    tag, split, shard, nsh = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    work = os.environ.get("WORK", os.path.join(REPO, ".data", "eval_verif"))
    allc = read_cases(os.environ.get("HC18_DIR", os.path.join(REPO, "..", "shared", "data", "hc18")))
    if split == "labels":
        labs = set(json.load(open(os.path.join(work, "models", tag, "cell_info.json")))["labels"])
        cases = [c for c in allc if c.image_id in labs]
    else:
        cases = [c for c in allc if c.split == split]
    cases = cases[shard::nsh][:int(os.environ.get("LIMIT", 10**6))]
    pred = ModelSource(model_dir=os.path.join(work, "models", tag)).load()
    cache = EmbeddingCache(os.path.join(REPO, ".data", "emb_cache"), pred)
    OUT = os.path.join(REPO, ".data", "peaks"); os.makedirs(OUT, exist_ok=True)
    out = []; t0 = time.time()
    for k, c in enumerate(cases):
        image, mask = read_image(c.image_path), c.load_mask() > 0
        emb = cache.get(image, False)
        found = candidates(pred, emb, image)
        rec = {"id": c.image_id, "px": c.pixel_size_mm, "n": 0}
        if found is not None:
            cands, pks = found
            ref = low_res_target(pred, emb, mask)[0, 0].cpu().numpy() > 0.5
            full = [mask_dice(pred.finish(emb, cd.logits, cd.iou).mask, mask) for cd in cands] if split == "test" else []
            rec.update(n=len(cands), masks=np.packbits(np.stack([cd.mask for cd in cands]), axis=-1),
                       X=B.verifier_inputs(emb, cands).astype(np.float16),
                       dlow=np.array([mask_dice(cd.mask, ref) for cd in cands]), score=np.array([cd.score for cd in cands]),
                       src=[cd.source for cd in cands], dfull=np.array(full), peaks=pks)
        out.append(rec)
        if k % 10 == 0:
            print(tag, split, shard, k, len(cases), f"{time.time()-t0:.0f}s", flush=True)
    pickle.dump(out, open(os.path.join(OUT, f"p{K}_{tag}_{split}_{shard}.pkl"), "wb"))
    print("done", time.time() - t0)
