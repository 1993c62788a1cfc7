"""Crash test: kill -9 the server at random moments during label writes and during training, restart it, check.

    .venv/bin/python scripts/crash_test.py [--iterations 20] [--images 4] [--seed 0] [--max-kill-delay 20]

Starts ``monailabel start_server`` on 127.0.0.1 over a datastore of HC18 images with final labels (the full set
from HC18_DIR or ../shared/data/hc18 when present, else tests/data/hc18_subset), then, per iteration, alternately:

- writes: 4 clients PUT labels as fast as they can (tag ``crashtest``, and ``final`` with ``force``), and
- training: ``POST /train/fetal_head_sam`` (a child process writing the checkpoint at its end),

and after a random delay (bounded by ``--max-kill-delay`` seconds) sends SIGKILL to the server's whole process
group (the server and its train child). Checked after each kill and after each restart:

1. ``datastore_v2.json`` parses as JSON (it is written atomically: temp file + rename);
2. the server restarts and answers ``/info/`` with every image still listed;
3. the served model is the last complete one: the fine-tuned checkpoint, if any, loads with
   ``torch.load(weights_only=True)``, and it is either the one served before the kill or a newer complete one
   (never a partial file), and no temp checkpoint is taken for it.

Prints one line per iteration and a JSON summary; exit status 1 if any check failed.
"""

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "apps" / "fetal_head" / "lib"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else ""


def checkpoint_ok(path: Path) -> bool:
    import torch

    if not path.is_file():
        return True  # no fine-tuned model: the base model is served
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return isinstance(ckpt, dict) and "state_dict" in ckpt
    except Exception as e:
        print(f"   checkpoint {path} does not load: {e}")
        return False


def datastore_json_ok(studies: Path) -> bool:
    path = studies / "datastore_v2.json"
    if not path.exists():
        return True  # not written yet: rebuilt at start
    try:
        json.loads(path.read_text())
        return True
    except ValueError as e:
        print(f"   {path} is not valid JSON ({path.stat().st_size} bytes): {e}")
        return False


def kill9(server) -> None:
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.proc.wait(30)
    server._logf.close()


def writer(url: str, image_ids, masks, stop: threading.Event, counts: dict, k: int):
    rng = random.Random(k)
    while not stop.is_set():
        image_id = rng.choice(image_ids)
        tag, query = ("crashtest", {}) if rng.random() < 0.5 else ("final", {"force": "true"})
        try:
            r = requests.put(f"{url}/datastore/label", params={"image": image_id, "tag": tag, **query},
                             files={"label": ("label.png", masks[image_id], "image/png")},
                             data={"params": json.dumps({"force": True} if tag == "final" else {})}, timeout=10)
            counts["ok" if r.ok else f"http_{r.status_code}"] = counts.get("ok" if r.ok else f"http_{r.status_code}", 0) + 1
        except requests.RequestException:
            counts["conn"] = counts.get("conn", 0) + 1
            time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-kill-delay", type=float, default=20.0, help="seconds; each kill comes at U(0.2, this)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs) at the end")
    args = ap.parse_args()

    from conftest import HC18, Server, make_app_copy, read_hc18
    from fetal_head.io.hc18 import import_cases
    from fetal_head.segmentation.model_store import FINETUNED_NAME

    rng = random.Random(args.seed)
    cases = [c for c in read_hc18(HC18) if c.split == "test"][: args.images]
    tmp = Path(tempfile.mkdtemp(prefix="crash_test_"))
    studies = tmp / "studies"
    import_cases(cases, str(studies), with_labels=True)
    app = make_app_copy(tmp)
    ckpt = app / "model" / FINETUNED_NAME
    masks = {}
    for c in cases:
        buf = io.BytesIO()
        Image.fromarray(c.load_mask().astype(np.uint8) * 255).save(buf, format="PNG")
        masks[c.image_id] = buf.getvalue()
    image_ids = [c.image_id for c in cases]

    failures, rows = [], []
    t_start = time.time()
    server = Server(studies, app, tmp / "server_0.log")
    for it in range(args.iterations):
        mode = "train" if it % 2 else "writes"
        served_before = sha(ckpt)
        delay = rng.uniform(0.2, args.max_kill_delay)
        stop, counts = threading.Event(), {}
        threads = []
        if mode == "writes":
            threads = [threading.Thread(target=writer, args=(server.url, image_ids, masks, stop, counts, k), daemon=True)
                       for k in range(4)]
            for t in threads:
                t.start()
        else:
            r = requests.post(f"{server.url}/train/fetal_head_sam",
                              json={"max_epochs": 1, "train_batch_size": 2, "automatic_head": False}, timeout=30)
            counts["train_post"] = r.status_code
        time.sleep(delay)
        kill9(server)
        stop.set()
        for t in threads:
            t.join(15)
        problems = []
        if not datastore_json_ok(studies):
            problems.append("datastore JSON invalid after the kill")
        if not checkpoint_ok(ckpt):
            problems.append("served checkpoint does not load after the kill")
        t0 = time.time()
        try:
            server = Server(studies, app, tmp / f"server_{it + 1}.log")
            info = requests.get(f"{server.url}/info/", timeout=30).json()
            if info.get("datastore", {}).get("total") != len(image_ids):
                problems.append(f"datastore lists {info.get('datastore', {}).get('total')} images, not {len(image_ids)}")
        except Exception as e:  # the server did not come back
            problems.append(f"restart failed: {str(e)[-300:]}")
            server = None
        restart_s = time.time() - t0
        if not datastore_json_ok(studies):
            problems.append("datastore JSON invalid after the restart")
        served_after = sha(ckpt)
        if not checkpoint_ok(ckpt):
            problems.append("served checkpoint does not load after the restart")
        model_changed = served_after != served_before
        row = {"iteration": it, "mode": mode, "kill_after_s": round(delay, 2), "requests": counts,
               "model_changed": model_changed, "restart_s": round(restart_s, 1), "problems": problems}
        rows.append(row)
        print(json.dumps(row), flush=True)
        failures += [f"iteration {it}: {p}" for p in problems]
        if server is None:
            break
    if server is not None:
        server.stop()
    summary = {"iterations": len(rows), "failures": len(failures), "failure_list": failures[:10],
               "writes_iterations": sum(r["mode"] == "writes" for r in rows),
               "train_iterations": sum(r["mode"] == "train" for r in rows),
               "label_puts_ok": sum(r["requests"].get("ok", 0) for r in rows),
               "model_replaced_by_a_complete_run": sum(r["model_changed"] for r in rows),
               "restart_s_mean": round(float(np.mean([r["restart_s"] for r in rows])), 1) if rows else None,
               "seconds": round(time.time() - t_start, 1), "temp": str(tmp) if args.keep else None}
    print(json.dumps(summary, indent=2))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
