"""Active-learning latency (issue 13): the first scoring pass over N unlabelled images (embeddings from the disk
cache when present, else encoded), then a cached Next Sample (scores read back, nothing encoded or scored).

    .venv/bin/python scripts/bench_active_learning.py [--n 8] [--strategy uncertainty] [--cache .data/emb_cache]

Runs the app's strategy classes on a MONAI Label LocalDatastore of N HC18 test-split images (a temporary copy,
no labels), in process (no server, so the times are the strategy's own). Prints both times and the counters.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head"))
sys.path.insert(0, os.path.join(REPO, "apps", "fetal_head", "lib"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hc18", default=os.path.join(REPO, "..", "shared", "data", "hc18"))
    p.add_argument("--cache", default=os.path.join(REPO, ".data", "emb_cache"), help="embedding cache (disk)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--strategy", default="uncertainty", choices=("uncertainty", "diversity", "hybrid"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from fetal_head.io.hc18 import import_cases, read_cases
    from fetal_head.segmentation.model_store import ModelSource, ServedModel
    from fetal_head.selection import PoolScorer
    from fetal_head.synthesis.store import open_datastore
    from lib.activelearning import Diversity, Hybrid, SelectionService, Uncertainty

    cases = sorted([c for c in read_cases(args.hc18) if c.split == "test"], key=lambda c: c.image_id)[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        studies = os.path.join(tmp, "studies")
        import_cases(cases, studies, with_labels=False)
        ds = open_datastore(studies)
        served = ServedModel(ModelSource(model_dir=os.path.join(tmp, "model"), cache_size=args.n + 4))
        t0 = time.time()
        served.get()
        print(f"model load: {time.time() - t0:.2f} s")
        scorer = PoolScorer(served.get, args.cache, os.path.join(tmp, "scores"))
        service = SelectionService(scorer, sync_first=args.n)  # the whole first pass in the call, to time it
        strategy = {"uncertainty": Uncertainty, "diversity": Diversity, "hybrid": Hybrid}[args.strategy](service)
        request = {"strategy": args.strategy}
        t0 = time.time()
        first = strategy(request, ds)
        scorer.wait()
        t_first = time.time() - t0
        stats_first = scorer.stats()
        t0 = time.time()
        again = strategy(request, ds)
        t_cached = time.time() - t0
        print(f"first scoring pass over {args.n} images ({args.strategy}): {t_first:.2f} s "
              f"({t_first / args.n:.2f} s/image; {stats_first['encoder_runs']} encoded, "
              f"{stats_first['scores_computed']} scored) -> {first['id']}")
        print(f"cached Next Sample: {t_cached * 1000:.0f} ms ({scorer.stats()['encoder_runs'] - stats_first['encoder_runs']} "
              f"encoded, {scorer.stats()['scores_computed'] - stats_first['scores_computed']} scored) -> {again['id']}")


if __name__ == "__main__":
    main()
