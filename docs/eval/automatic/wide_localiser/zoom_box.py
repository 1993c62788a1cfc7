"""Does a zoomed second encode (crop around the box, re-encoded at the model's input size) improve box
answers? usage: python zoom_box.py N Z1 Z2 ... (first N test images)"""
import os as _os
REPO = _os.path.abspath(_os.path.join(_os.path.dirname(__file__), "..", "..", "..", ".."))
OUT = _os.path.join(REPO, ".data", "wide_localiser"); _os.makedirs(OUT, exist_ok=True)
import sys, time, numpy as np, torch
sys.path.insert(0, _os.path.join(REPO, "apps", "fetal_head", "lib"))
torch.set_num_threads(2)
from fetal_head.evaluation.core import load_test_images, image_metrics
from fetal_head.io.hc18 import read_cases
from fetal_head.measurement import answer_mask
from fetal_head.segmentation import SamPredictor
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource

N = int(sys.argv[1]); ZS = [float(z) for z in sys.argv[2:]]
cases = [c for c in read_cases(_os.environ.get("HC18_DIR", _os.path.join(REPO, "..", "shared", "data", "hc18"))) if c.split == "test"][:N]
test = load_test_images(cases, seed=0)
models = {"zs": SamPredictor.litemedsam(), "n20": ModelSource(model_dir=_os.path.join(REPO, ".data", "eval_s9", "models", "n20_s0_loc_nogate")).load()}
for p in models.values():
    p.encoder_bf16 = False
    p.disk_cache = EmbeddingCache(_os.path.join(REPO, ".data", "emb_cache"), p)

def crop_square(image, box, z):
    h, w = image.shape
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = int(round(max(x1 - x0, y1 - y0) * z))
    side = min(side, max(h, w))
    ox, oy = int(round(cx - side / 2)), int(round(cy - side / 2))
    out = np.zeros((side, side), np.uint8)
    sx0, sy0 = max(ox, 0), max(oy, 0); sx1, sy1 = min(ox + side, w), min(oy + side, h)
    out[sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox] = image[sy0:sy1, sx0:sx1]
    return out, ox, oy

res = {}
t0 = time.time()
for t in test:
    img, box = t.image, np.array(t.box, float)
    for name, p in models.items():
        m = p.predict(img, __import__("fetal_head.segmentation.prompts", fromlist=["Prompt"]).Prompt(box=tuple(box))).mask
        for shape in ("segmentation", "ellipse"):
            res.setdefault((name, "full", shape), []).append(image_metrics(answer_mask(m, shape), t.mask, t.case.pixel_size_mm, t.case.hc_mm)["dice"])
    for z in ZS:
        crop, ox, oy = crop_square(img, box, z)
        emb = models["zs"].encode([crop])[0]
        cb = box - np.array([ox, oy, ox, oy])
        for name, p in models.items():
            logits, iou = p.decode(emb, boxes=cb[None])
            cm = p.finish(emb, logits, iou).mask
            full = np.zeros_like(t.mask)
            h, w = full.shape; s = cm.shape[0]
            sx0, sy0 = max(ox, 0), max(oy, 0); sx1, sy1 = min(ox + s, w), min(oy + s, h)
            full[sy0:sy1, sx0:sx1] = cm[sy0 - oy:sy1 - oy, sx0 - ox:sx1 - ox]
            for shape in ("segmentation", "ellipse"):
                res.setdefault((name, z, shape), []).append(image_metrics(answer_mask(full, shape), t.mask, t.case.pixel_size_mm, t.case.hc_mm)["dice"])
print(f"{len(test)} images, {time.time()-t0:.0f}s")
for k, v in sorted(res.items(), key=str):
    v = np.array(v); print(k, f"{100*v.mean():.2f} median {100*np.median(v):.2f} <0.9: {(v<0.9).sum()}")
np.save(_os.path.join(OUT, "zoom_res.npy"), {str(k): v for k, v in res.items()}, allow_pickle=True)
