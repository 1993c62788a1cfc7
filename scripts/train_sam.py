"""Fine-tune the SAM mask decoder on an HC18-style folder outside the server (for benchmarks).

    python scripts/train_sam.py --src /work/shared/data/hc18 --n-labels 20 --seed 0 --epochs 10 \\
        --out /tmp/model --eval-split test --eval-limit 50

Draws --n-labels labelled images from the 'pool' split (seeded), fine-tunes as the server's /train does
(fetal_head.training: the box decoder and the prompt-free head), writes <out>/fetal_head_sam.pt, and prints
box-prompt and prompt-free Dice at full resolution on the evaluation images, zero-shot and fine-tuned.
Embeddings of training and evaluation images come from --cache-dir (computed once there).
--world-size N trains data-parallel over N processes (DDP; gloo on CPU, nccl with --device cuda).
"""

import argparse
import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "apps", "fetal_head", "lib"))

from fetal_head.hc18 import read_cases, select  # noqa: E402
from fetal_head.model_store import ModelSource, save_finetuned  # noqa: E402
from fetal_head.training import (  # noqa: E402
    EmbeddingCache, LabelledImage, TrainConfig, checkpoint_meta, evaluate, finetune,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="HC18-style folder (images/, masks/, splits.csv)")
    ap.add_argument("--n-labels", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=TrainConfig.learning_rate)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.train_batch_size)
    ap.add_argument("--val-split", type=float, default=TrainConfig.val_split)
    ap.add_argument("--flip", action="store_true", help="also train on horizontally flipped images")
    ap.add_argument("--train-encoder", default="frozen", choices=("frozen", "lora", "full"))
    ap.add_argument("--no-prompt-free-head", action="store_true", help="train the box decoder only")
    ap.add_argument("--world-size", type=int, default=1,
                    help="data-parallel processes (DDP): one per GPU with --device cuda, gloo processes on CPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True, help="model folder to write fetal_head_sam.pt into")
    ap.add_argument("--cache-dir", default=None,
                    help="embedding cache for training and evaluation (default: <out>/embedding_cache)")
    ap.add_argument("--train-split", default="pool")
    ap.add_argument("--eval-split", default="test")
    ap.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N images of the split (0: all)")
    ap.add_argument("--skip-zero-shot", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    cases = read_cases(args.src)
    pool = [c for c in select(cases, args.train_split) if c.mask_path or c.annotation_path]
    rng = np.random.default_rng(args.seed)
    chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=min(args.n_labels, len(pool)), replace=False))]
    items = []
    label_dir = os.path.join(args.out, "labels")
    os.makedirs(label_dir, exist_ok=True)
    for c in chosen:  # annotation-only cases need their outline filled; write every label as a 0/1 PNG
        from PIL import Image

        path = os.path.join(label_dir, f"{c.image_id}.png")
        if not os.path.exists(path):
            Image.fromarray(c.load_mask().astype(np.uint8)).save(path)
        items.append(LabelledImage(c.image_id, c.image_path, path))
    eval_cases = select(cases, args.eval_split)
    if args.eval_limit:
        eval_cases = eval_cases[: args.eval_limit]

    cache_dir = args.cache_dir or os.path.join(args.out, "embedding_cache")
    source = ModelSource(model_dir=os.path.join(args.out, "_base"), device=args.device)  # always from the base weights
    predictor = source.load()
    results = {"n_labels": len(items), "seed": args.seed, "epochs": args.epochs, "eval_images": len(eval_cases)}
    if not args.skip_zero_shot:
        results["zero_shot"] = evaluate(predictor, eval_cases, seed=args.seed, cache=EmbeddingCache(cache_dir, predictor))
        print(f"zero-shot  Dice on {len(eval_cases)} {args.eval_split} images: {results['zero_shot']}", flush=True)

    cfg = TrainConfig(max_epochs=args.epochs, learning_rate=args.lr, train_batch_size=args.batch_size,
                      val_split=args.val_split, flip=args.flip, seed=args.seed, train_encoder=args.train_encoder,
                      prompt_free_head=not args.no_prompt_free_head, world_size=args.world_size)
    summary = finetune(predictor, items, cfg, cache_dir)
    meta = checkpoint_meta(summary, source.version())
    save_finetuned(predictor.model, source.base_model_type(), args.out, meta)
    tuned = ModelSource(model_dir=args.out, device=args.device).load()  # reload as the server would
    results["fine_tuned"] = evaluate(tuned, eval_cases, seed=args.seed, cache=EmbeddingCache(cache_dir, tuned))
    results["best_epoch"] = summary["best_epoch"]
    print(f"fine-tuned Dice on {len(eval_cases)} {args.eval_split} images: {results['fine_tuned']}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
