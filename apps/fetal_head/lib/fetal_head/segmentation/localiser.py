"""The head localiser: where the head is, from SAM's image embedding alone, learnt from a handful of labels.

SAM's image embedding (256 x 64 x 64 for LiteMedSAM, covering the padded square model input) already separates
the fetal skull from the rest of the frame; a small convolutional head on it (~15 k parameters, versus ~4 M in a
mask decoder) is what 5-20 labels can train without memorising them. It works on the embedding average-pooled to
32 x 32 (the head spans 10-40 % of the frame's width; a coarse box is all the box decoder needs, and a training
step costs a quarter) and predicts two maps, upsampled to the 64 x 64 grid:

- ``head``: per-cell head/background logits (dense supervision: every cell of every label is a training target,
  so 5 labels give ~15 000 targets, not 5 boxes);
- ``centre``: a heatmap of the head's centre (a Gaussian at the label's box centre, CenterNet-style), which picks
  the head among several blobs.

At inference the head map is upsampled to the model-input frame, thresholded, and the component holding the
strongest centre peak (or the user's foreground click) is the head. Measured after 5 labels (40 test images), that
component's centre lay inside the true head box on 40 of 40 images, but its extent over-reaches (median box area
1.7x the true one; box IoU 0.55), and its box fed to the box decoder gave only 0.70-0.74 Dice. So the localiser
says *where*; :func:`.box_search.localised` decodes candidate boxes of several sizes centred there and lets the
decoder's own confidence, stability and ellipse shape pick the extent. Its confidence is reported with the answer.

Augmentation, all on the cached embedding grid so the encoder never runs again: horizontal flips of the grid and
target (the flipped image's embedding is not exactly the flipped embedding, but the head's appearance is
left-right symmetric and the localiser only needs coarse features), translations of the image part by up to
``max_shift`` cells (vacated cells repeat the border, as ultrasound sector edges do), channel dropout and feature
noise. Training is a fixed schedule (``LocaliserConfig.steps``): no epoch is picked on a validation set, which
5 labels do not have; :func:`cross_validate` measures what the schedule gives on held-out labels instead.

The module is a submodule of the SAM model (``localiser``, :func:`.models.attach_localiser`), so its weights
travel in the same checkpoint and load with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .prompts import box_iou, mask_box

GRID_STRIDE = 4  # model-input pixels per embedding cell (LiteMedSAM: 256 px input, 64 cells; SAM: 1024/64 = 16)
# On small heads the strongest centre peak is often on another structure while the next one is on the head (20
# labels, seed 0: 4 of the 11 test images where no candidate held the head). With OTHER_PEAKS > 0 the automatic
# route also decodes boxes around the next OTHER_PEAKS peaks: local maxima of the centre map where the head map is
# >= PEAK_MIN_HEAD_PROB, off the frame's border, at least PEAK_MIN_DIST model-input pixels from the chosen centre
# and from each other. Off: with one peak (docs/eval/automatic/peaks) the 157 test images gained +0.34 points on the
# mean of six 5/20-label cells (per cell -0.36 to +1.86), 438 labels -0.08, the new-site simulation -1.22 / -0.12
# points at 5 / 10 labels (images below 0.80: 12 -> 18), for +1.2-1.4 s an automatic request on a 2-core CPU.
OTHER_PEAKS = 0
PEAK_MIN_HEAD_PROB = 0.3
PEAK_MIN_DIST = 20
# From WIDE_FROM_LABELS real labels the trainer fits a wider localiser for longer, and automatic requests take its
# own box (plus the box decoder's margin) instead of choosing among candidates (:func:`.box_search.localiser_box`).
# Measured on the 157 test images with the 438-label box decoder (docs/eval/automatic/wide_localiser): the
# localiser's box against the reference box, IoU median 0.74 -> 0.95 (width 16, 300 steps -> width 64, 1500 steps),
# and automatic Dice 93.26 % (candidates + head verifier) -> 95.82 % (its box), images below 0.80 9 -> 4; trained on
# 100 of the labels, its box gave 95.60 %. With 20 labels the wide one's box is also better (IoU median 0.76 -> 0.92)
# but misses the head on 10 images, and its box route lost (90.43 %, 16 below 0.80, against 92.24 % for the
# candidates), so below WIDE_FROM_LABELS the wide one is trained only with pseudo-labels of unlabelled images beside
# the real ones (self-training, :func:`.training.fit_self_trained_localiser`: 20 labels, 92.24 -> 94.56 %).
WIDE_FROM_LABELS = 100
WIDE_WIDTH = 64
WIDE_STEPS = 1500


class Localiser(nn.Module):
    """SAM image embedding (B, C, 64, 64) -> (B, 2, 64, 64) logits: head map and centre heatmap."""

    def __init__(self, in_channels: int = 256, width: int = 16, dropout: float = 0.2, pool: int = 2):
        super().__init__()
        self.width = width
        self.pool = pool
        self.drop = nn.Dropout2d(dropout)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.GroupNorm(8, width), nn.GELU(),
        )
        self.out = nn.Conv2d(width, 2, 1)
        # a trained localiser says so in its weights (a state dict holds no other flags)
        self.register_buffer("trained_labels", torch.zeros((), dtype=torch.int64))
        # 1: automatic requests take this localiser's own box (see WIDE_FROM_LABELS); a checkpoint saved before the
        # flag existed loads with 0 (:func:`.models.attach_heads_on_load`)
        self.register_buffer("answers_with_box", torch.zeros((), dtype=torch.int64))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(features, self.pool) if self.pool > 1 else features
        y = self.out(self.body(self.drop(x)))
        return F.interpolate(y, size=features.shape[-2:], mode="bilinear", align_corners=False) if self.pool > 1 else y


@dataclass
class LocaliserConfig:
    steps: int = 200  # fixed schedule: the same at every N (no validation split below ~10 labels)
    batch_size: int = 8
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    max_shift: int = 8  # cells (x 4 model-input px)
    flip: bool = True
    noise: float = 0.1  # feature noise, as a fraction of the features' std
    centre_sigma: float = 0.15  # the centre Gaussian's sigma, as a fraction of the head box's mean side
    seed: int = 0
    width: int = 16  # channels of the conv body (WIDE_WIDTH from WIDE_FROM_LABELS labels)
    answers_with_box: bool = False  # the trained localiser's flag (see WIDE_FROM_LABELS)

    @property
    def automatic_route(self) -> str:
        """How the trained localiser answers automatic requests, in the words of the training records."""
        return "its own box" if self.answers_with_box else "candidates"


def wide_config(seed: int = 0) -> LocaliserConfig:
    """The wide localiser that answers automatic requests with its own box (WIDE_WIDTH channels, WIDE_STEPS
    steps): from WIDE_FROM_LABELS real labels, or below that on real labels plus pseudo-labels
    (:func:`.training.fit_self_trained_localiser`)."""
    return LocaliserConfig(steps=WIDE_STEPS, seed=seed, width=WIDE_WIDTH, answers_with_box=True)


def config_for(labels: int, steps: int = 300, seed: int = 0, wide_from: int = WIDE_FROM_LABELS) -> LocaliserConfig:
    """The localiser recipe for ``labels`` real labels: the small one (``steps``) below ``wide_from``, from there
    the wide one (:func:`wide_config`)."""
    if labels >= wide_from:
        return wide_config(seed)
    return LocaliserConfig(steps=steps, seed=seed)


@dataclass
class Localisation:
    box: Optional[Tuple[float, float, float, float]]  # image pixels, inclusive; None: nothing found
    score: float  # mean head probability over the chosen component x the centre peak's probability
    head_prob: float
    centre_prob: float
    coarse_mask: Optional[np.ndarray]  # (nh, nw) bool on the model-input frame: the localiser's own head
    candidates: int  # head components found
    prob_map: Optional[np.ndarray] = None  # (nh, nw) head probability restricted to the chosen component
    other_peaks: Tuple[Tuple[float, float], ...] = ()  # (x, y) image pixels: the next centre peaks (see OTHER_PEAKS)
    centre: Optional[Tuple[float, float]] = None  # (x, y) image pixels: the chosen component's centroid


def grid_hw(input_hw: Tuple[int, int], stride: int = GRID_STRIDE) -> Tuple[int, int]:
    """Embedding cells covering the image part of the padded input."""
    nh, nw = input_hw
    return int(np.ceil(nh / stride)), int(np.ceil(nw / stride))


def grid_targets(mask: np.ndarray, input_hw: Tuple[int, int], grid: int = 64, sigma: float = 0.15,
                 stride: int = GRID_STRIDE) -> torch.Tensor:
    """(3, grid, grid) float: head fraction per cell, centre Gaussian, valid-cell mask, for one label."""
    gh, gw = grid_hw(input_hw, stride)
    nh, nw = input_hw
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    m = F.interpolate(m, size=(nh, nw), mode="area")
    m = F.pad(m, (0, gw * stride - nw, 0, gh * stride - nh))
    head = F.avg_pool2d(m, stride)[0, 0]  # (gh, gw) head fraction per cell
    out = torch.zeros(3, grid, grid)
    out[0, :gh, :gw] = head
    out[2, :gh, :gw] = 1.0
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    # box centre and size in cell units
    cy = (rows.min() + rows.max() + 1) / 2 * nh / h / stride
    cx = (cols.min() + cols.max() + 1) / 2 * nw / w / stride
    side = ((rows.max() - rows.min() + 1) * nh / h + (cols.max() - cols.min() + 1) * nw / w) / 2 / stride
    s = max(sigma * side, 1.0)
    yy, xx = torch.meshgrid(torch.arange(grid) + 0.5, torch.arange(grid) + 0.5, indexing="ij")
    out[1] = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)) * out[2]
    return out


def _shift(x: torch.Tensor, dy: int, dx: int, gh: int, gw: int) -> torch.Tensor:
    """Translate the image part (gh, gw) of a (C, G, G) grid by (dy, dx) cells, repeating the border."""
    part = x[:, :gh, :gw]
    padded = F.pad(part[None], (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")[0]
    y0, x0 = max(-dy, 0), max(-dx, 0)
    out = x.clone()
    out[:, :gh, :gw] = padded[:, y0:y0 + gh, x0:x0 + gw]
    return out


def augment(feat: torch.Tensor, target: torch.Tensor, gh: int, gw: int, cfg: LocaliserConfig,
            rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """One augmented (features, targets) pair; ``feat`` (C, G, G), ``target`` (3, G, G)."""
    x, t = feat, target
    if cfg.flip and rng.random() < 0.5:
        x, t = x.clone(), t.clone()
        x[:, :gh, :gw] = x[:, :gh, :gw].flip(-1)
        t[:, :gh, :gw] = t[:, :gh, :gw].flip(-1)
    if cfg.max_shift:
        dy, dx = (int(v) for v in rng.integers(-cfg.max_shift, cfg.max_shift + 1, size=2))
        if dy or dx:
            x = _shift(x, dy, dx, gh, gw)
            valid = t[2:3].clone()
            t = _shift(t, dy, dx, gh, gw)
            # the centre moves with the image; the head fraction of repeated border cells is what they repeat
            t[2:3] = valid
    if cfg.noise:
        x = x + cfg.noise * x.std() * torch.randn(x.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31))))
    return x, t


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Head map: BCE + soft Dice on the valid cells; centre: penalty-reduced focal loss (CenterNet)."""
    valid = targets[:, 2]
    head_t, centre_t = targets[:, 0], targets[:, 1]
    head_l, centre_l = logits[:, 0], logits[:, 1]
    n = valid.sum().clamp(min=1)
    bce = (F.binary_cross_entropy_with_logits(head_l, head_t, reduction="none") * valid).sum() / n
    p = torch.sigmoid(head_l) * valid
    dice = 1 - (2 * (p * head_t).sum((1, 2)) + 1) / (p.sum((1, 2)) + head_t.sum((1, 2)) + 1)
    q = torch.sigmoid(centre_l).clamp(1e-4, 1 - 1e-4)
    pos = (centre_t > 0.9).float()
    focal = -(pos * (1 - q) ** 2 * torch.log(q) + (1 - pos) * (1 - centre_t) ** 4 * q ** 2 * torch.log(1 - q)) * valid
    focal = focal.sum() / pos.sum().clamp(min=1)
    return bce + dice.mean() + 0.5 * focal


def train_localiser(samples: Sequence[Tuple[torch.Tensor, np.ndarray, Tuple[int, int]]],
                    cfg: Optional[LocaliserConfig] = None, localiser: Optional[Localiser] = None) -> Localiser:
    """Train on (features (1, C, G, G), mask (H, W) bool, input_hw) triples for ``cfg.steps`` steps."""
    cfg = cfg or LocaliserConfig()
    if not samples:
        raise ValueError("the localiser needs at least one label")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    feats = [f[0].float().cpu() for f, _, _ in samples]
    grid = feats[0].shape[-1]
    stride = None
    targets, parts = [], []
    for (f, m, hw) in samples:
        stride = max(1, int(round(max(hw) / grid))) if stride is None else stride
        targets.append(grid_targets(m, hw, grid, cfg.centre_sigma, stride))
        parts.append(grid_hw(hw, stride))
    net = localiser or Localiser(in_channels=feats[0].shape[0], width=cfg.width)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.learning_rate, total_steps=cfg.steps, pct_start=0.15)
    for _ in range(cfg.steps):
        idx = rng.integers(len(feats), size=cfg.batch_size)
        xs, ts = zip(*(augment(feats[i], targets[i], *parts[i], cfg, rng) for i in idx))
        loss = loss_fn(net(torch.stack(xs)), torch.stack(ts))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    net.trained_labels.fill_(len(samples))
    net.answers_with_box.fill_(int(cfg.answers_with_box))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _components(mask: np.ndarray):
    from skimage.measure import label

    return label(mask, connectivity=2)


@torch.no_grad()
def localise(net: Localiser, features: torch.Tensor, original_hw: Tuple[int, int], input_hw: Tuple[int, int],
             fg: Optional[np.ndarray] = None, bg: Optional[np.ndarray] = None, threshold: float = 0.5) -> Localisation:
    """The head's box in image pixels. ``fg``/``bg``: clicks (N, 2) as (x, y) in image pixels; a foreground click
    selects the component that holds it, a background click removes the component that holds it."""
    net.eval()
    dev = next(net.parameters()).device
    logits = net(features.to(dev).float())[0].cpu()
    grid = logits.shape[-1]
    h, w = original_hw
    nh, nw = input_hw
    stride = max(1, int(round(max(nh, nw) / grid)))
    up = F.interpolate(logits[None], scale_factor=stride, mode="bilinear", align_corners=False)[0, :, :nh, :nw]
    head_p, centre_p = torch.sigmoid(up[0]).numpy(), torch.sigmoid(up[1]).numpy()
    comps = _components(head_p > threshold)
    n = int(comps.max())
    none = Localisation(None, 0.0, 0.0, float(centre_p.max()), None, n)
    if n == 0:
        return none
    to_in = np.array([nw / w, nh / h])

    def comp_at(p):
        x, y = np.asarray(p, dtype=np.float64) * to_in
        return int(comps[int(np.clip(y, 0, nh - 1)), int(np.clip(x, 0, nw - 1))])

    allowed = set(range(1, n + 1))
    if bg is not None:
        allowed -= {comp_at(p) for p in bg}
    if fg is not None and len(fg):
        chosen = {comp_at(p) for p in fg} - {0}
        if len(chosen) != 1 or not chosen <= allowed:
            return none
        cid = chosen.pop()
    else:
        if not allowed:
            return none
        # the component with the strongest centre peak; ties (no peak anywhere) by area
        flat = comps.ravel()
        peaks = np.zeros(n + 1)
        np.maximum.at(peaks, flat, centre_p.ravel())
        areas = np.bincount(flat, minlength=n + 1)
        cid = max(allowed, key=lambda k: (round(float(peaks[k]), 2), areas[k]))
    region = comps == cid
    if region.sum() < 16:
        return none
    rows, cols = np.nonzero(region)
    sx, sy = w / nw, h / nh
    box = (cols.min() * sx, rows.min() * sy, min((cols.max() + 1) * sx - 1, w - 1.0), min((rows.max() + 1) * sy - 1, h - 1.0))
    head_prob = float(head_p[region].mean())
    centre_prob = float(centre_p[region].max())
    centre = (cols.mean() + 0.5, rows.mean() + 0.5)  # model-input pixels
    peaks = ()
    if fg is None or not len(fg):  # a click already says where the head is
        peaks = other_peaks(head_p, centre_p, centre, sx, sy, OTHER_PEAKS)
    return Localisation(box, head_prob * centre_prob, head_prob, centre_prob, region, n, head_p * region, peaks,
                        (centre[0] * sx, centre[1] * sy))


def other_peaks(head_p: np.ndarray, centre_p: np.ndarray, chosen, sx: float, sy: float, k: int = OTHER_PEAKS):
    """The ``k`` strongest local maxima of ``centre_p`` (model-input frame) besides the ``chosen`` centre (x, y), as
    (x, y) image pixels (``sx``, ``sy``: image pixels per model-input pixel); see OTHER_PEAKS."""
    if k <= 0:  # the served default: no filtering of the centre map on every automatic request
        return ()
    from scipy import ndimage

    ok = centre_p == ndimage.maximum_filter(centre_p, size=9, mode="constant", cval=0)
    ok &= (head_p >= PEAK_MIN_HEAD_PROB) & (centre_p > 0.02)
    ok[:3], ok[-3:], ok[:, :3], ok[:, -3:] = False, False, False, False  # the frame's edge is not a head's centre
    taken, out = [chosen], []
    for y, x in sorted(np.argwhere(ok), key=lambda p: -centre_p[p[0], p[1]]):
        if len(out) >= k:
            break
        if all(np.hypot(x - a, y - b) >= PEAK_MIN_DIST for a, b in taken):
            taken.append((x, y))
            out.append(((x + 0.5) * sx, (y + 0.5) * sy))
    return tuple(out)


def cross_validate(samples: Sequence[Tuple[torch.Tensor, np.ndarray, Tuple[int, int]]],
                   cfg: Optional[LocaliserConfig] = None, folds: int = 5) -> List[float]:
    """Held-out box IoU of the localiser's box against each label's box, ``folds``-fold (leave-one-out below
    ``folds`` labels); empty with fewer than 2 labels."""
    cfg = cfg or LocaliserConfig()
    n = len(samples)
    if n < 2:
        return []
    k = min(folds, n)
    order = np.random.default_rng(cfg.seed).permutation(n)
    ious = [0.0] * n
    for f in range(k):
        held = set(order[f::k].tolist())
        net = train_localiser([s for i, s in enumerate(samples) if i not in held], cfg)
        for i in held:
            feat, m, hw = samples[i]
            loc = localise(net, feat, m.shape, hw)
            ious[i] = box_iou(loc.box, mask_box(m))
    return ious
