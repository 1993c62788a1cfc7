"""Does the head localiser tell a small head from the fluid sac around it better when it also sees the image's
own intensities? The localiser sees only SAM's embedding; the failures left are sacs (dark, anechoic) taken for the
head (bright skull ring, grey brain). This trains the wide localiser (localiser.wide_config) on the same samples
with and without intensity channels (per embedding cell: mean, max and standard deviation of the model-input
image) and scores its box against the reference box on the 157 test images (no decoder: the box alone).

Samples: N real pool labels (benchmark.select_labels(pool, N, seed)) plus K other pool images with their reference
masks standing in for pseudo-labels (the self-training regime with oracle pseudo-labels, which scored as the real
pseudo-labels did: ../self_training).

usage: python localiser_image.py N K SEED [ARM ...]    ARM: emb | emb+img (default both)
Writes .data/image_channels/<arm>_n<N>_k<K>_s<SEED>.pt and .json (per-image box IoU)."""
import json
import os
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from fetal_head.evaluation.benchmark import select_labels  # noqa: E402
from fetal_head.io import read_image  # noqa: E402
from fetal_head.io.hc18 import read_cases  # noqa: E402
from fetal_head.segmentation import SamPredictor  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.localiser import localise, train_localiser, wide_config, GRID_STRIDE  # noqa: E402
from fetal_head.segmentation.prompts import box_iou, mask_box  # noqa: E402

OUT = os.path.join(REPO, ".data", "image_channels")
os.makedirs(OUT, exist_ok=True)
SCALE = float(os.environ.get("IMG_SCALE", "0.5"))  # the channels' weight against the embedding's (std ~0.1)


def intensity_channels(image: np.ndarray, input_hw, grid: int = 64, stride: int = GRID_STRIDE) -> torch.Tensor:
    """(3, grid, grid): mean, max and std of the model-input frame's intensity (0-1) per embedding cell."""
    nh, nw = input_hw
    x = torch.from_numpy(np.ascontiguousarray(image)).float()[None, None] / 255.0
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    x = F.pad(x, (0, grid * stride - nw, 0, grid * stride - nh))
    mean = F.avg_pool2d(x, stride)
    mx = F.max_pool2d(x, stride)
    sd = (F.avg_pool2d(x * x, stride) - mean ** 2).clamp(min=0).sqrt()
    return torch.cat([(mean - 0.25) * SCALE, (mx - 0.4) * SCALE, sd * 2 * SCALE], 1)[0]


def main():
    n, k, seed = (int(v) for v in sys.argv[1:4])
    arms = sys.argv[4:] or ["emb", "emb+img"]
    cases = read_cases(os.environ.get("HC18_DIR", os.path.join(REPO, "..", "shared", "data", "hc18")))
    pool = [c for c in cases if c.split == "pool"]
    test = [c for c in cases if c.split == "test"]
    real = select_labels(pool, n, seed)
    rest = [c for c in pool if c not in real]
    pseudo = [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))[:k]]
    p = SamPredictor.litemedsam(encoder_bf16=False)
    cache = EmbeddingCache(os.path.join(REPO, ".data", "emb_cache"), p)

    def sample(c, img):
        im = read_image(c.image_path)
        e = cache.get(im)
        f = e.features
        if img:
            f = torch.cat([f, intensity_channels(im, e.input_hw, f.shape[-1])[None]], 1)
        return f, c.load_mask(), e.input_hw

    for arm in arms:
        img = arm == "emb+img"
        tag = f"{arm}_n{n}_k{k}_s{seed}" + (f"_x{SCALE:g}" if img and SCALE != 0.5 else "")
        t0 = time.time()
        train = [sample(c, img) for c in tqdm(real + pseudo, desc=f"{tag} samples", mininterval=30)]
        cfg = wide_config(seed)
        cfg.steps = int(os.environ.get("STEPS", cfg.steps))  # a smoke test runs a few
        net = train_localiser(train, cfg)
        t_fit = time.time() - t0
        torch.save(net.state_dict(), os.path.join(OUT, tag + ".pt"))
        rows = {}
        for c in tqdm(test, desc=f"{tag} test", mininterval=30):
            f, m, hw = sample(c, img)
            loc = localise(net, f, m.shape, hw)
            iou = 0.0 if loc.box is None else box_iou(loc.box, mask_box(m))
            inside = False
            if loc.centre is not None:
                x, y = loc.centre
                inside = bool(m[int(min(y, m.shape[0] - 1)), int(min(x, m.shape[1] - 1))])
            rows[c.image_id] = {"iou": round(iou, 4), "centre_inside": inside,
                                "box": None if loc.box is None else [round(v, 1) for v in loc.box]}
        ious = np.array([r["iou"] for r in rows.values()])
        summary = {"arm": arm, "n": n, "k": k, "seed": seed, "scale": SCALE if img else None,
                   "iou_mean": round(float(ious.mean()), 4), "iou_median": round(float(np.median(ious)), 4),
                   "iou_below_0.5": int((ious < 0.5).sum()),
                   "centre_inside": int(sum(r["centre_inside"] for r in rows.values())),
                   "seconds_fit": round(t_fit, 1)}
        json.dump({"summary": summary, "images": rows}, open(os.path.join(OUT, tag + ".json"), "w"), indent=1)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
