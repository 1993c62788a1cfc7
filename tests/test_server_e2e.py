"""End to end: a real `monailabel start_server` on a datastore of HC18 test-split images, used over HTTP the way
the 3D Slicer MONAI Label module uses it (image ids, IJK `roi` and clicks, label upload)."""

import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

from conftest import REPO, Server, dice, make_app_copy, test_split
from fetal_head.biometry import head_ellipse_mask

N_IMAGES = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory, hc18):
    from fetal_head.io.hc18 import import_cases

    tmp = tmp_path_factory.mktemp("e2e")
    cases = test_split(hc18, "test", N_IMAGES, seed=1)
    studies = tmp / "studies"
    import_cases(cases, str(studies), with_labels=False)
    srv = Server(studies, make_app_copy(tmp), tmp / "server.log")
    srv.cases = cases
    yield srv
    srv.stop()


def infer(server, image_id, params, output="image", files=None, model="fetal_head_sam"):
    return requests.post(
        f"{server.url}/infer/{model}",
        params={"image": image_id, "output": output},
        data={"params": json.dumps(params)},
        files=files,
        timeout=300,
    )


def multipart(resp):
    """(mask, params) from MONAI Label's multipart answer (output=all)."""
    from requests_toolbelt.multipart import decoder

    mask, params = None, None
    for part in decoder.MultipartDecoder.from_response(resp).parts:
        disposition = part.headers.get(b"Content-Disposition", b"").decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        else:
            mask = np.array(Image.open(io.BytesIO(part.content)))
    return mask, params


def slicer_roi(mask, rng):
    """The roi the Slicer module sends: [i_min, i_max, j_min, j_max, k_min, k_max], each side jittered 0-20 px."""
    rows, cols = np.nonzero(mask)
    j = rng.integers(0, 21, size=4)
    return [int(cols.min() - j[0]), int(cols.max() + j[1]), int(rows.min() - j[2]), int(rows.max() + j[3]), 0, 0]


def test_info_names_label_tasks_and_strategies(server):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert "fetal_head" in info["labels"]
    # Slicer lists deepgrow-type models in SmartEdit (clicks) and segmentation-type ones in Auto Segmentation
    assert info["models"]["fetal_head_sam"]["type"] == "deepgrow"
    assert info["models"]["fetal_head_auto"]["type"] == "segmentation"
    assert all(m["dimension"] == 2 for m in info["models"].values())
    assert {"random", "first"} <= set(info["strategies"])
    assert not any("sam2" in name.lower() for name in info["models"])  # MONAI Label's downloading SAM2 is off
    assert info["datastore"]["total"] == N_IMAGES


def test_box_prompt_dice_and_biometry(server):
    """The default answer is the fitted head ellipse, filled; ``mask_shape: segmentation`` returns the decoder's own
    mask, whose ellipse the default answer is. The ellipse scores at least as well against the reference."""
    rng = np.random.default_rng(0)
    dices, seg_dices, hc_errors = [], [], []
    for case in server.cases:
        ref = case.load_mask()
        roi = slicer_roi(ref, rng)
        resp = infer(server, case.image_id, {"roi": roi}, output="all")
        assert resp.status_code == 200, resp.text
        mask, params = multipart(resp)
        assert mask.shape == ref.shape  # the image's own geometry
        assert set(np.unique(mask)) <= {0, 1}
        assert params["mask_shape"] == "ellipse"
        dices.append(dice(mask, ref))
        bio = params["biometry"]
        assert bio["hc_mm"] > 0 and bio["bpd_mm"] > 0 and bio["ofd_mm"] >= bio["bpd_mm"]
        assert bio["pixel_size_mm"][0] == pytest.approx(case.pixel_size_mm)
        hc_errors.append(abs(bio["hc_mm"] - case.hc_mm))
        seg_resp = infer(server, case.image_id, {"roi": roi, "mask_shape": "segmentation"}, output="all")
        seg, seg_params = multipart(seg_resp)
        assert seg_params["mask_shape"] == "segmentation" and seg_params["biometry"] == bio
        assert np.array_equal(mask.astype(bool), head_ellipse_mask(seg))
        seg_dices.append(dice(seg, ref))
    print(f"box-prompt Dice over {len(dices)} images: mean {np.mean(dices):.4f} min {np.min(dices):.4f} "
          f"(decoder's segmentation {np.mean(seg_dices):.4f}); HC MAD {np.mean(hc_errors):.2f} mm")
    assert np.mean(dices) >= 0.90
    assert np.mean(dices) >= np.mean(seg_dices)


def test_one_click_at_centroid(server):
    dices = []
    for case in server.cases:
        ref = case.load_mask()
        rows, cols = np.nonzero(ref)
        # exactly what Slicer's SmartEdit sends for a 2D model: label, IJK points, then the model's config
        params = {"label": "fetal_head", "foreground": [[int(cols.mean()), int(rows.mean()), 0]], "background": [],
                  "device": "cpu"}
        resp = infer(server, case.image_id, params)
        assert resp.status_code == 200, resp.text
        dices.append(dice(np.array(Image.open(io.BytesIO(resp.content))), ref))
    print(f"one-click Dice over {len(dices)} images: mean {np.mean(dices):.4f} min {np.min(dices):.4f}")
    assert np.mean(dices) >= 0.85


def test_automatic_mode_as_slicer_auto_segmentation(server):
    case = server.cases[0]
    resp = infer(server, case.image_id, {"device": "cpu"}, output="all", model="fetal_head_auto")
    assert resp.status_code == 200, resp.text
    mask, params = multipart(resp)
    assert params["prompt_mode"] == "automatic"
    assert params["label_names"] == {"fetal_head": 1}  # Slicer names the segment from this
    assert params["biometry"]["hc_mm"] > 0
    assert mask.shape == case.load_mask().shape


def test_repeated_prompt_reuses_the_embedding(server):
    case = server.cases[1]
    first = infer(server, case.image_id, {"box": [100, 100, 600, 450]}, output="json").json()
    again = infer(server, case.image_id, {"box": [120, 110, 620, 460]}, output="json").json()
    # a cached embedding leaves only the decoder (~40 ms on 2 cores; timings are in scripts/bench_latency.py)
    assert again["embedding_cached"] is True
    assert again["model_version"] == first["model_version"]
    never_seen = np.ascontiguousarray(np.asarray(Image.open(case.image_path).convert("L"))[::-1])  # upside down
    fresh = upload(server, "flipped.png", png_bytes(never_seen), {"box": [100, 100, 600, 450]})
    assert fresh.status_code == 200 and fresh.json()["embedding_cached"] is False  # a new image is encoded


def test_saved_label_persists_through_datastore_api(server):
    case = server.cases[2]
    label = case.load_mask().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(label).save(buf, format="PNG")
    resp = requests.put(
        f"{server.url}/datastore/label",
        params={"image": case.image_id, "tag": "final"},
        files={"label": (f"{case.image_id}.png", buf.getvalue(), "image/png")},
        data={"params": json.dumps({"label_info": [{"name": "fetal_head", "idx": 1}]})},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    got = requests.get(f"{server.url}/datastore/label", params={"label": case.image_id, "tag": "final"}, timeout=60)
    assert got.status_code == 200
    assert np.array_equal(np.array(Image.open(io.BytesIO(got.content))) > 0, label > 0)
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["datastore"]["label_tags"].get("final") == 1
    # active learning now skips the labelled image
    nxt = requests.post(f"{server.url}/activelearning/first", json={}, timeout=60).json()
    assert nxt["id"] != case.image_id


# ---- bad input: a 4xx with a message, or a correct answer for valid-but-unusual images; the server stays up ----

def png_bytes(array, **kw):
    buf = io.BytesIO()
    Image.fromarray(array, **kw).save(buf, format="PNG")
    return buf.getvalue()


def upload(server, name, content, params=None, output="json"):
    return infer(server, "", params or {}, output=output, files={"file": (name, content, "application/octet-stream")})


@pytest.fixture(scope="module")
def real_png(hc18):
    case = [c for c in hc18 if c.split == "test"][0]
    with open(case.image_path, "rb") as f:
        return f.read(), case


@pytest.mark.parametrize(
    "name, make",
    [
        ("truncated.png", lambda b: b[: len(b) // 3]),
        ("empty.png", lambda b: b""),
        ("not_an_image.png", lambda b: b"this is not an image at all" * 10),
        ("tiny.png", lambda b: png_bytes(np.zeros((1, 1), np.uint8))),
    ],
)
def test_unreadable_images_get_4xx(server, real_png, name, make):
    resp = upload(server, name, make(real_png[0]))
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.json()["detail"]
    assert server.alive()


@pytest.mark.parametrize("kind", ["uint16", "rgba", "rgb", "palette"])
def test_unusual_but_valid_images_are_segmented(server, real_png, kind):
    raw, case = real_png
    gray = np.array(Image.open(io.BytesIO(raw)))
    if kind == "uint16":
        content = png_bytes(gray.astype(np.uint16) * 257)
    elif kind == "rgba":
        content = png_bytes(np.dstack([gray, gray, gray, np.full_like(gray, 255)]))
    elif kind == "rgb":
        content = png_bytes(np.dstack([gray] * 3))
    else:
        buf = io.BytesIO()
        Image.fromarray(gray).convert("P").save(buf, format="PNG")
        content = buf.getvalue()
    ref = case.load_mask()
    rows, cols = np.nonzero(ref)
    params = {"roi": [int(cols.min()) - 10, int(cols.max()) + 10, int(rows.min()) - 10, int(rows.max()) + 10, 0, 0]}
    resp = upload(server, f"{kind}.png", content, params, output="image")
    assert resp.status_code == 200, resp.text
    mask = np.array(Image.open(io.BytesIO(resp.content)))
    assert mask.shape == ref.shape
    assert dice(mask, ref) > 0.85


@pytest.mark.parametrize(
    "params, needle",
    [
        ({"roi": [2000, 2100, 1500, 1600, 0, 0]}, "outside"),
        ({"roi": [300, 300, 200, 200, 0, 0]}, "degenerate"),
        ({"roi": ["left", 500, 150, 400, 0, 0]}, "numbers"),
        ({"roi": [1, 2, 3]}, "roi"),
        ({"foreground": [["x", "y", 0]]}, "numbers"),
        ({"foreground": [[5000, 10, 0]]}, "outside"),
        ({"box": [10, 10, "nan", 40]}, "box"),
        ({"pixel_size_mm": -1, "box": [100, 100, 400, 400]}, "pixel_size_mm"),
    ],
)
def test_bad_prompts_get_4xx(server, params, needle):
    resp = infer(server, server.cases[0].image_id, params, output="json")
    assert 400 <= resp.status_code < 500, resp.text
    assert needle in resp.json()["detail"]
    assert server.alive()


def test_unknown_image_id_is_404(server):
    resp = infer(server, "no_such_image", {"box": [1, 1, 50, 50]}, output="json")
    assert resp.status_code == 404
    assert "no_such_image" in resp.json()["detail"]
    assert server.alive()


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../etc/hostname", str(REPO / "README.md")])
def test_server_paths_are_not_image_ids(server, path):
    """`image` names a datastore image (or an upload); a path on the server's disk is never read."""
    resp = infer(server, path, {"box": [1, 1, 50, 50]}, output="json")
    assert resp.status_code == 404, resp.text
    assert "not in the datastore" in resp.json()["detail"]
    assert server.alive()


@pytest.mark.parametrize("key, value", [("automatic_agreement", "maybe"), ("embedding_cache_max_gb", "lots")])
def test_bad_conf_value_stops_the_server_with_its_name(tmp_path, hc18, key, value):
    """A mistyped ``--conf`` value is refused when the server starts, naming the option, instead of serving with a
    default the operator did not ask for."""
    from fetal_head.io.hc18 import import_cases

    studies = tmp_path / "studies"
    import_cases(test_split(hc18, "test", 1, seed=1), str(studies), with_labels=False)
    with pytest.raises(RuntimeError, match="server exited") as err:
        Server(studies, make_app_copy(tmp_path), tmp_path / "server.log", conf={key: value})
    assert key in str(err.value) and repr(value) in str(err.value)
