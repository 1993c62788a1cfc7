"""Overlays: automatic answers of a fine-tuned model with its head localiser, without and with the skull-ring
candidate, on chosen HC18 images (docs/eval/automatic/skull_ring.png).

    python scripts/plot_skull_ring.py MODEL_DIR IMAGE_ID... [--out PNG] [--hc18 DIR]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "apps", "fetal_head", "lib"))

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--out", default="docs/eval/automatic/skull_ring.png")
    ap.add_argument("--hc18", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hc18"))
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    from fetal_head.io import read_image
    from fetal_head.io.hc18 import read_cases
    from fetal_head.segmentation import box_search
    from fetal_head.segmentation.model_store import ModelSource

    pred = ModelSource(model_dir=args.model_dir).load()
    if pred.localiser is None:
        sys.exit(f"{args.model_dir}: the model has no trained head localiser")
    cases = {c.image_id: c for c in read_cases(args.hc18)}
    fig, axes = plt.subplots(1, len(args.images), figsize=(4 * len(args.images), 3.2), squeeze=False)
    for ax, image_id in zip(axes[0], args.images):
        c = cases[image_id]
        image, ref = read_image(c.image_path), c.load_mask()
        emb = pred.embed(image)
        without = box_search.localised(pred, emb)
        with_ring = box_search.localised(pred, emb, image=image)
        rgb = np.repeat(image[..., None], 3, axis=-1).astype(np.float32) / 255
        for mask, colour in ((ref, (0, 1, 0)), (without.mask, (1, 0.2, 0.2)), (with_ring.mask, (1, 1, 0))):
            edge = find_boundaries(mask, mode="thick")
            rgb[edge] = colour
        d = [2 * (m & ref).sum() / (m.sum() + ref.sum()) for m in (without.mask, with_ring.mask)]
        ax.imshow(rgb)
        ax.set_title(f"{image_id}: Dice {d[0]:.2f} -> {d[1]:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("automatic mode: reference (green), localiser candidates (red), + skull-ring candidate (yellow)",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
