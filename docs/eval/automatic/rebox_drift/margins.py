"""Which (x, y) margin should box-free answers add to their own box? drift.py shows the box decoder, fed a head's
box plus box_search.AUTOMATIC_MARGIN_PX, answers a little inside it left and right (where the skull's lateral walls
are faint), so each re-box shrinks the answer. This scores automatic and click answers with the margin set to each
(mx, my) on DEVELOPMENT images: pool images that are not the model's labels (a seeded draw), never the test split.

usage: python margins.py MODEL_DIR N_AUTOMATIC N_CLICK MX,MY [MX,MY ...]
prints mean Dice (the served ellipse) and images below 0.80 per setting and mode."""
import sys

import numpy as np
from tqdm import tqdm

from study_model import dev_cases, load_model
from fetal_head.evaluation.core import load_test_images
from fetal_head.measurement import answer_mask
from fetal_head.segmentation import box_search
from fetal_head.segmentation.prompts import mask_dice


def main():
    md, n_auto, n_click = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    settings = [tuple(float(v) for v in s.split(",")) for s in sys.argv[4:]]
    dev = dev_cases(md, max(n_auto, n_click))
    p, cache = load_model(md)
    dice = {(s, m): [] for s in settings for m in ("automatic", "click")}
    for i, t in enumerate(tqdm(load_test_images(dev), mininterval=30)):
        p.remember(t.image, cache.get(t.image))
        for s in settings:
            box_search.AUTOMATIC_MARGIN_PX = s
            for mode, n in (("automatic", n_auto), ("click", n_click)):
                if i < n:
                    pred = p.predict(t.image, t.prompt(mode))
                    dice[s, mode].append(mask_dice(answer_mask(pred.mask, "ellipse"), t.mask))
    for mode in ("automatic", "click"):
        for s in settings:
            d = np.array(dice[s, mode])
            if len(d):
                print(f"{mode:9s} margin {s}: Dice {100 * d.mean():.2f} % (median {100 * np.median(d):.2f}), "
                      f"< 0.80: {(d < 0.8).sum()} of {len(d)}", flush=True)


if __name__ == "__main__":
    main()
