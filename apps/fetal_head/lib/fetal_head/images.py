"""Reading ultrasound frames from files into the arrays the segmenter takes, with clear errors.

Real ultrasound exports come as 8-bit grayscale, RGB(A) screen captures, palette PNGs and 16-bit PNGs; every
one of them becomes an 8-bit (H, W) grayscale array here, and the original geometry (H, W) is kept so the
mask goes back in the image's own pixel grid.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

MIN_SIDE = 2  # a prompt needs at least a 2x2 grid; a 1x1 "image" is refused with a message
MAX_PIXELS = 64_000_000  # guard against decompression bombs; far above any ultrasound frame


class ImageReadError(ValueError):
    """The file is not a usable 2D image (corrupt, empty, truncated, unsupported)."""


def to_gray_uint8(array: np.ndarray) -> np.ndarray:
    """Any 2D frame (gray, RGB, RGBA; 8/16-bit, float) as (H, W) uint8."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] in (1, 2, 3, 4):
        channels = a.shape[-1]
        if channels in (2, 4):  # drop alpha
            a = a[..., : channels - 1]
        if a.shape[-1] == 3:
            # Ultrasound screen captures are mostly gray with coloured overlays; luminance keeps the anatomy.
            a = a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        else:
            a = a[..., 0]
    if a.ndim != 2:
        raise ImageReadError(f"expected a 2D image (gray or colour), got an array of shape {np.asarray(array).shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ImageReadError("the image contains NaN or infinite values")
    if np.asarray(array).dtype == np.uint8 or (
        np.issubdtype(np.asarray(array).dtype, np.integer) and a.min() >= 0 and a.max() <= 255
    ):
        return np.clip(np.round(a), 0, 255).astype(np.uint8)  # already 8-bit values (e.g. RGB -> luminance)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((a - lo) / (hi - lo) * 255).astype(np.uint8)


def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a PNG/JPEG/TIFF/BMP frame as (H, W) uint8; DICOM files and series directories go through
    :func:`fetal_head.dicom_us.read_ultrasound`."""
    path = os.fspath(path)
    if _is_dicom(path):
        from .dicom_us import read_ultrasound

        return read_ultrasound(path).pixels
    if not os.path.isfile(path):
        raise ImageReadError(f"image file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ImageReadError("the image file is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageReadError(f"image of {im.width}x{im.height} pixels is larger than supported")
            im.load()  # force decoding now: truncated files fail here, not later
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif im.mode == "1":
                im = im.convert("L")
            array = np.array(im)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot decode the image ({type(e).__name__}: {e})") from e
    gray = to_gray_uint8(array)
    if min(gray.shape) < MIN_SIDE:
        raise ImageReadError(f"image of {gray.shape[1]}x{gray.shape[0]} pixels is too small to segment")
    return gray


def _is_dicom(path: str) -> bool:
    from .dicom_us import is_dicom_file

    return os.path.isdir(path) or (os.path.isfile(path) and is_dicom_file(path))


def read_frame(
    path: Union[str, os.PathLike], frame: Optional[int] = None
) -> Tuple[np.ndarray, Optional[tuple], Optional[dict]]:
    """(pixels, (x, y) pixel size in mm or None, calibration) of an image file or DICOM series.

    Only DICOM carries its own calibration: ``{"source", "note", "pixel_spacing_mm", "frame_index", "n_frames"}``
    (:meth:`fetal_head.dicom_us.UltrasoundFrame.calibration_dict`); for other files it is None (the pixel size
    comes from the datastore or the request). ``frame`` (0-based) picks a frame of a multi-frame DICOM.
    """
    path = os.fspath(path)
    if _is_dicom(path):
        from .dicom_us import read_ultrasound

        us = read_ultrasound(path, frame=frame)
        return us.pixels, us.pixel_spacing_mm, us.calibration_dict()
    if frame not in (None, 0):
        raise ImageReadError(f"frame {frame} requested, but this image has a single frame (index 0)")
    return read_image(path), None, None


ITK_LABEL_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")  # Slicer submits labelmaps as .nrrd


def read_mask(path: Union[str, os.PathLike]) -> np.ndarray:
    """A label file as a (H, W) bool array (nonzero = head): PNG/JPEG (our infer, OHIF) or NRRD/NIfTI (Slicer).

    Singleton axes ((1, H, W) from Slicer, (H, W, 1)) are dropped; in an RGB(A) label any coloured pixel is head.
    """
    path = os.fspath(path)
    if path.lower().endswith(ITK_LABEL_SUFFIXES):
        import itk

        a = np.asarray(itk.array_from_image(itk.imread(path)))
    else:
        with Image.open(path) as im:
            a = np.array(im)
    a = np.squeeze(a)
    if a.ndim == 3 and a.shape[-1] in (2, 3, 4):
        a = a[..., : 3 if a.shape[-1] > 2 else 1].max(axis=-1)
    return a > 0


def write_mask_png(mask: np.ndarray, path: Union[str, os.PathLike], value: int = 1) -> str:
    """Write a binary mask as an 8-bit PNG with ``value`` for the head (MONAI Label labels use the label index)."""
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * value).save(os.fspath(path))
    return os.fspath(path)


def write_mask(mask: np.ndarray, path: Union[str, os.PathLike], value: int = 1, spacing_mm=None) -> str:
    """Write a binary mask as PNG, or as NRRD/NIfTI (what OHIF's MONAI Label panel parses) by the path's suffix.

    ITK formats carry the pixel spacing (mm, isotropic or (x, y)) when it is known, so a viewer overlays the mask
    in the image's geometry.
    """
    path = os.fspath(path)
    if not path.lower().endswith(ITK_LABEL_SUFFIXES):
        return write_mask_png(mask, path, value)
    import itk

    image = itk.image_from_array(np.ascontiguousarray((np.asarray(mask) > 0).astype(np.uint8) * value))
    if spacing_mm is not None:
        sx, sy = (spacing_mm, spacing_mm) if np.isscalar(spacing_mm) else spacing_mm
        image.SetSpacing([float(sx), float(sy)])
    itk.imwrite(image, path)
    return path
