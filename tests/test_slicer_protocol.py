"""The 3D Slicer MONAI Label module's session, replayed against a real server with MONAI Label's own client.

3D Slicer cannot be installed here. Its MONAI Label module talks to the server only through `MONAILabelClient`
(plugins/slicer/MONAILabel/MONAILabelLib/client.py in Project-MONAI/MONAILabel); the pip package ships the same client
as `monailabel.client.MONAILabelClient`: the same selectors, JSON bodies and multipart fields (the pip copy adds
optional auth headers, empty when auth is off). So these tests use that client, with the parameters the module's
buttons send (MONAILabel.py):

- refresh: GET /info/ (models by type: `deepgrow` -> SmartEdit, `segmentation` -> Auto Segmentation)
- Next Sample: POST /activelearning/<strategy> with the strategy's config (+ client_id); the module then loads
  `sample["path"]` if that file exists locally, else downloads GET /datastore/image?image=<id>
- SmartEdit (deepgrow, 2D model): {"label", "foreground": [[i, j, k]], "background": [...], **model config}; a
  Slicer ROI is sent as "roi": [i_min, i_max, j_min, j_max, k_min, k_max] (getROIPointsXYZ)
- Submit Label: PUT /datastore/label?image=<id> with the segmentation exported as a labelmap .nrrd (the module's
  default file extension) and params {"label_info": [{"name", "idx"}]}; no tag, so the final label
- Train: POST /train/<model> with the trainer's config from /info/ (as edited in the module's options table);
  the module then polls GET /train/ and re-reads /info/ for the model.

Test 1 runs the whole session on a PNG datastore (HC18 images), test 2 and 3 on DICOM ultrasound in a real Orthanc.
"""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import Server, dice, make_app_copy, test_split

CLIENT_ID = "user-xyz"  # what the Slicer module sends when no client id is configured (MONAILabelLogic.setClientId)
SLICER_LABEL_INFO = [{"name": "fetal_head", "idx": 1}]


def slicer_client(server, tmp: Path):
    from monailabel.client import MONAILabelClient

    tmpdir = tmp / "slicer-monai-label"
    tmpdir.mkdir(exist_ok=True)
    return MONAILabelClient(server.url, tmpdir=str(tmpdir), client_id=CLIENT_ID)


def model_config(info, model):
    """getParamsFromConfig("infer", model): the model's config values shown in the module's options table."""
    return dict(info["models"][model].get("config", {}))


def centroid_click(mask):
    rows, cols = np.nonzero(mask)
    return [int(round(cols.mean())), int(round(rows.mean())), 0]  # IJK of a 2D image: i = column, j = row, k = 0


def slicer_roi(mask, margin=10):
    rows, cols = np.nonzero(mask)
    return [int(cols.min() - margin), int(cols.max() + margin), int(rows.min() - margin), int(rows.max() + margin), 0, 0]


def read_result(path) -> np.ndarray:
    """The infer answer as Slicer reads it (SimpleITK/ITK): a 2D label image."""
    import itk

    return np.squeeze(np.asarray(itk.array_from_image(itk.imread(str(path)))))


def slicer_labelmap_nrrd(mask: np.ndarray, path: Path) -> str:
    """What Submit Label uploads: the segment exported to a labelmap volume (1 slice for a 2D image), saved as .nrrd."""
    import itk

    image = itk.image_from_array((mask > 0).astype(np.uint8)[None])  # (k, j, i) = (1, rows, columns)
    itk.imwrite(image, str(path), compression=True)
    return str(path)


def wait_for_training(client, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.train_status()
        if status.get("status") in ("DONE", "ERROR", "STOPPED"):
            return status
        time.sleep(1)
    raise TimeoutError("training did not finish")


# ---- PNG datastore ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def png_server(tmp_path_factory, hc18):
    from fetal_head.io.hc18 import import_cases

    tmp = tmp_path_factory.mktemp("slicer_png")
    studies = tmp / "studies"
    labelled = test_split(hc18, "pool", 2, seed=11)
    unlabelled = test_split(hc18, "test", 2, seed=12)
    import_cases(labelled, str(studies), with_labels=True)
    import_cases(unlabelled, str(studies), with_labels=False)
    app = make_app_copy(tmp)
    srv = Server(studies, app, tmp / "server.log")
    srv.tmp, srv.app, srv.labelled, srv.unlabelled = tmp, app, labelled, unlabelled
    yield srv
    srv.stop()


def test_slicer_session_on_png_datastore(png_server):
    srv = png_server
    client = slicer_client(srv, srv.tmp)

    # refresh: what the module fills its selectors from
    info = client.info()
    assert "fetal_head" in info["labels"]
    smartedit = [m for m, v in info["models"].items() if v["type"] == "deepgrow"]
    auto = [m for m, v in info["models"].items() if v["type"] == "segmentation"]
    assert "fetal_head_sam" in smartedit and "fetal_head_auto" in auto
    assert info["models"]["fetal_head_sam"]["dimension"] == 2  # -> the module sends the clicked slice's points only
    assert "first" in info["strategies"] and "fetal_head_sam" in info["trainers"]
    assert info["datastore"]["total"] == 4 and info["datastore"]["completed"] == 2

    # Next Sample ("first"): an unlabelled image the module can load
    sample = client.next_sample("first", {})
    by_id = {c.image_id: c for c in srv.unlabelled}
    assert sample["id"] in by_id
    case = by_id[sample["id"]]
    assert os.path.isfile(sample["path"])  # Slicer on the server's machine loads this file
    download = requests.get(f"{srv.url}/datastore/image", params={"image": sample["id"]}, timeout=60)
    assert download.status_code == 200  # Slicer elsewhere downloads it
    with open(case.image_path, "rb") as f:
        assert download.content == f.read()
    ref = case.load_mask()

    # SmartEdit: one foreground click on the head
    params = {"label": "fetal_head", "foreground": [centroid_click(ref)], "background": [],
              **model_config(info, "fetal_head_sam")}
    result_file, result = client.infer("fetal_head_sam", sample["id"], params)
    click_mask = read_result(result_file)
    assert click_mask.shape == ref.shape
    assert result["label_names"] == {"fetal_head": 1}  # the module names the segment from this
    click_dice = dice(click_mask, ref)

    # SmartEdit with a Slicer ROI (box) around the head
    params = {"label": "fetal_head", "roi": slicer_roi(ref), **model_config(info, "fetal_head_sam")}
    result_file, result = client.infer("fetal_head_sam", sample["id"], params)
    roi_mask = read_result(result_file)
    roi_dice = dice(roi_mask, ref)
    assert result["prompt_mode"] == "box"
    assert result["biometry"]["hc_mm"] == pytest.approx(case.hc_mm, abs=10)
    print(f"Slicer requests on {case.image_id}: click Dice {click_dice:.3f}, ROI Dice {roi_dice:.3f}, "
          f"HC {result['biometry']['hc_mm']:.1f} mm (reference {case.hc_mm:.1f} mm)")
    assert click_dice >= 0.85
    assert roi_dice >= 0.9

    # Submit Label: the accepted ROI result as Slicer exports it (.nrrd labelmap), final
    label_file = slicer_labelmap_nrrd(roi_mask, srv.tmp / "label.nrrd")
    client.save_label(sample["id"], label_file, params={"label_info": SLICER_LABEL_INFO})
    objects = client.datastore()["objects"]
    assert "final" in objects[sample["id"]]["labels"]
    assert client.info()["datastore"]["completed"] == 3
    assert np.array_equal(read_result(client.download_label(sample["id"], "final")) > 0, roi_mask > 0)
    assert client.next_sample("first", {})["id"] != sample["id"]  # active learning moves on

    # Train: the trainer's options from /info/, one epoch, then the module's status polling
    before = info["models"]["fetal_head_sam"]["model_version"]
    # (the head localiser, on by default, trains too: fewer steps keep this protocol test short; the head verifier,
    # ~5 s a label, is left to tests/test_localiser.py and the training test)
    options = {**info["trainers"]["fetal_head_sam"]["config"], "max_epochs": 1, "train_batch_size": 2,
               "localiser_steps": 30, "head_verifier": False}
    started = client.train_start("fetal_head_sam", options)
    assert started.get("status") in ("SUBMITTED", "RUNNING", "DONE"), started
    status = wait_for_training(client)
    assert status["status"] == "DONE", "\n".join(status.get("details", [])[-30:])
    assert not client.train_status(check_if_running=True)
    after = client.info()["models"]["fetal_head_sam"]["model_version"]
    assert after != before and after.startswith("finetuned:")
    meta = json.loads((srv.app / "model" / "fetal_head_sam.json").read_text())
    used = set(meta["labels_used"]) | set(meta.get("validation_images", []))
    assert used == {c.image_id for c in srv.labelled} | {sample["id"]}  # the label submitted from Slicer counted
    assert meta["localiser"]["replaced"], meta["localiser"]  # the default recipe's localiser, below 10 labels
    # the new model answers the next SmartEdit request
    _, result = client.infer("fetal_head_sam", sample["id"], {"label": "fetal_head", "roi": slicer_roi(ref)})
    assert result["model_version"] == after


# ---- DICOM ultrasound in a PACS (Orthanc, DICOMweb) -------------------------------------------------------------
@pytest.fixture(scope="module")
def dicom_server(tmp_path_factory, hc18):
    from fetal_head.io.dicom_us import write_ultrasound
    from orthanc_server import pacs_with_app_server

    tmp = tmp_path_factory.mktemp("slicer_dicom")
    cases = test_split(hc18, "test", 2, seed=13)
    files, series = [], {}
    for case in cases:
        path = tmp / f"{case.image_id}.dcm"
        ds = write_ultrasound(path, np.array(Image.open(case.image_path).convert("L")), case.pixel_size_mm,
                              patient_id=case.image_id, patient_name=f"HC18^{case.image_id}",
                              study_description="Fetal head HC18")
        files.append(path)
        series[str(ds.SeriesInstanceUID)] = case
    with pacs_with_app_server(tmp, files) as (orthanc, srv):  # no Orthanc: fails naming the install script
        srv.tmp, srv.orthanc, srv.series = tmp, orthanc, series
        yield srv


def test_slicer_smartedit_and_submit_label_on_dicom_ultrasound(dicom_server):
    srv = dicom_server
    client = slicer_client(srv, srv.tmp)
    info = client.info()
    assert info["datastore"]["total"] == 2
    sample = client.next_sample("first", {})
    assert sample["id"] in srv.series  # the image id is the SeriesInstanceUID
    case = srv.series[sample["id"]]
    ref = case.load_mask()

    params = {"label": "fetal_head", "roi": slicer_roi(ref), **model_config(info, "fetal_head_sam")}
    result_file, result = client.infer("fetal_head_sam", sample["id"], params)
    mask = read_result(result_file)
    assert mask.shape == ref.shape
    d = dice(mask, ref)
    # the pixel size comes from the DICOM's ultrasound region calibration
    assert result["biometry"]["pixel_size_mm"][0] == pytest.approx(case.pixel_size_mm, rel=1e-3)
    print(f"Slicer ROI on DICOM {case.image_id}: Dice {d:.3f}, HC {result['biometry']['hc_mm']:.1f} mm "
          f"(reference {case.hc_mm:.1f} mm)")
    assert d >= 0.9

    params = {"label": "fetal_head", "foreground": [centroid_click(ref)], "background": [],
              **model_config(info, "fetal_head_sam")}
    result_file, _ = client.infer("fetal_head_sam", sample["id"], params)
    assert dice(read_result(result_file), ref) >= 0.85

    n_before = len(srv.orthanc.instances())
    client.save_label(sample["id"], slicer_labelmap_nrrd(mask, srv.tmp / "label.nrrd"),
                      params={"label_info": SLICER_LABEL_INFO})
    assert "final" in client.datastore()["objects"][sample["id"]]["labels"]
    assert client.info()["datastore"]["completed"] == 1
    assert len(srv.orthanc.instances()) == n_before + 1  # the label went to the PACS (a DICOM SEG)
    assert np.array_equal(read_result(client.download_label(sample["id"], "final")) > 0, mask > 0)
    assert client.next_sample("first", {})["id"] != sample["id"]


def test_slicer_next_sample_image_can_be_loaded_from_dicom_datastore(dicom_server):
    """After Next Sample the module loads `sample["path"]` with slicer.util.loadVolume when that file exists on its
    machine, else downloads GET /datastore/image?image=<id>: Slicer needs a file (not a folder) or the download."""
    srv = dicom_server
    client = slicer_client(srv, srv.tmp)
    sample = client.next_sample("random", {})
    case = srv.series[sample["id"]]
    local = sample.get("path")
    download = requests.get(f"{srv.url}/datastore/image", params={"image": sample["id"]}, timeout=60)
    assert (local and os.path.isfile(local)) or download.status_code == 200, \
        f"path {local!r} is not a file and GET /datastore/image answered {download.status_code} {download.text[:200]}"
    assert download.status_code == 200, download.text[:300]  # Slicer on another machine
    from fetal_head.io import read_image

    path = srv.tmp / "downloaded_image"
    path.write_bytes(download.content)
    assert np.array_equal(read_image(str(path)), np.array(Image.open(case.image_path).convert("L")))
