"""Fine-tune the SAM mask decoder on an HC18-style folder outside the server (for benchmarks).

    python scripts/train_sam.py --src /work/shared/data/hc18 --n-labels 20 --seed 0 --epochs 10 \\
        --out /tmp/model --eval-split test --eval-limit 50

Draws --n-labels labelled images from the 'pool' split (seeded), fine-tunes as the server's /train does
(fetal_head.segmentation.training: the box decoder and the automatic head), writes <out>/fetal_head_sam.pt, and prints
box-prompt and automatic Dice at full resolution on the evaluation images, zero-shot and fine-tuned.
Embeddings of training and evaluation images come from --cache-dir (computed once there).
--world-size N trains data-parallel over N processes (DDP; gloo on CPU, nccl with --device cuda).
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "apps", "fetal_head", "lib"))

from fetal_head.io.hc18 import read_cases, select  # noqa: E402
from fetal_head.segmentation.model_store import ModelSource, save_finetuned  # noqa: E402
from fetal_head.evaluation.benchmark import select_labels  # noqa: E402
from fetal_head.evaluation.core import evaluate, load_test_images, summarize  # noqa: E402
from fetal_head.segmentation.embedding_cache import EmbeddingCache  # noqa: E402
from fetal_head.segmentation.prompts import AUTOMATIC  # noqa: E402
from fetal_head.segmentation.training import TrainConfig, checkpoint_meta, finetune, label_items  # noqa: E402


def mean_dice(predictor, test, cache) -> dict:
    rows, _ = evaluate(predictor, test, ("box", AUTOMATIC), cache=cache)
    return {mode: s["dice"] for mode, s in summarize(rows).items()}


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
    ap.add_argument("--no-automatic-head", "--no-prompt-free-head", dest="no_automatic_head", action="store_true",
                    help="train the box decoder only (the old spelling is accepted)")
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
    chosen = select_labels(pool, args.n_labels, args.seed)
    items = label_items(chosen, os.path.join(args.out, "labels"))
    eval_cases = select(cases, args.eval_split)
    if args.eval_limit:
        eval_cases = eval_cases[: args.eval_limit]
    test = load_test_images(eval_cases, seed=args.seed)

    cache_dir = args.cache_dir or os.path.join(args.out, "embedding_cache")
    source = ModelSource(model_dir=os.path.join(args.out, "_base"), device=args.device)  # always from the base weights
    predictor = source.load()
    results = {"n_labels": len(items), "seed": args.seed, "epochs": args.epochs, "eval_images": len(eval_cases)}
    if not args.skip_zero_shot:
        results["zero_shot"] = mean_dice(predictor, test, EmbeddingCache(cache_dir, predictor))
        print(f"zero-shot  Dice on {len(eval_cases)} {args.eval_split} images: {results['zero_shot']}", flush=True)

    cfg = TrainConfig(max_epochs=args.epochs, learning_rate=args.lr, train_batch_size=args.batch_size,
                      val_split=args.val_split, flip=args.flip, seed=args.seed, train_encoder=args.train_encoder,
                      automatic_head=not args.no_automatic_head, world_size=args.world_size)
    summary = finetune(predictor, items, cfg, cache_dir)
    meta = checkpoint_meta(summary, source.version())
    save_finetuned(predictor.model, source.base_model_type(), args.out, meta)
    tuned = ModelSource(model_dir=args.out, device=args.device).load()  # reload as the server would
    results["fine_tuned"] = mean_dice(tuned, test, EmbeddingCache(cache_dir, tuned))
    results["best_epoch"] = summary["best_epoch"]
    print(f"fine-tuned Dice on {len(eval_cases)} {args.eval_split} images: {results['fine_tuned']}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
