"""Automatic (or click) answers with and without their final re-box. The wide localiser's automatic route
(box_search.localiser_box) decodes the localiser's box plus the margin, then box_search.rebox decodes the answer's
own box once more; drift.py shows each re-box from a good box loses, and this asks whether the localiser's box is
now good enough to skip it. With ``click`` (one click at the centroid): the candidate route's final re-box of its
chosen candidate. Scores (the served ellipse) on development images (150 pool images that are not the model's
labels, a seeded draw) and on the 157 test images.

usage: python no_rebox.py MODEL_DIR [automatic|click]    (a model with a localiser)"""
import sys

import numpy as np

from study_model import dev_cases, load_model, test_cases
from fetal_head.evaluation.core import load_test_images
from fetal_head.measurement import answer_mask
from fetal_head.segmentation import box_search
from fetal_head.segmentation.prompts import mask_dice


def main():
    md = sys.argv[1]
    mode = sys.argv[2] if len(sys.argv) > 2 else "automatic"
    dev, test = dev_cases(md, 150), test_cases()
    p, cache = load_model(md)
    served_rebox = box_search.rebox
    for name, chosen in (("development", dev), ("test", test)):
        dice = {"re-boxed (served)": [], "not re-boxed": []}
        for t in load_test_images(chosen):
            p.remember(t.image, cache.get(t.image))
            for arm in dice:
                box_search.rebox = served_rebox if arm.startswith("re-") else (lambda predictor, e, pred, fg=None: pred)
                pred = p.predict(t.image, t.prompt(mode))
                dice[arm].append(mask_dice(answer_mask(pred.mask, "ellipse"), t.mask))
        box_search.rebox = served_rebox
        for arm, d in dice.items():
            d = np.array(d)
            print(f"{name} ({len(d)} images), {arm}: {mode} Dice {100 * d.mean():.2f} % (median "
                  f"{100 * np.median(d):.2f}), < 0.80: {(d < 0.8).sum()}", flush=True)


if __name__ == "__main__":
    main()
