"""The head localiser (fetal_head.segmentation.localiser): learns where the head is from a few labels on cached
SAM embeddings, travels in the checkpoint, answers automatic and click requests with a confidence."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO, dice
from fetal_head.io import read_image
from fetal_head.segmentation import Prompt, SamPredictor
from fetal_head.segmentation import localiser as L
from fetal_head.segmentation.box_search import LOCALISER_REVIEW_BELOW
from fetal_head.segmentation.embedding_cache import EmbeddingCache
from fetal_head.segmentation.models import LITEMEDSAM, LOCALISER, attach_localiser, build_model
from fetal_head.segmentation.prompts import box_iou, mask_box, mask_dice
from fetal_head.selection.scores import uncertainty_of


def centroid_click(mask) -> Prompt:
    """One foreground click at the reference mask's centroid (the evaluation's click prompt)."""
    rows, cols = np.nonzero(mask)
    return Prompt(points=np.array([[cols.mean(), rows.mean()]], dtype=np.float32), labels=np.array([1]))


@pytest.fixture(scope="module")
def predictor():
    return SamPredictor.litemedsam(cache_size=32)


@pytest.fixture(scope="module")
def samples(predictor, hc18_subset):
    """(features, mask, input_hw, image) of 8 pool-split and 8 test-split images spread over the shipped subset
    (HC18 numbers its images by gestational age: the first 8 would all be first-trimester heads, the localiser's
    weak spot -- trained and tested there it found 4-6 of 8). Embeddings in the repository's gitignored disk cache,
    so reruns encode nothing."""
    cache = EmbeddingCache(str(REPO / ".data" / "emb_cache"), predictor)
    out = {}
    for split in ("pool", "test"):
        rows = []
        cases = [c for c in hc18_subset if c.split == split]
        for c in cases[:: len(cases) // 8][:8]:
            image = read_image(c.image_path)
            emb = cache.get(image)
            predictor.remember(image, emb)
            rows.append((emb.features, c.load_mask(), emb.input_hw, image))
        out[split] = rows
    return out


@pytest.fixture(scope="module")
def trained(samples):
    # the trainer's own schedule (LocaliserConfig defaults): a shorter one (60 steps, batch 4) left the head map
    # at ~0.64 everywhere and found no head box
    return L.train_localiser([s[:3] for s in samples["pool"]], L.LocaliserConfig(seed=0))


def test_targets_and_flip_augmentation_are_consistent(samples):
    feat, mask, hw, _ = samples["pool"][0]
    t = L.grid_targets(mask, hw)
    gh, gw = L.grid_hw(hw)
    assert t.shape == (3, 64, 64) and t[2].sum() == gh * gw and t[0, gh:].sum() == 0
    cfg = L.LocaliserConfig(max_shift=0, noise=0.0, flip=True)
    rng = np.random.default_rng(1)
    for _ in range(4):  # flipped or not, the head fraction stays the same and inside the image part
        x, y = L.augment(feat[0], t, gh, gw, cfg, rng)
        assert torch.isclose(y[0].sum(), t[0].sum()) and y[0, gh:].sum() == 0
        assert x.shape == feat[0].shape


def test_localiser_from_8_labels_finds_held_out_heads(trained, samples):
    """What the localiser is for: *where* the head is (its head's centre inside the reference head box); its extent
    is left to the box decoder and the skull ring (box IoU alone is ~0.55 after 5 labels on 40 HC18 test images;
    here, 8 labels: centre inside on 7 of 8, box IoU 0.57 on average)."""
    inside, ious = 0, []
    for f, m, hw, _ in samples["test"]:
        loc = L.localise(trained, f, m.shape, hw)
        ious.append(box_iou(loc.box, mask_box(m)))
        if loc.coarse_mask is None:
            continue
        rows, cols = np.nonzero(loc.coarse_mask)
        cx, cy = (cols.mean() + 0.5) * m.shape[1] / hw[1], (rows.mean() + 0.5) * m.shape[0] / hw[0]
        x0, y0, x1, y1 = mask_box(m)
        inside += x0 <= cx <= x1 and y0 <= cy <= y1
    assert int(trained.trained_labels) == 8
    assert inside >= 7, (inside, ious)
    assert np.mean(ious) > 0.4, ious


def test_click_selects_and_background_click_removes(trained, samples):
    feat, mask, hw, _ = samples["test"][0]
    loc = L.localise(trained, feat, mask.shape, hw)
    assert loc.box is not None
    inside = np.array([[(loc.box[0] + loc.box[2]) / 2, (loc.box[1] + loc.box[3]) / 2]])
    if loc.coarse_mask is not None:  # a click on the localiser's head picks that head
        rows, cols = np.nonzero(loc.coarse_mask)
        k = len(rows) // 2
        inside = np.array([[cols[k] * mask.shape[1] / hw[1], rows[k] * mask.shape[0] / hw[0]]])
    assert L.localise(trained, feat, mask.shape, hw, fg=inside).box == loc.box
    assert L.localise(trained, feat, mask.shape, hw, bg=inside).box != loc.box


PEAK_SOURCE = ("localiser_peak",) if L.OTHER_PEAKS else ()  # a candidate source only with the peaks on


def test_other_peaks_are_the_next_centre_maxima_on_the_head_map_away_from_the_chosen_centre():
    """With OTHER_PEAKS > 0 the automatic route also decodes around the localiser's next centre peaks (small heads
    whose strongest peak sat on another structure): a peak on the head map, off the frame's border, away from the
    chosen centre."""
    yy, xx = np.mgrid[:100, :120]
    bump = lambda x, y, v: v * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 50.0)
    centre = bump(30, 40, 0.6) + bump(80, 50, 0.4) + bump(42, 52, 0.5) + bump(118, 98, 0.9) + bump(60, 90, 0.45)
    head = np.zeros((100, 120))
    head[20:70, 10:100] = 0.9  # (60, 90) lies off the head map, (118, 98) on the frame's border
    assert L.other_peaks(head, centre, (30, 40), 2.0, 3.0, k=1) == ((80.5 * 2.0, 50.5 * 3.0),)
    assert L.other_peaks(head, centre, (30, 40), 1.0, 1.0, k=3) == ((80.5, 50.5),)  # (42, 52): too near
    assert L.other_peaks(head, centre, (80, 50), 1.0, 1.0, k=1) == ((30.5, 40.5),)
    assert L.other_peaks(head, centre, (80, 50), 1.0, 1.0, k=0) == ()  # the served default (OTHER_PEAKS = 0)


def test_checkpoint_carries_the_localiser_and_old_ones_still_load(trained, tmp_path):
    net = build_model(LITEMEDSAM)
    setattr(net, LOCALISER, trained)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": net.state_dict()}, path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    fresh = build_model(LITEMEDSAM)
    fresh.load_state_dict(state, strict=True)  # the localiser attaches itself from its keys
    assert int(getattr(fresh, LOCALISER).trained_labels) == 8
    old = build_model(LITEMEDSAM)
    old.load_state_dict({k: v for k, v in state.items() if not k.startswith(LOCALISER + ".")}, strict=True)
    assert getattr(old, LOCALISER, None) is None
    attach_localiser(old)  # an untrained localiser is never used
    assert SamPredictor.for_model(old, LITEMEDSAM).localiser is None


def test_automatic_and_click_answers_come_from_the_localiser_with_confidence(predictor, trained, samples):
    net = predictor.model
    setattr(net, LOCALISER, trained)
    try:
        scores, click_scores = [], []
        for i, (feat, mask, hw, image) in enumerate(samples["test"]):
            # without a head verifier the agreement costs a second box search: checked on 2 of the 8 (CI time)
            predictor.automatic_agreement = i < 2
            pred = predictor.predict(image, Prompt())
            assert pred.confidence["source"] == "localiser"
            assert 0.0 <= pred.confidence["localiser_score"] <= 1.0
            assert ("box_search_agreement" in pred.confidence) == (i < 2) and "localiser_decoder_dice" in pred.confidence
            assert pred.confidence["chosen_candidate"] in ("localiser", "skull_ring") + PEAK_SOURCE
            assert pred.confidence["skull_ring_support"] is None or 0 < pred.confidence["skull_ring_support"] <= 1
            scores.append(dice(pred.mask, mask))
            click = predictor.predict(image, centroid_click(mask))
            assert click.confidence["source"] in ("localiser", "box_search")
            click_scores.append(dice(click.mask, mask))
        print("automatic Dice, zero-shot decoder + localiser + skull ring:", np.round(scores, 3))
        print("click Dice:", np.round(click_scores, 3))
        assert np.mean(scores) > 0.7, scores
        assert np.mean(click_scores) > 0.9 and min(click_scores) > 0.75, click_scores  # measured 0.936, min 0.821
    finally:
        delattr(net, LOCALISER)
        predictor.automatic_agreement = True


def test_trainer_attaches_the_localiser_below_10_labels_and_says_why(predictor, hc18_subset, tmp_path):
    """The few-label recipe: with fewer labels than a fair check needs, the trainer's localiser is trained on all of
    them with the fixed schedule and attached, and its record gives the reason (no cross-validation run)."""
    from fetal_head.segmentation import training as T

    pool = [c for c in hc18_subset if c.split == "pool"]
    items = T.label_items(pool[:: len(pool) // 3][:3], str(tmp_path))
    cfg = T.TrainConfig(localiser=True, localiser_steps=20)
    try:
        record = T.fit_localiser(predictor, items, cfg, str(REPO / ".data" / "emb_cache"))
        assert record["replaced"] and record["gate_passed"] is None and record["cv_automatic_dice"] is None
        assert "too few for a fair check" in record["reason"], record
        assert predictor.localiser is not None and int(predictor.localiser.trained_labels) == 3
    finally:
        delattr(predictor.model, LOCALISER)


def test_from_10_labels_the_localiser_must_beat_the_automatic_head_the_model_would_serve(predictor, hc18_subset,
                                                                                          tmp_path):
    """From 10 labels on the localiser is cross-validated against what the model answers without it: with a kept
    automatic head that is the head (from ~400 labels on the better route), not the box search."""
    from fetal_head.segmentation import training as T
    from fetal_head.segmentation.models import AUTOMATIC_DECODER, attach_automatic_decoder

    pool = [c for c in hc18_subset if c.split == "pool"]
    # the 8 pool images of ``samples`` (their embeddings are on disk already) and two more
    items = T.label_items(pool[:: len(pool) // 8][:8] + pool[1:3], str(tmp_path))
    cfg = T.TrainConfig(localiser=True, localiser_steps=20, localiser_cv_limit=3)
    attach_automatic_decoder(predictor.model)  # as a run that kept its automatic head leaves the model
    try:
        record = T.fit_localiser(predictor, items, cfg, str(REPO / ".data" / "emb_cache"))
        assert record["baseline"] == "automatic head" and record["cv_automatic_dice"] is not None, record
        assert 0.0 <= record["baseline_automatic_dice"] <= 1.0
        assert record["replaced"] == (record["cv_automatic_dice"] > record["baseline_automatic_dice"])
        assert ("kept the model's automatic head" in record["reason"]) != record["replaced"]
    finally:
        delattr(predictor.model, AUTOMATIC_DECODER)
        if getattr(predictor.model, LOCALISER, None) is not None:
            delattr(predictor.model, LOCALISER)


def test_from_wide_from_labels_the_wide_localiser_answers_automatic_requests_with_its_own_box(
        predictor, samples, hc18_subset, tmp_path, monkeypatch):
    """With many labels (localiser_wide_from, 100 by default; 8 here) the trainer fits the wide localiser, which
    answers automatic requests with its own box (source ``localiser_box``), travels in the checkpoint with its width
    and flag, and leaves clicks to the candidates; a checkpoint saved before the flag loads as a candidate chooser."""
    from fetal_head.segmentation import training as T

    monkeypatch.setattr(L, "WIDE_STEPS", 300)  # the recipe's 1500 cost ~5 min on 2 cores; 300 find these heads
    pool = [c for c in hc18_subset if c.split == "pool"]
    items = T.label_items(pool[:: len(pool) // 8][:8], str(tmp_path))  # the 8 of ``samples``: embeddings on disk
    cfg = T.TrainConfig(localiser=True, localiser_wide_from=8)
    try:
        record = T.fit_localiser(predictor, items, cfg, str(REPO / ".data" / "emb_cache"))
        assert record["replaced"] and record["width"] == L.WIDE_WIDTH and record["automatic_route"] == "its own box"
        wide = predictor.localiser
        assert wide.width == L.WIDE_WIDTH and int(wide.answers_with_box) == 1

        net = build_model(LITEMEDSAM)
        setattr(net, LOCALISER, wide)
        state = net.state_dict()
        fresh = build_model(LITEMEDSAM)
        fresh.load_state_dict(state, strict=True)
        assert getattr(fresh, LOCALISER).width == L.WIDE_WIDTH and int(getattr(fresh, LOCALISER).answers_with_box)
        older = build_model(LITEMEDSAM)
        older.load_state_dict({k: v for k, v in state.items() if not k.endswith(".answers_with_box")}, strict=True)
        assert int(getattr(older, LOCALISER).answers_with_box) == 0

        auto, click = [], []
        for feat, mask, hw, image in samples["test"]:
            pred = predictor.predict(image, Prompt())
            assert pred.confidence["source"] == "localiser_box" and 0 <= pred.confidence["rebox_stability"] <= 1
            # no verifier here: the flag comes from the localiser's own head probability
            assert pred.confidence["needs_review"] is (pred.confidence["localiser_head_prob"] < LOCALISER_REVIEW_BELOW)
            auto.append(dice(pred.mask, mask))
            c = predictor.predict(image, centroid_click(mask))
            assert c.confidence["source"] in ("localiser", "box_search")
            click.append(dice(c.mask, mask))
        print("automatic Dice, zero-shot decoder + wide localiser's box (8 labels):", np.round(auto, 3))
        print("click Dice:", np.round(click, 3))
        assert np.mean(auto) > 0.7, auto
        assert np.mean(click) > 0.9, click
    finally:
        delattr(predictor.model, LOCALISER)


def test_a_click_near_a_candidates_rim_ranks_it_below_the_head_that_centres_it(hc18_subset):
    """Click answers weigh each candidate by how central the click is in it (box_search.centrality): the head under
    a centroid click scores 1, a same-sized neighbour with the click on its rim exp(-2)."""
    from fetal_head.segmentation.box_search import centrality

    mask = hc18_subset[0].load_mask() > 0
    rows, cols = np.nonzero(mask)
    click = (cols.mean() + 0.5, rows.mean() + 0.5)
    width = cols.max() - cols.min() + 1
    neighbour = np.roll(mask, width // 2, axis=1)  # the same ellipse, its rim under the click
    assert centrality(mask, click) > 0.99
    assert centrality(neighbour, click) < 0.2
    assert centrality(np.zeros_like(mask), click) == 0.0


def test_the_final_rebox_keeps_the_head_in_the_images_geometry(predictor, samples):
    """The localised route's winner is decoded once more with its own box plus AUTOMATIC_MARGIN_PX (box_search.rebox,
    +0.5 points of automatic Dice with a fine-tuned decoder). Here from answers to the reference box grown by 10 %
    per side: a swapped axis or a box in the wrong frame would lose the head."""
    from fetal_head.segmentation.box_search import rebox

    before, after = [], []
    for feat, mask, hw, image in samples["test"]:
        x0, y0, x1, y1 = mask_box(mask)
        h, w = mask.shape
        mx, my = 0.1 * (x1 - x0), 0.1 * (y1 - y0)
        pred = predictor.predict(image, Prompt(box=(max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, w - 1),
                                                    min(y1 + my, h - 1))))
        out = rebox(predictor, predictor.embed(image), pred)
        assert out.mask.shape == mask.shape
        before.append(dice(pred.mask, mask))
        after.append(dice(out.mask, mask))
    print("Dice before / after the re-box:", np.round(before, 3), np.round(after, 3))
    assert np.mean(after) > 0.9 and np.mean(after) > np.mean(before) - 0.01, (before, after)


# ---- the head verifier (fetal_head.segmentation.verifier) ------------------------------------------------------
@pytest.fixture(scope="module")
def verifier(predictor, trained, hc18_subset, tmp_path_factory):
    """The head verifier as the trainer fits it (training.fit_head_verifier) on the 8 pool labels, with the zero-shot
    decoder and the localiser trained on the same labels; returns (verifier, its record)."""
    from fetal_head.segmentation import training as T
    from fetal_head.segmentation.models import HEAD_VERIFIER

    pool = [c for c in hc18_subset if c.split == "pool"]
    items = T.label_items(pool[:: len(pool) // 8][:8], str(tmp_path_factory.mktemp("labels")))
    setattr(predictor.model, LOCALISER, trained)
    try:
        record = T.fit_head_verifier(predictor, items, T.TrainConfig(seed=0), str(REPO / ".data" / "emb_cache"))
        print("head verifier record:", record)
        return predictor.head_verifier, record
    finally:
        for name in (LOCALISER, HEAD_VERIFIER):
            if getattr(predictor.model, name, None) is not None:
                delattr(predictor.model, name)


def test_verifier_fit_needs_both_kinds_and_ranks_them():
    from fetal_head.segmentation.verifier import fit_verifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 10)).astype(np.float32)
    y = x[:, 0] + 0.3 * rng.normal(size=60) > 0
    net = fit_verifier(x, y, labels=3)
    p = net.probability(x)
    assert int(net.trained_labels) == 3
    assert np.mean([a > b for a in p[y] for b in p[~y]]) > 0.95  # heads first (the strong L2 keeps p modest)
    assert p[y].mean() > 0.5 > p[~y].mean()
    assert fit_verifier(x, np.zeros(60, bool), labels=3) is None  # no head among the candidates: nothing to learn
    assert fit_verifier(x[:3], np.array([True, False, False]), labels=1) is None


def test_verifier_cross_validation_says_whether_it_chooses_better_than_the_decoder_scores():
    """The trainer's gate from 10 labels (training.fit_head_verifier): held-out choices with and without it. Here,
    per image, the decoder scores a sac above the head; the first input marks the head (it helps), or 300 inputs are
    noise (a verifier fitted on them makes worse choices than the scores alone)."""
    from fetal_head.segmentation.verifier import cross_validate

    rng = np.random.default_rng(0)

    def groups(informative):
        out = []
        for i in range(12):
            dice_ = np.array([0.95, 0.5, 0.3, 0.2, 0.6, 0.1])
            score = np.array([0.8, 0.9, 0.5, 0.4, 0.7, 0.3]) if i % 2 else np.array([0.9, 0.8, 0.5, 0.4, 0.7, 0.3])
            x = rng.normal(size=(6, 300)).astype(np.float32)
            if informative:
                x[:, 0] = np.where(dice_ >= 0.9, 1.0, -1.0) + 0.2 * rng.normal(size=6)
            out.append((x, dice_, score))
        return out

    good = cross_validate(groups(True), folds=3)
    assert good["images"] == 12 and good["with_verifier"] > good["without"], good
    assert np.isclose(good["without"], (6 * 0.95 + 6 * 0.5) / 12)  # the scores alone pick the sac on half the images
    noise = cross_validate(groups(False), folds=3)
    assert noise["with_verifier"] < noise["without"] == good["without"], noise


def test_verifier_ranks_held_out_heads_above_the_other_structures(predictor, trained, verifier, samples):
    """What it is for: on images it never saw, the candidates that are the head (Dice >= 0.9 with the reference at
    the decoder's resolution) get a higher head probability than those that are not (< 0.8: the fluid sac, part of
    the head, the midline). Measured on all 8: AUC 0.98 over 21 heads and 62 others."""
    from fetal_head.segmentation import box_search
    from fetal_head.segmentation.training import low_res_target
    from fetal_head.segmentation.verifier import POSITIVE_DICE

    net, record = verifier
    assert record["attached"] and record["labels"] == 8 and 2 <= record["heads"] < record["candidates"], record
    # its cross-validation is reported below 10 labels but is not a gate there (measured with this zero-shot decoder:
    # 0.878 with it vs 0.946 without; weighing this zero-shot decoder's candidates by it gave 0.68 automatic Dice on
    # the 8 test images against 0.79 without, a first-trimester head losing to its sac. The trainer fits it on its
    # new decoder's candidates, where it gains (README, issue 12); tests/test_training.py checks it served.)
    assert record["cv"]["images"] == 8 and record["gate_passed"] is None, record
    setattr(predictor.model, LOCALISER, trained)
    try:
        heads, others = [], []
        for _, mask, _, image in samples["test"][::2]:  # 4 of the 8 (CI time): ~50 candidates
            emb = predictor.embed(image)
            found = box_search.localised_candidates(predictor, emb, image=image, search_too=True)
            assert found is not None
            ref = low_res_target(predictor, emb, mask)[0, 0].cpu().numpy() > 0.5
            for cand, p in zip(found[1], net.probability(box_search.verifier_inputs(emb, found[1]))):
                d = mask_dice(cand.mask, ref)
                (heads if d >= POSITIVE_DICE else others if d < 0.8 else []).append(p)
    finally:
        delattr(predictor.model, LOCALISER)
    auc = np.mean([h > o for h in heads for o in others])
    print(f"{len(heads)} head and {len(others)} other candidates; AUC {auc:.3f}")
    assert len(heads) >= 3 and len(others) >= 3
    assert auc > 0.8, (heads, others)


def test_checkpoint_carries_the_verifier(verifier, tmp_path):
    from fetal_head.segmentation.models import HEAD_VERIFIER

    net = build_model(LITEMEDSAM)
    setattr(net, HEAD_VERIFIER, verifier[0])
    torch.save({"state_dict": net.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=True)["state_dict"]
    fresh = build_model(LITEMEDSAM)
    fresh.load_state_dict(state, strict=True)  # attaches itself from its keys
    assert int(getattr(fresh, HEAD_VERIFIER).trained_labels) == 8
    assert torch.equal(getattr(fresh, HEAD_VERIFIER).linear.weight, verifier[0].linear.weight)


def test_uncertainty_scores_the_served_answer_and_its_head_probability(predictor, trained, verifier, samples):
    """Active learning ranks what the user would be shown: with a localiser and a verifier, the uncertainty strategy's
    answer is the served automatic one, and its ``not_head`` is 1 - that answer's head probability, weighted into
    the score (docs/active_learning/uncertainty_served: it ranks the served failures first)."""
    from fetal_head.segmentation.models import HEAD_VERIFIER
    from fetal_head.selection import UNCERTAINTY_WEIGHTS, uncertainty

    setattr(predictor.model, LOCALISER, trained)
    setattr(predictor.model, HEAD_VERIFIER, verifier[0])
    try:
        for _, mask, _, image in samples["test"][:1]:  # one image: the served route runs twice (~9 s)
            emb = predictor.embed(image)
            comps, pred = uncertainty(predictor, emb, image=image)
            served = predictor.predict(image, Prompt())
            assert pred.confidence["source"] == served.confidence["source"] == "localiser"
            assert mask_dice(pred.mask, served.mask) > 0.999
            assert np.isclose(comps["not_head"], 1 - served.confidence["head_probability"], atol=1e-3)
            assert np.isclose(comps["score"], sum(w * comps[k] for k, w in UNCERTAINTY_WEIGHTS.items()))
            assert UNCERTAINTY_WEIGHTS["not_head"] > 0
    finally:
        for name in (LOCALISER, HEAD_VERIFIER):
            if getattr(predictor.model, name, None) is not None:
                delattr(predictor.model, name)


def test_self_training_trains_the_wide_localiser_on_pseudo_labels_the_verifier_is_sure_of(
        predictor, trained, verifier, samples, hc18_subset, tmp_path, monkeypatch):
    """Below localiser_wide_from labels the trainer pseudo-labels unlabelled images with the served route (small
    localiser + head verifier), keeps those the verifier is sure of, and trains the wide localiser on the real labels
    plus them (training.fit_self_trained_localiser): automatic answers then come from its own box, on held-out
    images better than the candidate route answered, and nothing is written beside the images."""
    from fetal_head.segmentation import training as T
    from fetal_head.segmentation.models import HEAD_VERIFIER

    monkeypatch.setattr(L, "WIDE_STEPS", 300)  # the recipe's 1500 cost ~4 min on 2 cores
    pool = [c for c in hc18_subset if c.split == "pool"]
    labelled = pool[:: len(pool) // 8][:8]  # the 8 of ``samples`` and of the verifier's fit
    items = T.label_items(labelled, str(tmp_path))
    unlabelled = [c.image_path for c in pool if c not in labelled]
    folder = os.path.dirname(pool[0].image_path)
    listed = sorted(os.listdir(folder))
    cfg = T.TrainConfig(self_training_images=16, seed=0)
    setattr(predictor.model, LOCALISER, trained)
    setattr(predictor.model, HEAD_VERIFIER, verifier[0])
    try:
        before = [dice(predictor.predict(image, Prompt()).mask, mask) for _, mask, _, image in samples["test"]]
        record = T.fit_self_trained_localiser(predictor, items, unlabelled, cfg, str(REPO / ".data" / "emb_cache"))
        print("self-training record:", record)
        assert record["unlabelled_drawn"] == 16 and 0 < record["pseudo_labels"] <= 16, record
        assert record["replaced"] and record["gate_passed"] is None and "too few for a fair check" in record["reason"]
        wide = predictor.localiser
        assert wide is not trained and wide.width == L.WIDE_WIDTH and int(wide.answers_with_box) == 1
        assert int(wide.trained_labels) == 8  # real labels; the pseudo-labels are counted in the record
        after = []
        for _, mask, _, image in samples["test"]:
            pred = predictor.predict(image, Prompt())
            assert pred.confidence["source"] == "localiser_box" and "head_probability" not in pred.confidence
            assert pred.confidence["needs_review"] is (pred.confidence["localiser_head_prob"] < LOCALISER_REVIEW_BELOW)
            # active learning's uncertainty takes the flag as its not_head term (there is no verifier)
            not_head = uncertainty_of(predictor, predictor.embed(image), pred)["not_head"]
            assert not_head == float(pred.confidence["needs_review"])
            after.append(dice(pred.mask, mask))
        print("automatic Dice on 8 held-out images, candidates + verifier:", np.round(before, 3))
        print("                                     self-trained wide box:", np.round(after, 3))
        # the zero-shot decoder, 8 labels: the candidates took another structure on 3 small heads (0.72 mean), the
        # self-trained box recovers one of them (0.77)
        assert np.mean(after) > np.mean(before) and np.mean(after) > 0.7, (before, after)
        assert sorted(os.listdir(folder)) == listed  # nothing written beside the images
    finally:
        for name in (LOCALISER, HEAD_VERIFIER):
            if getattr(predictor.model, name, None) is not None:
                delattr(predictor.model, name)


def test_the_trainer_self_trains_below_wide_from_labels_and_drops_the_verifier(hc18_subset, tmp_path, monkeypatch):
    """training.finetune with unlabelled images (what the train task passes from the datastore): decoder, small
    localiser, head verifier, then the self-trained wide localiser replaces the candidates' route and the verifier is
    dropped; the checkpoint metadata says so. A short schedule everywhere: the wiring, not the accuracy (above)."""
    from fetal_head.segmentation import training as T
    from fetal_head.segmentation.model_store import ModelSource, meta_path, save_finetuned

    monkeypatch.setattr(L, "WIDE_STEPS", 20)
    pool = [c for c in hc18_subset if c.split == "pool"]
    labelled = pool[:: len(pool) // 8][:3]  # embeddings on disk already (``samples``)
    unlabelled = [c.image_path for c in pool[1:4] if c not in labelled] + [str(tmp_path / "missing.png")]
    predictor = SamPredictor.litemedsam(cache_size=8)
    cfg = T.TrainConfig(max_epochs=1, train_batch_size=2, localiser_steps=20, self_training_images=4,
                        self_training_min_head_probability=0.0, seed=0)
    summary = T.finetune(predictor, T.label_items(labelled, str(tmp_path / "labels")), cfg,
                         str(REPO / ".data" / "emb_cache"), unlabelled=unlabelled)
    st = summary["self_training"]
    print("self-training record:", st)
    assert st["replaced"] and st["unlabelled_drawn"] == 4 and st["unreadable"] == 1 and st["pseudo_labels"] >= 1, st
    assert int(predictor.localiser.answers_with_box) == 1 and predictor.head_verifier is None
    assert not summary["head_verifier"]["attached"] and "dropped" in summary["head_verifier"]["reason"]
    meta = T.checkpoint_meta(summary, LITEMEDSAM)
    save_finetuned(predictor.model, LITEMEDSAM, str(tmp_path / "model"), meta)
    served = ModelSource(model_dir=str(tmp_path / "model")).load()
    assert int(served.localiser.answers_with_box) == 1 and served.localiser.width == L.WIDE_WIDTH
    with open(meta_path(str(tmp_path / "model"))) as f:
        assert served.head_verifier is None and json.load(f)["self_training"]["replaced"]
