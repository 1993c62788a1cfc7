"""Load benchmark against a real server: N concurrent clients x M box requests, while another client polls /info/.

    .venv/bin/python scripts/bench_load.py [--url http://127.0.0.1:8000] [--clients 8] [--requests 20] [--images 8]

Without ``--url`` it starts ``monailabel start_server`` on 127.0.0.1 over a datastore of HC18 images (the full set
from HC18_DIR or ../shared/data/hc18 when present, else tests/data/hc18_subset) and stops it at the end.
First every (image, box) is asked once, sequentially (the reference answers); then the clients send their
requests at once, each answer's mask is compared with the sequential one (Dice, must be 1.0) and with the
reference label. Prints: errors, Dice concurrent-vs-sequential (min), Dice vs label (mean), request latency
p50/p95, throughput, and /info/ latency p50/p95/max during the load (issue 11: p95 < 1 s).
"""

import argparse
import io
import json
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))


def ask(url, image_id, box, timeout=600):
    t0 = time.time()
    r = requests.post(f"{url}/infer/fetal_head_sam", params={"image": image_id, "output": "image"},
                      data={"params": json.dumps({"box": box})}, timeout=timeout)
    dt = time.time() - t0
    if r.status_code != 200:
        return None, dt, f"{r.status_code} {r.text[:200]}"
    return np.array(Image.open(io.BytesIO(r.content))) > 0, dt, None


def pct(values, q):
    return round(float(np.percentile(values, q)), 3) if values else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--info-interval", type=float, default=0.1)
    ap.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                    help="server --conf pairs when this script starts the server")
    args = ap.parse_args()

    from conftest import HC18, Server, make_app_copy, read_hc18
    from fetal_head.io.hc18 import import_cases
    from fetal_head.segmentation.prompts import mask_box, mask_dice

    cases = [c for c in read_hc18(HC18) if c.split == "test"][: args.images]
    server, tmp = None, None
    url = args.url
    if not url:
        tmp = Path(tempfile.mkdtemp(prefix="bench_load_"))
        import_cases(cases, str(tmp / "studies"), with_labels=False)
        t0 = time.time()
        server = Server(tmp / "studies", make_app_copy(tmp), tmp / "server.log", conf=args.conf)
        print(f"server started in {time.time() - t0:.1f} s at {server.url}", flush=True)
        url = server.url
    try:
        rng = np.random.default_rng(0)
        jobs = []
        for c in cases:
            ref = c.load_mask()
            x0, y0, x1, y1 = mask_box(ref)
            j = rng.integers(0, 11, size=4)
            jobs.append((c.image_id, [float(x0 - j[0]), float(y0 - j[1]), float(x1 + j[2]), float(y1 + j[3])], ref))

        t0 = time.time()
        sequential = {}
        for image_id, box, _ in jobs:
            mask, _, err = ask(url, image_id, box)
            if err:
                raise SystemExit(f"sequential request failed: {err}")
            sequential[image_id] = mask
        seq_s = time.time() - t0

        info_times, stop = [], threading.Event()

        def poll_info():
            while not stop.is_set():
                t = time.time()
                try:
                    ok = requests.get(f"{url}/info/", timeout=30).ok
                except requests.RequestException:
                    ok = False
                info_times.append((time.time() - t) if ok else float("inf"))
                stop.wait(args.info_interval)

        def client(k):
            out = []
            for i in range(args.requests):
                image_id, box, ref = jobs[(k + i) % len(jobs)]
                mask, dt, err = ask(url, image_id, box)
                out.append((image_id, mask, dt, err, ref))
            return out

        poller = threading.Thread(target=poll_info, daemon=True)
        poller.start()
        t0 = time.time()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [r for rs in pool.map(client, range(args.clients)) for r in rs]
        load_s = time.time() - t0
        stop.set()
        poller.join(60)

        errors = [r[3] for r in results if r[3]]
        ok = [r for r in results if not r[3]]
        same = [mask_dice(mask > 0, sequential[image_id] > 0, empty=1.0) for image_id, mask, _, _, _ in ok]
        vs_label = [mask_dice(mask > 0, ref > 0, empty=1.0) for _, mask, _, _, ref in ok]
        latencies = [r[2] for r in ok]
        finite_info = [t for t in info_times if np.isfinite(t)]
        summary = {
            "clients": args.clients, "requests_per_client": args.requests, "images": len(jobs),
            "requests": len(results), "errors": len(errors), "first_errors": errors[:3],
            "sequential_seconds": round(seq_s, 1), "load_seconds": round(load_s, 1),
            "throughput_rps": round(len(results) / load_s, 2),
            "dice_vs_sequential_min": round(min(same), 6) if same else None,
            "masks_identical_to_sequential": sum(s == 1.0 for s in same),
            "dice_vs_label_mean": round(float(np.mean(vs_label)), 4) if vs_label else None,
            "request_latency_p50_s": pct(latencies, 50), "request_latency_p95_s": pct(latencies, 95),
            "info_polls": len(info_times), "info_failures": len(info_times) - len(finite_info),
            "info_p50_s": pct(finite_info, 50), "info_p95_s": pct(finite_info, 95),
            "info_max_s": round(max(finite_info), 3) if finite_info else None,
        }
        print(json.dumps(summary, indent=2))
        return 0 if not errors and summary["dice_vs_sequential_min"] == 1.0 and (summary["info_p95_s"] or 9) < 1 else 1
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
