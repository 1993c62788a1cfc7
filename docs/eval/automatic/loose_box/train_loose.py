"""The N-label box decoder (seed SEED's draw) trained with the prompt mix SHARES (JSON: kinds of
prompts.sample_prompt plus loose_box, below), as scripts/eval_automatic.py trains a cell's decoder, with the localiser of SOURCE_MODEL_DIR
(the shipped cell's self-trained one) put on it; saved to .data/loose_box/models/TAG. usage:

    python train_loose.py 20 0 '{"box":0.7,"loose_box":0.2,"box_clicks":0.1}' TAG SOURCE_MODEL_DIR

Env STEPS: optimizer steps (default eval_automatic's)."""
import os, sys, json, time
REPO=os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "..")); sys.path.insert(0, REPO+"/apps/fetal_head/lib"); sys.path.insert(0, REPO+"/scripts")
import numpy as np, torch
torch.set_num_threads(2)
from fetal_head.evaluation.benchmark import select_labels
from fetal_head.io.hc18 import read_cases
from fetal_head.segmentation.model_store import ModelSource, save_finetuned
from fetal_head.segmentation.models import LITEMEDSAM
from fetal_head.segmentation.predictor import SamPredictor
from fetal_head.segmentation.training import checkpoint_meta, finetune, label_items
from eval_automatic import TRAIN_STEPS, cell_config
from fetal_head.segmentation import training as T
from fetal_head.segmentation.prompts import Prompt, jitter_box, mask_box, sample_clicks

LOOSE_BOX_MAX_FRACTION = 0.5  # each side grown by up to half the head's width / height


def loosen_box(box, rng, max_fraction, height, width):
    """Grow each side outward by 0..max_fraction of the box's width (x) or height (y)."""
    g = rng.uniform(0.0, max_fraction, size=4)
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    return (max(x0 - g[0] * bw, 0.0), max(y0 - g[1] * bh, 0.0), min(x1 + g[2] * bw, width - 1.0),
            min(y1 + g[3] * bh, height - 1.0))


def sample_with_loose(mask, rng, shares, max_jitter=20):
    """prompts.sample_prompt (the same draws) plus the kind ``loose_box``: the jittered box, then loosened (the
    target is still the head)."""
    kinds = list(shares)
    p = np.array([shares[k] for k in kinds], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    h, w = mask.shape
    if kind == "clicks":
        pts, lab = sample_clicks(mask, rng)
        return kind, Prompt(points=pts, labels=lab)
    box = jitter_box(mask_box(mask), rng, max_jitter, h, w)
    if kind == "loose_box":
        return kind, Prompt(box=loosen_box(box, rng, LOOSE_BOX_MAX_FRACTION, h, w))
    if kind == "box_clicks":
        pts, lab = sample_clicks(mask, rng)
        return kind, Prompt(box=box, points=pts, labels=lab)
    return "box", Prompt(box=box)


T.sample_prompt = sample_with_loose  # run_epoch's name for it
n, seed, shares, tag, src = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
work=REPO+"/.data/loose_box"
cases=read_cases(REPO+"/../shared/data/hc18"); pool=[c for c in cases if c.split=="pool"]
chosen=select_labels(pool, n, seed)
items=label_items(chosen, work+"/labels")
# the cells' schedule (eval_automatic.cell_config), the loose-box prompt mix, and nothing but the box decoder
cfg=cell_config(n, seed, items, int(os.environ.get('STEPS',TRAIN_STEPS)), automatic_head=False, localiser=False,
                head_verifier=False, self_training_images=0, prompt_shares=shares)
epochs=cfg.max_epochs
p=SamPredictor.litemedsam(version=LITEMEDSAM); t0=time.time()
summary=finetune(p, items, cfg, REPO+"/.data/emb_cache")
src_p=ModelSource(model_dir=src).load()
p.model.localiser = src_p.model.localiser
md=work+"/models/"+tag
meta=checkpoint_meta(summary, LITEMEDSAM); meta["self_training"]=json.load(open(src+"/fetal_head_sam.json")).get("self_training")
save_finetuned(p.model, LITEMEDSAM, md, meta)
json.dump({"labels":[c.image_id for c in chosen],"epochs":epochs,"seconds_train":round(time.time()-t0,1)}, open(md+"/cell_info.json","w"))
print("saved", md, round(time.time()-t0,1), "s")
