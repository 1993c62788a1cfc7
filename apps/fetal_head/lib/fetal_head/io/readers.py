"""One entry point for every input frame: a small registry of readers, each with a test of the file's content
(as nnU-Net's reader registry picks an image reader), tried in order.

    pixels, spacing_mm, calibration = read_frame(path, frame=None)   # any supported input
    pixels = read_image(path)                                         # just the (H, W) uint8 frame

| reader | recognised by | calibration |
| --- | --- | --- |
| ``dicom`` | a directory (one DICOM series), 'DICM' at byte 128, or ``*.dcm`` | US regions, else PixelSpacing |
| ``itk`` | ``.nrrd``, ``.nii(.gz)``, ``.mha``/``.mhd`` (a 2D image or a one-slice volume) | the image spacing |
| ``bitmap`` | anything else (PNG, JPEG, TIFF, BMP, decoded by Pillow) | none: datastore or request |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import numpy as np

from . import dicom_us
from .common import MIN_SIDE, ImageReadError, check_pixel_count, to_gray_uint8
from .images import ITK_LABEL_SUFFIXES, read_bitmap

PathLike = Union[str, os.PathLike]
Frame = Tuple[np.ndarray, Optional[tuple], Optional[dict]]  # pixels, (x, y) mm or None, calibration or None


@dataclass(frozen=True)
class FrameReader:
    name: str
    accepts: Callable[[str], bool]
    read: Callable[[str, Optional[int]], Frame]


def _single_frame(frame: Optional[int]) -> None:
    if frame not in (None, 0):
        raise ImageReadError(f"frame {frame} requested, but this image has a single frame (index 0)")


def _read_dicom(path: str, frame: Optional[int]) -> Frame:
    us = dicom_us.read_ultrasound(path, frame=frame)
    return us.pixels, us.pixel_spacing_mm, us.calibration_dict()


def _read_itk(path: str, frame: Optional[int]) -> Frame:
    import itk

    _single_frame(frame)
    _check_itk_header(path)
    try:
        image = itk.imread(path)
    except Exception as e:  # itk raises RuntimeError for anything it cannot parse
        raise ImageReadError(f"cannot read {os.path.basename(path)} with ITK ({e})") from e
    pixels = to_gray_uint8(np.squeeze(np.asarray(itk.array_from_image(image))))
    if min(pixels.shape) < MIN_SIDE:
        raise ImageReadError(f"image of {pixels.shape[1]}x{pixels.shape[0]} pixels is too small to segment")
    sx, sy = (float(v) for v in tuple(image.GetSpacing())[:2])
    calibration = {"source": "image spacing", "note": f"pixel spacing from the {os.path.splitext(path)[1]} header",
                   "pixel_spacing_mm": (sx, sy), "frame_index": 0, "n_frames": 1}
    return pixels, (sx, sy), calibration


def _check_itk_header(path: str) -> None:
    """The pixel limit from the NRRD/NIfTI/MHA header, before any voxel is decoded."""
    import itk

    try:
        io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
        if io is None:
            raise ImageReadError(f"cannot read {os.path.basename(path)}: no ITK reader for this file")
        io.SetFileName(path)
        io.ReadImageInformation()
        dims = [int(io.GetDimensions(i)) for i in range(io.GetNumberOfDimensions())]
    except ImageReadError:
        raise
    except Exception as e:  # itk raises RuntimeError for anything it cannot parse
        raise ImageReadError(f"cannot read {os.path.basename(path)} with ITK ({e})") from e
    dims = dims + [1] * (3 - len(dims))
    check_pixel_count(dims[0], dims[1], int(np.prod(dims[2:])) * max(int(io.GetNumberOfComponents()), 1))


def _read_bitmap(path: str, frame: Optional[int]) -> Frame:
    _single_frame(frame)
    return read_bitmap(path), None, None


READERS: List[FrameReader] = [
    FrameReader("dicom", lambda p: os.path.isdir(p) or (os.path.isfile(p) and dicom_us.is_dicom_file(p)), _read_dicom),
    FrameReader("itk", lambda p: p.lower().endswith(ITK_LABEL_SUFFIXES), _read_itk),
    FrameReader("bitmap", lambda p: True, _read_bitmap),
]


def reader_for(path: PathLike) -> FrameReader:
    path = os.fspath(path)
    return next(r for r in READERS if r.accepts(path))


def read_frame(path: PathLike, frame: Optional[int] = None) -> Frame:
    """(pixels, (x, y) pixel size in mm or None, calibration) of an image file or DICOM series.

    Only self-describing formats (DICOM, NRRD/NIfTI) carry a calibration: ``{"source", "note",
    "pixel_spacing_mm", "frame_index", "n_frames"}``; for bitmaps it is None (the pixel size comes from the
    datastore or the request). ``frame`` (0-based) picks a frame of a multi-frame DICOM.
    """
    path = os.fspath(path)
    return reader_for(path).read(path, frame)


def read_image(path: PathLike) -> np.ndarray:
    """The (H, W) uint8 frame of any supported input (the default frame of a cine)."""
    return read_frame(path)[0]
