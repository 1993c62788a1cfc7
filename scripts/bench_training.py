"""Seconds per training epoch with cached embeddings vs running the frozen encoder at every step.

    python scripts/bench_training.py --src /work/shared/data/hc18 --n-images 100 --encoder-steps 10

Both arms train the mask decoder on the same --n-images pool images with the same prompt sampling. The cached
arm embeds every image once (timed separately, reported as a one-off cost), then runs one full epoch on the
cached embeddings. The encoder-every-step arm runs only --encoder-steps steps (encoder + decoder per image) and
extrapolates to one epoch of --n-images steps; the output says so. The ratio is of the two per-epoch times.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "apps", "fetal_head", "lib"))

from fetal_head.io.hc18 import read_cases, select  # noqa: E402
from fetal_head.io import read_image  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource  # noqa: E402
from fetal_head.segmentation import ImageEmbedding  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.prompts import sample_prompt  # noqa: E402
from fetal_head.segmentation.training import (  # noqa: E402
    TrainConfig, low_res_target, seed_everything, step_logits, prepare_trainable,
)


def train_step(predictor, opt, loss_fn, emb, mask, rng, cfg):
    opt.zero_grad(set_to_none=True)
    _, prompt = sample_prompt(mask, rng, cfg.prompt_shares, cfg.max_jitter)
    loss = loss_fn(step_logits(predictor, emb, prompt), low_res_target(predictor, emb, mask))
    loss.backward()
    opt.step()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True)
    ap.add_argument("--n-images", type=int, default=100)
    ap.add_argument("--encoder-steps", type=int, default=10, help="steps timed in the encoder-every-step arm")
    ap.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder (cold cache)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from monai.losses import DiceCELoss

    seed_everything(args.seed)
    cases = [c for c in select(read_cases(args.src), "pool") if c.mask_path][: args.n_images]
    images = [read_image(c.image_path) for c in cases]
    masks = [c.load_mask() for c in cases]
    predictor = ModelSource(model_dir=tempfile.mkdtemp()).load()
    cfg = TrainConfig(automatic_head=False, localiser=False)  # times the box decoder's step, as before the automatic head
    params = prepare_trainable(predictor, cfg)["mask_decoder"].parameters()
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    loss_fn = DiceCELoss(sigmoid=True)
    rng = np.random.default_rng(args.seed)
    predictor.model.mask_decoder.train()

    # arm 1: encoder at every step (frozen, no grad), for a few steps, extrapolated to an epoch
    t0 = time.perf_counter()
    for i in range(args.encoder_steps):
        k = i % len(images)
        with torch.no_grad():
            e = predictor.encode([images[k]])[0]
        emb = ImageEmbedding(features=e.features.clone(), original_hw=e.original_hw, input_hw=e.input_hw)
        train_step(predictor, opt, loss_fn, emb, masks[k], rng, cfg)
    per_step_encoder = (time.perf_counter() - t0) / args.encoder_steps
    epoch_encoder = per_step_encoder * len(images)

    # arm 2: embeddings computed once (disk cache), then one epoch on cached embeddings
    cache = EmbeddingCache(args.cache_dir or tempfile.mkdtemp(prefix="emb-"), predictor)
    t0 = time.perf_counter()
    embs = [cache.get(im) for im in images]
    embed_once = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in rng.permutation(len(images)):
        train_step(predictor, opt, loss_fn, embs[k], masks[k], rng, cfg)
    epoch_cached = time.perf_counter() - t0

    out = {
        "images": len(images),
        "threads": torch.get_num_threads(),
        "encoder_every_step_s_per_epoch": round(epoch_encoder, 2),
        "encoder_every_step_note": f"measured on {args.encoder_steps} steps ({per_step_encoder:.3f} s/step), "
                                   f"extrapolated to {len(images)} steps",
        "cached_s_per_epoch": round(epoch_cached, 2),
        "cached_one_off_embedding_s": round(embed_once, 2),
        "cache_hits": cache.hits,
        "speedup_per_epoch": round(epoch_encoder / epoch_cached, 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
