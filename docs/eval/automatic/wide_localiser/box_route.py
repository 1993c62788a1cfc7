"""A wider localiser (width W, S steps) trained on the cell's own labels; its box (grown by margin) straight
to the cell's box decoder, for automatic and for click (the component holding the click). usage:
python box_route.py MODEL_DIR WIDTH STEPS [N_TEST] (env K: train on a seeded draw of K of the cell's labels)"""
import os as _os
REPO = _os.path.abspath(_os.path.join(_os.path.dirname(__file__), "..", "..", "..", ".."))
OUT = _os.path.join(REPO, ".data", "wide_localiser"); _os.makedirs(OUT, exist_ok=True)
import sys, json, time, os, numpy as np, torch
sys.path.insert(0, _os.path.join(REPO, "apps", "fetal_head", "lib"))
torch.set_num_threads(2)
from fetal_head.io.hc18 import read_cases
from fetal_head.io import read_image
from fetal_head.evaluation.core import load_test_images, image_metrics
from fetal_head.measurement import answer_mask
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource
from fetal_head.segmentation.localiser import localise, train_localiser, LocaliserConfig, Localiser
from fetal_head.segmentation.prompts import grow_box
from fetal_head.segmentation import box_search

md, W, S = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
NT = int(sys.argv[4]) if len(sys.argv) > 4 else None
labels = json.load(open(os.path.join(md, "cell_info.json")))["labels"]
KL = int(os.environ.get("K", "0"))
if KL: labels = [labels[i] for i in sorted(np.random.default_rng(0).permutation(len(labels))[:KL])]
cases = read_cases(_os.environ.get("HC18_DIR", _os.path.join(REPO, "..", "shared", "data", "hc18")))
byid = {c.image_id: c for c in cases}
p = ModelSource(model_dir=md).load(); p.encoder_bf16 = False
cache = EmbeddingCache(_os.path.join(REPO, ".data", "emb_cache"), p)
def sample(c):
    im = read_image(c.image_path); e = cache.get(im); return (e.features, c.load_mask(), e.input_hw)
S_ = [sample(byid[i]) for i in labels]
tag = f"{os.path.basename(md)}_w{W}_s{S}" + (f"_K{KL}" if KL else "")
path = _os.path.join(OUT, f"loc_{tag}.pt")
if os.path.exists(path):
    net = Localiser(width=W); net.load_state_dict(torch.load(path, weights_only=True)); net.eval()
else:
    t0 = time.time(); net = train_localiser(S_, LocaliserConfig(steps=S), Localiser(width=W)); print(f"train {time.time()-t0:.0f}s", flush=True)
    torch.save(net.state_dict(), path)
test = load_test_images([c for c in cases if c.split == "test"][:NT], seed=0)
res = {}
rows = []
served_p = ModelSource(model_dir=md).load(); served_p.encoder_bf16 = False
def score(key, mask, t):
    d = image_metrics(answer_mask(mask, "ellipse"), t.mask, t.case.pixel_size_mm, t.case.hc_mm)
    res.setdefault(key, []).append((d["dice"], d["hc_abs_diff_mm"]))
for t in test:
    emb = cache.get(t.image); p.remember(t.image, emb)
    h, w = t.image.shape
    rows_, cols_ = np.nonzero(t.mask); click = np.array([[cols_.mean(), rows_.mean()]], np.float32)
    for mode, fg in (("auto", None), ("click", click)):
        loc = localise(net, emb.features, (h, w), emb.input_hw, fg)
        if loc.box is None:
            for mg in (0, 10, 20): score((mode, mg, "rebox0"), np.zeros_like(t.mask), t); score((mode, mg, "rebox1"), np.zeros_like(t.mask), t)
            continue
        for mg in (0, 10, 20):
            box = grow_box(loc.box, mg, h, w)
            lg, iou = p.decode(emb, boxes=np.array([box]))
            pred = p.finish(emb, lg, iou)
            score((mode, mg, "rebox0"), pred.mask, t)
            score((mode, mg, "rebox1"), box_search.rebox(p, emb, pred, fg).mask, t)
    score(("box", "user", "-"), p.predict(t.image, t.prompt("box")).mask, t)
print(tag, len(test), "images")
for k, v in sorted(res.items(), key=str):
    v = np.array(v); print(k, f"Dice {100*v[:,0].mean():.2f} median {100*np.median(v[:,0]):.2f} <0.80: {(v[:,0]<0.8).sum()} HC {v[:,1].mean():.2f} mm", flush=True)
