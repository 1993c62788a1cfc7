"""Train the box decoder with some of its box steps on its own answer's box (TrainConfig.self_box_share, the box a
re-box feeds it) and score it in the cell's model: the cell's labels and schedule (scripts/eval_automatic.py's), the
cell's localiser kept, only the box decoder's weights swapped. box / one click at the centroid / automatic on the
157 test images, through SamPredictor.predict and the served ellipse (evaluation.core.evaluate).

usage: python self_box.py MODEL_DIR SHARE [SHARE ...]     (writes .data/self_box/<cell>_<share>.json)
Needs self_box.patch applied (git apply docs/eval/automatic/rebox_drift/self_box.patch): the option is not shipped."""
import json
import math
import os
import sys
from dataclasses import replace

import numpy as np

from study_model import HC18, REPO, load_model, test_cases
from fetal_head.evaluation.core import evaluate, load_test_images, summarize
from fetal_head.io.hc18 import read_cases
from fetal_head.segmentation import SamPredictor
from fetal_head.segmentation.training import TrainConfig, finetune, label_items, split_items

# scripts/eval_automatic.py's schedule: 100 optimizer steps of 4, lr 1e-4, at most 40 epochs, at most 20 validating
TRAIN_STEPS, BATCH, LR, MAX_EPOCHS, MAX_VAL = 100, 4, 1e-4, 40, 20


def main():
    md = sys.argv[1]
    info = json.load(open(os.path.join(md, "cell_info.json")))
    cases = {c.image_id: c for c in read_cases(HC18)}
    chosen = [cases[k] for k in info["labels"]]
    seed = int(os.path.basename(md.rstrip("/")).split("_s")[1].split("_")[0])
    out = os.path.join(REPO, ".data", "self_box")
    items = label_items(chosen, os.path.join(out, "labels"))
    n = len(chosen)
    cfg = TrainConfig(train_batch_size=BATCH, val_split=0.2 if n * 0.2 <= MAX_VAL else MAX_VAL / n, learning_rate=LR,
                      seed=seed, automatic_head=False, localiser=False, head_verifier=False, self_training_images=0)
    train, _ = split_items(items, cfg)
    epochs = int(np.clip(math.ceil(TRAIN_STEPS / max(1, math.ceil(len(train) / BATCH))), 1, MAX_EPOCHS))
    test = load_test_images(test_cases())
    for share in (float(v) for v in sys.argv[2:]):
        trainer = SamPredictor.litemedsam()
        trainer.encoder_bf16 = False
        trainer.refresh_encoder_key()
        summary = finetune(trainer, items, replace(cfg, max_epochs=epochs, self_box_share=share),
                           os.path.join(REPO, ".data", "emb_cache"))
        p, cache = load_model(md)
        p.model.mask_decoder.load_state_dict(trainer.model.mask_decoder.state_dict())
        rows, _ = evaluate(p, test, ("box", "click", "automatic"), cache=cache)
        s = summarize(rows)
        print(f"self_box_share {share}: " + ", ".join(
            f"{m} {100 * s[m]['dice']:.2f} % ({sum(r['dice'] < 0.8 for r in rows if r['mode'] == m)} < 0.80, HC "
            f"{s[m]['hc_abs_diff_mm']:.2f} mm)" for m in ("box", "click", "automatic")), flush=True)
        json.dump({"share": share, "best_epochs": summary.get("best_epochs"), "summary": s, "rows": rows},
                  open(os.path.join(out, f"{os.path.basename(md.rstrip('/'))}_{share:g}.json"), "w"), default=float)


if __name__ == "__main__":
    main()
