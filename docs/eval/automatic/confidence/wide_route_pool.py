"""Which confidence field flags the wide localiser's automatic failures? Calibrated on unlabelled pool images, not
on the test split (issue 12; box_search.LOCALISER_REVIEW_BELOW).

A self-trained model (``MODEL_DIR``: its wide localiser learnt from its real labels plus pseudo-labels) answers the
unlabelled HC18 pool images that were *not* its pseudo-labels: the trainer draws ``self_training_images`` of them
(``training.seeded_draw`` over the unlabelled list in pool order, as ``training.pseudo_labels``) and keeps those whose
head probability (round 1: the model before self-training, ``ROUND1``, the ``pseudo.jsonl`` of
``../self_training/pseudo_boxes.py MODEL pseudo``) is >= the threshold. Prints each field's ROC AUC for a failure
(Dice < 0.80; MONAI's ``compute_roc_auc``), what thresholds on ``localiser_head_prob`` flag, and the ROC AUC of
active learning's uncertainty score (``selection.scores.uncertainty``) with and without its ``not_head`` term.

    python wide_route_pool.py .data/eval_s18st/models/n20_s0_loc_nogate .data/self_training/n20_s0_loc_nogate/pseudo.jsonl

Answers are appended to ``.data/self_training/<cell>_round2/answers.jsonl``, uncertainty components to
``uncertainty.jsonl`` beside it (a stopped run resumes).
"""
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
torch.set_num_threads(int(os.environ.get("THREADS", "2")))

from fetal_head.evaluation.core import FAILURE_DICE  # noqa: E402
from fetal_head.io import read_image  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.measurement import answer_mask  # noqa: E402
from fetal_head.segmentation.box_search import LOCALISER_REVIEW_BELOW  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource  # noqa: E402
from fetal_head.segmentation.prompts import mask_dice  # noqa: E402
from fetal_head.segmentation.training import TrainConfig, seeded_draw  # noqa: E402
from fetal_head.selection.scores import UNCERTAINTY_WEIGHTS, uncertainty  # noqa: E402

FIELDS = ("localiser_head_prob", "localiser_score", "localiser_centre_prob", "decoder_iou", "rebox_stability")

md, round1 = sys.argv[1], sys.argv[2]
cell = os.path.basename(md.rstrip("/"))
work = os.path.join(REPO, ".data", "self_training", cell + "_round2")
os.makedirs(work, exist_ok=True)
labels = set(json.load(open(os.path.join(md, "cell_info.json")))["labels"])
pool = [c for c in read_cases(os.path.join(REPO, "..", "shared", "data", "hc18")) if c.split == "pool"
        and c.image_id not in labels]
cfg = TrainConfig()
r1 = {json.loads(line)["image"]: json.loads(line) for line in open(round1)}
drawn = {c.image_id for c in seeded_draw(pool, cfg.seed, cfg.self_training_images)}  # as pseudo_labels draws
used = {i for i in drawn if r1[i]["head_probability"] >= cfg.self_training_min_head_probability}
held = [c for c in pool if c.image_id not in used]
print(f"{len(pool)} unlabelled pool images, {len(used)} were pseudo-labels, {len(held)} held out")

p = ModelSource(model_dir=md).load()
cache = EmbeddingCache(os.path.join(REPO, ".data", "emb_cache"), p)
path = os.path.join(work, "answers.jsonl")
done = {json.loads(line)["image"] for line in open(path)} if os.path.exists(path) else set()
for c in tqdm([c for c in held if c.image_id not in done], mininterval=30):
    im = read_image(c.image_path)
    pred = p.predict_automatic(cache.get(im), im, agreement=False)
    m, ref = answer_mask(pred.mask, "ellipse") if pred.mask.sum() >= 16 else pred.mask, c.load_mask()
    row = {"image": c.image_id, "dice": mask_dice(m, ref),
           **{k: v for k, v in pred.confidence.items() if isinstance(v, (int, float, bool))}}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")

from monai.metrics import compute_roc_auc  # noqa: E402

rows = [r for r in (json.loads(line) for line in open(path)) if r["image"] not in used]
dice = np.array([r["dice"] for r in rows])
failed = dice < FAILURE_DICE
print(f"automatic Dice {100 * dice.mean():.2f} %, {int(failed.sum())} below {FAILURE_DICE}")
for k in FIELDS:
    v = np.array([r.get(k, np.nan) for r in rows], float)
    a = compute_roc_auc(torch.as_tensor(-v), torch.as_tensor(failed, dtype=torch.float32))
    print(f"  {k}: ROC AUC {float(a):.3f}")
lh = np.array([r["localiser_head_prob"] for r in rows])
for t in sorted({0.95, 0.96, LOCALISER_REVIEW_BELOW, 0.97}):
    flag = lh < t
    print(f"  localiser_head_prob < {t}: {int(flag.sum())} flagged ({100 * flag.mean():.0f} %), "
          f"{int((flag & failed).sum())} of {int(failed.sum())} failures; unflagged {100 * dice[~flag].mean():.2f} %")

upath = os.path.join(work, "uncertainty.jsonl")
udone = {json.loads(line)["image"] for line in open(upath)} if os.path.exists(upath) else set()
for c in tqdm([c for c in held if c.image_id not in udone], mininterval=30, desc="uncertainty"):
    im = read_image(c.image_path)
    u, _ = uncertainty(p, cache.get(im), 0, im)
    with open(upath, "a") as f:
        f.write(json.dumps({"image": c.image_id, **u}) + "\n")
u = {r["image"]: r for r in (json.loads(line) for line in open(upath))}
failed_t = torch.as_tensor(failed, dtype=torch.float32)
score = np.array([u[r["image"]]["score"] for r in rows])
without = score - UNCERTAINTY_WEIGHTS["not_head"] * np.array([u[r["image"]]["not_head"] for r in rows])
print(f"uncertainty score ROC AUC: {float(compute_roc_auc(torch.as_tensor(score), failed_t)):.3f} "
      f"(without not_head {float(compute_roc_auc(torch.as_tensor(without), failed_t)):.3f})")
