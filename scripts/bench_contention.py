"""How fast the server encodes an image while it retrains: SAM encodes in one process while another trains the head
localiser (what MONAI Label's training subprocess does beside the server), under OpenMP's default wait policy and
under OMP_WAIT_POLICY=PASSIVE, side by side in one run.

    .venv/bin/python scripts/bench_contention.py [--images 5] [--steps 150]

torch's CPU threads are OpenMP threads. By default they spin for a while after each parallel region, waiting for
the next one; that is free on an idle machine, but two processes spinning on each other's cores (2 here) slow
both. OpenMP reads the policy once, when torch loads, so each configuration runs in fresh processes. Printed:
seconds per encode alone and beside the training, and the training's seconds.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "tests" / "data" / "hc18_subset" / "images"
POLICIES = {"default": None, "PASSIVE": "PASSIVE"}


def encode(n: int) -> dict:
    from fetal_head.io import read_image
    from fetal_head.segmentation import SamPredictor

    predictor = SamPredictor.litemedsam(cache_size=0)
    images = [read_image(p) for p in sorted(IMAGES.glob("*.png"))[: n + 1]]
    predictor.encode(images[:1])  # warm-up: first-call allocations
    t0 = time.perf_counter()
    for image in images[1:]:
        predictor.encode([image])
    return {"encode_s": (time.perf_counter() - t0) / n}


def train(steps: int) -> dict:
    import numpy as np
    import torch

    from fetal_head.segmentation import localiser as L

    g = torch.Generator().manual_seed(0)
    mask = np.zeros((540, 800), bool)
    mask[100:400, 200:600] = True
    samples = [(torch.randn(1, 256, 64, 64, generator=g), mask, (173, 256)) for _ in range(5)]
    print("ready", flush=True)  # imports done: the parent starts the encoder now
    t0 = time.perf_counter()
    L.train_localiser(samples, L.LocaliserConfig(steps=steps))
    return {"train_s": time.perf_counter() - t0}


def child(role: str, args, policy) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, __file__, "--role", role, "--images", str(args.images), "--steps", str(args.steps)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{proc.args} failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5, help="images encoded per measurement")
    ap.add_argument("--steps", type=int, default=150, help="localiser training steps in the competing process")
    ap.add_argument("--role", choices=("encode", "train"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))
        print(json.dumps(encode(args.images) if args.role == "encode" else train(args.steps)), flush=True)
        return
    print(f"{'wait policy':12} {'encode alone':>13} {'encode beside training':>23} {'training':>9}  (s, {os.cpu_count()} CPUs)")
    for name, policy in POLICIES.items():
        alone = result(child("encode", args, policy))["encode_s"]
        trainer = child("train", args, policy)
        trainer.stdout.readline()  # "ready"
        beside = result(child("encode", args, policy))["encode_s"]
        train_s = result(trainer)["train_s"]
        print(f"{name:12} {alone:13.2f} {beside:23.2f} {train_s:9.1f}", flush=True)


if __name__ == "__main__":
    main()
