"""The predictor: SAM's image side (preprocessing, encoder, embedding cache) and prompt side (prompt encoder and
mask decoder) behind one small API, as ``segment_anything.SamPredictor`` has::

    predictor = SamPredictor.from_family("litemedsam")
    prediction = predictor.predict(gray_uint8_frame, Prompt(box=(x0, y0, x1, y1)))   # or Prompt() (automatic)

Both model families (:mod:`.models`) share SAM's prompt encoder and mask decoder, whose low-resolution logits
(256 x 256) cover the padded square model input; they are cropped to the image's part and resized to the image's
own geometry here, and nowhere else. Automatic and click-only requests go through :mod:`.box_search`: the trained
head localiser first (:mod:`.localiser`), else the trained automatic head, else the box search. Their answers carry a
``confidence`` dict (which route answered, the localiser's score, agreement with the box search when
``automatic_agreement`` is on).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import box_search
from .models import AUTOMATIC_DECODER, HEAD_VERIFIER, LOCALISER, family, weights_key
from .prompts import Prompt, PromptError, mask_dice

logger = logging.getLogger(__name__)

# SAM's decoder copies the image embedding once per prompt (4 MB each); on the CPU most of its time goes to moving
# those copies, not to arithmetic, and a few prompts at a time stay in the cache. Automatic answers 1.41x faster with
# the localiser (4.34 -> 3.08 s), 1.39x zero-shot (2.45 -> 1.77 s), masks identical (`scripts/bench_decode_chunks.py`,
# 8 images, 2 cores, 2026-11-28; chunks of 2 were as fast). A GPU takes the whole batch at once.
CPU_DECODE_CHUNK = 4
_IMAGENET_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
_IMAGENET_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


ENCODER_BF16_ENV = "FETAL_HEAD_ENCODER_BF16"  # "0" / "1" overrides the CPU check below


@functools.lru_cache(maxsize=None)  # read once per process: every model (re)load asks
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 matrix products run natively (elsewhere autocast emulates them, slower)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_encoder_bf16(device: torch.device) -> bool:
    """bf16 autocast for the image encoder on CPUs that run it natively: on the 157 HC18 test images it changed
    box Dice by -0.03 points (fp32 95.46 %, bf16 95.43 %) and ran the encoder 1.6x faster
    (scripts/bench_bf16_encoder.py). ``FETAL_HEAD_ENCODER_BF16=0`` keeps fp32."""
    env = os.environ.get(ENCODER_BF16_ENV)
    if env in ("0", "1"):
        return env == "1"
    return device.type == "cpu" and cpu_has_bf16()


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
    # automatic and click-only answers: how they were found and how sure (JSON-ready numbers and strings)
    confidence: Dict[str, object] = field(default_factory=dict)


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
        encoder_bf16: Optional[bool] = None,
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
        # None: on where the CPU runs bf16 natively (default_encoder_bf16); part of the embedding-cache key
        self.encoder_bf16 = default_encoder_bf16(self.device) if encoder_bf16 is None else bool(encoder_bf16)
        self.refresh_encoder_key()
        self.cache_size = cache_size
        self._cache: "OrderedDict[tuple, ImageEmbedding]" = OrderedDict()
        self._lock = threading.RLock()
        self.cache_hits = 0  # embeddings served without running the encoder (from memory or ``disk_cache``)
        self.cache_misses = 0  # encoder runs
        # an optional :class:`~.embedding_cache.EmbeddingCache` behind the in-memory one (the server's, shared with
        # its trainer and active learning): an image encoded for any of them, or before a restart, is not encoded again
        self.disk_cache = None
        # automatic answers from the localiser also run the box search (~25 decoder calls) and report the two
        # masks' Dice as ``confidence["box_search_agreement"]``; off: that figure is left out (mask unchanged).
        # With a head verifier the localised route decodes the box search's candidates itself and reports it free
        self.automatic_agreement = True

    def refresh_encoder_key(self) -> None:
        """Recompute the embedding-cache key after the image encoder's weights changed (encoder fine-tuning)."""
        precision = ":bf16" if self.encoder_bf16 else ""
        self.encoder_key = weights_key(self.model.image_encoder, f"{self.image_size}:{self.normalization}{precision}")

    @property
    def automatic_decoder(self) -> Optional[nn.Module]:
        """The trained automatic head (:func:`.models.attach_automatic_decoder`), None for a zero-shot model."""
        return getattr(self.model, AUTOMATIC_DECODER, None)

    @property
    def localiser(self) -> Optional[nn.Module]:
        """The trained head localiser (:func:`.models.attach_localiser`), None when the model has none."""
        loc = getattr(self.model, LOCALISER, None)
        return loc if loc is not None and int(loc.trained_labels) > 0 else None

    @property
    def head_verifier(self) -> Optional[nn.Module]:
        """The trained head verifier (:mod:`.verifier`), None when the model has none; used with the localiser."""
        v = getattr(self.model, HEAD_VERIFIER, None)
        return v if v is not None and int(v.trained_labels) > 0 else None

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, net: nn.Module, model_type: str, **kwargs) -> "SamPredictor":
        """A predictor over ``net`` with its family's input size and normalisation."""
        fam = family(model_type)
        return cls(net, image_size=fam.image_size, normalization=fam.normalization, **kwargs)

    @classmethod
    def from_family(cls, model_type: str, checkpoint: Optional[str] = None, **kwargs) -> "SamPredictor":
        return cls.for_model(family(model_type).build(checkpoint), model_type, **kwargs)

    @classmethod
    def litemedsam(cls, checkpoint: Optional[str] = None, **kwargs) -> "SamPredictor":
        return cls.from_family("litemedsam", checkpoint, **kwargs)

    @classmethod
    def meta_sam(cls, checkpoint: str, model_type: str = "vit_b", **kwargs) -> "SamPredictor":
        return cls.from_family(model_type, checkpoint, **kwargs)

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
        """Image embeddings for a batch of frames, without touching the cache (float32 features, computed in bf16
        when :attr:`encoder_bf16`)."""
        if not self.encoder_bf16:
            return self.encode_with_grad(images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            out = self.encode_with_grad(images)
        for emb in out:
            emb.features = emb.features.float()
        return out

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
        emb = None if self.disk_cache is None else self.disk_cache.load(image)
        encoded = emb is None
        if encoded:
            emb = self.encode([image])[0]
            if self.disk_cache is not None:  # the answer uses the embedding as it reads back after a restart
                try:
                    emb = self.disk_cache.store(image, emb)
                except OSError as e:  # a full or read-only disk costs the next restart an encode, not this answer
                    logger.warning(f"embedding not written to the disk cache ({e})")
        with self._lock:
            if encoded:
                self.cache_misses += 1
            else:
                self.cache_hits += 1
        return self._keep(key, emb)

    def remember(self, image: np.ndarray, emb: ImageEmbedding) -> None:
        """Put an embedding computed elsewhere (e.g. ``training.EmbeddingCache`` on disk) into the LRU cache."""
        self._keep((self.encoder_key, self.image_key(image)), emb)

    def _keep(self, key: tuple, emb: ImageEmbedding) -> ImageEmbedding:
        """Store ``emb`` (on this predictor's device) as the newest LRU entry under ``key``; returns what it stored."""
        emb = ImageEmbedding(features=emb.features.to(self.device), original_hw=emb.original_hw, input_hw=emb.input_hw)
        with self._lock:
            self._cache[key] = emb
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return emb

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
        self, emb: ImageEmbedding, boxes: Optional[np.ndarray] = None, **kwargs
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution logits (B, K, 256, 256) and predicted IoU (B, K); the arguments of
        :meth:`decode_with_grad`.

        ``boxes`` is (B, 4) as (x_min, y_min, x_max, y_max) in the image frame: B candidate boxes are decoded
        in one batched call (SAM's decoder repeats the image embedding per prompt). Points apply to each box.
        No boxes and no points: no sparse prompt at all (what the automatic head, ``decoder``, is trained on).
        On the CPU the boxes go through the decoder :data:`CPU_DECODE_CHUNK` at a time (the same answers).
        """
        chunk = CPU_DECODE_CHUNK if self.device.type == "cpu" else 0
        if boxes is None or not chunk or len(boxes) <= chunk:
            return self.decode_with_grad(emb, boxes=boxes, **kwargs)
        parts = [self.decode_with_grad(emb, boxes=boxes[i : i + chunk], **kwargs) for i in range(0, len(boxes), chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

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

    def low_res_hw(self, emb: ImageEmbedding, low: int = 256) -> Tuple[int, int]:
        nh, nw = emb.input_hw
        return max(1, int(np.ceil(nh * low / self.image_size))), max(1, int(np.ceil(nw * low / self.image_size)))

    def upscale(self, emb: ImageEmbedding, logits: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits (B, 1, 256, 256) -> logits in the image's own (H, W)."""
        ch, cw = self.low_res_hw(emb, logits.shape[-1])
        return F.interpolate(logits[..., :ch, :cw].float(), size=emb.original_hw, mode="bilinear", align_corners=False)

    def predict(self, image: np.ndarray, prompt: Prompt) -> Prediction:
        """Segment the head in ``image`` (H, W uint8) with a box and/or clicks, or none (automatic mode)."""
        h, w = image.shape[:2]
        prompt = prompt.validated(h, w)
        emb = self.embed(image)
        if prompt.box is not None:
            logits, iou = self.decode(emb, boxes=np.array([prompt.box]), points=prompt.points, labels=prompt.labels)
            return self.finish(emb, logits, iou)
        if len(prompt.points):
            fg = prompt.points[prompt.labels == 1]
            if len(fg) == 0:
                raise PromptError("clicks without a box need at least one foreground point")
            if self.localiser is not None:  # the localiser's head that holds the click
                pred = box_search.localised(self, emb, prompt, image)
                if pred is not None and pred.mask.sum() >= 16:
                    return pred
            centre = fg.mean(axis=0)
            pred = box_search.search(self, emb, [tuple(centre)], prompt)
            pred.confidence = {"source": "box_search", "decoder_iou": round(pred.score, 4)}
            return pred
        return self.predict_automatic(emb, image)

    def predict_automatic(self, emb: ImageEmbedding, image: Optional[np.ndarray] = None,
                          agreement: Optional[bool] = None) -> Prediction:
        """No prompt: the trained localiser when the model has one, else the trained automatic head, else the box
        search. ``image`` (the frame ``emb`` encodes) lets the localiser add the skull ring's candidate.
        ``agreement`` (default :attr:`automatic_agreement`): run the box search for ``box_search_agreement`` when
        the localised route did not decode its candidates anyway (the pool scorer does not need it)."""
        if self.localiser is not None:
            pred = box_search.localised(self, emb, image=image)
            if pred is not None and pred.mask.sum() >= 16:
                agreement = self.automatic_agreement if agreement is None else agreement
                if agreement and "box_search_agreement" not in pred.confidence:
                    other = box_search.search(self, emb, box_search.image_centres(*emb.original_hw), Prompt())
                    pred.confidence["box_search_agreement"] = round(mask_dice(pred.mask, other.mask), 4)
                return pred
        if self.automatic_decoder is not None:
            pred = box_search.automatic_head(self, emb)
            if pred.mask.sum() >= 16:
                pred.confidence = {"source": "automatic_head", "decoder_iou": round(pred.score, 4)}
                return pred
        pred = box_search.search(self, emb, box_search.image_centres(*emb.original_hw), Prompt())
        pred.confidence = {"source": "box_search", "decoder_iou": round(pred.score, 4)}
        return pred

    def empty(self, emb: ImageEmbedding) -> Prediction:
        """No head found: an empty mask (score 0) in the image's geometry."""
        return Prediction(mask=np.zeros(emb.original_hw, dtype=bool), score=0.0,
                          logits=torch.full((1, 1, 256, 256), -20.0))

    def finish(self, emb: ImageEmbedding, logits: torch.Tensor, iou: torch.Tensor) -> Prediction:
        """The first of a batch of low-resolution answers as a full-resolution :class:`Prediction`."""
        full = self.upscale(emb, logits[:1, :1])
        return Prediction(mask=(full[0, 0] > 0).cpu().numpy(), score=float(iou[0, 0]), logits=logits[:1, :1])
