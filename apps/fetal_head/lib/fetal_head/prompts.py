"""Prompts as MONAI Label clients send them, turned into a :class:`~fetal_head.sam.Prompt`.

3D Slicer's MONAI Label module and the OHIF MONAI Label extension send, for a 2D image, index-space (IJK)
coordinates where i is the column, j the row and k the slice (0 for a PNG):

- ``roi``: ``[i_min, i_max, j_min, j_max, k_min, k_max]`` (Slicer's ROI node; pairs may come reversed after
  its RAS->IJK flip, so each pair is sorted); ``[i_min, i_max, j_min, j_max]`` is accepted too;
- ``foreground`` / ``background``: lists of ``[i, j]`` or ``[i, j, k]`` clicks;
- ``box``: ``[x_min, y_min, x_max, y_max]`` for scripts and simple clients.

No prompt at all selects the automatic (prompt-free) mode.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .sam import Prompt, PromptError


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
    return [_numbers(p, f"{name} point", (2, 3))[:2] for p in value if p is not None and len(p)]


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
    return "clicks" if len(prompt.points) else "automatic"


def pixel_size_from_request(value: Any) -> Optional[tuple]:
    """``pixel_size_mm`` as one number or [x, y]; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float, str)):
        value = [value, value]
    nums = _numbers(list(value), "pixel_size_mm", (1, 2))
    if len(nums) == 1:
        nums = nums * 2
    if min(nums) <= 0:
        raise PromptError(f"'pixel_size_mm' must be positive, got {value!r}")
    return tuple(nums)
