"""Should the image encoder run in bf16 on this CPU? Encoder time per image (fp32 vs bf16 autocast, interleaved on
the same images in one run) and box-prompt Dice / HC error on the HC18 test images with each embedding, through
the same decoder. Issue 12's rule: switch to bf16 only if test Dice changes by less than 0.1 point.

    python scripts/bench_bf16_encoder.py [--model-dir DIR] [--limit N] [--hc18 DIR]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "apps", "fetal_head", "lib"))

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="a fine-tuned model folder (default: zero-shot LiteMedSAM)")
    ap.add_argument("--limit", type=int, default=0, help="first N test images only (0: all)")
    ap.add_argument("--hc18", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hc18"))
    args = ap.parse_args()

    import torch
    from tqdm import tqdm

    from fetal_head.evaluation.core import image_metrics, load_test_images
    from fetal_head.io.hc18 import read_cases
    from fetal_head.segmentation import SamPredictor
    from fetal_head.segmentation.model_store import ModelSource
    from fetal_head.segmentation.predictor import ImageEmbedding

    pred = ModelSource(model_dir=args.model_dir).load() if args.model_dir else SamPredictor.litemedsam()
    pred.encoder_bf16 = False  # fp32 unless this script autocasts (the predictor's default may be bf16)
    pred.refresh_encoder_key()
    cases = [c for c in read_cases(args.hc18) if c.split == "test"]
    test = load_test_images(cases, seed=0)[: args.limit or None]
    secs = {"fp32": [], "bf16": []}
    rows = {"fp32": [], "bf16": []}
    with torch.inference_mode():
        pred.encode([test[0].image])  # warm kernels
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred.encode([test[0].image])
        for t in tqdm(test, desc="fp32 vs bf16", unit="image", mininterval=10):
            for kind in ("fp32", "bf16"):
                t0 = time.perf_counter()
                if kind == "bf16":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        emb = pred.encode([t.image])[0]
                    emb = ImageEmbedding(emb.features.float(), emb.original_hw, emb.input_hw)
                else:
                    emb = pred.encode([t.image])[0]
                secs[kind].append(time.perf_counter() - t0)
                logits, iou = pred.decode(emb, boxes=np.array([t.box]))
                mask = pred.finish(emb, logits, iou).mask
                rows[kind].append(image_metrics(mask, t.mask, t.case.pixel_size_mm, t.case.hc_mm))
    print(f"{len(test)} HC18 test images, box prompts, model: {args.model_dir or 'zero-shot LiteMedSAM'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| encoder | s / image (median) | box Dice % | HC abs diff mm |")
    print("| --- | --- | --- | --- |")
    for kind in ("fp32", "bf16"):
        d = 100 * np.mean([r["dice"] for r in rows[kind]])
        hc = np.mean([r["hc_abs_diff_mm"] for r in rows[kind]])
        print(f"| {kind} | {np.median(secs[kind]):.3f} | {d:.3f} | {hc:.3f} |")
    diff = [100 * (b["dice"] - a["dice"]) for a, b in zip(rows["fp32"], rows["bf16"])]
    print(f"bf16 - fp32 Dice: mean {np.mean(diff):+.3f} points, largest per-image change {np.max(np.abs(diff)):.3f} "
          f"points; speed-up x{np.median(secs['fp32']) / np.median(secs['bf16']):.2f}")


if __name__ == "__main__":
    main()
