#!/usr/bin/env python
"""Few real labels + synthetic pairs: the benchmark of issue 5 (fetal_head.evaluation.benchmark), from a CPU smoke run to
the full grid on a GPU.

    python scripts/benchmark.py --config smoke --out /tmp/bench_smoke          # CI: ~2 min on 2 CPU cores
    python scripts/benchmark.py --config cpu   --out docs/benchmark/cpu        # the largest CPU run
    python scripts/benchmark.py --config full  --out docs/benchmark/full --device cuda   # the issue's grid

Overrides: --n 5 20 --seeds 0 1 --synthetic-n 5 --synthetic-seeds 0 --train-steps 300 --test-limit 40.
Finished cells are kept in --work-dir and skipped on the next run (resume after an interruption); --report-only
writes the outputs from the cells finished so far. Prints the summary table at the end.
"""

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))

from fetal_head.evaluation.benchmark import CONFIGS, Benchmark, make_config, write_report  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="smoke", choices=sorted(CONFIGS))
    ap.add_argument("--out", help="outputs (default docs/benchmark/<config>)")
    ap.add_argument("--work-dir", help="cells, labels, generators (default .data/benchmark/<config>)")
    ap.add_argument("--cache-dir", default=str(REPO / ".data" / "emb_cache"), help="on-disk embedding cache")
    ap.add_argument("--hc18", default=os.environ.get("HC18_DIR", str(REPO.parent / "shared" / "data" / "hc18")))
    ap.add_argument("--n", type=int, nargs="+", dest="n_labels", help="N real labels (e.g. 5 10 20 50 438)")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--synthetic-n", type=int, nargs="*", help="N values that run the real+synthetic arm")
    ap.add_argument("--synthetic-seeds", type=int, nargs="*")
    ap.add_argument("--train-steps", type=int)
    ap.add_argument("--test-limit", type=int, help="first K test images (0: all 157)")
    ap.add_argument("--device")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is faster on a CPU shared with other jobs)")
    ap.add_argument("--report-only", action="store_true", help="write the outputs from the finished cells only")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tup = lambda v: tuple(v) if v is not None else None  # noqa: E731
    cfg = make_config(args.config, n_labels=tup(args.n_labels), seeds=tup(args.seeds),
                      synthetic_n=tup(args.synthetic_n), synthetic_seeds=tup(args.synthetic_seeds),
                      train_steps=args.train_steps, test_limit=args.test_limit, device=args.device)
    out = args.out or str(REPO / "docs" / "benchmark" / cfg.name)
    work = args.work_dir or str(REPO / ".data" / "benchmark" / cfg.name)
    bench = Benchmark(cfg, args.hc18, work, args.cache_dir)
    t0 = time.time()
    if not args.report_only:
        bench.run()
    # the command that produces these cells (a --report-only rerun only rewrites the outputs)
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)] + argv)
    report = write_report(bench, out, command=command)
    print(report["markdown"])
    print(f"outputs in {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
