"""MONAI Label infer task: SAM segmentation of the fetal head plus head biometry (thin adapter)."""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any, Dict, Tuple, Union

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from fetal_head.io import write_mask
from fetal_head.measurement import DEFAULT_MASK_SHAPE, MASK_SHAPES, check_mask_shape, measure_frame
from fetal_head.segmentation.model_store import ServedModel
from fetal_head.segmentation.prompts import pixel_size_from_request, prompt_from_request

logger = logging.getLogger(__name__)


class RequestOptionError(ValueError):
    """An infer request option other than the prompt (``frame``, ``result_extension``, ``mask_shape``) that cannot
    be used."""


def _frame_index(value) -> Union[int, None]:
    """The request option ``frame``: a 0-based frame index of a multi-frame DICOM (None: the file's default)."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise RequestOptionError(f"'frame' must be a whole number (0-based frame index), got {value!r}") from None


class FetalHeadSamInfer(InferTask):
    """Box, clicks, box + clicks or no prompt -> head mask (PNG, image geometry) and biometry JSON.

    The 3D Slicer module lists models by type: ``deepgrow`` ones in SmartEdit (clicks), ``segmentation`` ones in
    Auto Segmentation (no prompt). The app registers this task once per type over one shared model.
    """

    def __init__(self, model: ServedModel, type=InferType.DEEPGROW, label: str = "fetal_head", description: str = ""):
        super().__init__(
            type=type,
            labels={label: 1},
            dimension=2,
            description=description
            or "Fetal head segmentation with Segment Anything (box, clicks or automatic) and HC/BPD/OFD",
            config={"device": model.source.device},
        )
        self.model = model

    def info(self) -> Dict[str, Any]:
        d = super().info()
        d["model_version"] = self.model.source.version()
        d["prompts"] = ["roi", "foreground", "background", "box", "none (automatic)"]
        d["mask_shapes"] = {"options": list(MASK_SHAPES), "default": DEFAULT_MASK_SHAPE}  # request option mask_shape
        return d

    def is_valid(self) -> bool:
        return True

    def __call__(self, request) -> Tuple[Union[str, None], Dict]:
        t0 = time.time()
        prompt = prompt_from_request(request)
        pixel_size = pixel_size_from_request(request.get("pixel_size_mm"))
        suffix = _result_suffix(request)  # refuse a bad option before the expensive work
        mask_shape = _mask_shape(request)
        # the image only ever comes from a file (never an array in the request: clients must not inject one)
        m = measure_frame(self.model.get(), request["image"], prompt, pixel_size, _frame_index(request.get("frame")),
                          mask_shape)
        t2 = time.time()
        label_file = tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name
        write_mask(m.mask, label_file, spacing_mm=m.pixel_size)
        result = m.result
        result["latencies"] = {
            "pre": round(t2 - t0 - m.seconds["segment"] - m.seconds["measure"], 3),
            "infer": round(m.seconds["segment"], 3),
            "post": round(time.time() - t2 + m.seconds["measure"], 3),
            "total": round(time.time() - t0, 3),
        }
        return label_file, result

    def clear(self):
        self.model.clear()


RESULT_SUFFIXES = (".png", ".nrrd", ".nii.gz", ".nii")


def _result_suffix(request) -> str:
    """The label file's format: PNG by default; OHIF's MONAI Label panel asks for ``result_extension: .nrrd``."""
    suffix = request.get("result_extension") or ".png"
    if suffix not in RESULT_SUFFIXES:
        raise RequestOptionError(f"result_extension {suffix!r} is not supported; use one of {', '.join(RESULT_SUFFIXES)}")
    return suffix


def _mask_shape(request) -> str:
    """``mask_shape``: the fitted head ellipse, filled (default), or the decoder's own ``segmentation``."""
    try:
        return check_mask_shape(request.get("mask_shape") or DEFAULT_MASK_SHAPE)
    except ValueError as e:
        raise RequestOptionError(str(e)) from None
