"""The evaluation core: what prompt each test image gets, how a predicted mask is scored, and what a failure
counts as. The trainer's evaluation (``scripts/train_sam.py``), the benchmark and ``scripts/eval_sam.py`` all
score through here, so their numbers mean the same thing.

- Prompts, drawn once per test image in case order from ``seed`` (identical for every model evaluated):
  ``box``: the reference mask's box with each side grown by 0-``max_jitter`` px and clipped to the image (a
  Slicer-style ROI); ``click``: one foreground click at the reference mask's centroid; ``automatic``: none.
- The scored mask is the served answer's: the fitted head ellipse, filled (``mask_shape="ellipse"``, the infer
  default), or the decoder's own mask (``"segmentation"``; every figure before 2026-11-28 scored that).
- Metrics per image: Dice (MONAI ``compute_dice``), HD95 in mm (MONAI ``compute_hausdorff_distance``, 95th
  percentile, the image's pixel size as spacing), and the HC absolute difference in mm (ellipse fit,
  :func:`fetal_head.biometry.measure_head`) against the reference HC.
- Failures stay in the means with finite penalties instead of being dropped or NaN: an empty prediction scores
  Dice 0 and HD95 = the image diagonal; a prediction no ellipse fits measures HC 0, so its HC error is the
  reference HC. ``head_found`` marks these rows.
- A *failed* answer, in the counts the reports and issue 12 give ("images below 0.80"), has Dice below
  :data:`FAILURE_DICE`: at that overlap the answer is another structure or a fragment, not a loose head outline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

from ..biometry import BiometryError, measure_head
from ..io import read_image
from ..io.hc18 import HC18Case
from ..measurement import DEFAULT_MASK_SHAPE, answer_mask
from ..segmentation.embedding_cache import EmbeddingCache
from ..segmentation.predictor import SamPredictor
from ..segmentation.prompts import AUTOMATIC, Prompt, jitter_box, mask_box

MODES = ("box", "click", AUTOMATIC)
METRICS = ("dice", "hd95_mm", "hc_abs_diff_mm")
FAILURE_DICE = 0.80


@dataclass
class TestImage:
    case: HC18Case
    image: np.ndarray  # (H, W) uint8
    mask: np.ndarray  # (H, W) bool, the reference
    box: Tuple[float, float, float, float]  # the jittered Slicer-style box, the same for every model

    def prompt(self, mode: str) -> Prompt:
        if mode == "box":
            return Prompt(box=self.box)
        if mode == "click":
            rows, cols = np.nonzero(self.mask)
            return Prompt(points=np.array([[cols.mean(), rows.mean()]], dtype=np.float32), labels=np.array([1]))
        if mode == AUTOMATIC:
            return Prompt()
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def load_test_images(cases: Sequence[HC18Case], seed: int = 0, max_jitter: int = 20) -> List[TestImage]:
    rng = np.random.default_rng(seed)  # boxes drawn in case order: identical for every model
    out = []
    for c in cases:
        mask = c.load_mask()
        out.append(TestImage(c, read_image(c.image_path), mask, jitter_box(mask_box(mask), rng, max_jitter, *mask.shape)))
    return out


def image_metrics(pred: np.ndarray, ref: np.ndarray, pixel_size_mm: float, hc_ref_mm: float) -> dict:
    """Dice, HD95 (mm) and HC absolute difference (mm) of one predicted mask against the reference (failures:
    see the module docstring)."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    p = torch.as_tensor(np.asarray(pred, dtype=bool), dtype=torch.float32)[None, None]
    r = torch.as_tensor(np.asarray(ref, dtype=bool), dtype=torch.float32)[None, None]
    dice = float(compute_dice(p, r, include_background=True, ignore_empty=False)[0, 0])
    h, w = ref.shape
    found = bool(pred.any())
    if found:
        hd95 = float(compute_hausdorff_distance(p, r, include_background=True, percentile=95,
                                                spacing=pixel_size_mm)[0, 0])
    else:
        hd95 = math.hypot(h, w) * pixel_size_mm
    try:
        hc_mm = float(measure_head(pred, pixel_size_mm).hc_mm)
    except BiometryError:
        hc_mm, found = 0.0, False
    return {"dice": dice, "hd95_mm": hd95, "hc_mm": hc_mm, "hc_ref_mm": float(hc_ref_mm),
            "hc_abs_diff_mm": abs(hc_mm - hc_ref_mm), "head_found": found}


def warm_embeddings(predictor: SamPredictor, test: Sequence[TestImage], cache: EmbeddingCache) -> None:
    """Put the test embeddings from the disk cache into the predictor's in-memory cache, so evaluating runs the
    decoder only (models with a frozen encoder share one embedding per image)."""
    predictor.cache_size = max(predictor.cache_size, len(test) + 16)
    for t in tqdm(test, desc="test embeddings", unit="image", mininterval=10):
        predictor.remember(t.image, cache.get(t.image))


def evaluate(predictor: SamPredictor, test: Sequence[TestImage], modes: Sequence[str] = MODES,
             desc: str = "evaluate", cache: Optional[EmbeddingCache] = None,
             mask_shape: str = DEFAULT_MASK_SHAPE) -> Tuple[List[dict], Dict[str, np.ndarray]]:
    """Per-image metric rows and the predicted masks (``"<mode>/<image id>"``) of every test image in every mode,
    through ``predictor.predict`` and :func:`~fetal_head.measurement.answer_mask` (the served answer; ``mask_shape``
    as the infer request's). ``cache``: embeddings from this disk cache (when it belongs to the same encoder) instead
    of encoding each image."""
    rows, masks = [], {}
    use_cache = cache is not None and cache.predictor.encoder_key == predictor.encoder_key
    for t in tqdm(test, desc=desc, unit="image", mininterval=10, leave=False):
        if use_cache:
            predictor.remember(t.image, cache.get(t.image))
        for mode in modes:
            pred = answer_mask(predictor.predict(t.image, t.prompt(mode)).mask, mask_shape)
            masks[f"{mode}/{t.case.image_id}"] = pred
            rows.append({"mode": mode, "image": t.case.image_id, "mask_shape": mask_shape,
                         **image_metrics(pred, t.mask, t.case.pixel_size_mm, t.case.hc_mm)})
    return rows, masks


def summarize(rows: Iterable[dict], metrics: Sequence[str] = METRICS) -> Dict[str, Dict[str, float]]:
    """Per mode: the mean of each metric over images, plus the number of images and of failures."""
    by_mode: Dict[str, List[dict]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], []).append(r)
    return {mode: {**{m: float(np.mean([r[m] for r in rs])) for m in metrics},
                   "images": len(rs), "failures": sum(not r["head_found"] for r in rs)}
            for mode, rs in by_mode.items()}
