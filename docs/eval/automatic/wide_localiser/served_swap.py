"""The served automatic / click route of a cell's model with its localiser swapped for a saved one.
usage: python served_swap.py MODEL_DIR LOC_PT WIDTH [refit] [N_TEST]"""
import os as _os
REPO = _os.path.abspath(_os.path.join(_os.path.dirname(__file__), "..", "..", "..", ".."))
OUT = _os.path.join(REPO, ".data", "wide_localiser"); _os.makedirs(OUT, exist_ok=True)
import sys, json, time, os, numpy as np, torch
sys.path.insert(0, _os.path.join(REPO, "apps", "fetal_head", "lib"))
torch.set_num_threads(2)
from fetal_head.io.hc18 import read_cases
from fetal_head.evaluation.core import load_test_images, evaluate, FAILURE_DICE
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.model_store import ModelSource
from fetal_head.segmentation.localiser import Localiser
md, lp, W = sys.argv[1], sys.argv[2], int(sys.argv[3])
refit = len(sys.argv) > 4 and sys.argv[4] == "refit"
NT = int(sys.argv[5]) if len(sys.argv) > 5 else None
p = ModelSource(model_dir=md).load(); p.encoder_bf16 = False
net = Localiser(width=W); net.load_state_dict(torch.load(lp, weights_only=True)); net.eval()
for q in net.parameters(): q.requires_grad_(False)
p.model.localiser = net
if refit:
    from fetal_head.segmentation import training
    cases = read_cases(_os.environ.get("HC18_DIR", _os.path.join(REPO, "..", "shared", "data", "hc18"))); byid = {c.image_id: c for c in cases}
    labels = json.load(open(os.path.join(md, "cell_info.json")))["labels"]
    items = training.label_items([byid[i] for i in labels], os.path.join(os.path.dirname(os.path.dirname(md)), "labels"))
    cfg = training.TrainConfig(verifier_gate=False)
    rec = training.fit_head_verifier(p, items, cfg, _os.path.join(REPO, ".data", "emb_cache"))
    print("verifier refit:", rec, flush=True)
cases = [c for c in read_cases(_os.environ.get("HC18_DIR", _os.path.join(REPO, "..", "shared", "data", "hc18"))) if c.split == "test"][:NT]
test = load_test_images(cases, seed=0)
cache = EmbeddingCache(_os.path.join(REPO, ".data", "emb_cache"), p)
t0 = time.time()
rows, _ = evaluate(p, test, modes=("click", "automatic"), cache=cache)
print(os.path.basename(md), os.path.basename(lp), "refit" if refit else "", f"{time.time()-t0:.0f}s")
for mode in ("click", "automatic"):
    d = np.array([r["dice"] for r in rows if r["mode"] == mode]); hc = np.array([r["hc_abs_diff_mm"] for r in rows if r["mode"] == mode])
    print(mode, f"Dice {100*d.mean():.2f} median {100*np.median(d):.2f} <0.80: {(d<FAILURE_DICE).sum()} HC {hc.mean():.2f}")
import pickle; pickle.dump(rows, open(f"{OUT}/rows_{os.path.basename(md)}_{os.path.basename(lp)}{'_refit' if refit else ''}.pkl", "wb"))
