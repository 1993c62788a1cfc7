"""Quality control for synthetic image-mask pairs, before a pair may enter the datastore.

Two gates, in order (the first failure is the pair's rejection reason):

1. Shape: the mask is one filled, near-elliptical component, like every real HC18 head mask:
   ``empty_mask`` (fewer than ``min_area_px`` head pixels), ``fragmented`` (more than one connected component:
   two blobs, speckle), ``holes`` (the filled mask is larger than the mask), ``area_out_of_range`` (the head
   covers a fraction of the frame outside the real range), ``not_elliptical`` (RMS distance of the outline to
   its fitted ellipse, :attr:`fetal_head.biometry.HeadBiometry.fit_residual_px`, above ``max_fit_residual_px``,
   or the mask's area differs from its fitted ellipse's area, clipped to the frame, by more than
   ``max_area_ratio_error``).
2. SAM agreement: the shipped SAM model must find the mask's head from two prompts: the mask's bounding box
   grown by 15% on each side (a tight box lets SAM inscribe an ellipse whatever the image shows) with Dice at least
   ``min_sam_dice``, and one click at the mask's centroid (SamPredictor's click search, no box to lean on) with
   Dice at least ``min_sam_click_dice``; otherwise ``sam_disagrees``. An image whose head SAM does not find where
   the mask says is not a usable pair. Measured with LiteMedSAM on 40 HC18 test-split pairs: 39 pass (one
   sam_disagrees); the same 40 masks over uniform-noise images: 1 passes. SAM agreement is necessary, not
   sufficient: SAM's shape prior is strong (box prompts alone pass noise images at Dice 0.8-0.9).

``mode="shape-only"`` skips gate 2. It exists for tests and for CPU smoke runs, where a tiny generator trained
for a few steps makes images no segmenter would recognise; it must not be used for data that trains a model.
The shape thresholds leave room around the 438 HC18 pool-split masks, which all pass: RMS residual 0.23-0.39 px,
area within 0.1% of the fitted ellipse's, head area 3.7%-53% of the frame.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict

import numpy as np
from scipy import ndimage
from skimage import measure

from ..biometry import BiometryError, ellipse_mask, measure_head
from ..segmentation.prompts import mask_dice

QC_MODES = ("full", "shape-only")
ACCEPTED = "accepted"


@dataclass
class QCThresholds:
    min_area_px: int = 64
    # real HC18 heads cover 3.7% to 53% of the frame; slack either side
    min_area_fraction: float = 0.01
    max_area_fraction: float = 0.6
    # real masks: RMS residual 0.23-0.39 px at 800x540 (flood-filled from drawn ellipses); allow irregular outlines
    max_fit_residual_px: float = 2.0
    max_area_ratio_error: float = 0.05
    # SAM prompted with a box draws an ellipse into almost any box (noise images reach Dice 0.8-0.9 with a 5%
    # margin); a looser box and a click-only prompt make it find the boundary from the image (numbers above).
    min_sam_dice: float = 0.85
    min_sam_click_dice: float = 0.7
    sam_box_margin: float = 0.15  # fraction of the box size added on each side


@dataclass
class QCResult:
    accepted: bool
    reason: str  # ACCEPTED or the first failed check
    detail: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def mask_box(mask: np.ndarray, margin: float = 0.0):
    """(x_min, y_min, x_max, y_max) of the mask, grown by ``margin`` x its size on each side, clipped."""
    from ..segmentation import prompts  # lazily, as below: the shape-only QC imports no torch

    x0, y0, x1, y1 = prompts.mask_box(mask)
    h, w = mask.shape
    return prompts.grow_box((x0, y0, x1, y1), ((x1 - x0 + 1) * margin, (y1 - y0 + 1) * margin), h, w)


def check_shape(mask: np.ndarray, thresholds: QCThresholds = QCThresholds()) -> QCResult:
    """Gate 1: one filled near-elliptical component of a plausible size."""
    m = np.asarray(mask) > 0
    area = int(m.sum())
    if area < thresholds.min_area_px:
        return QCResult(False, "empty_mask", {"area_px": area})
    n_components = int(measure.label(m, connectivity=2).max())
    if n_components != 1:
        return QCResult(False, "fragmented", {"components": n_components})
    filled = int(ndimage.binary_fill_holes(m).sum())
    if filled > area:
        return QCResult(False, "holes", {"hole_px": filled - area})
    fraction = area / m.size
    if not thresholds.min_area_fraction <= fraction <= thresholds.max_area_fraction:
        return QCResult(False, "area_out_of_range", {"area_fraction": fraction})
    try:
        bio = measure_head(m, boundary_offset_px=0.0)
    except BiometryError:
        return QCResult(False, "not_elliptical", {"fit": 0.0})
    # the fitted ellipse rasterised in the same frame (so a head cut by the border is compared like for like)
    ellipse_area = int(ellipse_mask(m.shape, bio).sum())
    ratio = area / max(ellipse_area, 1)
    detail = {"area_fraction": fraction, "fit_residual_px": bio.fit_residual_px, "area_ratio": ratio}
    if bio.fit_residual_px > thresholds.max_fit_residual_px or abs(ratio - 1.0) > thresholds.max_area_ratio_error:
        return QCResult(False, "not_elliptical", detail)
    return QCResult(True, ACCEPTED, detail)


def check_sam_agreement(image: np.ndarray, mask: np.ndarray, predictor, thresholds: QCThresholds = QCThresholds()) -> QCResult:
    """Gate 2: SAM finds the same head from a loose box and from a centroid click."""
    from ..segmentation.prompts import Prompt

    m = np.asarray(mask) > 0
    pred = predictor.predict(image, Prompt(box=mask_box(m, thresholds.sam_box_margin)))
    rows, cols = np.nonzero(m)
    click = Prompt(points=np.array([[cols.mean(), rows.mean()]], dtype=np.float32), labels=np.array([1]))
    pred_click = predictor.predict(image, click)  # the embedding is cached: only the decoder runs again
    d, d_click = mask_dice(pred.mask, m), mask_dice(pred_click.mask, m)
    detail = {"sam_dice": d, "sam_click_dice": d_click, "sam_score": pred.score}
    if d < thresholds.min_sam_dice or d_click < thresholds.min_sam_click_dice:
        return QCResult(False, "sam_disagrees", detail)
    return QCResult(True, ACCEPTED, detail)


def check_pair(
    image: np.ndarray,
    mask: np.ndarray,
    predictor=None,
    mode: str = "full",
    thresholds: QCThresholds = QCThresholds(),
) -> QCResult:
    """Both gates (``mode="full"``, needs ``predictor``) or the shape gate alone (``"shape-only"``, tests)."""
    if mode not in QC_MODES:
        raise ValueError(f"qc must be one of {QC_MODES}, got {mode!r}")
    shape = check_shape(mask, thresholds)
    if not shape.accepted or mode == "shape-only":
        return shape
    if predictor is None:
        raise ValueError("qc='full' needs a SAM predictor")
    sam = check_sam_agreement(image, mask, predictor, thresholds)
    return QCResult(sam.accepted, sam.reason, {**shape.detail, **sam.detail})


class QCTally:
    """Counts of accepted pairs and rejections by reason."""

    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, result: QCResult) -> None:
        self.counts[result.reason] += 1

    @property
    def accepted(self) -> int:
        return self.counts[ACCEPTED]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def rejected(self) -> Dict[str, int]:
        return {k: v for k, v in sorted(self.counts.items()) if k != ACCEPTED}

    def to_dict(self) -> dict:
        return {"candidates": self.total, "accepted": self.accepted, "rejected": self.rejected(),
                "pass_rate": round(self.accepted / self.total, 4) if self.total else None}
