"""Sampling synthetic image-mask pairs from a trained diffusion checkpoint, with quality control.

Every candidate pair is determined by ``(seed, index)``: its shape-model mask (mask-conditioned scheme) and its
initial noise come from generators seeded by ``numpy.random.SeedSequence([seed, index])``. So a run can be split
over processes by index (rank r of w takes indices r, r + w, ...) and gives the same pairs as one process (up to
floating-point differences between batch compositions), and ids ``synthetic_<scheme>_<seed>_<index>`` never
repeat for a given generator run.

Pipeline (as in diffusers: model and scheduler passed in, the loop explicit):
    x_T ~ N(0, I) per pair -> for t in sampler.timesteps: eps = unet([x_t, mask], t); x_t = sampler.step(...)
then the image is resized from the model's square frame to the output frame (800x540 by default, HC18's).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .diffusion import (
    DiffusionConfig,
    build_sampler,
    checkpoint_hash,
    _autocast,
    ema_unet_from_checkpoint,
    guided_eps,
    load_checkpoint,
)
from .quality import QCResult, QCTally, QCThresholds, check_pair
from .shape_model import HeadEllipse, HeadShapeModel

logger = logging.getLogger(__name__)

OUTPUT_HW = (540, 800)  # HC18's frame: synthetic pairs look like real ones to every consumer


@dataclass
class SyntheticPair:
    image: np.ndarray  # (H, W) uint8
    mask: np.ndarray  # (H, W) bool
    seed: int
    index: int
    ellipse: Optional[HeadEllipse] = None  # the shape-model ellipse the image was conditioned on
    qc: Optional[QCResult] = None


def pair_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]) >> 1


def shard(indices: Sequence[int], rank: int, world_size: int) -> List[int]:
    """The indices rank ``rank`` of ``world_size`` processes samples (round-robin, DistributedSampler-style)."""
    return list(indices[rank::world_size])


class PairGenerator:
    """A trained generator (EMA weights) plus what its scheme needs to sample pairs."""

    def __init__(self, checkpoint_path: str, device: str = "cpu", sampler: Optional[str] = None,
                 steps: Optional[int] = None, guidance_scale: Optional[float] = None):
        ckpt = load_checkpoint(checkpoint_path)
        self.unet, self.config = ema_unet_from_checkpoint(ckpt)
        self.scheme = self.config.scheme_obj
        self.device = torch.device(device)
        self.unet.to(self.device)
        if self.device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)
        self.sampler_name = sampler or self.config.sampler
        self.steps = int(steps or self.config.sampling_steps)
        self.guidance_scale = float(self.config.guidance_scale if guidance_scale is None else guidance_scale)
        if self.guidance_scale != 1.0 and not self.scheme.conditional:
            raise ValueError(f"the {self.config.scheme} scheme has no condition to guide")
        self.version = checkpoint_hash(checkpoint_path)
        self.trained_steps = int(ckpt["step"])
        extra = json.loads(ckpt.get("extra") or "{}")
        self.shape_model = HeadShapeModel.from_json(extra["shape_model"]) if extra.get("shape_model") else None
        if self.scheme.draws_masks_from_shape_model and self.shape_model is None:
            raise ValueError(f"{checkpoint_path}: a {self.config.scheme} checkpoint needs its shape model")

    def provenance(self, seed: int, index: int) -> dict:
        return {
            "scheme": self.config.scheme,
            "generator_version": self.version,
            "trained_steps": self.trained_steps,
            "seed": seed,
            "index": index,
            "steps": self.steps,
            "sampler": self.sampler_name,
            "guidance_scale": self.guidance_scale,
            "image_size": self.config.image_size,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _condition(self, seed: int, index: int, output_hw) -> Tuple[np.ndarray, HeadEllipse, torch.Tensor]:
        """Full-resolution shape-model mask and its model-resolution version (as training resized real masks)."""
        rng = np.random.default_rng([seed, index])
        mask, ellipse = self.shape_model.sample_mask(rng, *output_hw)
        s = self.config.image_size
        small = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(s, s), mode="area")
        return mask, ellipse, torch.where(small[0] >= 0.5, 1.0, -1.0)

    @torch.no_grad()
    def generate(self, seed: int, indices: Sequence[int], output_hw=OUTPUT_HW) -> List[SyntheticPair]:
        """One batch of pairs, one per index."""
        cfg: DiffusionConfig = self.config
        s, c = cfg.image_size, cfg.out_channels
        noise = torch.stack([torch.randn((c, s, s), generator=torch.Generator().manual_seed(pair_seed(seed, i)))
                             for i in indices]).to(self.device)
        cond_full, ellipses, cond = [], [], None
        if self.scheme.draws_masks_from_shape_model:
            conds = [self._condition(seed, i, output_hw) for i in indices]
            cond_full = [m for m, _, _ in conds]
            ellipses = [e for _, e, _ in conds]
            cond = torch.stack([t for _, _, t in conds]).to(self.device)
        sampler = build_sampler(cfg, self.sampler_name)
        sampler.set_timesteps(self.steps)
        x = noise * sampler.init_noise_sigma
        for t in sampler.timesteps:
            model_in = sampler.scale_model_input(x, t)
            with _autocast(self.device, cfg.mixed_precision):
                eps = guided_eps(self.unet, cfg, model_in, t.expand(len(indices)).to(self.device), cond,
                                 self.guidance_scale)
            x = sampler.step(eps.float(), t, x).prev_sample
        x = x.float().cpu()
        image, mask_logit = self.scheme.split_output(x)
        image = F.interpolate(image, size=output_hw, mode="bilinear", align_corners=False)
        image = ((image[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        if mask_logit is not None:
            # the generated mask channel, resized as logits then thresholded at the midpoint of {-1, 1}
            mask_logit = F.interpolate(mask_logit, size=output_hw, mode="bilinear", align_corners=False)
            masks = list((mask_logit[:, 0] > 0).numpy())
        else:
            masks = cond_full
        return [SyntheticPair(image=image[k], mask=masks[k], seed=seed, index=i,
                              ellipse=ellipses[k] if ellipses else None) for k, i in enumerate(indices)]


@dataclass
class SamplingOptions:
    """How candidates are sampled and quality-checked (``synthesize`` and the datastore/folder writers)."""

    qc: str = "full"  # "full" (shape gates + SAM agreement) or "shape-only"
    predictor: Any = None  # the SAM predictor that "full" QC prompts
    thresholds: QCThresholds = field(default_factory=QCThresholds)
    batch_size: int = 8
    max_candidates_factor: float = 4.0  # give up after num_pairs x this many candidates
    output_hw: Tuple[int, int] = OUTPUT_HW
    progress: bool = True
    batched_qc: bool = True  # encode each batch's shape-passed images in one SAM encoder call before the gates


def _pre_encode(pairs: Sequence[SyntheticPair], opt: SamplingOptions) -> None:
    """Batched QC: one SAM encoder call for the batch's candidates that pass the shape gate (the SAM gate's two
    prompts per pair then only run the decoder, from the predictor's cache)."""
    from .quality import check_shape

    if opt.qc != "full" or opt.predictor is None or not opt.batched_qc:
        return
    todo = [p.image for p in pairs if check_shape(p.mask, opt.thresholds).accepted]
    if len(todo) < 2:
        return
    for image, emb in zip(todo, opt.predictor.encode(todo)):
        opt.predictor.remember(image, emb)


def synthesize(
    generator: PairGenerator,
    num_pairs: int,
    seed: int,
    on_accept: Callable[[SyntheticPair, dict], None],
    start_index: int = 0,
    rank: int = 0,
    world_size: int = 1,
    options: Optional[SamplingOptions] = None,
) -> dict:
    """Sample candidates until ``num_pairs`` pass QC (or ``num_pairs x max_candidates_factor`` candidates were
    tried); each accepted pair goes to ``on_accept(pair, provenance)``. With ``world_size`` > 1 this process
    takes its round-robin share of indices and of ``num_pairs``. Returns the QC tally and the accepted ids."""
    opt = options or SamplingOptions()
    qc, batch_size = opt.qc, opt.batch_size
    target = num_pairs // world_size + (1 if rank < num_pairs % world_size else 0)
    budget = int(math.ceil(target * opt.max_candidates_factor))
    # round-robin over an index range as long as every rank's budget: rank r takes start+r, start+r+w, ...
    indices = shard(range(start_index, start_index + budget * world_size), rank, world_size)
    tally, accepted = QCTally(), []
    bar = tqdm(total=target, desc=f"synthesize rank {rank}", unit="pair", disable=not opt.progress)
    pos = 0
    while len(accepted) < target and pos < len(indices):
        batch = indices[pos : pos + min(batch_size, max(target - len(accepted), 1))]
        pos += len(batch)
        pairs = generator.generate(seed, batch, opt.output_hw)
        _pre_encode(pairs, opt)
        for pair in pairs:
            result = check_pair(pair.image, pair.mask, predictor=opt.predictor, mode=qc, thresholds=opt.thresholds)
            pair.qc = result
            tally.add(result)
            if result.accepted and len(accepted) < target:
                prov = generator.provenance(seed, pair.index)
                prov["qc"] = {"mode": qc, **{k: round(float(v), 4) for k, v in result.detail.items()}}
                if pair.ellipse is not None:
                    prov["ellipse"] = {k: round(float(v), 3) for k, v in pair.ellipse.__dict__.items()}
                on_accept(pair, prov)
                accepted.append(pair.index)
                bar.update(1)
        bar.set_postfix(tried=tally.total, rejected=sum(tally.rejected().values()))
    bar.close()
    if len(accepted) < target:
        logger.warning(f"only {len(accepted)} of {target} pairs passed QC in {tally.total} candidates: "
                       f"rejected {tally.rejected()}")
    return {"target": target, "accepted_indices": accepted, "qc": tally.to_dict(), "qc_mode": qc}
