"""Active learning through a real `monailabel start_server` (issue 13): the strategies of lib/activelearning return
only unlabelled, non-synthetic images, never one labelled meanwhile; scores are cached (counters, not times); an
empty pool gives an empty answer; auto-retrain after K labels runs MONAI Label's training task and the new model
serves without a restart. The selection rules themselves are unit-tested at the end (no server)."""

import json
import shutil
import time

import numpy as np
import pytest
import requests

from conftest import Server, make_app_copy, test_split, png_bytes

STRATEGIES = ("uncertainty", "diversity", "hybrid", "random", "first")
N_UNLABELLED = 4
K = 2  # auto_retrain_every



@pytest.fixture(scope="module")
def server(tmp_path_factory, hc18):
    from fetal_head.io.hc18 import import_cases
    from fetal_head.synthesis.store import SYNTHETIC_PREFIX

    tmp = tmp_path_factory.mktemp("al")
    cases = test_split(hc18, "test", N_UNLABELLED + 1, seed=3)
    studies = tmp / "studies"
    import_cases(cases[:N_UNLABELLED], str(studies), with_labels=False)
    import_cases(cases[N_UNLABELLED:], str(studies), with_labels=True)  # one labelled already
    synthetic = f"{SYNTHETIC_PREFIX}test_0_0"
    shutil.copy(cases[0].image_path, studies / f"{synthetic}.png")  # a synthetic image: never handed out
    srv = Server(studies, make_app_copy(tmp), tmp / "server.log", conf=[
        ("auto_retrain_every", str(K)), ("auto_retrain_epochs", "1"),
        # the cheapest retrain the trainer offers (options it does not know are ignored)
        ("auto_retrain_options", json.dumps({"automatic_head": False, "localiser": False}, separators=(",", ":"))),
        ("embedding_cache_dir", str(tmp / "emb")), ("score_cache_dir", str(tmp / "scores")),
    ])
    srv.cases = {c.image_id: c for c in cases}
    srv.labelled = {cases[-1].image_id}
    srv.synthetic = synthetic
    yield srv
    srv.stop()


def sample(server, strategy):
    r = requests.post(f"{server.url}/activelearning/{strategy}", json={}, timeout=600)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def submit(server, image_id):
    r = requests.put(
        f"{server.url}/datastore/label", params={"image": image_id, "tag": "final"},
        files={"label": ("label.png", png_bytes(server.cases[image_id].load_mask()), "application/octet-stream")},
        data={"params": json.dumps({"label_info": [{"name": "fetal_head", "idx": 1}]})}, timeout=120,
    )
    assert r.status_code == 200, r.text[:500]
    server.labelled.add(image_id)
    return r.json()


def wait_scored(server, timeout=900):
    """Next Sample until the background pass has scored every unlabelled image."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        res = sample(server, "uncertainty")
        st = res["active_learning"]
        if not st["background_running"] and st["scored"] == st["unlabelled"]:
            return res
        time.sleep(2)
    raise AssertionError(f"background scoring did not finish: {res}")


def test_info_lists_strategies_with_default_first(server):
    info = requests.get(f"{server.url}/info/", timeout=60).json()
    names = list(info["strategies"])
    assert set(STRATEGIES) <= set(names)
    assert "[default]" in info["strategies"][names[0]]["description"]


def test_each_strategy_returns_unlabelled_real_images(server):
    for strategy in STRATEGIES:
        for _ in range(2):
            res = sample(server, strategy)
            assert res["id"] in server.cases, (strategy, res)
            assert res["id"] not in server.labelled and res["id"] != server.synthetic, (strategy, res)


def test_scores_cached_and_sample_preannotated(server):
    first = wait_scored(server)
    again = sample(server, "uncertainty")
    a, b = first["active_learning"], again["active_learning"]
    assert b["encoder_runs"] == a["encoder_runs"], (a, b)  # no image encoded again
    assert b["scores_computed"] == a["scores_computed"], (a, b)  # no image scored again
    assert b["score_cache_hits"] > a["score_cache_hits"]
    # pre-annotation: the handed-out image's embedding is in the served predictor's cache, so infer skips the encoder
    r = requests.post(f"{server.url}/infer/fetal_head_auto", params={"image": again["id"], "output": "json"},
                      data={"params": "{}"}, timeout=600)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["embedding_cached"] is True, r.json()


@pytest.mark.timeout(1800)  # a real training job in a child process; ~20 min measured on 2 very busy cores
def test_labelled_image_never_returned_and_auto_retrain(server):
    before = requests.get(f"{server.url}/info/", timeout=60).json()["models"]["fetal_head_sam"]["model_version"]
    res = None
    for _ in range(K):
        image_id = sample(server, "hybrid")["id"]
        res = submit(server, image_id)
        for strategy in STRATEGIES:
            got = sample(server, strategy)
            assert got.get("id") not in server.labelled, (strategy, got)
    assert "queued" in res.get("auto_retrain", ""), res
    deadline = time.time() + 1700
    status = {}
    while time.time() < deadline:
        status = requests.get(f"{server.url}/train/", timeout=30).json()
        if status.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        time.sleep(1)
    assert status.get("status") == "DONE", json.dumps(status)[-3000:]
    after = requests.get(f"{server.url}/info/", timeout=60).json()["models"]["fetal_head_sam"]["model_version"]
    assert after != before and after.startswith("finetuned"), (before, after)


def test_empty_pool_gives_empty_answer(server):
    for image_id in [i for i in server.cases if i not in server.labelled]:
        submit(server, image_id)
    for strategy in STRATEGIES:
        assert sample(server, strategy) == {}, strategy


# ---- the selection rules, without the server ---------------------------------------------------------------------
def test_k_center_greedy_covers_clusters():
    from fetal_head.selection import select_diverse, select_hybrid, select_uncertain

    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32)
    feats = {f"{c}_{i}": centres[c] + rng.normal(0, 0.1, 2).astype(np.float32) for c in range(3) for i in range(5)}
    picks = select_diverse(feats, ["0_0"], [k for k in feats if k != "0_0"], 2)
    assert {p.split("_")[0] for p in picks} == {"1", "2"}  # the two clusters with no label yet
    scores = {k: float(i) for i, k in enumerate(feats)}
    assert select_uncertain(scores, 2) == ["2_4", "2_3"]
    assert len(set(select_hybrid(scores, feats, ["0_0"], 2, shortlist=3))) == 2
