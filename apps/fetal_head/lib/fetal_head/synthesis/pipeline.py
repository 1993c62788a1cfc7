"""End to end: train a pair generator on real labelled pairs, then put QC-passed synthetic pairs into a MONAI
Label datastore (or an HC18-style folder). The MONAI Label task (lib/trainers/synthesis_train.py) and the scripts
(scripts/train_diffusion.py, scripts/synthesize.py) are thin wrappers over these functions."""

from __future__ import annotations

import logging
import time
from typing import List, Optional, Sequence, Tuple

import torch

import numpy as np

from .diffusion import DiffusionConfig, load_images, load_pairs, train
from ..io import read_mask
from .shape_model import HeadShapeModel
from .sampling import PairGenerator, SamplingOptions, synthesize
from .store import add_pair, next_free_index, synthetic_id, write_pair_to_folder

logger = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def train_generator(
    pairs: Sequence[Tuple[str, str, str]],
    config: DiffusionConfig,
    checkpoint_path: str,
    device: Optional[str] = None,
    resume: bool = True,
    progress: bool = True,
    unlabelled: Sequence[Tuple[str, str]] = (),
    legacy_loop: bool = False,
) -> dict:
    """Fit the head shape model on the real masks and train the diffusion model on ``pairs``
    (image_id, image_path, mask_path); the shape model and the training ids travel inside the checkpoint.

    ``unlabelled`` (image_id, image_path) are real images without labels: with ``config.unlabelled_images`` > 0
    a seeded draw of at most that many of them (never a labelled one) trains the generator's unconditional side
    (semi-supervised); otherwise they are ignored. Callers pass real images only: never synthetic pairs, never
    test images."""
    if not pairs:
        raise ValueError("no real labelled pairs to train the generator on")
    t0 = time.time()
    ids = [p[0] for p in pairs]
    shape_model = HeadShapeModel.fit((read_mask(p[2]) for p in pairs), names=ids)
    images, masks = load_pairs([(p[1], p[2]) for p in pairs], config.image_size, progress=progress)
    unl = [u for u in unlabelled if u[0] not in set(ids)]
    unl_images, unl_ids = None, []
    if config.unlabelled_images > 0 and unl:
        pick = np.random.default_rng(config.seed).permutation(len(unl))[: config.unlabelled_images]
        chosen = [unl[i] for i in sorted(pick)]
        unl_ids = [u[0] for u in chosen]
        unl_images = load_images([u[1] for u in chosen], config.image_size, progress=progress)
    summary = train(config, images, masks, checkpoint_path, device=device or default_device(), resume=resume,
                    progress=progress, unlabelled=unl_images, legacy_loop=legacy_loop,
                    extra={"shape_model": shape_model.to_json(), "train_ids": ids, "unlabelled_ids": unl_ids})
    summary["shape_model_fitted_on"] = shape_model.n_fitted
    summary["seconds_total"] = round(time.time() - t0, 1)
    return summary


def synthesize_into_datastore(
    ds,
    checkpoint_path: str,
    num_pairs: int,
    seed: int = 0,
    options: Optional[SamplingOptions] = None,
    device: Optional[str] = None,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
) -> dict:
    """Sample, QC and add ``num_pairs`` pairs as ``synthetic_<scheme>_<seed>_<index>`` (indices continue after any
    pair of the same scheme and seed already there: nothing is overwritten). One process: a datastore file is
    rewritten whole on every add, so parallel writers would lose each other's entries (see scripts/synthesize.py
    for multi-GPU runs, which write folders and merge)."""
    generator = PairGenerator(checkpoint_path, device=device or default_device(), sampler=sampler, steps=steps,
                              guidance_scale=guidance_scale)
    start = next_free_index(ds, generator.config.scheme, seed)
    return _synthesize_and_write(
        generator, num_pairs, seed, options, lambda image_id, pair, prov: add_pair(ds, image_id, pair.image,
                                                                                   pair.mask, prov),
        start_index=start,
    )


def synthesize_into_folder(
    folder: str,
    checkpoint_path: str,
    num_pairs: int,
    seed: int = 0,
    start_index: int = 0,
    rank: int = 0,
    world_size: int = 1,
    options: Optional[SamplingOptions] = None,
    device: Optional[str] = None,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
) -> dict:
    """This process's share of the pairs into an HC18-style folder (images/, masks/, provenance-rank<r>.jsonl);
    safe to run from several processes at once (disjoint indices and files)."""
    generator = PairGenerator(checkpoint_path, device=device or default_device(), sampler=sampler, steps=steps,
                              guidance_scale=guidance_scale)
    provenance_file = f"provenance-rank{rank}.jsonl"
    return _synthesize_and_write(
        generator, num_pairs, seed, options,
        lambda image_id, pair, prov: write_pair_to_folder(folder, image_id, pair.image, pair.mask, prov,
                                                          provenance_file=provenance_file),
        start_index=start_index, rank=rank, world_size=world_size,
    )


def _synthesize_and_write(generator: PairGenerator, num_pairs: int, seed: int, options, write, **shard) -> dict:
    """``synthesize`` with each accepted pair written as ``write(synthetic id, pair, provenance) -> id``."""
    scheme = generator.config.scheme
    added: List[str] = []

    def on_accept(pair, provenance):
        added.append(write(synthetic_id(scheme, seed, pair.index), pair, provenance))

    result = synthesize(generator, num_pairs, seed, on_accept, options=options, **shard)
    return {"added": added, "generator_version": generator.version, "scheme": scheme, **result}
