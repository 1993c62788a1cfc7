"""What the verifier's cross-validated gate says on the evaluation cells' own labels. usage: FETAL_HEAD_ENCODER_BF16=0 [WORK=.data/eval_site_verif] python gate_check.py TAG... (a study script, not run by CI)"""
import os, sys, json
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
import numpy as np, torch
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
torch.set_num_threads(1)
from fetal_head.io.hc18 import read_cases
from fetal_head.segmentation.model_store import ModelSource
from fetal_head.segmentation.training import TrainConfig, fit_head_verifier, label_items
work = os.environ.get("WORK", os.path.join(REPO, ".data", "eval_verif"))
cases = {c.image_id: c for c in read_cases(os.environ.get("HC18_DIR", os.path.join(REPO, "..", "shared", "data", "hc18")))}
for tag in sys.argv[1:]:
    d = os.path.join(work, "models", tag)
    info = json.load(open(os.path.join(d, "cell_info.json")))
    seed = int(tag.split("_s")[1].split("_")[0])
    pred = ModelSource(model_dir=d).load()
    items = label_items([cases[i] for i in info["labels"]], os.path.join(work, "labels"))
    rec = fit_head_verifier(pred, items, TrainConfig(seed=seed, min_labels_for_validation=2), os.path.join(REPO, ".data", "emb_cache"))
    print(tag, json.dumps(rec), flush=True)
