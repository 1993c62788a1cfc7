"""How often does the localiser's chosen centre fall inside the reference head (157 test images)?
Localisers: the 5- and 20-label seed-0 models', and ones trained here on K pool labels (frozen-encoder
embeddings), width 16 / 300 steps and width 64 / 1500 steps. usage: python localiser_boxes.py K [K ...]"""
import os as _os
REPO = _os.path.abspath(_os.path.join(_os.path.dirname(__file__), "..", "..", "..", ".."))
OUT = _os.path.join(REPO, ".data", "wide_localiser"); _os.makedirs(OUT, exist_ok=True)
import sys, time, numpy as np, torch
sys.path.insert(0, _os.path.join(REPO, "apps", "fetal_head", "lib"))
torch.set_num_threads(2)
from fetal_head.io.hc18 import read_cases
from fetal_head.io import read_image
from fetal_head.segmentation import SamPredictor
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource
from fetal_head.segmentation.localiser import localise, train_localiser, LocaliserConfig, Localiser
from fetal_head.segmentation.prompts import box_iou, mask_box

cases = read_cases(_os.environ.get("HC18_DIR", _os.path.join(REPO, "..", "shared", "data", "hc18")))
test = [c for c in cases if c.split == "test"]
pool = [c for c in cases if c.split != "test"]
p = SamPredictor.litemedsam(); p.encoder_bf16 = False
cache = EmbeddingCache(_os.path.join(REPO, ".data", "emb_cache"), p)
def sample(c):
    im = read_image(c.image_path); e = cache.get(im); return (e.features, c.load_mask(), e.input_hw)
T = [sample(c) for c in test]
def hits(net, name):
    inside, ious = 0, []
    for (f, m, hw), c in zip(T, test):
        loc = localise(net, f, m.shape, hw)
        if loc.box is None: ious.append(0); continue
        x, y = loc.centre
        inside += bool(m[int(min(y, m.shape[0]-1)), int(min(x, m.shape[1]-1))])
        ious.append(box_iou(loc.box, mask_box(m)))
    ious = np.array(ious)
    print(f"{name}: centre inside head {inside}/{len(T)}, box IoU mean {ious.mean():.3f} median {np.median(ious):.3f}, IoU<0.5: {(ious<0.5).sum()}", flush=True)
m20 = ModelSource(model_dir=_os.path.join(REPO, ".data", "eval_s9", "models", "n20_s0_loc_nogate")).load()
hits(m20.localiser, "n20_s0 served localiser")
m5 = ModelSource(model_dir=_os.path.join(REPO, ".data", "eval_s11", "models", "n5_s0_loc_nogate")).load()
hits(m5.localiser, "n5_s0 served localiser")
rng = np.random.default_rng(0)
order = rng.permutation(len(pool))
P = {}
for K in [int(k) for k in sys.argv[1:]]:
    idx = order[:K]
    S = [P[i] if i in P else P.setdefault(i, sample(pool[i])) for i in idx]
    for width, steps in [(16, 300), (64, 1500)]:
        t0 = time.time()
        net = train_localiser(S, LocaliserConfig(steps=steps), Localiser(width=width))
        hits(net, f"K={K} width {width} steps {steps} ({time.time()-t0:.0f}s train)")
