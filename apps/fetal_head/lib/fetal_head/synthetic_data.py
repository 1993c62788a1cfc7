"""End to end: train a pair generator on real labelled pairs, then put QC-passed synthetic pairs into a MONAI
Label datastore (or an HC18-style folder). The MONAI Label task (lib/trainers/synthesis_train.py) and the scripts
(scripts/train_diffusion.py, scripts/synthesize.py) are thin wrappers over these functions."""

from __future__ import annotations

import logging
import time
from typing import List, Optional, Sequence, Tuple

import torch

from .diffusion import DiffusionConfig, load_pairs, train
from .images import read_mask
from .quality import QCThresholds
from .shape_model import HeadShapeModel
from .synthesis import OUTPUT_HW, PairGenerator, synthesize
from .synthetic_store import add_pair, next_free_index, synthetic_id, write_pair_to_folder

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
) -> dict:
    """Fit the head shape model on the real masks and train the diffusion model on ``pairs``
    (image_id, image_path, mask_path); the shape model and the training ids travel inside the checkpoint."""
    if not pairs:
        raise ValueError("no real labelled pairs to train the generator on")
    t0 = time.time()
    ids = [p[0] for p in pairs]
    shape_model = HeadShapeModel.fit((read_mask(p[2]) for p in pairs), names=ids)
    images, masks = load_pairs([(p[1], p[2]) for p in pairs], config.image_size, progress=progress)
    summary = train(config, images, masks, checkpoint_path, device=device or default_device(), resume=resume,
                    progress=progress, extra={"shape_model": shape_model.to_json(), "train_ids": ids})
    summary["shape_model_fitted_on"] = shape_model.n_fitted
    summary["seconds_total"] = round(time.time() - t0, 1)
    return summary


def synthesize_into_datastore(
    ds,
    checkpoint_path: str,
    num_pairs: int,
    seed: int = 0,
    qc: str = "full",
    predictor=None,
    thresholds: QCThresholds = QCThresholds(),
    device: Optional[str] = None,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    batch_size: int = 8,
    max_candidates_factor: float = 4.0,
    progress: bool = True,
) -> dict:
    """Sample, QC and add ``num_pairs`` pairs as ``synthetic_<scheme>_<seed>_<index>`` (indices continue after any
    pair of the same scheme and seed already there: nothing is overwritten). One process: a datastore file is
    rewritten whole on every add, so parallel writers would lose each other's entries (see scripts/synthesize.py
    for multi-GPU runs, which write folders and merge)."""
    generator = PairGenerator(checkpoint_path, device=device or default_device(), sampler=sampler, steps=steps)
    scheme = generator.config.scheme
    start = next_free_index(ds, scheme, seed)
    added: List[str] = []

    def on_accept(pair, provenance):
        added.append(add_pair(ds, synthetic_id(scheme, seed, pair.index), pair.image, pair.mask, provenance))

    result = synthesize(generator, num_pairs, seed, on_accept, start_index=start, qc=qc, predictor=predictor,
                        thresholds=thresholds, batch_size=batch_size, max_candidates_factor=max_candidates_factor,
                        progress=progress)
    return {"added": added, "generator_version": generator.version, "scheme": scheme, **result}


def synthesize_into_folder(
    folder: str,
    checkpoint_path: str,
    num_pairs: int,
    seed: int = 0,
    start_index: int = 0,
    rank: int = 0,
    world_size: int = 1,
    qc: str = "full",
    predictor=None,
    thresholds: QCThresholds = QCThresholds(),
    device: Optional[str] = None,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    batch_size: int = 8,
    max_candidates_factor: float = 4.0,
    output_hw=OUTPUT_HW,
    progress: bool = True,
) -> dict:
    """This process's share of the pairs into an HC18-style folder (images/, masks/, provenance-rank<r>.jsonl);
    safe to run from several processes at once (disjoint indices and files)."""
    generator = PairGenerator(checkpoint_path, device=device or default_device(), sampler=sampler, steps=steps)
    scheme = generator.config.scheme
    added: List[str] = []
    provenance_file = f"provenance-rank{rank}.jsonl"

    def on_accept(pair, provenance):
        added.append(write_pair_to_folder(folder, synthetic_id(scheme, seed, pair.index), pair.image, pair.mask,
                                          provenance, provenance_file=provenance_file))

    result = synthesize(generator, num_pairs, seed, on_accept, start_index=start_index, rank=rank,
                        world_size=world_size, qc=qc, predictor=predictor, thresholds=thresholds,
                        batch_size=batch_size, max_candidates_factor=max_candidates_factor, output_hw=output_hw,
                        progress=progress)
    return {"added": added, "generator_version": generator.version, "scheme": scheme, **result}
