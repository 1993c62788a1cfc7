"""Denoising diffusion models of fetal head ultrasound image-mask pairs: configuration, model, schedulers,
training data and the training loop with resumable checkpoints. Sampling lives in :mod:`fetal_head.synthesis.sampling`.

Two schemes:

- ``joint`` (the paper's scheme): one UNet denoises 3 channels (image, image, mask), so every sample is a pair;
  the mask is whatever the model draws and has to pass quality control (:mod:`fetal_head.synthesis.quality`).
- ``mask_conditioned`` (the default): the UNet denoises the image only and sees the mask as a second input
  channel (channel concatenation: in_channels=2, out_channels=1). Masks come from a shape model of real heads
  (:mod:`fetal_head.synthesis.shape_model`), so each mask is one filled ellipse by construction and the image is generated
  to match it. Why the default: image-mask consistency, the thing a segmentation trainer needs, is a conditioning
  signal the model is trained on rather than something two channels have to agree on by chance, and the mask
  distribution is controlled (fitted to real heads, no malformed masks to reject). Which scheme gives the more
  useful training data is an empirical question that needs GPU training at 256 px and a downstream SAM
  fine-tuning comparison; it has not been run (CPU-only so far).

Both are trained with the DDPM objective (epsilon prediction, 1000 steps, cosine schedule) on images resized to
``image_size`` (square: the 800x540 frames are squeezed and stretched back on output), with an EMA of the
weights (diffusers' EMAModel with warm-up), AdamW with a cosine learning-rate schedule, horizontal flips, and
bf16 autocast on GPU only. Checkpoints are plain dicts of state dicts written atomically with ``torch.save`` and
read with ``torch.load(weights_only=True)``; training resumes from the last one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..files import atomic_torch_save

logger = logging.getLogger(__name__)

SCHEMES = ("mask_conditioned", "joint")
DEFAULT_SCHEME = "mask_conditioned"
SAMPLERS = ("ddim", "dpm")


@dataclass
class DiffusionConfig:
    scheme: str = DEFAULT_SCHEME
    image_size: int = 256
    block_out_channels: Tuple[int, ...] = (64, 128, 128, 256, 256)
    layers_per_block: int = 2
    attention_levels: Tuple[bool, ...] = (False, False, False, True, False)  # self-attention at 32x32 (256 px)
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    batch_size: int = 16
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 500
    max_steps: int = 50_000
    ema_decay: float = 0.9999  # the ceiling; warm-up (inv_gamma, power) starts it low so early EMA tracks the model
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    mixed_precision: str = "bf16"  # used on CUDA only: "bf16", "fp16" or "no"
    hflip: bool = True
    checkpoint_every: int = 2000
    sampler: str = "ddim"
    sampling_steps: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_levels = tuple(self.attention_levels)
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        if self.image_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError("image_size must be divisible by 2**(number of levels - 1)")

    @property
    def in_channels(self) -> int:
        return 3 if self.scheme == "joint" else 2

    @property
    def out_channels(self) -> int:
        return 3 if self.scheme == "joint" else 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DiffusionConfig":
        return cls(**json.loads(text))


# "tiny" is for CPU tests and smoke runs: 32 px, two levels of one ResNet layer, no attention. Its samples are
# noise-like; only the plumbing is exercised. "default" is the GPU configuration (256 px, ~30M parameters).
CONFIGS: Dict[str, DiffusionConfig] = {
    "default": DiffusionConfig(),
    "tiny": DiffusionConfig(
        image_size=32, block_out_channels=(16, 32), layers_per_block=1, attention_levels=(False, False),
        batch_size=8, learning_rate=1e-3, lr_warmup_steps=0, max_steps=20, checkpoint_every=10, sampling_steps=10,
    ),
}


def make_config(name: str = "default", **overrides) -> DiffusionConfig:
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {tuple(CONFIGS)}, got {name!r}")
    return replace(CONFIGS[name], **{k: v for k, v in overrides.items() if v is not None})


# ---- model and schedulers (kept apart, as in diffusers) ------------------------------------------------------

def build_unet(config: DiffusionConfig):
    from diffusers import UNet2DModel

    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=min(32, config.block_out_channels[0]),
        attention_head_dim=8,
    )


def build_train_scheduler(config: DiffusionConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type="epsilon", clip_sample=False)


def build_sampler(config: DiffusionConfig, name: Optional[str] = None):
    """A fast sampler sharing the training noise schedule: DDIM (eta=0) or DPM-Solver++ (2nd order)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    name = name or config.sampler
    train = build_train_scheduler(config)
    if name == "ddim":
        return DDIMScheduler.from_config(train.config, clip_sample=True, set_alpha_to_one=True)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(train.config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {name!r}")


# ---- training data ------------------------------------------------------------------------------------------

def load_pair(image_path: str, mask_path: str, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One real pair at the model's resolution: image in [-1, 1] (1, S, S), mask in {-1, 1} (1, S, S)."""
    from ..io import read_image, read_mask

    image = torch.from_numpy(read_image(image_path)).float()[None, None] / 127.5 - 1.0
    mask = torch.from_numpy(read_mask(mask_path).astype(np.float32))[None, None]
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    # area-average then threshold: the mask stays binary and its boundary lands where the coverage is half
    mask = F.interpolate(mask, size=(size, size), mode="area")
    return image[0].clamp(-1, 1), torch.where(mask[0] >= 0.5, 1.0, -1.0)


def load_pairs(pairs: Sequence[Tuple[str, str]], size: int, progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """All training pairs in memory as (N, 1, S, S) tensors (438 HC18 pool images at 256 px: ~230 MB)."""
    images, masks = [], []
    for image_path, mask_path in tqdm(pairs, desc="load pairs", unit="pair", disable=not progress):
        im, m = load_pair(image_path, mask_path, size)
        images.append(im)
        masks.append(m)
    return torch.stack(images), torch.stack(masks)


def model_input(config: DiffusionConfig, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The clean sample x0 the diffusion runs on: (image, image, mask) for ``joint``, the image otherwise."""
    return torch.cat([image, image, mask], 1) if config.scheme == "joint" else image


def unet_forward(unet, config: DiffusionConfig, noisy: torch.Tensor, t: torch.Tensor, mask: Optional[torch.Tensor]):
    """Noise prediction; the mask-conditioned model sees the mask concatenated to its noisy input."""
    x = torch.cat([noisy, mask], 1) if config.scheme == "mask_conditioned" else noisy
    return unet(x, t).sample


# ---- checkpoints --------------------------------------------------------------------------------------------

def save_checkpoint(path: str, state: dict) -> None:
    """Atomic write: a killed run never leaves a half-written checkpoint where resume or sampling looks."""
    atomic_torch_save(state, path)


def load_checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_hash(path: str) -> str:
    """The generator version recorded in every synthetic pair's provenance: first 16 hex of the file's SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def ema_unet_from_checkpoint(ckpt: dict):
    """(UNet with the EMA weights, config): what sampling uses."""
    config = DiffusionConfig.from_json(ckpt["config"])
    unet = build_unet(config)
    unet.load_state_dict(ckpt["unet"])
    params = list(unet.parameters())
    for p, shadow in zip(params, ckpt["ema"]["shadow_params"]):
        p.data.copy_(shadow.to(p.dtype))
    return unet.eval(), config


# ---- training -----------------------------------------------------------------------------------------------

def _autocast(device: torch.device, mixed_precision: str):
    if device.type == "cuda" and mixed_precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)
    return torch.autocast(device.type, enabled=False)


def train(
    config: DiffusionConfig,
    images: torch.Tensor,
    masks: torch.Tensor,
    checkpoint_path: str,
    device: str = "cpu",
    resume: bool = True,
    progress: bool = True,
    extra: Optional[dict] = None,
) -> dict:
    """Train (or continue training) until ``config.max_steps``; returns a summary. ``images``/``masks`` are
    (N, 1, S, S) from :func:`load_pairs`. ``extra`` (JSON-able) is stored in the checkpoint, e.g. the shape
    model and the training image ids."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    if images.shape[-1] != config.image_size:
        raise ValueError(f"pairs are {images.shape[-1]} px, the config wants {config.image_size} px")
    dev = torch.device(device)
    torch.manual_seed(config.seed)
    unet = build_unet(config).to(dev)
    noise_scheduler = build_train_scheduler(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=1e-2)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=max(config.max_steps, 1))
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True,
                   inv_gamma=config.ema_inv_gamma, power=config.ema_power)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda" and config.mixed_precision == "fp16")
    rng = torch.Generator().manual_seed(config.seed)
    step, losses = 0, []

    if resume and os.path.isfile(checkpoint_path):
        ckpt = load_checkpoint(checkpoint_path)
        saved = DiffusionConfig.from_json(ckpt["config"])
        if (saved.scheme, saved.image_size, saved.block_out_channels, saved.layers_per_block) != (
            config.scheme, config.image_size, config.block_out_channels, config.layers_per_block):
            raise ValueError(f"{checkpoint_path} holds another model ({saved.scheme}, {saved.image_size} px); "
                             "use another checkpoint path or resume=False")
        unet.load_state_dict(ckpt["unet"])
        optimizer.load_state_dict(ckpt["optimizer"])
        lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        ema.load_state_dict(ckpt["ema"])
        ema.to(dev)
        rng.set_state(ckpt["rng"])
        step = int(ckpt["step"])
        logger.info(f"resumed {checkpoint_path} at step {step}")

    def save():
        save_checkpoint(checkpoint_path, {
            "config": config.to_json(),
            "step": step,
            "unet": {k: v.detach().cpu() for k, v in unet.state_dict().items()},
            "ema": {k: ([p.detach().cpu() for p in v] if k == "shadow_params" else v) for k, v in ema.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "rng": rng.get_state(),
            "extra": json.dumps(extra or {}),
        })

    n = len(images)
    start_step, t0 = step, time.time()
    unet.train()
    bar = tqdm(total=config.max_steps, initial=step, desc=f"train {config.scheme}", unit="step", disable=not progress)
    while step < config.max_steps:
        idx = torch.randint(0, n, (config.batch_size,), generator=rng)
        image, mask = images[idx], masks[idx]
        if config.hflip:  # a mirrored head is a plausible head; image and mask flip together
            flip = torch.rand(config.batch_size, generator=rng) < 0.5
            image = torch.where(flip[:, None, None, None], image.flip(-1), image)
            mask = torch.where(flip[:, None, None, None], mask.flip(-1), mask)
        image, mask = image.to(dev), mask.to(dev)
        x0 = model_input(config, image, mask)
        noise = torch.randn(x0.shape, generator=rng).to(dev)
        t = torch.randint(0, config.num_train_timesteps, (config.batch_size,), generator=rng).to(dev)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        with _autocast(dev, config.mixed_precision):
            pred = unet_forward(unet, config, noisy, t, mask)
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        ema.step(unet.parameters())
        step += 1
        losses.append(loss.detach().item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", ema=f"{ema.cur_decay_value or 0:.4f}")
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            save()
    bar.close()
    if not os.path.isfile(checkpoint_path):
        save()  # max_steps already reached by an older run of another path: still leave a checkpoint
    return {
        "checkpoint": checkpoint_path,
        "generator_version": checkpoint_hash(checkpoint_path),
        "steps_done": step - start_step,
        "step": step,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "seconds": round(time.time() - t0, 1),
        "num_pairs": n,
    }
