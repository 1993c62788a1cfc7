"""Diffusion synthesis of image-mask pairs: the MONAI Label task through a real server, quality control, the head
shape model and the realism metrics. CPU, tiny configuration (32 px, a few training steps).

The tiny generator's images are noise-like, so the server test runs with ``qc="shape-only"``: the shape gate is
passed deterministically by the mask-conditioned scheme (its masks are shape-model ellipses), the SAM agreement
gate would reject every pair. The SAM gate itself is tested on real and broken pairs below.
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import Server, make_app_copy, test_split

TASK = "fetal_head_synthesis"
TINY = {"scheme": "mask_conditioned", "config": "tiny", "max_steps": 20, "num_pairs": 4, "seed": 7, "qc": "shape-only"}


# ---- through the server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, hc18):
    from fetal_head.io.hc18 import import_cases

    tmp = tmp_path_factory.mktemp("synthesis")
    studies = tmp / "studies"
    import_cases(test_split(hc18, "pool", 8, seed=3), str(studies))
    srv = Server(studies, make_app_copy(tmp), tmp / "server.log")
    srv.studies = studies
    yield srv
    srv.stop()


def run_task(server, options, timeout=600):
    resp = requests.post(f"{server.url}/train/{TASK}", json=options, timeout=60)
    assert resp.status_code == 200, resp.text
    deadline = time.time() + timeout
    while time.time() < deadline:
        task = requests.get(f"{server.url}/train/", timeout=30).json()
        if task["status"] in ("DONE", "ERROR", "STOPPED"):
            assert task["status"] == "DONE", "\n".join(task.get("details", []))
            return task
        time.sleep(1)
    pytest.fail("synthesis task did not finish")


def datastore_objects(studies: Path) -> dict:
    # The task runs in a subprocess (MONAI Label's background training) that writes datastore_v2.json; the
    # server's own in-memory datastore does not reload it (auto-reload is off in tests), so read the file.
    return json.loads((studies / "datastore_v2.json").read_text())["objects"]


def real_files(studies: Path) -> list:
    return sorted(p for p in list(studies.glob("*.png")) + list((studies / "labels").rglob("*.png"))
                  if not p.name.startswith("synthetic_"))


def test_task_is_listed(server):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert TASK in info["trainers"]
    assert info["trainers"][TASK]["config"]["scheme"] == "mask_conditioned"


def test_synthesis_task_adds_pairs_then_purges_only_synthetic(server):
    from fetal_head.synthesis.quality import check_shape
    from fetal_head.synthesis.store import file_hashes
    from PIL import Image

    studies = server.studies
    real_before = file_hashes(real_files(studies))
    assert len(real_before) == 16  # 8 images + 8 final labels

    run_task(server, TINY)
    objects = datastore_objects(studies)
    synthetic = {k: v for k, v in objects.items() if v["image"]["info"].get("synthetic")}
    assert sorted(synthetic) == [f"synthetic_mask_conditioned_7_{i}" for i in range(4)]
    for image_id, obj in synthetic.items():
        prov = obj["image"]["info"]["provenance"]
        assert prov["scheme"] == "mask_conditioned" and prov["seed"] == 7 and prov["sampler"] == "ddim"
        assert len(prov["generator_version"]) == 16 and prov["steps"] > 0 and prov["created"]
        assert "final" in obj["labels"]
        image = np.array(Image.open(studies / f"{image_id}.png"))
        label = np.array(Image.open(studies / "labels" / "final" / f"{image_id}.png"))
        assert image.shape == label.shape == (540, 800) and image.dtype == np.uint8
        assert set(np.unique(label)) == {0, 1}  # MONAI Label's label-index convention, as the real labels
        assert check_shape(label).accepted
    assert file_hashes(real_files(studies)) == real_before  # real images and labels byte-identical

    # a second run with the same seed continues the numbering: nothing is overwritten
    synthetic_before = file_hashes(sorted(studies.glob("synthetic_*.png")))
    run_task(server, {**TINY, "num_pairs": 2})
    ids = sorted(k for k in datastore_objects(studies) if k.startswith("synthetic_"))
    assert ids == sorted(f"synthetic_mask_conditioned_7_{i}" for i in range(6))
    assert {p: h for p, h in file_hashes(sorted(studies.glob("synthetic_*.png"))).items() if p in synthetic_before} == synthetic_before

    run_task(server, {"purge": True})
    objects = datastore_objects(studies)
    assert not [k for k in objects if k.startswith("synthetic_")]
    assert len(objects) == 8 and all("final" in o["labels"] for o in objects.values())
    assert not list(studies.rglob("synthetic_*"))
    assert file_hashes(real_files(studies)) == real_before


# ---- generator: resume, both schemes, both samplers --------------------------------------------------------------

def test_training_resumes_and_both_schemes_sample_pairs(tmp_path, hc18):
    import torch
    from fetal_head.synthesis.diffusion import load_checkpoint, make_config
    from fetal_head.synthesis.sampling import PairGenerator
    from fetal_head.synthesis.pipeline import train_generator

    cases = test_split(hc18, "pool", 6, seed=8)
    pairs = [(c.image_id, c.image_path, c.mask_path) for c in cases]
    ckpt = str(tmp_path / "joint.pt")
    first = train_generator(pairs, make_config("tiny", scheme="joint", max_steps=3), ckpt, device="cpu", progress=False)
    again = train_generator(pairs, make_config("tiny", scheme="joint", max_steps=5), ckpt, device="cpu", progress=False)
    assert (first["step"], again["steps_done"], again["step"]) == (3, 2, 5)
    assert first["generator_version"] != again["generator_version"]
    state = load_checkpoint(ckpt)  # weights_only=True
    assert state["step"] == 5 and isinstance(state["unet"]["conv_in.weight"], torch.Tensor)
    with pytest.raises(ValueError):  # another model under the same path is refused, not silently mixed
        train_generator(pairs, make_config("tiny", scheme="mask_conditioned", max_steps=6), ckpt, progress=False)

    gen = PairGenerator(ckpt, sampler="dpm", steps=4)
    batch = gen.generate(seed=1, indices=[0, 1])
    assert [p.image.shape for p in batch] == [(540, 800)] * 2 and batch[0].mask.dtype == bool
    # a pair depends on (seed, index) only, not on which batch it was sampled in
    alone = gen.generate(seed=1, indices=[1])[0]
    assert np.abs(alone.image.astype(int) - batch[1].image.astype(int)).max() <= 1

    ckpt_mc = str(tmp_path / "mc.pt")
    train_generator(pairs, make_config("tiny", max_steps=2), ckpt_mc, device="cpu", progress=False)
    pair = PairGenerator(ckpt_mc).generate(seed=2, indices=[5])[0]
    assert pair.ellipse is not None and pair.mask.sum() > 0


# ---- quality control -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_pair(hc18):
    from fetal_head.io import read_image

    case = test_split(hc18, "pool", 1, seed=11)[0]
    return read_image(case.image_path), case.load_mask()


@pytest.fixture(scope="module")
def predictor():
    from fetal_head.segmentation import SamPredictor

    return SamPredictor.litemedsam()


def test_qc_rejects_broken_pairs_with_the_right_reason(real_pair, predictor):
    from fetal_head.synthesis.quality import check_pair

    image, mask = real_pair
    rng = np.random.default_rng(0)
    two_blobs = np.zeros_like(mask)
    two_blobs[100:200, 100:250] = True
    two_blobs[300:420, 450:650] = True
    speckle = rng.random(mask.shape) < 0.2
    with_hole = mask.copy()
    rows, cols = np.nonzero(mask)
    cy, cx = int(rows.mean()), int(cols.mean())
    with_hole[cy - 20 : cy + 20, cx - 20 : cx + 20] = False
    square = np.zeros_like(mask)
    square[100:400, 200:500] = True
    cases = {
        "empty_mask": np.zeros_like(mask),
        "fragmented": two_blobs,
        "holes": with_hole,
        "not_elliptical": square,
    }
    for reason, broken in cases.items():
        result = check_pair(image, broken, predictor, mode="full")
        assert not result.accepted and result.reason == reason, (reason, result)
    assert check_pair(image, speckle, predictor).reason == "fragmented"

    # an elliptical mask where the image has no head: speckle noise under the real mask
    noise = rng.integers(0, 256, size=image.shape, dtype=np.uint8)
    result = check_pair(noise, mask, predictor, mode="full")
    print(f"noise image with the real mask: SAM box Dice {result.detail['sam_dice']:.3f}, "
          f"click Dice {result.detail['sam_click_dice']:.3f}")
    assert result.reason == "sam_disagrees"


def test_qc_accepts_a_clean_real_ellipse_pair(real_pair, predictor):
    from fetal_head.synthesis.quality import check_pair
    from fetal_head.synthesis.shape_model import fit_ellipse_to_mask

    image, mask = real_pair
    clean = fit_ellipse_to_mask(mask).rasterise(mask.shape)
    result = check_pair(image, clean, predictor, mode="full")
    print(f"real pair QC: {result.detail}")
    assert result.accepted, result
    assert result.detail["sam_dice"] >= 0.8


def test_qc_shape_only_is_explicit():
    from fetal_head.synthesis.quality import check_pair

    with pytest.raises(ValueError):
        check_pair(np.zeros((8, 8), np.uint8), np.zeros((8, 8), bool), None, mode="lenient")
    with pytest.raises(ValueError):  # full QC without SAM is refused, not silently downgraded
        mask = np.zeros((540, 800), bool)
        mask[200:300, 300:500] = True
        from fetal_head.synthesis.shape_model import fit_ellipse_to_mask

        check_pair(np.zeros((540, 800), np.uint8), fit_ellipse_to_mask(mask).rasterise(mask.shape), None, mode="full")


# ---- shape model -----------------------------------------------------------------------------------------------

def test_shape_model_samples_plausible_single_ellipses(full_hc18):
    from fetal_head.biometry import measure_head
    from fetal_head.synthesis.quality import check_shape
    from fetal_head.synthesis.shape_model import HeadShapeModel, fit_ellipse_to_mask
    from skimage.measure import label

    cases = test_split(full_hc18, "pool", 40, seed=5)
    masks = [c.load_mask() for c in cases]
    model = HeadShapeModel.fit(masks)
    real = [fit_ellipse_to_mask(m) for m in masks]
    a_lo, a_hi = min(e.semi_major for e in real), max(e.semi_major for e in real)
    b_lo, b_hi = min(e.semi_minor for e in real), max(e.semi_minor for e in real)
    rng = np.random.default_rng(0)
    semi_major = []
    for _ in range(25):
        mask, e = model.sample_mask(rng, 540, 800)
        assert label(mask, connectivity=2).max() == 1
        assert check_shape(mask).accepted
        bio = measure_head(mask, boundary_offset_px=0.0)
        assert a_lo - 2 <= bio.semi_major_px <= a_hi + 2
        assert b_lo * 0.9 - 2 <= bio.semi_minor_px <= b_hi * 1.1 + 2
        assert abs(bio.semi_major_px - e.semi_major) < 2 and abs(bio.semi_minor_px - e.semi_minor) < 2
        semi_major.append(e.semi_major)
    assert np.std(semi_major) > 5  # samples vary, not a fixed mean ellipse
    restored = HeadShapeModel.from_json(model.to_json())
    assert np.allclose(restored.cov, model.cov)


# ---- realism metrics ------------------------------------------------------------------------------------------

def test_real_vs_real_is_closer_than_real_vs_noise(hc18, predictor):
    from fetal_head.io import read_image
    from fetal_head.synthesis.realism import compare, feature_scale, sam_features

    cases = test_split(hc18, "test", 16, seed=2)[:12]  # 6 vs 6 real, 6 noise: encoding is the cost (~1.5 s each)
    images = [read_image(c.image_path) for c in cases]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, size=images[0].shape, dtype=np.uint8) for _ in range(6)]
    real = sam_features(predictor, images, progress=False)
    fake = sam_features(predictor, noise, progress=False)
    scale = feature_scale(real)
    yardstick = compare(real[:6], real[6:], scale, kid_subsets=20)
    to_noise = compare(real[:6], fake, scale, kid_subsets=20)
    print(f"real vs real: FD {yardstick['fd']:.1f} KID {yardstick['kid']:.3f}; "
          f"real vs noise: FD {to_noise['fd']:.1f} KID {to_noise['kid']:.3f}")
    assert yardstick["fd"] < to_noise["fd"]
    assert yardstick["kid"] < to_noise["kid"]


# ---- schemes, semi-supervised generator, guidance, the fast training loop -----------------------------------------

def test_scheme_objects_replace_the_scheme_string():
    import torch
    from fetal_head.synthesis.diffusion import DiffusionConfig, make_config
    from fetal_head.synthesis.schemes import SCHEMES, Joint, MaskConditioned, scheme_for

    assert SCHEMES == ("mask_conditioned", "joint")
    mc, joint = scheme_for(make_config("tiny")), scheme_for("joint")
    assert isinstance(mc, MaskConditioned) and isinstance(joint, Joint)
    assert (mc.in_channels, mc.out_channels, joint.in_channels, joint.out_channels) == (2, 1, 3, 3)
    image, mask = torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    assert joint.model_input(image, mask).shape[1] == 3 and mc.model_input(image, mask).shape[1] == 1
    assert mc.unet_input(image, mask).shape[1] == 2 and (mc.null_condition(mask) == 0).all()
    with pytest.raises(ValueError):
        scheme_for("nope")
    # a config saved before the semi-supervised fields existed still loads (checkpoint compatibility)
    old = json.loads(make_config("tiny").to_json())
    for k in ("unlabelled_images", "labelled_share", "cond_dropout", "guidance_scale", "channels_last", "compile",
              "log_every"):
        old.pop(k)
    cfg = DiffusionConfig.from_json(json.dumps(old))
    assert cfg.scheme_obj.name == "mask_conditioned" and cfg.guidance_scale == 1.0 and not cfg.semi_supervised
    with pytest.raises(ValueError):  # the joint scheme has no condition to drop or guide
        make_config("tiny", scheme="joint", unlabelled_images=4)


def test_fast_loop_matches_the_legacy_loop_on_cpu(tmp_path, hc18):
    """The new loop draws the same random numbers as the old one on a CPU, so it trains the same model."""
    from fetal_head.synthesis.diffusion import load_checkpoint, make_config
    from fetal_head.synthesis.pipeline import train_generator

    pairs = [(c.image_id, c.image_path, c.mask_path) for c in test_split(hc18, "pool", 4, seed=8)]
    cfg = make_config("tiny", max_steps=4, log_every=2)
    old = train_generator(pairs, cfg, str(tmp_path / "old.pt"), device="cpu", progress=False, legacy_loop=True)
    new = train_generator(pairs, cfg, str(tmp_path / "new.pt"), device="cpu", progress=False)
    assert new["final_loss"] == pytest.approx(old["final_loss"], rel=1e-4)
    a, b = load_checkpoint(str(tmp_path / "old.pt")), load_checkpoint(str(tmp_path / "new.pt"))
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert (x - y).abs().max() < 1e-5


def test_semi_supervised_generator_trains_on_unlabelled_images_and_samples_with_guidance(tmp_path, hc18):
    from fetal_head.synthesis.diffusion import load_checkpoint, make_config
    from fetal_head.synthesis.pipeline import train_generator
    from fetal_head.synthesis.sampling import PairGenerator, SamplingOptions, synthesize

    cases = test_split(hc18, "pool", 9, seed=5)
    pairs = [(c.image_id, c.image_path, c.mask_path) for c in cases[:4]]
    unlabelled = [(c.image_id, c.image_path) for c in cases[4:]] + [(cases[0].image_id, cases[0].image_path)]
    cfg = make_config("tiny", max_steps=4, unlabelled_images=3, cond_dropout=0.2, guidance_scale=2.0)
    ckpt = str(tmp_path / "semi.pt")
    summary = train_generator(pairs, cfg, ckpt, device="cpu", progress=False, unlabelled=unlabelled)
    assert summary["num_unlabelled"] == 3 and summary["step"] == 4
    extra = json.loads(load_checkpoint(ckpt)["extra"])
    assert len(extra["unlabelled_ids"]) == 3 and not set(extra["unlabelled_ids"]) & set(extra["train_ids"])
    # resume keeps the device random stream
    again = train_generator(pairs, make_config("tiny", max_steps=6, unlabelled_images=3, cond_dropout=0.2,
                                               guidance_scale=2.0), ckpt, device="cpu", progress=False,
                            unlabelled=unlabelled)
    assert again["steps_done"] == 2

    gen = PairGenerator(ckpt, sampler="dpm", steps=3)
    assert gen.guidance_scale == 2.0 and gen.provenance(0, 0)["guidance_scale"] == 2.0
    guided = gen.generate(seed=3, indices=[0, 1])
    plain = PairGenerator(ckpt, sampler="dpm", steps=3, guidance_scale=1.0).generate(seed=3, indices=[0, 1])
    assert guided[0].image.shape == (540, 800) and (guided[0].mask == plain[0].mask).all()
    assert np.abs(guided[0].image.astype(int) - plain[0].image.astype(int)).max() > 0  # guidance changes images
    got = []
    result = synthesize(gen, 2, seed=3, on_accept=lambda p, prov: got.append(prov),
                        options=SamplingOptions(qc="shape-only", progress=False))
    assert len(got) == 2 and result["qc"]["candidates"] >= 2


def test_datastore_feeds_only_real_unlabelled_images(tmp_path, hc18):
    from fetal_head.io.hc18 import import_cases
    from fetal_head.synthesis.store import add_pair, open_datastore, real_labelled_pairs, real_unlabelled_images

    studies = tmp_path / "studies"
    cases = test_split(hc18, "pool", 3, seed=4)
    import_cases(cases, str(studies))
    extra = test_split(hc18, "pool", 5, seed=9)[:2]
    for c in extra:  # unlabelled real images
        (studies / f"{c.image_id}.png").write_bytes(Path(c.image_path).read_bytes())
    ds = open_datastore(str(studies))
    case = cases[0]
    from fetal_head.io import read_image

    add_pair(ds, "synthetic_mask_conditioned_0_0", read_image(case.image_path), case.load_mask(), {"scheme": "x"})
    ds = open_datastore(str(studies))
    unl = {i for i, _ in real_unlabelled_images(ds)}
    assert unl == {c.image_id for c in extra if c.image_id not in {x.image_id for x in cases}}
    assert not unl & {p[0] for p in real_labelled_pairs(ds)}
