"""Fine-tuning SAM on labelled fetal head images (importable without the server).

Design decisions:

- What trains: SAM's mask decoder for box (and box + click) prompts, and beside it a separate prompt-free head
  (``auto_decoder``, a copy of the mask decoder, :func:`fetal_head.sam.attach_auto_decoder`) trained with no
  sparse prompt at all. Separate weights keep box-prompt results exactly what box training gives; at inference
  the head's coarse mask only proposes the box that the box decoder then segments
  (:meth:`fetal_head.sam.SamPredictor.predict_automatic`). Each head keeps its own best epoch (validation Dice
  with a fixed jittered box, and prompt-free Dice through the served path). The image encoder and prompt encoder
  stay frozen by default, as MedSAM/LiteMedSAM fine-tuning does; ``train_encoder="lora"`` (peft LoRA on the
  encoder's attention and MLP linears, merged into the weights at the end) or ``"full"`` train it end to end at
  the model's input size (256 px for LiteMedSAM), bypassing the embedding cache. The saved encoder weights change
  the served predictor's ``encoder_key``, so no cached embedding of the old encoder is ever reused.
- Cached embeddings: with the encoder frozen, each image's embedding is computed once and stored on disk
  (``torch.save`` of float16 features, loaded with ``weights_only=True``), keyed by a hash of the image pixels,
  a hash of the encoder weights (so another base model or a fine-tuned encoder never hits a stale entry) and
  whether the image was flipped. The decoders then train on cached embeddings only: on 2 CPU cores the
  LiteMedSAM encoder costs ~1-2 s per image, a decoder step ~0.1 s (``scripts/bench_training.py``).
  Entries are written to a temporary file and renamed, so a killed run never leaves a corrupt entry.
- Augmentation is on the prompt side: every step draws a new prompt for each image: the label's bounding box
  with 0-20 px jitter per side (at the original resolution) (90 %), or that box plus 1-3 foreground clicks
  inside the mask and sometimes one background click (10 %). Clicks alone are supported
  (``prompt_shares["clicks"]``) but off by default: the predictor turns click-only requests into box prompts,
  and on 10 labels a 50 % box share lowered test box Dice (0.908 zero-shot -> 0.879) where box-only training
  raised it (-> 0.934). An earlier prompt-free design fed the box decoder the full-image box as a "prompt-free"
  prompt: it lowered box Dice, hence the separate head. Pixel-side augmentation would invalidate the cache,
  except a horizontal flip (``flip=True``), which is encoded once more as its own cache entry; it is off by
  default because it doubles the encoder time on CPU.
- Data parallel: ``world_size > 1`` spawns that many processes (``torch.multiprocessing.spawn``, as MONAI
  Label's BasicTrainTask does; nccl on GPUs, gloo on CPU), wraps the per-sample losses in
  DistributedDataParallel, and gives each rank its own shard of every epoch's permutation (padded to equal
  length, like DistributedSampler). Embeddings are computed once in the parent first; rank 0 validates and
  hands the best weights back to the caller, which saves them.
- Loss: MONAI's DiceCELoss (sigmoid) on the decoders' low-resolution logits (the part covering the image)
  against the label resized to that grid; validation: MONAI's DiceMetric at the image's full resolution.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .images import read_image, read_mask
from .sam import AUTO_DECODER, ImageEmbedding, Prompt, SamPredictor, attach_auto_decoder

logger = logging.getLogger(__name__)

ENCODER_MODES = ("frozen", "lora", "full")
MIN_VAL_IMAGES_FOR_HEAD = 10  # validation images needed to trust the prompt-free head over the box search


@dataclass
class TrainConfig:
    max_epochs: int = 10
    train_batch_size: int = 4
    val_split: float = 0.2
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    max_real_labels: int = 0  # 0: all real labels
    synthetic_share: float = 0.0  # fraction of the training pairs that are synthetic
    train_encoder: str = "frozen"
    flip: bool = False
    max_jitter: int = 20
    seed: int = 0
    # share of each prompt kind among the box decoder's training steps (normalised)
    prompt_shares: Dict[str, float] = field(default_factory=lambda: {"box": 0.9, "box_clicks": 0.1, "clicks": 0.0})
    prompt_free_head: bool = True  # also train the prompt-free head (auto_decoder) on the same samples
    world_size: int = 1  # data-parallel processes (DDP): one per GPU, or gloo processes on CPU
    lora_rank: int = 8  # train_encoder="lora" only


@dataclass
class LabelledImage:
    image_id: str
    image_path: str
    label_path: str
    synthetic: bool = False


@dataclass
class Sample:
    image_id: str
    emb: Optional[ImageEmbedding]  # features (1, 256, 64, 64) float32; None when the encoder trains
    mask: np.ndarray  # (H, W) bool, in the same (possibly flipped) frame as the embedding
    image: Optional[np.ndarray] = None  # the (possibly flipped) frame, kept only when the encoder trains


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- prompts ---------------------------------------------------------------------------------------------------
def mask_box(mask: np.ndarray) -> Tuple[float, float, float, float]:
    """(x_min, y_min, x_max, y_max), inclusive pixel indices of the mask's bounding box."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        raise ValueError("empty mask has no bounding box")
    return float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())


def jitter_box(box, rng: np.random.Generator, max_jitter: int, height: int, width: int):
    """Grow each side outward by 0..max_jitter px (a user's box is drawn around the head, not inside it)."""
    j = rng.integers(0, max_jitter + 1, size=4)
    x0, y0, x1, y1 = box
    return (max(x0 - j[0], 0.0), max(y0 - j[1], 0.0), min(x1 + j[2], width - 1.0), min(y1 + j[3], height - 1.0))


def sample_clicks(mask: np.ndarray, rng: np.random.Generator, max_fg: int = 3, bg_prob: float = 0.5):
    """1..max_fg foreground clicks inside the mask and, with ``bg_prob``, one background click outside it."""
    rows, cols = np.nonzero(mask)
    n_fg = int(rng.integers(1, max_fg + 1))
    idx = rng.choice(len(rows), size=n_fg, replace=len(rows) < n_fg)
    points = [(float(cols[i]), float(rows[i])) for i in idx]
    labels = [1] * n_fg
    if rng.random() < bg_prob:
        brows, bcols = np.nonzero(~mask)
        if len(brows):
            i = int(rng.integers(len(brows)))
            points.append((float(bcols[i]), float(brows[i])))
            labels.append(0)
    return np.array(points, dtype=np.float32).reshape(-1, 2), np.array(labels, dtype=np.int64)


def sample_prompt(mask: np.ndarray, rng: np.random.Generator, shares: Dict[str, float], max_jitter: int = 20):
    """(kind, Prompt) for one box-decoder training step; kinds: box, box_clicks, clicks."""
    kinds = list(shares)
    p = np.array([shares[k] for k in kinds], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    h, w = mask.shape
    if kind == "clicks":
        pts, lab = sample_clicks(mask, rng)
        return kind, Prompt(points=pts, labels=lab)
    box = jitter_box(mask_box(mask), rng, max_jitter, h, w)
    if kind == "box_clicks":
        pts, lab = sample_clicks(mask, rng)
        return kind, Prompt(box=box, points=pts, labels=lab)
    return "box", Prompt(box=box)


# ---- embedding cache -------------------------------------------------------------------------------------------
class EmbeddingCache:
    """Image embeddings on disk: ``<dir>/<encoder>/<image hash>[_flip].pt``."""

    def __init__(self, cache_dir: str, predictor: SamPredictor):
        self.predictor = predictor
        self.dir = os.path.join(cache_dir, predictor.encoder_key)  # encoder weights + preprocessing
        os.makedirs(self.dir, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def path(self, image: np.ndarray, flipped: bool) -> str:
        return os.path.join(self.dir, SamPredictor.image_key(image) + ("_flip" if flipped else "") + ".pt")

    def get(self, image: np.ndarray, flipped: bool = False) -> ImageEmbedding:
        """``image`` is the unflipped frame; the flipped embedding is of ``image[:, ::-1]``."""
        path = self.path(image, flipped)
        if os.path.isfile(path):
            try:
                d = torch.load(path, map_location="cpu", weights_only=True)
                self.hits += 1
                return ImageEmbedding(
                    features=d["features"].float(),
                    original_hw=tuple(int(v) for v in d["original_hw"]),
                    input_hw=tuple(int(v) for v in d["input_hw"]),
                )
            except Exception as e:  # an unreadable entry is recomputed, never trusted
                logger.warning(f"embedding cache entry {path} unreadable ({e}); recomputing")
        self.misses += 1
        frame = np.ascontiguousarray(image[:, ::-1]) if flipped else image
        emb = self.predictor.encode([frame])[0]
        emb = ImageEmbedding(features=emb.features.detach().cpu().clone(), original_hw=emb.original_hw, input_hw=emb.input_hw)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pt")
        os.close(fd)
        try:
            # float16 halves the disk use (4 MB -> 2 MB per LiteMedSAM image); the rounding is far below label noise
            torch.save(
                {
                    "features": emb.features.half(),
                    "original_hw": torch.tensor(emb.original_hw),
                    "input_hw": torch.tensor(emb.input_hw),
                },
                tmp,
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return ImageEmbedding(features=emb.features.half().float(), original_hw=emb.original_hw, input_hw=emb.input_hw)


def load_samples(
    items: Sequence[LabelledImage], cache: Optional[EmbeddingCache], flip: bool, desc: str = "embed"
) -> List[List[Sample]]:
    """Per image: [unflipped sample] or [unflipped, flipped] samples, embeddings from the cache (``cache=None``:
    no embeddings, the frames themselves, for encoder training)."""
    out = []
    for it in tqdm(items, desc=desc, unit="image", mininterval=5):
        image = read_image(it.image_path)
        mask = read_mask(it.label_path)
        if mask.shape != image.shape:
            raise ValueError(f"label of {it.image_id} is {mask.shape}, image is {image.shape}")
        if not mask.any():
            logger.warning(f"skipping {it.image_id}: empty label")
            continue
        variants = []
        for flipped in (False, True) if flip else (False,):
            frame, m = (np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])) if flipped else (image, mask)
            if cache is None:
                variants.append(Sample(it.image_id, None, m, frame))
            else:
                variants.append(Sample(it.image_id, cache.get(image, flipped), m))
        out.append(variants)
        logger.info(f"embedded {len(out)}/{len(items)}: {it.image_id}")
    return out


# ---- selection of training and validation images ---------------------------------------------------------------
def split_items(items: Sequence[LabelledImage], cfg: TrainConfig):
    """(train, val): a seeded draw of ``max_real_labels`` real labels, ``val_split`` of them held out for
    validation, plus synthetic pairs for ``synthetic_share`` of the training set (synthetic never validates)."""
    rng = np.random.default_rng(cfg.seed)
    real = sorted([i for i in items if not i.synthetic], key=lambda i: i.image_id)
    synth = sorted([i for i in items if i.synthetic], key=lambda i: i.image_id)
    real = [real[k] for k in rng.permutation(len(real))]
    if cfg.max_real_labels and cfg.max_real_labels > 0:
        real = real[: cfg.max_real_labels]
    n_val = int(round(len(real) * cfg.val_split)) if len(real) > 1 else 0
    n_val = min(n_val, len(real) - 1)
    val, train = real[:n_val], real[n_val:]
    if cfg.synthetic_share > 0 and synth:
        share = min(cfg.synthetic_share, 0.95)
        n_syn = min(len(synth), int(round(len(train) * share / (1 - share))))
        train = train + [synth[k] for k in rng.permutation(len(synth))[:n_syn]]
    return train, val


# ---- training --------------------------------------------------------------------------------------------------
def low_res_target(predictor: SamPredictor, emb: ImageEmbedding, mask: np.ndarray) -> torch.Tensor:
    """The label on the decoder's low-resolution grid (the part covering the image), (1, 1, ch, cw)."""
    ch, cw = predictor._low_res_hw(emb)
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(t, size=(ch, cw), mode="area") > 0.5).float().to(predictor.device)


def step_logits(predictor: SamPredictor, emb: ImageEmbedding, prompt: Prompt, decoder: Optional[nn.Module] = None):
    """Low-resolution logits cropped to the image part, with gradients, (1, 1, ch, cw). An empty prompt decodes
    with no sparse prompt (the prompt-free head's input)."""
    boxes = None if prompt.box is None else np.array([prompt.box])
    pts = prompt.points if len(prompt.points) else None
    logits, _ = predictor.decode_with_grad(
        emb, boxes=boxes, points=pts, labels=prompt.labels if pts is not None else None, decoder=decoder
    )
    ch, cw = predictor._low_res_hw(emb)
    return logits[:, :1, :ch, :cw]


def sample_embedding(predictor: SamPredictor, s: Sample) -> ImageEmbedding:
    """The cached embedding, or (encoder training) the frame encoded now, with gradients when training."""
    if s.emb is not None:
        return s.emb
    return predictor.encode_with_grad([s.image])[0]


def fixed_val_prompts(samples: List[List[Sample]], seed: int, max_jitter: int):
    """One jittered box per validation image, the same at every epoch."""
    rng = np.random.default_rng(seed + 1000)
    out = []
    for variants in samples:
        m = variants[0].mask
        out.append(jitter_box(mask_box(m), rng, max_jitter, *m.shape))
    return out


@torch.no_grad()
def validate(predictor: SamPredictor, samples: List[List[Sample]], boxes, prompt_free: bool = True) -> Dict[str, float]:
    """Mean full-resolution Dice with the fixed jittered box, and prompt-free: the prompt-free head's pipeline when
    the model has one (without its fallback), else the box search (:meth:`SamPredictor.predict_automatic`)."""
    # MONAI's functional compute_dice: DiceMetric's aggregate would all-gather across DDP ranks, and only rank 0
    # validates
    from monai.metrics import compute_dice

    def dice(pred: torch.Tensor, ref: torch.Tensor) -> float:
        return float(compute_dice(pred.float().cpu(), ref, include_background=True, ignore_empty=False)[0, 0])

    box_scores, free_scores = [], []
    predictor.model.eval()
    for variants, box in zip(samples, boxes):
        s = variants[0]
        emb = sample_embedding(predictor, s)
        ref = torch.from_numpy(s.mask)[None, None].float()
        logits, _ = predictor.decode_with_grad(emb, boxes=np.array([box]))
        box_scores.append(dice(predictor.upscale(emb, logits[:, :1]) > 0, ref))
        if prompt_free:
            # the head's own answer, without the box-search fallback: an untrained head that finds nothing here
            # must not win on the fallback's merit (it finds garbage on other images)
            free = predictor._auto(emb) if predictor.auto_decoder is not None else predictor.predict_automatic(emb)
            free_scores.append(dice(torch.from_numpy(free.mask)[None, None], ref))
    out = {"val_dice": float(np.mean(box_scores))}
    if prompt_free:
        out["val_dice_prompt_free"] = float(np.mean(free_scores))
    return out


def check_encoder_mode(mode: str) -> None:
    if mode not in ENCODER_MODES:
        raise ValueError(f"train_encoder must be one of {ENCODER_MODES}, got {mode!r}")
    if mode == "lora":
        try:
            import peft  # noqa: F401
        except ImportError as e:
            raise RuntimeError("train_encoder='lora' needs the 'peft' package (pip install peft)") from e


def prepare_trainable(predictor: SamPredictor, cfg: TrainConfig) -> Dict[str, nn.Module]:
    """Freeze everything, then unfreeze what ``cfg`` trains; returns the trained modules by name (the encoder
    LoRA-wrapped for ``train_encoder="lora"``)."""
    check_encoder_mode(cfg.train_encoder)
    net = predictor.model
    for p in net.parameters():
        p.requires_grad_(False)
    heads = {"mask_decoder": net.mask_decoder}
    if cfg.prompt_free_head:
        heads[AUTO_DECODER] = attach_auto_decoder(net)  # continues from a served head, else a decoder copy
    for m in heads.values():
        for p in m.parameters():
            p.requires_grad_(True)
    if cfg.train_encoder == "full":
        for p in net.image_encoder.parameters():
            p.requires_grad_(True)
        heads["image_encoder"] = net.image_encoder
    elif cfg.train_encoder == "lora":
        from peft import LoraConfig, get_peft_model

        # TinyViT's (and SAM ViT's) attention and MLP linears; biases and norms stay frozen
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in net.image_encoder.named_modules() if isinstance(m, nn.Linear)})
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0, target_modules=targets)
        net.image_encoder = get_peft_model(net.image_encoder, lora)
        heads["image_encoder"] = net.image_encoder
    return heads


def set_train_mode(predictor: SamPredictor, heads: Dict[str, nn.Module], train: bool) -> None:
    predictor.model.eval()
    if not train:
        return
    for m in heads.values():
        m.train()
    # batch statistics of one image per step would be noise: the encoder's BatchNorms keep their running stats
    for m in predictor.model.image_encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def finish_encoder(predictor: SamPredictor, cfg: TrainConfig) -> None:
    """Merge LoRA into plain weights (the checkpoint keeps the base architecture's keys) and re-key the cache."""
    if cfg.train_encoder == "frozen":
        return
    net = predictor.model
    if cfg.train_encoder == "lora":
        net.image_encoder = net.image_encoder.merge_and_unload()
    net.image_encoder.eval()
    net.image_encoder.to(memory_format=torch.channels_last)
    predictor.refresh_encoder_key()
    predictor.clear_cache()


class SampleLosses(nn.Module):
    """The training losses of one sample: the box decoder's with the drawn prompt, plus the prompt-free head's
    with no prompt. A module so that DistributedDataParallel can wrap the step."""

    def __init__(self, predictor: SamPredictor, prompt_free: bool):
        super().__init__()
        from monai.losses import DiceCELoss

        self.model = predictor.model  # registered, so DDP finds the trainable parameters
        self.predictor = predictor
        self.prompt_free = prompt_free
        self.loss_fn = DiceCELoss(sigmoid=True)

    def forward(self, s: Sample, prompt: Prompt) -> Tuple[torch.Tensor, torch.Tensor]:
        emb = sample_embedding(self.predictor, s)
        target = low_res_target(self.predictor, emb, s.mask)
        box_loss = self.loss_fn(step_logits(self.predictor, emb, prompt), target)
        if not self.prompt_free:
            return box_loss, torch.zeros(())
        auto = getattr(self.model, AUTO_DECODER)
        return box_loss, self.loss_fn(step_logits(self.predictor, emb, Prompt(), decoder=auto), target)


def train_decoder(
    predictor: SamPredictor,
    train: List[List[Sample]],
    val: List[List[Sample]],
    cfg: TrainConfig,
    on_epoch: Optional[Callable[[dict], None]] = None,
    rank: int = 0,
) -> dict:
    """Fine-tune ``predictor.model`` in place (the box decoder, the prompt-free head, and the encoder when
    ``cfg.train_encoder`` says so); each head's best epoch is loaded at the end. Under DDP (``world_size > 1``,
    process group initialised) this rank trains on its shard; only rank 0 validates and its summary counts.

    Returns a summary: per-epoch history, the best epochs and their metrics, validation before training.
    """
    seed_everything(cfg.seed)
    distributed = cfg.world_size > 1
    rng = np.random.default_rng(cfg.seed + 7919 * rank)  # prompts differ per rank
    # every rank draws the same permutation; one process keeps a single stream (earlier runs reproduce exactly)
    order_rng = np.random.default_rng(cfg.seed) if distributed else rng
    validating = bool(val) and rank == 0
    val_boxes = fixed_val_prompts(val, cfg.seed, cfg.max_jitter) if validating else []
    before = validate(predictor, val, val_boxes) if validating else {}  # zero-shot: prompt-free is the box search
    if before:
        logger.info(f"before training: {_fmt(before)}")
    heads = prepare_trainable(predictor, cfg)
    params = [p for m in heads.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    step = SampleLosses(predictor, cfg.prompt_free_head)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: the unused multimask tokens and the IoU head get no gradient
        step = DistributedDataParallel(
            step, device_ids=[predictor.device.index] if predictor.device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    # which validation metric picks each module's best epoch (a trained encoder goes with the box decoder)
    selectors = {name: ("val_dice_prompt_free" if name == AUTO_DECODER else "val_dice") for name in heads}
    best = {name: (-np.inf, 0, None) for name in heads}  # (metric, epoch, state)
    history, shards = [], None
    bs = max(1, int(cfg.train_batch_size))
    for epoch in range(1, cfg.max_epochs + 1):
        t0 = time.time()
        set_train_mode(predictor, heads, True)
        order = order_rng.permutation(len(train))
        if distributed:  # DistributedSampler's scheme: pad to a multiple of world_size, then stride
            order = np.concatenate([order, order[: (-len(order)) % cfg.world_size]])[rank :: cfg.world_size]
        losses, auto_losses = [], []
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        for batch in tqdm(batches, desc=f"epoch {epoch}/{cfg.max_epochs}", unit="batch", mininterval=5, disable=rank > 0):
            opt.zero_grad(set_to_none=True)
            batch_loss = batch_auto = 0.0
            for j, k in enumerate(batch):
                variants = train[k]
                s = variants[int(rng.integers(len(variants)))]  # flipped or not, when both exist
                _, prompt = sample_prompt(s.mask, rng, cfg.prompt_shares, cfg.max_jitter)
                # gradients are all-reduced once per batch, at its last sample
                sync = contextlib.nullcontext() if not distributed or j == len(batch) - 1 else step.no_sync()
                with sync:
                    box_loss, auto_loss = step(s, prompt)
                    ((box_loss + auto_loss) / len(batch)).backward()
                batch_loss += float(box_loss.detach()) / len(batch)
                batch_auto += float(auto_loss.detach()) / len(batch)
            opt.step()
            losses.append(batch_loss)
            auto_losses.append(batch_auto)
        mean_losses = torch.tensor([np.mean(losses), np.mean(auto_losses)] if losses else [np.nan, np.nan])
        if distributed:
            import torch.distributed as dist

            mean_losses = mean_losses.to(predictor.device)
            dist.all_reduce(mean_losses)  # the log shows every rank's loss
            mean_losses = mean_losses.cpu() / cfg.world_size
            shards = [None] * cfg.world_size  # which images each rank trained on this epoch (for the summary)
            dist.all_gather_object(shards, [train[k][0].image_id for k in order])
        record = {"epoch": epoch, "loss": float(mean_losses[0]), "seconds": round(time.time() - t0, 2)}
        if cfg.prompt_free_head:
            record["loss_prompt_free"] = float(mean_losses[1])
        if rank > 0:
            continue
        if val:
            record.update(validate(predictor, val, val_boxes, prompt_free=cfg.prompt_free_head))
        improved = []
        for name, module in heads.items():
            metric = record.get(selectors[name], -record["loss_prompt_free" if name == AUTO_DECODER else "loss"])
            if metric > best[name][0]:
                best[name] = (metric, epoch, copy.deepcopy(module.state_dict()))
                improved.append(name)
        history.append(record)
        logger.info(f"epoch {epoch}/{cfg.max_epochs} {_fmt(record)}" + (f" *best {', '.join(improved)}*" if improved else ""))
        if on_epoch:
            on_epoch(record)
    if rank == 0:
        for name, module in heads.items():
            if best[name][2] is not None:
                module.load_state_dict(best[name][2])
        # a prompt-free head that validates worse than the box search it replaces is not kept (too few labels or
        # epochs), nor one validated on too few images to tell (a head that won on 2 validation images scored 0.53
        # vs the box search's 0.69 on test images): the served model then falls back to the box search
        n_val = len(val) if validating else 0
        if AUTO_DECODER in heads and "val_dice_prompt_free" in before and (
            n_val < MIN_VAL_IMAGES_FOR_HEAD or best[AUTO_DECODER][0] <= before["val_dice_prompt_free"]
        ):
            logger.info(
                f"prompt-free head dropped: best val Dice {best[AUTO_DECODER][0]:.4f} vs box search "
                f"{before['val_dice_prompt_free']:.4f} on {n_val} validation images (kept only if better, on at "
                f"least {MIN_VAL_IMAGES_FOR_HEAD})"
            )
            delattr(predictor.model, AUTO_DECODER)
            del heads[AUTO_DECODER], best[AUTO_DECODER]
    finish_encoder(predictor, cfg)
    set_train_mode(predictor, heads, False)
    for p in predictor.model.parameters():
        p.requires_grad_(False)
    best_epochs = {name: b[1] for name, b in best.items()}
    best_epoch = best_epochs.get("mask_decoder", 0)
    best_record = dict(next((r for r in history if r["epoch"] == best_epoch), {}))
    if AUTO_DECODER in best_epochs:  # the prompt-free figure of the prompt-free head's own best epoch
        auto_record = next((r for r in history if r["epoch"] == best_epochs[AUTO_DECODER]), {})
        if "val_dice_prompt_free" in auto_record:
            best_record["val_dice_prompt_free"] = auto_record["val_dice_prompt_free"]
    elif "val_dice_prompt_free" in before:  # no head kept: prompt-free requests get the box search
        best_record["val_dice_prompt_free"] = before["val_dice_prompt_free"]
    summary = {"history": history, "best_epoch": best_epoch, "best_epochs": best_epochs, "best": best_record,
               "before": before, "trained": sorted(heads)}
    if distributed:
        summary["last_epoch_shards"] = shards
    return summary


def _fmt(record: dict) -> str:
    return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "epoch")


# ---- data parallel (DDP) ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, cfg, net, image_size, normalization, device, train_items, val_items, cache_dir, result_path):
    """One DDP process: its own predictor on its own device, samples from the shared disk cache."""
    import torch.distributed as dist

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(levelname)s %(message)s")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.world_size))  # the ranks share the cores
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=cfg.world_size)
    try:
        predictor = SamPredictor(net, image_size, normalization, device=f"cuda:{rank}" if cuda else "cpu")
        cache = EmbeddingCache(cache_dir, predictor) if cfg.train_encoder == "frozen" else None
        train = load_samples(train_items, cache, cfg.flip, desc=f"load train (rank {rank})")
        val = load_samples(val_items, cache, False, desc="load val") if rank == 0 else []
        summary = train_decoder(predictor, train, val, cfg, rank=rank)
        summary["ranks"] = cfg.world_size
        if rank == 0:
            state = {k: v.detach().cpu() for k, v in predictor.model.state_dict().items()}
            torch.save({"state_dict": state, "summary": summary}, result_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_distributed(
    predictor: SamPredictor, train_items, val_items, cfg: TrainConfig, cache_dir: str,
    on_epoch: Optional[Callable[[dict], None]] = None,
) -> dict:
    """:func:`train_decoder` over ``cfg.world_size`` DDP processes; rank 0's weights are loaded into
    ``predictor`` and its summary returned (``on_epoch`` then sees each epoch's record after the run)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    net = copy.deepcopy(predictor.model).cpu()
    with tempfile.TemporaryDirectory(prefix="fetal_head_ddp_") as tmp:
        result_path = os.path.join(tmp, "rank0.pt")
        mp.spawn(
            _ddp_worker,
            args=(cfg, net, predictor.image_size, predictor.normalization, predictor.device.type, list(train_items),
                  list(val_items), cache_dir, result_path),
            nprocs=cfg.world_size, join=True,
        )
        result = torch.load(result_path, map_location="cpu", weights_only=True)
    if any(k.startswith(AUTO_DECODER + ".") for k in result["state_dict"]):
        attach_auto_decoder(predictor.model)
    predictor.model.load_state_dict(result["state_dict"], strict=True)
    predictor.model.to(predictor.device).eval()
    for p in predictor.model.parameters():
        p.requires_grad_(False)
    if cfg.train_encoder != "frozen":
        predictor.refresh_encoder_key()
        predictor.clear_cache()
    for record in result["summary"]["history"]:
        if on_epoch:
            on_epoch(record)
    return result["summary"]


def finetune(
    predictor: SamPredictor,
    items: Sequence[LabelledImage],
    cfg: TrainConfig,
    cache_dir: str,
    on_epoch: Optional[Callable[[dict], None]] = None,
) -> dict:
    """Select, embed (cached), train; returns the summary plus which images trained and validated."""
    seed_everything(cfg.seed)
    check_encoder_mode(cfg.train_encoder)  # refuse unusable modes before any work
    train_items, val_items = split_items(items, cfg)
    if not train_items:
        raise ValueError("no labelled images to train on")
    logger.info(
        f"training on {len(train_items)} images ({sum(i.synthetic for i in train_items)} synthetic), "
        f"validating on {len(val_items)}, {cfg.world_size} process(es), encoder {cfg.train_encoder}"
    )
    # a trained encoder makes cached embeddings useless: the frames are encoded at every step instead
    cache = EmbeddingCache(cache_dir, predictor) if cfg.train_encoder == "frozen" else None
    t0 = time.time()
    train = load_samples(train_items, cache, cfg.flip, desc="embed train")
    val = load_samples(val_items, cache, False, desc="embed val")
    if cache is not None:
        logger.info(f"embeddings ready in {time.time() - t0:.1f} s (cache hits {cache.hits}, computed {cache.misses})")
    if cfg.world_size > 1:
        del train, val  # the ranks read them back from the disk cache
        summary = train_distributed(predictor, train_items, val_items, cfg, cache_dir, on_epoch)
    else:
        summary = train_decoder(predictor, train, val, cfg, on_epoch)
    summary["train_images"] = [i.image_id for i in train_items]
    summary["val_images"] = [i.image_id for i in val_items]
    summary["config"] = asdict(cfg)
    return summary


def checkpoint_meta(summary: dict, base_version: str) -> dict:
    """What save_finetuned stores beside the weights."""
    trained = summary.get("trained", ["mask_decoder"])
    return {
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_version": base_version,
        "trained": trained,
        # how the served model answers prompt-free requests: its trained head, or (None) the box search
        "prompt_free": AUTO_DECODER if AUTO_DECODER in trained else None,
        "train_encoder": summary["config"].get("train_encoder", "frozen"),
        "labels_used": summary["train_images"],
        "validation_images": summary["val_images"],
        "best_epoch": summary["best_epoch"],
        "best_epochs": summary.get("best_epochs", {}),
        "metrics": summary["best"],
        "metrics_before": summary["before"],
        "history": summary["history"],
        "options": summary["config"],
    }


# ---- evaluation (scripts and tests) ----------------------------------------------------------------------------
def evaluate(
    predictor: SamPredictor, cases, seed: int = 0, max_jitter: int = 20, modes=("box", "prompt_free"),
    cache: Optional[EmbeddingCache] = None,
) -> dict:
    """Mean full-resolution Dice on HC18 cases (``HC18Case``) through ``predictor.predict``, the served path.
    ``cache``: take the embeddings from this disk cache (computed once there) instead of encoding each time."""
    from monai.metrics import compute_dice

    rng = np.random.default_rng(seed)
    scores = {m: [] for m in modes}
    for c in tqdm(cases, desc="evaluate", unit="image", mininterval=5):
        image = read_image(c.image_path)
        ref = c.load_mask()
        box = jitter_box(mask_box(ref), rng, max_jitter, *ref.shape)
        if cache is not None and cache.predictor.encoder_key == predictor.encoder_key:
            predictor.remember(image, cache.get(image))
        for m in modes:
            prompt = Prompt(box=box) if m == "box" else Prompt()
            pred = predictor.predict(image, prompt).mask
            d = compute_dice(
                torch.from_numpy(pred)[None, None].float(), torch.from_numpy(ref)[None, None].float(),
                include_background=True, ignore_empty=False,
            )
            scores[m].append(float(d[0, 0]))
    return {m: float(np.mean(v)) for m, v in scores.items()}
