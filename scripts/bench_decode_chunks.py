"""Automatic answers with SAM's decoder fed all candidate boxes in one batch vs a few at a time (the predictor's
``CPU_DECODE_CHUNK``), side by side on the same images and embeddings, in one run.

    .venv/bin/python scripts/bench_decode_chunks.py [--model-dir DIR] [--images 8] [--chunks 0 4 2]

SAM's decoder copies the image embedding once per prompt and spends most of its CPU time moving those copies;
a few prompts at a time stay in the CPU's cache. Printed per chunk size (0: one batch): seconds per automatic
answer (median), and the pixels whose mask differs from the one-batch answer. ``--model-dir``: a fine-tuned model
(its localiser's route); none: the zero-shot box search.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))
IMAGES = REPO / "tests" / "data" / "hc18_subset" / "images"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="fine-tuned model folder (default: zero-shot LiteMedSAM)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 4, 2])
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from fetal_head.io import read_image
    from fetal_head.segmentation import SamPredictor, predictor as P
    from fetal_head.segmentation.model_store import ModelSource

    predictor = ModelSource(model_dir=args.model_dir).load() if args.model_dir else SamPredictor.litemedsam()
    images = [read_image(p) for p in sorted(IMAGES.glob("*.png"))[: args.images]]
    seconds = {c: [] for c in args.chunks}
    differ = {c: 0 for c in args.chunks}
    for image in tqdm(images, desc="images"):
        emb = predictor.embed(image)
        masks = {}
        for c in args.chunks:  # the same embedding, each chunk size in turn
            P.CPU_DECODE_CHUNK = c
            t0 = time.perf_counter()
            masks[c] = predictor.predict_automatic(emb, image).mask
            seconds[c].append(time.perf_counter() - t0)
        for c in args.chunks:
            differ[c] += int((masks[c] != masks[args.chunks[0]]).sum())
    route = "localiser" if predictor.localiser is not None else "box search"
    print(f"automatic answers ({route}), {len(images)} images, median seconds per answer:")
    base = statistics.median(seconds[args.chunks[0]])
    for c in args.chunks:
        s = statistics.median(seconds[c])
        print(f"  chunk {c or 'all':>3}: {s:.2f} s  ({base / s:.2f}x)  mask pixels differing from chunk "
              f"{args.chunks[0] or 'all'}: {differ[c]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
