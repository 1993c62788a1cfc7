"""Hostile input through the real server (issue 11, items 4, 5, 7): every probe gets a 4xx with a message (or a
documented 200), no upload is left in the temp folder, and the server still answers ``/info/`` afterwards. Plus
the DICOM multi-region and per-frame calibration rules (unit tests, no server).

Documented 200: ``foreground: [400, 350]`` (a flat point without k) is one click, as ``[[400, 350]]``.
"""

import io
import json
import os
import struct
import time
import zlib

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

from conftest import Server, make_app_copy, test_split

N_IMAGES = 3


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height 8-bit gray pixels, with a tiny (truncated) image stream: what
    a decompression bomb looks like to a reader that checks the header (875 KB in the issue; a few bytes here)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def server(tmp_path_factory, hc18):
    from fetal_head.io.hc18 import import_cases

    tmp = tmp_path_factory.mktemp("robust")
    cases = test_split(hc18, "test", N_IMAGES, seed=3)
    studies = tmp / "studies"
    import_cases(cases, str(studies), with_labels=True)
    server_tmp = tmp / "server_tmp"  # the server's temp folder: uploads must not stay there
    server_tmp.mkdir()
    srv = Server(studies, make_app_copy(tmp), tmp / "server.log", env={"TMPDIR": str(server_tmp)})
    srv.cases, srv.tmp = cases, server_tmp
    yield srv
    srv.stop()


def leftover_uploads(server):
    return [os.path.join(r, f) for r, _, files in os.walk(server.tmp) for f in files
            if "fetal_head_uploads_" in r]


def post_infer(server, params=None, image=None, files=None, model="fetal_head_sam", raw_params=None):
    data = {"params": raw_params if raw_params is not None else json.dumps(params or {})}
    query = {"output": "json"}
    if image is not None:
        query["image"] = image
    return requests.post(f"{server.url}/infer/{model}", params=query, data=data, files=files, timeout=300)


def png_bytes(shape=(120, 160)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


INFER_PROBES = {
    # name: (kwargs for post_infer except server, expected status)
    "30000x30000 png (decompression bomb)": (dict(files={"file": ("bomb.png", png_header_only(30000, 30000))}), 413),
    "pixel_size_mm 1e308": (dict(params={"box": [100, 100, 300, 300], "pixel_size_mm": 1e308}), 422),
    "pixel_size_mm negative": (dict(params={"pixel_size_mm": -0.1}), 422),
    "image_array in params": (dict(params={"image_array": [[0, 1], [1, 0]]}), 422),
    "image path in params": (dict(params={"image": "/etc/hostname"}), 422),
    "label path in params": (dict(params={"label": "/etc/hostname"}), 422),
    "session in params": (dict(params={"session": {"image": "/etc/hostname"}}), 422),
    "malformed json params": (dict(raw_params="{not json"), 422),
    "non-object json params (list)": (dict(raw_params="[1, 2, 3]"), 422),
    "non-object json params (string)": (dict(raw_params='"box"'), 422),
    "empty file upload": (dict(files={"file": ("empty.png", b"")}), 422),
    "text file upload": (dict(files={"file": ("notes.png", b"hello, not an image")}), 422),
    "no image, no file": (dict(image=None), 422),
    "unknown model": (dict(model="no_such_model"), 404),
    "foreground as a flat list of 4": (dict(params={"foreground": [1, 2, 3, 4]}), 422),
    "box of strings": (dict(params={"box": ["a", "b", "c", "d"]}), 422),
    "frame not a number": (dict(params={"frame": "abc"}), 422),
    "result_extension .exe": (dict(params={"result_extension": ".exe"}), 422),
    "mask_shape triangle": (dict(params={"mask_shape": "triangle"}), 422),
    "server file as image id": (dict(image="/etc/hostname"), 404),
}


@pytest.mark.parametrize("name", list(INFER_PROBES))
def test_bad_infer_input_is_a_4xx_with_a_message(server, name):
    kwargs, expected = INFER_PROBES[name]
    kwargs = dict(kwargs)
    if "image" not in kwargs and "files" not in kwargs:
        kwargs["image"] = server.cases[0].image_id
    resp = post_infer(server, **kwargs)
    assert resp.status_code == expected, f"{name}: {resp.status_code} {resp.text[:300]}"
    detail = resp.json().get("detail")
    assert detail and isinstance(detail, str), resp.text
    assert requests.get(f"{server.url}/info/", timeout=10).ok
    assert not leftover_uploads(server), leftover_uploads(server)


def test_flat_foreground_point_is_one_click(server):
    """Documented 200: ``foreground: [i, j]`` without k is one click (as ``[[i, j]]``)."""
    case = server.cases[0]
    a = post_infer(server, {"foreground": [400, 350], "label": "fetal_head"}, image=case.image_id)  # Slicer's label
    b = post_infer(server, {"foreground": [[400, 350]]}, image=case.image_id)
    assert a.status_code == 200 and b.status_code == 200, a.text
    assert a.json()["prompt_mode"] == "clicks" and a.json()["biometry"] == b.json()["biometry"]


def test_uploads_are_removed_and_only_current_uploads_are_read(server):
    # an accepted upload, and a rejected one: neither stays in the temp folder
    ok = post_infer(server, {"box": [10, 10, 100, 100]}, files={"file": ("frame.png", png_bytes())})
    assert ok.status_code == 200, ok.text
    bad = post_infer(server, {"pixel_size_mm": 1e308}, files={"file": ("frame.png", png_bytes())})
    assert bad.status_code == 422
    assert not leftover_uploads(server)
    # a file lying in the server's temp folder is not an upload of this request: 404, not read
    stray = server.tmp / "stray.png"
    stray.write_bytes(png_bytes())
    for image in (str(stray), str(server.tmp / "missing.png")):
        resp = post_infer(server, {}, image=image)
        assert resp.status_code == 404, resp.text


TRAIN_PROBES = {
    "max_epochs -1": ({"max_epochs": -1}, 422),
    "max_epochs 0": ({"max_epochs": 0}, 422),
    "learning_rate abc": ({"learning_rate": "abc"}, 422),
    "learning_rate nan": ({"learning_rate": "nan"}, 422),
    "val_split 2": ({"val_split": 2}, 422),
    "train_batch_size 1.5": ({"train_batch_size": 1.5}, 422),
    "train_encoder unknown": ({"train_encoder": "everything"}, 422),
    "world_size 0": ({"world_size": 0}, 422),
}


@pytest.mark.parametrize("name", list(TRAIN_PROBES))
def test_bad_train_options_are_refused_before_the_job(server, name):
    options, expected = TRAIN_PROBES[name]
    before = requests.get(f"{server.url}/train/", timeout=10)
    resp = requests.post(f"{server.url}/train/fetal_head_sam", json=options, timeout=30)
    assert resp.status_code == expected, f"{name}: {resp.status_code} {resp.text[:300]}"
    assert "train option" in resp.json()["detail"]
    after = requests.get(f"{server.url}/train/", timeout=10)
    assert after.text == before.text  # no job started
    resp = requests.post(f"{server.url}/train/fetal_head_sam", params={"run_sync": "true"}, json=options, timeout=30)
    assert resp.status_code == expected
    assert requests.get(f"{server.url}/info/", timeout=10).ok


def test_unknown_train_task_is_404(server):
    resp = requests.post(f"{server.url}/train/no_such_task", json={}, timeout=30)
    assert resp.status_code == 404 and "not found" in resp.json()["detail"]


def test_info_answers_during_sync_training(server):
    """``/train?run_sync=true`` runs off the event loop: ``/info/`` keeps answering meanwhile (polled for up to the
    first 15 s of the run), and the run then answers 200. A short run (no localiser or head verifier): a long one
    would still hold the server's shutdown when the module ends."""
    import threading

    result = {}

    def train():
        try:
            result["resp"] = requests.post(f"{server.url}/train/fetal_head_sam", params={"run_sync": "true"},
                                           json={"max_epochs": 2, "automatic_head": False, "localiser": False,
                                                 "head_verifier": False}, timeout=900)
        except requests.RequestException as e:
            result["error"] = e

    t = threading.Thread(target=train, daemon=True)
    t.start()
    time.sleep(1.0)
    times, t_end = [], time.time() + 15
    while time.time() < t_end and t.is_alive():
        t0 = time.time()
        assert requests.get(f"{server.url}/info/", timeout=10).ok
        times.append(time.time() - t0)
        time.sleep(0.2)
    assert len(times) >= 5 and max(times) < 2.0, times
    t.join(timeout=600)
    assert result.get("resp") is not None and result["resp"].status_code == 200, result


def test_zero_step_training_never_replaces_the_served_model(tmp_path, monkeypatch):
    """A run that trained nothing returns 'skipped' and writes no checkpoint."""
    import sys

    from conftest import APP_DIR

    monkeypatch.syspath_prepend(str(APP_DIR))  # `lib.` imports, as MONAI Label loads the app
    sys.modules.pop("lib", None)
    import lib.trainers.sam_train as st

    monkeypatch.setattr(st, "finetune", lambda *a, **k: {"history": [], "train_images": [], "val_images": [],
                                                        "best_epoch": 0, "best": {}, "before": {}, "config": {}})
    saved = []
    monkeypatch.setattr(st, "save_finetuned", lambda *a, **k: saved.append(a))

    class Source:
        model_dir = str(tmp_path)
        finetuned_path = str(tmp_path / "finetuned.pt")

        def version(self):
            return "base"

        def load(self):
            return object()

    class Store:
        def get_labeled_images(self, tag):
            return []

        def list_images(self):  # the unlabelled images the localiser's self-training would draw from
            return []

    task = st.FetalHeadSamTrain.__new__(st.FetalHeadSamTrain)
    task.source, task.cache_dir = Source(), str(tmp_path)
    out = task({"model": "fetal_head_sam", "max_epochs": 1}, Store())
    assert "skipped" in out and not saved and not os.path.exists(Source.finetuned_path)


# ---- DICOM: several ultrasound regions, per-frame calibration --------------------------------------------------
def _region(x0, y0, x1, y1, delta_cm, data_type=1):
    r = pydicom.Dataset()
    r.RegionSpatialFormat, r.RegionDataType, r.RegionFlags = 1, data_type, 0
    r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x0, y0, x1, y1
    r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = 3
    r.PhysicalDeltaX = r.PhysicalDeltaY = delta_cm
    return r


@pytest.fixture
def us_file(tmp_path):
    from fetal_head.io.dicom_us import write_ultrasound

    gray = np.random.default_rng(1).integers(0, 255, (200, 300), dtype=np.uint8)
    path = tmp_path / "us.dcm"
    write_ultrasound(path, gray, 0.1)

    def with_regions(*regions, name="r.dcm"):
        ds = pydicom.dcmread(path)
        ds.SequenceOfUltrasoundRegions = list(regions)
        ds.save_as(tmp_path / name)
        return tmp_path / name

    return with_regions


def test_dicom_bmode_region_wins_over_doppler(us_file):
    from fetal_head.io.dicom_us import read_ultrasound

    # a Doppler strip (RegionDataType 3, PW) larger and over the centre, the B-mode image on the left
    path = us_file(_region(0, 0, 149, 199, 0.02, data_type=1), _region(0, 80, 299, 199, 0.5, data_type=3))
    us = read_ultrasound(path)
    assert us.pixel_size_mm == pytest.approx(0.2)
    assert "B-mode" in us.calibration_note and "non-tissue" in us.calibration_note
    assert "warning" not in us.calibration_note


def test_dicom_region_containing_the_head(us_file):
    from fetal_head.io.dicom_us import read_ultrasound

    # a dual view: two B-mode regions side by side with different depths (calibrations)
    path = us_file(_region(0, 0, 149, 199, 0.02), _region(150, 0, 299, 199, 0.03))
    assert read_ultrasound(path, head_xy=(40, 100)).pixel_size_mm == pytest.approx(0.2)
    assert read_ultrasound(path, head_xy=(250, 100)).pixel_size_mm == pytest.approx(0.3)


def test_dicom_ambiguous_regions_warn(us_file, caplog):
    from fetal_head.io.dicom_us import read_ultrasound

    # overlapping B-mode regions with different calibrations over the head: the largest, with a warning
    path = us_file(_region(0, 0, 299, 199, 0.02), _region(100, 50, 200, 150, 0.04))
    with caplog.at_level("WARNING"):
        us = read_ultrasound(path)
    assert us.pixel_size_mm == pytest.approx(0.2)
    assert us.calibration_note.startswith("calibration warning") and "check the calibration" in us.calibration_note
    assert any("calibration" in r.message for r in caplog.records)
    # untyped regions only, several: ambiguous too
    path = us_file(_region(0, 0, 299, 199, 0.02, data_type=0), _region(0, 0, 9, 9, 0.5, data_type=0), name="u.dcm")
    assert "no region is typed as tissue" in read_ultrasound(path).calibration_note


def test_dicom_per_frame_calibration_in_cine(tmp_path):
    from fetal_head.io.dicom_us import read_ultrasound, write_ultrasound

    gray = np.random.default_rng(2).integers(0, 255, (64, 80), dtype=np.uint8)
    path = tmp_path / "cine.dcm"
    write_ultrasound(path, None, 0.1, frames=[gray, gray, gray])
    ds = pydicom.dcmread(path)
    groups = []
    for spacing in (0.1, 0.15, 0.2):  # depth changed during the clip
        measures = pydicom.Dataset()
        measures.PixelSpacing = [spacing, spacing]
        item = pydicom.Dataset()
        item.PixelMeasuresSequence = [measures]
        groups.append(item)
    ds.PerFrameFunctionalGroupsSequence = groups
    ds.save_as(path)
    for k, spacing in enumerate((0.1, 0.15, 0.2)):
        us = read_ultrasound(path, frame=k)
        assert us.pixel_size_mm == pytest.approx(spacing) and us.calibration == "PixelMeasuresSequence"
        assert f"frame {k}" in us.calibration_note


def test_dicom_pixel_limit_checked_before_decoding(tmp_path, monkeypatch):
    from fetal_head.io import common
    from fetal_head.io.dicom_us import read_ultrasound, write_ultrasound

    gray = np.zeros((64, 80), dtype=np.uint8)
    write_ultrasound(tmp_path / "a.dcm", None, 0.1, frames=[gray, gray])
    monkeypatch.setattr(common, "MAX_PIXELS", 64 * 80)  # one frame fits, the cine does not
    with pytest.raises(common.ImageTooLargeError, match="max_image_pixels"):
        read_ultrasound(tmp_path / "a.dcm")


def test_write_ultrasound_header_dataclass_and_keywords(tmp_path):
    from fetal_head.io.dicom_us import UltrasoundEncoding, UltrasoundHeader, read_ultrasound, write_ultrasound

    gray = np.zeros((40, 50), dtype=np.uint8)
    header = UltrasoundHeader(patient_id="P1", series_description="probe", instance_number=7)
    ds = write_ultrasound(tmp_path / "h.dcm", gray, 0.2, header=header, encoding=UltrasoundEncoding(jpeg=True))
    assert ds.PatientID == "P1" and ds.InstanceNumber == 7 and ds.LossyImageCompression == "01"
    ds = write_ultrasound(tmp_path / "k.dcm", gray, 0.2, header=header, patient_id="P2", calibrate=False)
    assert ds.PatientID == "P2" and ds.SeriesDescription == "probe"  # the keyword overrides the dataclass
    assert read_ultrasound(tmp_path / "k.dcm").calibration == "none"
    with pytest.raises(TypeError):
        write_ultrasound(tmp_path / "x.dcm", gray, 0.2, no_such_option=1)


def test_bitmap_pixel_limit_configurable(tmp_path, monkeypatch):
    from fetal_head.io import common, read_image

    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(30000, 30000))
    with pytest.raises(common.ImageTooLargeError):
        read_image(path)
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "small.png")
    monkeypatch.setattr(common, "MAX_PIXELS", 50 * 50)
    with pytest.raises(common.ImageTooLargeError, match="2500"):
        read_image(tmp_path / "small.png")
