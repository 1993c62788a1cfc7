#!/usr/bin/env python
"""Sample synthetic image-mask pairs from a diffusion checkpoint, quality-control them, and store them.

    python scripts/synthesize.py --checkpoint CKPT --n 100 --out-datastore DATASTORE [--qc full] [--seed 0]
    python scripts/synthesize.py --checkpoint CKPT --n 100 --out-folder DIR        [--qc full] [--seed 0]
    python scripts/synthesize.py --purge --out-datastore DATASTORE

At scale, one command over several GPUs (each process samples its round-robin share of the candidate indices):

    torchrun --nproc_per_node=8 scripts/synthesize.py --checkpoint CKPT --num-pairs 10000 --out-datastore DATASTORE
    accelerate launch --num_processes 8 scripts/synthesize.py ...   (the same environment variables)

The processes read RANK / WORLD_SIZE / LOCAL_RANK as torchrun and accelerate set them. With --out-folder each
process writes its own pairs and provenance-rank<r>.jsonl into one HC18-style folder; with --out-datastore they
write to a staging folder beside the datastore, and rank 0 adds everything to the datastore at the end (one
writer: MONAI Label's datastore file is rewritten whole on each add). Only single-process CPU runs have been
tested; the multi-process path has run with torchrun on CPU (gloo), not on GPUs.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))

import torch  # noqa: E402

from fetal_head.synthesis.quality import QC_MODES, QCThresholds  # noqa: E402
from fetal_head.synthesis.sampling import SamplingOptions  # noqa: E402
from fetal_head.synthesis.pipeline import synthesize_into_datastore, synthesize_into_folder  # noqa: E402
from fetal_head.synthesis.store import import_folder, next_free_index, open_datastore, purge_synthetic  # noqa: E402


def dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint")
    ap.add_argument("--num-pairs", "--n", dest="n", type=int, default=10,
                    help="number of QC-passed pairs to add over all processes (under torchrun write --num-pairs: torchrun takes --n for its own --nnodes)")
    ap.add_argument("--seed", type=int, default=0)
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--out-datastore", help="MONAI Label datastore folder")
    out.add_argument("--out-folder", help="HC18-style folder (images/, masks/, provenance*.jsonl)")
    ap.add_argument("--qc", default="full", choices=QC_MODES,
                    help="'shape-only' skips the SAM agreement gate: tests and smoke runs only")
    ap.add_argument("--min-sam-dice", type=float, default=QCThresholds.min_sam_dice)
    ap.add_argument("--model-dir", default=str(REPO / "apps" / "fetal_head" / "model"),
                    help="app model folder: the SAM model QC uses (fine-tuned if present, else LiteMedSAM)")
    ap.add_argument("--sampler", choices=("ddim", "dpm"))
    ap.add_argument("--steps", type=int, help="sampling steps (default: the checkpoint config's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-candidates-factor", type=float, default=4.0)
    ap.add_argument("--start-index", type=int, help="first candidate index (default: after existing ids)")
    ap.add_argument("--device", help="default: cuda:<LOCAL_RANK> when CUDA is available, else cpu")
    ap.add_argument("--purge", action="store_true", help="remove all synthetic pairs from --out-datastore and exit")
    args = ap.parse_args(argv)

    if args.purge:
        if not args.out_datastore:
            sys.exit("--purge needs --out-datastore")
        removed = purge_synthetic(open_datastore(args.out_datastore))
        print(f"purged {len(removed)} synthetic pairs")
        return
    if not args.checkpoint:
        sys.exit("--checkpoint is required")

    rank, world, local_rank = dist_env()
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    predictor = None
    if args.qc == "full":
        from fetal_head.segmentation.model_store import ModelSource

        predictor = ModelSource(args.model_dir, device=device).load()
    thresholds = QCThresholds(min_sam_dice=args.min_sam_dice)
    options = SamplingOptions(qc=args.qc, predictor=predictor, thresholds=thresholds, batch_size=args.batch_size,
                              max_candidates_factor=args.max_candidates_factor)
    common = dict(seed=args.seed, options=options, device=device, sampler=args.sampler, steps=args.steps)

    if world == 1 and args.out_datastore:
        ds = open_datastore(args.out_datastore)
        summary = synthesize_into_datastore(ds, args.checkpoint, args.n, **common)
        summary.pop("accepted_indices")
        print(json.dumps(summary, indent=2))
        return

    folder = args.out_folder or args.out_datastore.rstrip("/") + f".staging-seed{args.seed}"
    start = args.start_index
    if start is None:
        # every rank reads the same datastore before anyone writes to it: the same start index everywhere
        if args.out_datastore:
            from fetal_head.synthesis.diffusion import DiffusionConfig, load_checkpoint

            scheme = DiffusionConfig.from_json(load_checkpoint(args.checkpoint)["config"]).scheme
            start = next_free_index(open_datastore(args.out_datastore), scheme, args.seed) if rank == 0 else 0
            if world > 1:
                import torch.distributed as dist

                box = [start]
                dist.broadcast_object_list(box, src=0)
                start = box[0]
        else:
            start = 0
    summary = synthesize_into_folder(folder, args.checkpoint, args.n, start_index=start, rank=rank, world_size=world,
                                     **common)
    summary.pop("accepted_indices")
    summaries = [summary]
    if world > 1:
        import torch.distributed as dist

        summaries = [None] * world
        dist.all_gather_object(summaries, summary)
        dist.barrier()
    if rank == 0:
        total = {"accepted": sum(len(s["added"]) for s in summaries),
                 "candidates": sum(s["qc"]["candidates"] for s in summaries), "rejected": {}}
        for s in summaries:
            for k, v in s["qc"]["rejected"].items():
                total["rejected"][k] = total["rejected"].get(k, 0) + v
        if args.out_datastore:
            added, skipped = import_folder(open_datastore(args.out_datastore), folder)
            shutil.rmtree(folder)
            total["added_to_datastore"] = len(added)
            total["skipped_existing"] = len(skipped)
        print(json.dumps({"processes": world, **total}, indent=2))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
