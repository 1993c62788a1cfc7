"""Fine-tuning through the real server: /train/fetal_head_sam improves box-prompt Dice, is served without a
restart, and a killed run leaves the served model and the datastore untouched. Plus prompt sampling units."""

import hashlib
import io
import json
import os
import time

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import Server, dice, make_app_copy, test_split

N_LABELLED = 10  # pool-split images with final labels (training data)
N_TEST = 20  # test-split images without labels (evaluation)
TRAIN_OPTIONS = {"max_epochs": 10, "train_batch_size": 2, "learning_rate": 1e-4, "val_split": 0.2, "seed": 0}


# ---- prompt sampling (no server) -------------------------------------------------------------------------------
def test_prompt_sampling_box_jitter_and_clicks(hc18):
    from fetal_head.training import jitter_box, mask_box, sample_clicks, sample_prompt

    mask = [c for c in hc18 if c.split == "pool"][0].load_mask()
    h, w = mask.shape
    x0, y0, x1, y1 = mask_box(mask)
    rng = np.random.default_rng(0)
    for _ in range(200):
        b = jitter_box((x0, y0, x1, y1), rng, 20, h, w)
        grow = np.array([x0 - b[0], y0 - b[1], b[2] - x1, b[3] - y1])
        assert (grow >= 0).all() and (grow <= 20).all()
        pts, labels = sample_clicks(mask, rng)
        assert 1 <= (labels == 1).sum() <= 3 and (labels == 0).sum() <= 1
        for (x, y), lab in zip(pts, labels):
            assert mask[int(y), int(x)] == bool(lab)  # foreground inside the mask, background outside
    kinds = [sample_prompt(mask, rng, {"box": 0.5, "box_clicks": 0.2, "clicks": 0.1, "free": 0.2})[0] for _ in range(400)]
    assert set(kinds) == {"box", "box_clicks", "clicks", "free"}
    _, free = sample_prompt(mask, rng, {"free": 1.0})
    assert free.box == (0.0, 0.0, w - 1.0, h - 1.0)


# ---- through the server -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, hc18):
    from fetal_head.hc18 import import_cases

    tmp = tmp_path_factory.mktemp("train")
    studies = tmp / "studies"
    labelled = test_split(hc18, "pool", N_LABELLED, seed=2)
    test_cases = test_split(hc18, "test", N_TEST, seed=3)
    import_cases(labelled, str(studies), with_labels=True)
    import_cases(test_cases, str(studies), with_labels=False)
    app = make_app_copy(tmp)
    srv = Server(studies, app, tmp / "server.log")
    srv.studies, srv.app, srv.test_cases = studies, app, test_cases
    yield srv
    srv.stop()


def model_version(server):
    return requests.get(f"{server.url}/info/", timeout=30).json()["models"]["fetal_head_sam"]["model_version"]


def box_dice(server):
    """Mean box-prompt Dice on the test images (roi = reference box, each side jittered 0-20 px, fixed seed)."""
    rng = np.random.default_rng(0)
    scores, versions = [], set()
    for case in server.test_cases:
        ref = case.load_mask()
        rows, cols = np.nonzero(ref)
        j = rng.integers(0, 21, size=4)
        roi = [int(cols.min() - j[0]), int(cols.max() + j[1]), int(rows.min() - j[2]), int(rows.max() + j[3]), 0, 0]
        resp = requests.post(f"{server.url}/infer/fetal_head_sam", params={"image": case.image_id, "output": "all"},
                             data={"params": json.dumps({"roi": roi})}, timeout=300)
        assert resp.status_code == 200, resp.text
        from requests_toolbelt.multipart import decoder

        for part in decoder.MultipartDecoder.from_response(resp).parts:
            if 'name="params"' in part.headers.get(b"Content-Disposition", b"").decode():
                versions.add(json.loads(part.content)["model_version"])
            else:
                scores.append(dice(np.array(Image.open(io.BytesIO(part.content))), ref))
    return float(np.mean(scores)), versions


def wait_for_training(server, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        task = requests.get(f"{server.url}/train/", timeout=30).json()
        if task["status"] in ("DONE", "ERROR", "STOPPED"):
            return task
        time.sleep(3)
    raise TimeoutError("training did not finish")


def snapshot(folder):
    """sha256 of every file under folder (datastore: images, labels, datastore_v2.json)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_training_improves_box_dice_and_is_served_without_restart(server):
    zero_version = model_version(server)
    zero_dice, versions = box_dice(server)
    assert versions == {zero_version}
    t0 = time.time()
    resp = requests.post(f"{server.url}/train/fetal_head_sam", json=TRAIN_OPTIONS, timeout=60)
    assert resp.status_code == 200, resp.text
    task = wait_for_training(server)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    train_s = time.time() - t0
    new_version = model_version(server)
    assert new_version != zero_version and new_version.startswith("finetuned:")
    tuned_dice, versions = box_dice(server)
    assert versions == {new_version}
    meta = json.loads((server.app / "model" / "fetal_head_sam.json").read_text())
    print(f"\nbox-prompt Dice on {N_TEST} test images: zero-shot {zero_dice:.4f} -> fine-tuned {tuned_dice:.4f} "
          f"(train {train_s:.0f} s on {len(meta['labels_used'])} labels, best epoch {meta['best_epoch']}, "
          f"val {meta['metrics']})")
    assert len(meta["labels_used"]) + len(meta["validation_images"]) == N_LABELLED
    assert meta["prompt_free"] is None  # prompt-free training is off by default: the box search serves it
    assert tuned_dice > zero_dice


def test_killed_training_leaves_model_and_datastore_untouched(server):
    model_file = server.app / "model" / "fetal_head_sam.pt"
    before_version = model_version(server)
    before_model = model_file.read_bytes() if model_file.exists() else None
    before_store = snapshot(server.studies)
    resp = requests.post(f"{server.url}/train/fetal_head_sam", json={**TRAIN_OPTIONS, "max_epochs": 1000}, timeout=60)
    assert resp.status_code == 200, resp.text
    deadline = time.time() + 600
    while time.time() < deadline:  # kill it mid-run: once it is training (an epoch was logged)
        task = requests.get(f"{server.url}/train/", timeout=30).json()
        assert task["status"] in ("SUBMITTED", "RUNNING"), task
        if any("epoch 1/1000" in line for line in task.get("details", [])):
            break
        time.sleep(1)
    else:
        pytest.fail("training never reached its first epoch")
    stopped = requests.delete(f"{server.url}/train/", timeout=60).json()
    assert stopped["status"] == "STOPPED"
    time.sleep(2)
    assert requests.get(f"{server.url}/train/", timeout=30).json()["status"] == "STOPPED"
    assert model_version(server) == before_version
    assert (model_file.read_bytes() if model_file.exists() else None) == before_model
    assert snapshot(server.studies) == before_store
    assert server.alive()
