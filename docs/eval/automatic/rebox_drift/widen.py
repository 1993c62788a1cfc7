"""Is the box-free answers' narrowness (drift.py: left and right sides 3-4 px inside the reference box) a bias that a
fixed widening of the served ellipse removes? Scores the served automatic and click ellipses grown by DX px left and
right and DY px up and down (a dilation by a line, then the ellipse refitted), on development images: pool images
that are not the model's labels (a seeded draw), or with --test on the test split.

usage: python widen.py MODEL_DIR N [--test]      prints Dice per (DX, DY) and mode"""
import sys

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from study_model import dev_cases, load_model, test_cases
from fetal_head.evaluation.core import load_test_images
from fetal_head.measurement import answer_mask
from fetal_head.segmentation.prompts import mask_dice
GROW = [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (2, 1), (3, 1), (4, 2)]


def widened(mask, dx, dy):
    m = mask
    if dx:
        m = ndimage.binary_dilation(m, np.ones((1, 2 * dx + 1), bool))
    if dy:
        m = ndimage.binary_dilation(m, np.ones((2 * dy + 1, 1), bool))
    return answer_mask(m, "ellipse")


def main():
    md, n = sys.argv[1], int(sys.argv[2])
    chosen = test_cases()[:n] if "--test" in sys.argv else dev_cases(md, n)
    p, cache = load_model(md)
    dice = {(g, m): [] for g in GROW for m in ("box", "click", "automatic")}
    for t in tqdm(load_test_images(chosen), mininterval=30):
        p.remember(t.image, cache.get(t.image))
        for mode in ("box", "click", "automatic"):
            ellipse = answer_mask(p.predict(t.image, t.prompt(mode)).mask, "ellipse")
            for g in GROW:
                dice[g, mode].append(mask_dice(widened(ellipse, *g) if any(g) else ellipse, t.mask))
    for mode in ("box", "click", "automatic"):
        for g in GROW:
            d = np.array(dice[g, mode])
            print(f"{mode:9s} grown by (dx, dy) = {g}: Dice {100 * d.mean():.2f} % (median {100 * np.median(d):.2f}), "
                  f"< 0.80: {(d < 0.8).sum()} of {len(d)}", flush=True)


if __name__ == "__main__":
    main()
