"""Denoising diffusion models of fetal head ultrasound image-mask pairs: configuration, model, schedulers,
training data and the training loop with resumable checkpoints. Sampling lives in :mod:`fetal_head.synthesis.sampling`.

Two schemes (one class each in :mod:`fetal_head.synthesis.schemes`; configs and checkpoints store the name):

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

Semi-supervised (mask-conditioned only, ``unlabelled_images`` > 0): unlabelled images train the same UNet with
the null condition (an all-zero mask channel), labelled pairs with their mask (dropped with probability
``cond_dropout``, as classifier-free guidance trains); sampling uses guidance ``guidance_scale``
(:func:`guided_eps`). With ``unlabelled_images`` = 0, ``cond_dropout`` = 0 and ``guidance_scale`` = 1 (the
defaults) the generator is the labelled-only one.
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
from .schemes import DEFAULT_SCHEME, Scheme, scheme_for

logger = logging.getLogger(__name__)

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
    # semi-supervised mask-conditioned training (classifier-free guidance style): up to ``unlabelled_images``
    # unlabelled images learn the image distribution with the null condition; ``labelled_share`` of each batch
    # is labelled pairs when there are unlabelled images; ``cond_dropout`` drops a labelled pair's condition too;
    # sampling mixes conditional and unconditional predictions with ``guidance_scale`` (1: conditional only).
    unlabelled_images: int = 0
    labelled_share: float = 0.5
    cond_dropout: float = 0.0
    guidance_scale: float = 1.0
    # speed (the training loop's fast path): channels-last memory on CUDA, torch.compile of the UNet (off: its
    # compile time only pays back over thousands of steps), host syncs for the progress bar every ``log_every`` steps
    channels_last: bool = True
    compile: bool = False
    log_every: int = 25

    def __post_init__(self):
        scheme = scheme_for(self.scheme)  # raises on an unknown name
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_levels = tuple(self.attention_levels)
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        if self.image_size % 2 ** (len(self.block_out_channels) - 1):
            raise ValueError("image_size must be divisible by 2**(number of levels - 1)")
        if not scheme.conditional and (self.unlabelled_images or self.cond_dropout or self.guidance_scale != 1.0):
            raise ValueError(f"the {self.scheme} scheme has no condition: unlabelled images, cond_dropout and "
                             "guidance need the mask_conditioned scheme")
        if not 0.0 <= self.cond_dropout < 1.0 or not 0.0 < self.labelled_share <= 1.0:
            raise ValueError("cond_dropout must be in [0, 1) and labelled_share in (0, 1]")

    @property
    def scheme_obj(self) -> Scheme:
        return scheme_for(self.scheme)

    @property
    def in_channels(self) -> int:
        return self.scheme_obj.in_channels

    @property
    def out_channels(self) -> int:
        return self.scheme_obj.out_channels

    @property
    def semi_supervised(self) -> bool:
        return self.unlabelled_images > 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DiffusionConfig":
        """Checkpoints written before a field existed load with that field's default."""
        return cls(**json.loads(text))


# "tiny" is for CPU tests and smoke runs: 32 px, two levels of one ResNet layer, no attention. Its samples are
# noise-like; only the plumbing is exercised. "default" is the GPU configuration (256 px, ~30M parameters),
# sampled with DPM-Solver++ (2M) in 25 steps (as good as DDIM 50 on standard benchmarks at half the UNet calls;
# not yet measured here: no GPU). "fast128" is the issue-14 GPU-budget generator: 128 px, channels
# 64-128-256-256, attention at 16x16, a few thousand steps in minutes.
CONFIGS: Dict[str, DiffusionConfig] = {
    "default": DiffusionConfig(sampler="dpm", sampling_steps=25),
    "fast128": DiffusionConfig(
        image_size=128, block_out_channels=(64, 128, 256, 256), attention_levels=(False, False, True, False),
        batch_size=32, learning_rate=2e-4, lr_warmup_steps=200, max_steps=4000, checkpoint_every=1000,
        ema_decay=0.999, sampler="dpm", sampling_steps=20,
    ),
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


def load_image(image_path: str, size: int) -> torch.Tensor:
    """One (unlabelled) image at the model's resolution, in [-1, 1], (1, S, S)."""
    from ..io import read_image

    image = torch.from_numpy(read_image(image_path)).float()[None, None] / 127.5 - 1.0
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return image[0].clamp(-1, 1)


def load_images(paths: Sequence[str], size: int, progress: bool = True) -> torch.Tensor:
    """Unlabelled images in memory as (N, 1, S, S)."""
    return torch.stack([load_image(p, size) for p in tqdm(paths, desc="load images", unit="image",
                                                          disable=not progress)])


def load_pairs(pairs: Sequence[Tuple[str, str]], size: int, progress: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """All training pairs in memory as (N, 1, S, S) tensors (438 HC18 pool images at 256 px: ~230 MB)."""
    images, masks = [], []
    for image_path, mask_path in tqdm(pairs, desc="load pairs", unit="pair", disable=not progress):
        im, m = load_pair(image_path, mask_path, size)
        images.append(im)
        masks.append(m)
    return torch.stack(images), torch.stack(masks)


def model_input(config: DiffusionConfig, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The clean sample x0 the diffusion runs on (the scheme decides: :meth:`Scheme.model_input`)."""
    return config.scheme_obj.model_input(image, mask)


def unet_forward(unet, config: DiffusionConfig, noisy: torch.Tensor, t: torch.Tensor, mask: Optional[torch.Tensor]):
    """Noise prediction; a conditional scheme sees its condition beside the noisy input."""
    return unet(config.scheme_obj.unet_input(noisy, mask), t).sample


def guided_eps(unet, config: DiffusionConfig, noisy: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor],
               guidance_scale: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance: ``eps_u + w (eps_c - eps_u)`` with the conditional and the null-condition
    predictions from one batched forward; ``w`` = 1 is the conditional prediction alone (one forward)."""
    scheme = config.scheme_obj
    if guidance_scale == 1.0 or not scheme.conditional:
        return unet_forward(unet, config, noisy, t, cond)
    both = unet_forward(unet, config, torch.cat([noisy, noisy]), torch.cat([t, t]),
                        torch.cat([cond, scheme.null_condition(cond)]))
    eps_c, eps_u = both.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


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
    unlabelled: Optional[torch.Tensor] = None,
    legacy_loop: bool = False,
) -> dict:
    """Train (or continue training) until ``config.max_steps``; returns a summary. ``images``/``masks`` are
    (N, 1, S, S) from :func:`load_pairs`; ``unlabelled`` (M, 1, S, S) images from :func:`load_images` train the
    unconditional side of a semi-supervised mask-conditioned generator (``config.unlabelled_images`` > 0).
    ``extra`` (JSON-able) is stored in the checkpoint, e.g. the shape model and the training image ids.

    The loop keeps the training data on the device as tensors and draws every random number there (no
    host-device copy per step), reads the loss back to the host only every ``config.log_every`` steps, updates
    the EMA and clips gradients with foreach kernels and uses fused AdamW, channels-last memory and bf16
    autocast on CUDA (``config.compile`` adds torch.compile). ``legacy_loop=True`` runs the loop as it was
    before these changes (CPU-side batches, a ``.item()`` per step, per-tensor EMA): kept only so that
    scripts/profile_synthesis.py can measure old and new side by side."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    scheme = config.scheme_obj
    if images.shape[-1] != config.image_size:
        raise ValueError(f"pairs are {images.shape[-1]} px, the config wants {config.image_size} px")
    if unlabelled is not None and len(unlabelled) == 0:
        unlabelled = None
    if unlabelled is not None:
        if not scheme.conditional:
            raise ValueError(f"the {config.scheme} scheme cannot learn from unlabelled images")
        if unlabelled.shape[-1] != config.image_size:
            raise ValueError(f"unlabelled images are {unlabelled.shape[-1]} px, the config wants {config.image_size} px")
        if legacy_loop:
            raise ValueError("the legacy loop is labelled-only")
    dev = torch.device(device)
    fast = not legacy_loop
    cuda = dev.type == "cuda"
    torch.manual_seed(config.seed)
    unet = build_unet(config).to(dev)
    channels_last = fast and cuda and config.channels_last
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    noise_scheduler = build_train_scheduler(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=1e-2,
                                  **({"fused": True} if fast and cuda else {}))
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=max(config.max_steps, 1))
    ema = EMAModel(unet.parameters(), decay=config.ema_decay, use_ema_warmup=True,
                   inv_gamma=config.ema_inv_gamma, power=config.ema_power, foreach=fast)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and config.mixed_precision == "fp16")
    rng = torch.Generator().manual_seed(config.seed)  # the legacy loop's (CPU) random numbers
    drng = torch.Generator(device=dev).manual_seed(config.seed)  # the fast loop's, on the device
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
        if "rng_device" in ckpt and ckpt.get("rng_device_type") == dev.type:
            drng.set_state(ckpt["rng_device"])
        else:  # an older checkpoint, or another device: a fresh stream per resume step
            drng.manual_seed(config.seed * 1_000_003 + step)
        logger.info(f"resumed {checkpoint_path} at step {step}")

    def save():
        save_checkpoint(checkpoint_path, {
            "config": config.to_json(),
            "step": step,
            "unet": {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()},
            "ema": {k: ([p.detach().cpu().contiguous() for p in v] if k == "shadow_params" else v)
                    for k, v in ema.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "rng": rng.get_state(),
            "rng_device": drng.get_state(),
            "rng_device_type": dev.type,
            "extra": json.dumps(extra or {}),
        })

    n = len(images)
    start_step, t0 = step, time.time()
    unet.train()
    forward = torch.compile(unet) if (fast and config.compile) else unet
    bar = tqdm(total=config.max_steps, initial=step, desc=f"train {config.scheme}", unit="step", disable=not progress)
    B = config.batch_size

    if fast:
        images_d, masks_d = images.to(dev), masks.to(dev)
        unl_d = unlabelled.to(dev) if unlabelled is not None else None
        n_lab = max(1, int(round(B * config.labelled_share))) if unl_d is not None else B
        n_unl = B - n_lab
        labelled = torch.arange(B, device=dev) < n_lab  # rows of the batch that carry a real mask
        loss_acc, acc_steps = torch.zeros((), device=dev), 0

    def fast_step():
        li = torch.randint(0, n, (n_lab,), generator=drng, device=dev)
        image, mask = images_d[li], masks_d[li]
        if n_unl:
            ui = torch.randint(0, len(unl_d), (n_unl,), generator=drng, device=dev)
            image = torch.cat([image, unl_d[ui]])
            mask = torch.cat([mask, torch.zeros((n_unl,) + mask.shape[1:], device=dev)])
        if config.hflip:  # a mirrored head is a plausible head; image and mask flip together
            flip = (torch.rand(B, generator=drng, device=dev) < 0.5)[:, None, None, None]
            image = torch.where(flip, image.flip(-1), image)
            mask = torch.where(flip, mask.flip(-1), mask)
        x0 = scheme.model_input(image, mask)
        cond = mask
        if scheme.conditional:
            keep = labelled
            if config.cond_dropout > 0:
                keep = keep & (torch.rand(B, generator=drng, device=dev) >= config.cond_dropout)
            if n_unl or config.cond_dropout > 0:
                cond = torch.where(keep[:, None, None, None], mask, scheme.null_condition(mask))
        noise = torch.randn(x0.shape, generator=drng, device=dev)
        t = torch.randint(0, config.num_train_timesteps, (B,), generator=drng, device=dev)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        x_in = scheme.unet_input(noisy, cond)
        if channels_last:
            x_in = x_in.contiguous(memory_format=torch.channels_last)
        with _autocast(dev, config.mixed_precision):
            pred = forward(x_in, t).sample
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0, foreach=True)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        ema.step(unet.parameters())
        return loss.detach()

    def legacy_step():
        idx = torch.randint(0, n, (B,), generator=rng)
        image, mask = images[idx], masks[idx]
        if config.hflip:
            flip = torch.rand(B, generator=rng) < 0.5
            image = torch.where(flip[:, None, None, None], image.flip(-1), image)
            mask = torch.where(flip[:, None, None, None], mask.flip(-1), mask)
        image, mask = image.to(dev), mask.to(dev)
        x0 = model_input(config, image, mask)
        noise = torch.randn(x0.shape, generator=rng).to(dev)
        t = torch.randint(0, config.num_train_timesteps, (B,), generator=rng).to(dev)
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
        return loss.detach().item()

    while step < config.max_steps:
        step += 1
        if fast:
            loss_acc += fast_step()
            acc_steps += 1
            if acc_steps >= config.log_every or step == config.max_steps or step % config.checkpoint_every == 0:
                losses.append(float(loss_acc.item()) / acc_steps)  # the one host sync per log_every steps
                loss_acc.zero_()
                bar.update(acc_steps)
                acc_steps = 0
                bar.set_postfix(loss=f"{losses[-1]:.4f}", ema=f"{ema.cur_decay_value or 0:.4f}")
        else:
            losses.append(legacy_step())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", ema=f"{ema.cur_decay_value or 0:.4f}")
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            save()
    bar.close()
    if not os.path.isfile(checkpoint_path):
        save()  # max_steps already reached by an older run of another path: still leave a checkpoint
    recent = losses[-max(1, 50 // config.log_every):] if fast else losses[-50:]
    return {
        "checkpoint": checkpoint_path,
        "generator_version": checkpoint_hash(checkpoint_path),
        "steps_done": step - start_step,
        "step": step,
        "final_loss": float(np.mean(recent)) if losses else None,
        "seconds": round(time.time() - t0, 1),
        "num_pairs": n,
        "num_unlabelled": 0 if unlabelled is None else len(unlabelled),
    }
