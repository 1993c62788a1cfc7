"""Prompts: what a prompt is (:class:`Prompt`, in the image's own pixel frame), how MONAI Label clients send one
(:func:`prompt_from_request`), and how a user's prompt is simulated from a reference mask (training and evaluation
draw boxes and clicks the same way).

3D Slicer's MONAI Label module and the OHIF MONAI Label extension send, for a 2D image, index-space (IJK)
coordinates where i is the column, j the row and k the slice (0 for a PNG):

- ``roi``: ``[i_min, i_max, j_min, j_max, k_min, k_max]`` (Slicer's ROI node; pairs may come reversed after
  its RAS->IJK flip, so each pair is sorted); ``[i_min, i_max, j_min, j_max]`` is accepted too;
- ``foreground`` / ``background``: lists of ``[i, j]`` or ``[i, j, k]`` clicks; one click may also come flat,
  ``[i, j]`` or ``[i, j, k]`` (a list of 2 or 3 numbers is one point, not two malformed ones);
- ``box``: ``[x_min, y_min, x_max, y_max]`` for scripts and simple clients.

No prompt at all selects the automatic mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

AUTOMATIC = "automatic"  # the one name of the no-prompt mode (answers, benchmarks, metrics)
MODES = ("box", "box+clicks", "clicks", AUTOMATIC)


class PromptError(ValueError):
    """A prompt that cannot be used on this image (outside it, degenerate, malformed)."""


@dataclass
class Prompt:
    """Prompts in the image's own pixel frame: x is the column, y the row.

    ``box`` is (x_min, y_min, x_max, y_max), inclusive pixel indices; ``points`` is (N, 2) as (x, y) with
    ``labels`` 1 for foreground and 0 for background. An empty prompt means automatic (automatic) mode.
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



def _numbers(value: Any, name: str, lengths: Sequence[int]) -> Optional[list]:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    if not isinstance(value, (list, tuple)) or len(value) not in lengths:
        raise PromptError(f"'{name}' must be a list of {' or '.join(map(str, lengths))} numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise PromptError(f"'{name}' must contain numbers only, got {value!r}") from None
        if not math.isfinite(float(v)):
            raise PromptError(f"'{name}' must contain finite numbers, got {value!r}")
        out.append(float(v))
    return out


def _points(value: Any, name: str) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"'{name}' must be a list of [i, j] or [i, j, k] points, got {value!r}")
    if value and all(not isinstance(p, (list, tuple, dict)) and p is not None for p in value):
        if len(value) in (2, 3):  # one flat click [i, j] / [i, j, k], as a user types it
            return [_numbers(list(value), name, (2, 3))[:2]]
        raise PromptError(f"'{name}' must be a list of [i, j] or [i, j, k] points (or one such point), got {value!r}")
    points = []
    for p in value:
        if p is None or (isinstance(p, (list, tuple)) and len(p) == 0):
            continue
        if not isinstance(p, (list, tuple)):
            raise PromptError(f"'{name}' must be a list of [i, j] or [i, j, k] points, got {value!r}")
        points.append(_numbers(p, f"{name} point", (2, 3))[:2])
    return points


def prompt_from_request(request: Mapping[str, Any]) -> Prompt:
    """Build a prompt from a MONAI Label infer request (Slicer/OHIF conventions, see module docstring)."""
    box = None
    roi = _numbers(request.get("roi"), "roi", (4, 6))
    if roi is not None:
        (x0, x1), (y0, y1) = sorted(roi[0:2]), sorted(roi[2:4])
        box = (x0, y0, x1, y1)
    explicit = _numbers(request.get("box"), "box", (4,))
    if explicit is not None:
        if box is not None:
            raise PromptError("give either 'roi' or 'box', not both")
        box = tuple(explicit)
    fg = _points(request.get("foreground"), "foreground")
    bg = _points(request.get("background"), "background")
    points = np.array(fg + bg, dtype=np.float32).reshape(-1, 2)
    labels = np.array([1] * len(fg) + [0] * len(bg), dtype=np.int64)
    return Prompt(box=box, points=points, labels=labels)


def prompt_mode(prompt: Prompt) -> str:
    if prompt.box is not None:
        return "box+clicks" if len(prompt.points) else "box"
    return "clicks" if len(prompt.points) else AUTOMATIC


MAX_PIXEL_SIZE_MM = 10.0  # a 10 mm pixel is already far coarser than any ultrasound frame


def pixel_size_from_request(value: Any) -> Optional[tuple]:
    """``pixel_size_mm`` as one number or [x, y], each in (0, MAX_PIXEL_SIZE_MM] mm; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float, str)):
        value = [value, value]
    if not isinstance(value, (list, tuple)):
        raise PromptError(f"'pixel_size_mm' must be a number or [x, y] in mm, got {value!r}")
    nums = _numbers(list(value), "pixel_size_mm", (1, 2))
    if nums is None:
        return None
    if len(nums) == 1:
        nums = nums * 2
    if not all(0 < v <= MAX_PIXEL_SIZE_MM for v in nums):
        raise PromptError(f"'pixel_size_mm' must be in (0, {MAX_PIXEL_SIZE_MM:g}] mm, got {value!r}")
    return tuple(nums)


# ---- simulated user prompts (training, evaluation, active learning) ---------------------------------------------------------------------------------------------------
def mask_box(mask: np.ndarray) -> Tuple[float, float, float, float]:
    """(x_min, y_min, x_max, y_max), inclusive pixel indices of the mask's bounding box."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        raise ValueError("empty mask has no bounding box")
    return float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())


def grow_box(box, margin, height: int, width: int) -> Tuple[float, float, float, float]:
    """``box`` (x_min, y_min, x_max, y_max) grown by ``margin`` px (a number, or (x, y) margins), clipped to the
    image (inclusive pixel indices)."""
    mx, my = (margin, margin) if np.isscalar(margin) else margin
    x0, y0, x1, y1 = box
    return (max(x0 - mx, 0.0), max(y0 - my, 0.0), min(x1 + mx, width - 1.0), min(y1 + my, height - 1.0))


def box_iou(a, b) -> float:
    """Intersection over union of two inclusive-pixel boxes (x_min, y_min, x_max, y_max); 0 when either is None."""
    if a is None or b is None:
        return 0.0
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return float(inter / (area(a) + area(b) - inter))


def mask_dice(a: np.ndarray, b: np.ndarray, empty: float = 0.0) -> float:
    """Dice of two binary masks of one shape; ``empty`` when both are empty (0: two empty answers are no agreement;
    1 where "both empty" means "the same answer"). The one mask-overlap helper of the package: plain numpy because
    the automatic route scores dozens of candidate pairs per request; evaluation uses MONAI's ``compute_dice``."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    s = int(a.sum()) + int(b.sum())
    return float(2 * np.count_nonzero(a & b) / s) if s else float(empty)


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
