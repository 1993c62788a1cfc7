#!/usr/bin/env python
"""Train the diffusion pair generator on an HC18-style folder (images/, masks/, splits.csv).

    python scripts/train_diffusion.py --src ../shared/data/hc18 --split pool [--n 0] \
        [--scheme mask_conditioned|joint] [--config default|tiny] [--steps 50000] \
        [--out apps/fetal_head/model/diffusion/mask_conditioned_default.pt] [--device cuda] [--no-resume]

Resumes the checkpoint at --out when it exists (training continues to --steps). The head shape model (fitted on
the same masks) and the training image names are stored inside the checkpoint. Single process: one GPU trains the
256 px model; generation, not training, is what scripts/synthesize.py spreads over GPUs.
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))

from fetal_head.synthesis.diffusion import CONFIGS, DEFAULT_SCHEME, make_config  # noqa: E402
from fetal_head.synthesis.schemes import SCHEMES  # noqa: E402
from fetal_head.io.hc18 import read_cases, select  # noqa: E402
from fetal_head.synthesis.pipeline import default_device, train_generator  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="HC18-style folder")
    ap.add_argument("--split", default="pool", help="train on this split of splits.csv ('' for all images)")
    ap.add_argument("--n", type=int, default=0, help="at most this many images (0: all of the split)")
    ap.add_argument("--scheme", default=DEFAULT_SCHEME, choices=SCHEMES)
    ap.add_argument("--config", default="default", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, help="train to this many optimizer steps (default: the config's)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="checkpoint path (default apps/fetal_head/model/diffusion/<scheme>_<config>.pt)")
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--no-resume", action="store_true", help="start over even if --out exists")
    args = ap.parse_args(argv)

    cases = [c for c in select(read_cases(args.src), split=args.split or None) if c.mask_path]
    if args.n:
        cases = cases[: args.n]
    if not cases:
        sys.exit("no images with masks matched")
    config = make_config(args.config, scheme=args.scheme, max_steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    out = args.out or str(REPO / "apps" / "fetal_head" / "model" / "diffusion" / f"{args.scheme}_{args.config}.pt")
    pairs = [(c.image_id, c.image_path, c.mask_path) for c in cases]
    print(f"training {args.scheme} ({args.config}, {config.image_size} px) on {len(pairs)} pairs to step {config.max_steps}")
    summary = train_generator(pairs, config, out, device=args.device, resume=not args.no_resume)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
