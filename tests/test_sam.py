"""The SAM predictor in process: accuracy on real images and the embedding cache."""

import os

import numpy as np
import pytest

from conftest import dice, test_split
from fetal_head.io import read_image
from fetal_head.segmentation import Prompt, SamPredictor


@pytest.fixture(scope="module")
def predictor():
    return SamPredictor.litemedsam(cache_size=3)


def test_box_from_reference_mask(predictor, hc18):
    scores = []
    for case in test_split(hc18, "test", 5, seed=3):
        ref = case.load_mask()
        rows, cols = np.nonzero(ref)
        pred = predictor.predict(read_image(case.image_path), Prompt(box=(cols.min(), rows.min(), cols.max(), rows.max())))
        assert pred.mask.shape == ref.shape
        scores.append(dice(pred.mask, ref))
    assert np.mean(scores) > 0.88


def test_non_ultrasound_size_keeps_geometry(predictor, hc18):
    img = read_image(hc18[0].image_path)[:301, :457]  # odd size, not the model's aspect
    pred = predictor.predict(img, Prompt(box=(100, 60, 400, 280)))
    assert pred.mask.shape == (301, 457)


def test_cache_hits_same_pixels_and_misses_changed_ones(predictor, hc18):
    predictor.clear_cache()
    img = read_image(hc18[1].image_path)
    e1 = predictor.embed(img)
    assert predictor.embed(img.copy()) is e1  # same pixels, another array: hit
    changed = img.copy()
    changed[0, 0] ^= 1  # one pixel differs: must not reuse the stale embedding
    assert predictor.embed(changed) is not e1


def test_cache_is_bounded(predictor, hc18):
    predictor.clear_cache()
    img = read_image(hc18[2].image_path)
    for i in range(5):
        variant = img.copy()
        variant[0, 0] = i
        predictor.embed(variant)
    assert len(predictor._cache) == predictor.cache_size == 3


def test_encoder_weights_are_part_of_the_key(predictor, hc18):
    import torch

    img = read_image(hc18[3].image_path)
    predictor.clear_cache()
    e1 = predictor.embed(img)
    other = SamPredictor.litemedsam(cache_size=3)
    with torch.no_grad():
        other.model.image_encoder.neck[0].weight.mul_(1.01)  # different encoder weights
    from fetal_head.segmentation.models import weights_key

    other.encoder_key = weights_key(other.model.image_encoder, "256:minmax")
    other.share_cache(predictor)
    assert other.embed(img) is not e1  # no stale embedding from another encoder
    same = SamPredictor.litemedsam(cache_size=3)
    same.share_cache(predictor)
    assert same.embed(img) is e1  # same encoder (e.g. a decoder-only fine-tune): the embedding is reused


def test_served_model_keeps_embeddings_across_a_decoder_only_retrain(hc18, tmp_path):
    """After a retrain that kept the encoder (the default, frozen), the server's next request on an image it has
    seen reuses the embedding instead of encoding again (~1 s an image on 2 CPU cores)."""
    import time

    import torch

    from fetal_head.segmentation.model_store import ModelSource, ServedModel, save_finetuned

    served = ServedModel(ModelSource(model_dir=str(tmp_path)))
    first = served.get()
    img = read_image(hc18[4].image_path)
    e1 = first.embed(img)
    with torch.no_grad():
        first.model.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.1)  # a "retrained" decoder
    save_finetuned(first.model, "litemedsam", str(tmp_path), {"trained": ["mask_decoder"]})
    second = served.get()
    assert second is not first and second.version.startswith("finetuned:")
    assert second.embed(img) is e1 and second.cache_misses == 0
    with torch.no_grad():  # a retrained encoder: the old embedding is not reused
        second.model.image_encoder.neck[0].weight.mul_(1.01)
    save_finetuned(second.model, "litemedsam", str(tmp_path), {"trained": ["image_encoder"]})
    os.utime(served.source.finetuned_path, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # same size: new mtime
    third = served.get()
    assert third is not second and third.embed(img) is not e1 and third.cache_misses == 1


def test_automatic_agreement_off_survives_a_retrain(tmp_path):
    """``--conf automatic_agreement false`` (no box search beside a localiser's automatic answer) holds for the
    predictor the server reloads after a retrain, not only for the first one."""
    import time

    from fetal_head.segmentation.model_store import ModelSource, ServedModel, save_finetuned

    served = ServedModel(ModelSource(model_dir=str(tmp_path), automatic_agreement=False))
    first = served.get()
    assert first.automatic_agreement is False
    save_finetuned(first.model, "litemedsam", str(tmp_path), {"trained": ["mask_decoder"]})
    os.utime(served.source.finetuned_path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    second = served.get()
    assert second is not first and second.automatic_agreement is False
    assert ServedModel(ModelSource(model_dir=str(tmp_path))).get().automatic_agreement is True  # the default


def test_cpu_decoder_chunks_answer_like_one_batch(predictor, hc18):
    """Many boxes go through the decoder a few at a time on the CPU (faster: the per-prompt copies of the
    embedding stay in cache); the answers must be those of one batch."""
    import torch

    from fetal_head.segmentation import predictor as P

    emb = predictor.embed(read_image(hc18[1].image_path))
    boxes = np.array([[60 + 25 * i, 50 + 10 * i, 520 - 5 * i, 430 - 10 * i] for i in range(9)], dtype=np.float32)
    assert len(boxes) > P.CPU_DECODE_CHUNK > 0
    logits, iou = predictor.decode(emb, boxes=boxes)
    with torch.inference_mode():
        whole, whole_iou = predictor.decode_with_grad(emb, boxes=boxes)
    assert logits.shape == whole.shape and torch.equal(logits > 0, whole > 0)
    assert torch.allclose(logits, whole, atol=1e-3) and torch.allclose(iou, whole_iou, atol=1e-4)


def test_server_embeddings_outlive_a_restart_and_feed_the_trainer(hc18, tmp_path):
    """The server keeps embeddings on disk (``--conf embedding_cache_dir``): after a restart, and in the trainer
    and active learning (the same folder), an image it has answered on is not encoded again (~1-2 s on 2 cores),
    and the answer is the same as before the restart."""
    from fetal_head.segmentation.embedding_cache import EmbeddingCache
    from fetal_head.segmentation.model_store import ModelSource, ServedModel

    case = test_split(hc18, "test", 3, seed=3)[0]
    image, ref = read_image(case.image_path), case.load_mask()
    rows, cols = np.nonzero(ref)
    box = Prompt(box=(cols.min(), rows.min(), cols.max(), rows.max()))
    first = ServedModel(ModelSource(model_dir=str(tmp_path / "model")), str(tmp_path / "emb")).get()
    before = first.predict(image, box).mask
    assert (first.cache_misses, first.cache_hits) == (1, 0)
    restarted = ServedModel(ModelSource(model_dir=str(tmp_path / "model")), str(tmp_path / "emb")).get()
    after = restarted.predict(image, box).mask
    assert (restarted.cache_misses, restarted.cache_hits) == (0, 1)  # read from disk, not encoded
    assert np.array_equal(before, after) and dice(after, ref) > 0.9
    trainer_cache = EmbeddingCache(str(tmp_path / "emb"), restarted)
    trainer_cache.get(image)
    assert (trainer_cache.hits, trainer_cache.misses) == (1, 0)


def test_an_unwritable_embedding_folder_costs_no_answer(hc18, tmp_path):
    """A disk cache that cannot be made, or a write that fails (disk full, folder gone), must not cost an answer."""
    from fetal_head.segmentation.model_store import ModelSource, ServedModel

    (tmp_path / "file").write_text("not a folder")
    served = ServedModel(ModelSource(model_dir=str(tmp_path / "model")), str(tmp_path / "file" / "emb")).get()
    assert served.disk_cache is None  # could not be made: in memory only
    emb_dir = tmp_path / "emb"
    served = ServedModel(ModelSource(model_dir=str(tmp_path / "model")), str(emb_dir)).get()
    os.rmdir(served.disk_cache.dir)
    emb_dir.rmdir()
    emb_dir.write_text("the folder became a file")  # every write now fails
    case = hc18[2]
    ref = case.load_mask()
    rows, cols = np.nonzero(ref)
    pred = served.predict(read_image(case.image_path), Prompt(box=(cols.min(), rows.min(), cols.max(), rows.max())))
    assert served.cache_misses == 1 and dice(pred.mask, ref) > 0.85


def test_the_embedding_folder_keeps_to_its_bound(predictor, hc18, tmp_path, monkeypatch):
    """A bounded folder (``--conf embedding_cache_max_gb``) drops its least recently used entries (a read counts as a
    use); an image whose entry went is simply encoded again."""
    import time

    from fetal_head.segmentation import embedding_cache as ec

    monkeypatch.setattr(ec, "PRUNE_EVERY_S", 0.0)  # prune at every write, not once a minute
    images = [read_image(c.image_path) for c in hc18[:3]]
    embs = [predictor.embed(im) for im in images]
    probe = ec.EmbeddingCache(str(tmp_path / "probe"), predictor)
    probe.store(images[0], embs[0])
    entry = os.path.getsize(probe.path(images[0], False))  # every LiteMedSAM entry has this size
    cache = ec.EmbeddingCache(str(tmp_path / "emb"), predictor, max_bytes=int(2.5 * entry))
    paths = [cache.path(im, False) for im in images]
    now = time.time()
    for k in (0, 1):
        cache.store(images[k], embs[k])
        os.utime(paths[k], (now - 100 + 50 * k,) * 2)  # image 0 written first, image 1 later
    assert cache.load(images[0]) is not None  # image 0 used again: now the most recent
    cache.store(images[2], embs[2])  # three entries over a bound of 2.5: the least recently used goes
    assert [os.path.exists(p) for p in paths] == [True, False, True]
    assert sum(os.path.getsize(p) for p in paths if os.path.exists(p)) <= 2.5 * entry
    misses = cache.misses
    again = cache.get(images[1])  # gone from disk: encoded again, the same embedding
    assert cache.misses == misses + 1
    assert np.allclose(again.features, embs[1].features.cpu(), atol=2e-2)


def test_bf16_encoder_answers_like_fp32_under_its_own_cache_key(hc18):
    """The bf16 encoder (the default where the CPU runs bf16 natively) must not change answers that matter, and its
    embeddings must never be mixed with fp32 ones."""
    fp32, bf16 = SamPredictor.litemedsam(encoder_bf16=False), SamPredictor.litemedsam(encoder_bf16=True)
    assert fp32.encoder_key != bf16.encoder_key
    for case in test_split(hc18, "test", 4, seed=3):
        ref = case.load_mask()
        rows, cols = np.nonzero(ref)
        image = read_image(case.image_path)
        box = Prompt(box=(cols.min() - 10, rows.min() - 10, cols.max() + 10, rows.max() + 10))
        d32, d16 = dice(fp32.predict(image, box).mask, ref), dice(bf16.predict(image, box).mask, ref)
        assert d16 > 0.85 and abs(d16 - d32) < 0.02, (case.image_id, d32, d16)
        assert bf16.embed(image).features.dtype == fp32.embed(image).features.dtype
