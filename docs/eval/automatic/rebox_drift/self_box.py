"""Train the box decoder with some of its box steps on its own answer's box (TrainConfig.self_box_share, the box a
re-box feeds it) and score it in the cell's model: the cell's labels and schedule (scripts/eval_automatic.py's), the
cell's localiser kept, only the box decoder's weights swapped. box / one click at the centroid / automatic on the
157 test images, through SamPredictor.predict and the served ellipse (evaluation.core.evaluate).

usage: python self_box.py MODEL_DIR SHARE [SHARE ...]     (writes .data/self_box/<cell>_<share>.json)
Needs self_box.patch applied (git apply docs/eval/automatic/rebox_drift/self_box.patch): the option is not shipped."""
import json
import os
import sys
from dataclasses import replace

from study_model import HC18, REPO, load_model, test_cases
from fetal_head.evaluation.core import evaluate, load_test_images, summarize
from fetal_head.io.hc18 import read_cases
from fetal_head.segmentation import SamPredictor
from fetal_head.segmentation.training import finetune, label_items

sys.path.insert(0, os.path.join(REPO, "scripts"))
from eval_automatic import cell_config  # noqa: E402  (the cells' schedule)


def main():
    md = sys.argv[1]
    info = json.load(open(os.path.join(md, "cell_info.json")))
    cases = {c.image_id: c for c in read_cases(HC18)}
    chosen = [cases[k] for k in info["labels"]]
    seed = json.load(open(os.path.join(md, "fetal_head_sam.json")))["options"]["seed"]  # the cell's training seed
    out = os.path.join(REPO, ".data", "self_box")
    items = label_items(chosen, os.path.join(out, "labels"))
    cfg = cell_config(len(chosen), seed, items, automatic_head=False, localiser=False, head_verifier=False,
                      self_training_images=0)
    test = load_test_images(test_cases())
    for share in (float(v) for v in sys.argv[2:]):
        trainer = SamPredictor.litemedsam()
        trainer.encoder_bf16 = False
        trainer.refresh_encoder_key()
        summary = finetune(trainer, items, replace(cfg, self_box_share=share),
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
