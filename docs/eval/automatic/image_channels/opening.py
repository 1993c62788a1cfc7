"""Does a morphological opening of the localiser's head map cut the head free of the fluid sac it is joined to?
On the sac failures the head map's component is the sac with the head hanging from it by a neck (082_HC). This
opens the thresholded map (model-input frame) with a disk of radius R px, lets localiser.localise take the component
with the strongest centre peak, grows it back by R inside the unopened map, and scores its box against
the reference box on the 157 test images. usage: python opening.py LOCALISER.pt (a width-64 localiser state dict
of localiser_image.py, "emb" arm)"""
import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage.measure import label  # noqa: E402
from skimage.morphology import disk  # noqa: E402

from fetal_head.io import read_image  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation import SamPredictor  # noqa: E402
from fetal_head.segmentation import localiser as L  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.prompts import box_iou, mask_box  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
RADII = (0, 4, 8, 12, 16, 20)  # model-input px (4 per embedding cell)


def opened_localise(net, emb, r):
    """localiser.localise with its thresholded head map opened by a disk of radius ``r`` before the components are
    labelled (the unopened map where the opening leaves nothing); the chosen component grown back by ``r`` inside
    the unopened map. Returns the box in image pixels, or None."""
    seen = {}

    def components(mask):
        seen["map"] = mask
        comps = label(ndimage.binary_opening(mask, disk(r)), connectivity=2) if r else None
        return comps if comps is not None and comps.max() else label(mask, connectivity=2)

    served, L._components = L._components, components
    try:
        loc = L.localise(net, emb.features, emb.original_hw, emb.input_hw)
    finally:
        L._components = served
    if loc.box is None or not r:
        return loc.box
    rows, cols = np.nonzero(ndimage.binary_dilation(loc.coarse_mask, disk(r)) & seen["map"])
    (h, w), (nh, nw) = emb.original_hw, emb.input_hw
    sx, sy = w / nw, h / nh
    return (cols.min() * sx, rows.min() * sy, min((cols.max() + 1) * sx - 1, w - 1.0),
            min((rows.max() + 1) * sy - 1, h - 1.0))


def main():
    net = L.Localiser(width=64)
    net.load_state_dict(torch.load(sys.argv[1], weights_only=True))
    net.eval()
    test = [c for c in read_cases(os.path.join(REPO, "..", "shared", "data", "hc18")) if c.split == "test"]
    cache = EmbeddingCache(os.path.join(REPO, ".data", "emb_cache"), SamPredictor.litemedsam(encoder_bf16=False))
    res = {r: {} for r in RADII}
    for c in test:
        emb = cache.get(read_image(c.image_path))
        m = c.load_mask()
        for r in RADII:
            box = opened_localise(net, emb, r)
            res[r][c.image_id] = box_iou(box, mask_box(m))
    ref = np.array(list(res[0].values()))
    for r in RADII:
        v = np.array(list(res[r].values()))
        worst = sorted(res[r], key=res[r].get)[:5]
        print(f"R={r:2d} px: box IoU mean {v.mean():.4f}, median {np.median(v):.4f}, < 0.5: {(v < 0.5).sum()}; "
              f"vs R=0 better / worse by > 0.05: {(v - ref > 0.05).sum()} / {(v - ref < -0.05).sum()}; worst "
              + ", ".join(f"{k} {res[r][k]:.2f}" for k in worst))


if __name__ == "__main__":
    main()
