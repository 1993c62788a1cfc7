"""Issue 11, items 1, 2, 3 and 8, replayed as a hostile client against a real `monailabel start_server`.

Every probe must answer a 4xx (or a documented 200), change nothing outside the datastore (the datastore's parent
folder is hashed before and after), and change no real final label unless forced, in which case the previous
version is in the label history and can be restored. The server starts on a zero-byte ``datastore_v2.json`` (what
a kill mid-write used to leave) and must recover from the folder.
"""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import Server, make_app_copy, test_split, png_bytes

N_IMAGES = 4  # 2 with a final label, 2 without


def tree_hashes(root: Path, skip: Path = None) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not (skip and (p == skip or skip in p.parents)):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out



@pytest.fixture(scope="module")
def srv(tmp_path_factory, hc18):
    from fetal_head.io.hc18 import import_cases

    tmp = tmp_path_factory.mktemp("security")
    parent = tmp / "parent"  # the datastore's parent folder: nothing in it may change
    studies = parent / "studies"
    cases = test_split(hc18, "test", N_IMAGES, seed=3)
    labelled, unlabelled = cases[:2], cases[2:]
    import_cases(labelled, str(studies), with_labels=True)
    import_cases(unlabelled, str(studies), with_labels=False)
    (studies / "datastore_v2.json").write_bytes(b"")  # a kill in the middle of MONAI Label's in-place rewrite
    (parent / "victim.txt").write_text("do not touch")
    (parent / "victim.png").write_bytes(png_bytes(np.zeros((8, 8))))
    server = Server(studies, make_app_copy(tmp), tmp / "server.log")
    server.parent, server.studies = parent, studies
    server.labelled, server.unlabelled = labelled, unlabelled
    server.outside_before = tree_hashes(parent, skip=studies)
    yield server
    server.stop()


def final_labels(srv) -> dict:
    """Hashes of the current final labels (the history folder excluded)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((srv.studies / "labels" / "final").glob("*")) if p.is_file()}


def put_label(srv, image_id, name, content, tag="final", force=None, params=None):
    query = {"image": image_id, "tag": tag, **({"force": force} if force is not None else {})}
    return requests.put(f"{srv.url}/datastore/label", params=query, files={"label": (name, content)},
                        data={"params": json.dumps(params or {})}, timeout=60)


def infer(srv, image_id, params):
    return requests.post(f"{srv.url}/infer/fetal_head_sam", params={"image": image_id, "output": "json"},
                         data={"params": json.dumps(params)}, timeout=120)


def test_zero_byte_datastore_file_is_recovered(srv):
    log = srv.log.read_text()
    assert "is damaged" in log and "rebuilding the datastore from the folder" in log
    assert list(srv.studies.glob("datastore_v2.json.damaged-*")), "the damaged file is kept aside"
    status = requests.get(f"{srv.url}/datastore/", timeout=30).json()
    assert status["total"] == N_IMAGES and status["completed"] == len(srv.labelled)
    json.loads((srv.studies / "datastore_v2.json").read_text())  # rewritten, valid


def probes(srv):
    """(item, name, request thunk, expected status): every probe of items 1, 2 and 3 that must be refused."""
    real, free = srv.labelled[0], srv.unlabelled[0]
    shape = real.load_mask().shape
    victim = str(srv.parent / "victim")
    u = srv.url
    return [
        ("1", "PUT image ?image=<abs path> (txt)", lambda: requests.put(
            f"{u}/datastore/image", params={"image": victim}, files={"file": ("victim.txt", b"x")}, timeout=60), 400),
        ("1", "PUT image ?image=<abs path> (png)", lambda: requests.put(
            f"{u}/datastore/image", params={"image": victim}, files={"file": ("victim.png", png_bytes(np.ones((8, 8))))},
            timeout=60), 400),
        ("1", "PUT image ?image=../escape", lambda: requests.put(
            f"{u}/datastore/image", params={"image": "../escape"}, files={"file": ("e.png", png_bytes(np.ones((8, 8))))},
            timeout=60), 400),
        ("1", "DELETE image ?id=<abs path>", lambda: requests.delete(
            f"{u}/datastore/image", params={"id": victim}, timeout=60), 400),
        ("1", "DELETE image ?id=../victim", lambda: requests.delete(
            f"{u}/datastore/image", params={"id": "../victim"}, timeout=60), 400),
        ("1", "PUT label tag=../../escape_tag", lambda: put_label(
            srv, free.image_id, "l.png", png_bytes(np.zeros(shape)), tag="../../escape_tag"), 400),
        ("1", "PUT label image=../victim", lambda: put_label(srv, "../victim", "l.png", png_bytes(np.zeros(shape))), 400),
        ("1", "DELETE label tag=../final", lambda: requests.delete(
            f"{u}/datastore/label", params={"id": real.image_id, "tag": "../final"}, timeout=60), 400),
        ("1", "GET image ?image=../victim.txt", lambda: requests.get(
            f"{u}/datastore/image", params={"image": "../victim.txt"}, timeout=60), 404),
        ("1", "GET label ?label=../../victim&tag=..", lambda: requests.get(
            f"{u}/datastore/label", params={"label": "../../victim", "tag": ".."}, timeout=60), 404),
        ("1", "infer label_tag=../../escape_infer save_label", lambda: infer(
            srv, free.image_id, {"box": [0, 0, 120, 120], "label_tag": "../../escape_infer", "save_label": True}),
         422),
        ("2", "infer label_tag=final save_label", lambda: infer(
            srv, real.image_id, {"box": [0, 0, 120, 120], "label_tag": "final", "save_label": True}), 403),
        ("2", "infer label_tag=final save_label='false'", lambda: infer(
            srv, real.image_id, {"box": [0, 0, 120, 120], "label_tag": "final", "save_label": "false"}), 403),
        ("2", "DELETE final label (no force)", lambda: requests.delete(
            f"{u}/datastore/label", params={"id": real.image_id, "tag": "final"}, timeout=60), 409),
        ("2", "DELETE image with final label (no force)", lambda: requests.delete(
            f"{u}/datastore/image", params={"id": real.image_id}, timeout=60), 409),
        ("2", "PUT final label over a final one (no force)", lambda: put_label(
            srv, real.image_id, "l.png", png_bytes(np.zeros(shape))), 409),
        ("2", "PUT image over an existing one (no force)", lambda: requests.put(
            f"{u}/datastore/image", params={"image": real.image_id}, files={"file": ("x.png", png_bytes(np.ones(shape)))},
            timeout=60), 409),
        ("2", "PUT image/info synthetic=true", lambda: requests.put(
            f"{u}/datastore/image/info", params={"image": srv.labelled[1].image_id},
            data={"info": json.dumps({"synthetic": True})}, timeout=60), 422),
        ("2", "PUT image/info provenance", lambda: requests.put(
            f"{u}/datastore/image/info", params={"image": srv.labelled[1].image_id},
            data={"info": json.dumps({"provenance": {"scheme": "x"}})}, timeout=60), 422),
        ("2", "PUT image ?image=synthetic_x", lambda: requests.put(
            f"{u}/datastore/image", params={"image": "synthetic_x"}, files={"file": ("s.png", png_bytes(np.ones(shape)))},
            timeout=60), 422),
        ("2", "PUT image params synthetic=true", lambda: requests.put(
            f"{u}/datastore/image", params={"image": "new_img"}, files={"file": ("s.png", png_bytes(np.ones(shape)))},
            data={"params": json.dumps({"synthetic": True})}, timeout=60), 422),
        ("3", "PUT 100x100 PNG as final label", lambda: put_label(
            srv, free.image_id, "l.png", png_bytes(np.ones((100, 100)))), 422),
        ("3", "PUT text file as final label", lambda: put_label(srv, free.image_id, "l.png", b"not an image"), 422),
        ("3", "PUT .txt file as final label", lambda: put_label(srv, free.image_id, "l.txt", b"not an image"), 422),
        ("3", "PUT label with values {0, 7}", lambda: put_label(
            srv, free.image_id, "l.png", png_bytes(np.where(np.arange(shape[1]) % 2, 7, 0)[None].repeat(shape[0], 0))),
         422),
        ("3", "PUT RGB label", lambda: put_label(
            srv, free.image_id, "l.png", png_bytes(np.zeros((*shape, 3)))), 422),
        ("3", "PUT empty label file", lambda: put_label(srv, free.image_id, "l.png", b""), 422),
    ]


def test_probes_are_refused_and_change_nothing(srv):
    labels_before = final_labels(srv)
    objects_before = set(requests.get(f"{srv.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"])
    table = []
    for item, name, call, expected in probes(srv):
        resp = call()
        table.append(f"{item:>2} {name:<48} {resp.status_code}")
        assert resp.status_code == expected, f"{name}: {resp.status_code} {resp.text[:300]}"
        assert resp.json().get("detail"), f"{name}: a refusal says why"
        assert final_labels(srv) == labels_before, f"{name} changed a final label"
        assert tree_hashes(srv.parent, skip=srv.studies) == srv.outside_before, f"{name} wrote outside the datastore"
    print("\n" + "\n".join(table))
    objects = requests.get(f"{srv.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    assert set(objects) == objects_before
    assert not any("synthetic" in o["image"]["info"] for o in objects.values())
    assert srv.alive()


def test_forced_replace_and_delete_keep_history(srv):
    real = srv.labelled[0]
    label_file = srv.studies / "labels" / "final" / f"{real.image_id}.png"
    original = label_file.read_bytes()
    edited = (real.load_mask() > 0).astype(np.uint8)
    edited[: edited.shape[0] // 2] = 0

    resp = put_label(srv, real.image_id, "l.png", png_bytes(edited * 255), force="true")
    assert resp.status_code == 200, resp.text
    assert np.array_equal(np.array(Image.open(label_file)) > 0, edited > 0)
    history = requests.get(f"{srv.url}/datastore/label/history", params={"label": real.image_id}, timeout=30).json()
    assert len(history) == 1
    kept = srv.studies / "labels" / "final" / ".history" / real.image_id / history[0]["version"]
    assert kept.read_bytes() == original

    resp = requests.post(f"{srv.url}/datastore/label/restore",
                         params={"label": real.image_id, "version": history[0]["version"]}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert label_file.read_bytes() == original  # undone

    resp = requests.delete(f"{srv.url}/datastore/label", params={"id": real.image_id, "tag": "final", "force": "true"},
                           timeout=30)
    assert resp.status_code == 200, resp.text
    assert not label_file.exists()
    history = requests.get(f"{srv.url}/datastore/label/history", params={"label": real.image_id}, timeout=30).json()
    deleted = [h for h in history
               if (srv.studies / "labels/final/.history" / real.image_id / h["version"]).read_bytes() == original]
    assert deleted, "the deleted final label is in the history"
    resp = requests.post(f"{srv.url}/datastore/label/restore",
                         params={"label": real.image_id, "version": deleted[-1]["version"]}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert label_file.read_bytes() == original
    got = requests.get(f"{srv.url}/datastore/label", params={"label": real.image_id, "tag": "final"}, timeout=30)
    assert got.status_code == 200 and got.content == original
    assert tree_hashes(srv.parent, skip=srv.studies) == srv.outside_before


def test_valid_labels_are_accepted(srv):
    """0/255 PNG and Slicer's (1, H, W) NRRD labelmap on unlabelled images: 200, stored inside the datastore."""
    import itk

    a, b = srv.unlabelled
    mask_a = (a.load_mask() > 0).astype(np.uint8)
    resp = put_label(srv, a.image_id, "l.png", png_bytes(mask_a * 255), params={"label_info": [{"name": "fetal_head"}]})
    assert resp.status_code == 200, resp.text
    nrrd = srv.parent.parent / "slicer_label.nrrd"
    itk.imwrite(itk.image_from_array((b.load_mask() > 0).astype(np.uint8)[None]), str(nrrd), compression=True)
    resp = put_label(srv, b.image_id, "label.nrrd", nrrd.read_bytes())
    assert resp.status_code == 200, resp.text
    assert (srv.studies / "labels" / "final" / f"{b.image_id}.nrrd").is_file()
    # a file name with a path in it lands inside the datastore under its base name (documented 200)
    resp = requests.put(f"{srv.url}/datastore/image", files={"file": ("../../escape2.png", png_bytes(np.ones((60, 80))))},
                        timeout=60)
    assert resp.status_code == 200 and resp.json()["image"] == "escape2", resp.text
    assert (srv.studies / "escape2.png").is_file()
    assert tree_hashes(srv.parent, skip=srv.studies) == srv.outside_before
    assert not list(srv.studies.rglob(".tmp-*")), "no temporary file left in the datastore"


def test_purge_after_synthetic_probe_keeps_real_images(srv):
    """The synthesis task's purge (a MONAI Label training subprocess) removes nothing real."""
    labels_before = final_labels(srv)
    images_before = sorted(p.name for p in srv.studies.glob("*.png"))
    resp = requests.post(f"{srv.url}/train/fetal_head_synthesis", json={"purge": True}, timeout=60)
    assert resp.status_code == 200, resp.text
    deadline = time.time() + 120
    while time.time() < deadline:
        task = requests.get(f"{srv.url}/train/", timeout=30).json()
        if task.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        time.sleep(1)
    assert task.get("status") == "DONE", task
    assert sorted(p.name for p in srv.studies.glob("*.png")) == images_before
    assert final_labels(srv) == labels_before
    assert tree_hashes(srv.parent, skip=srv.studies) == srv.outside_before
