"""Reading ultrasound frames from files into the arrays the segmenter takes, with clear errors.

Real ultrasound exports come as 8-bit grayscale, RGB(A) screen captures, palette PNGs and 16-bit PNGs; every
one of them becomes an 8-bit (H, W) grayscale array here, and the original geometry (H, W) is kept so the
mask goes back in the image's own pixel grid.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import common
from .common import MIN_SIDE, ImageReadError, check_pixel_count, to_gray_uint8


def read_bitmap(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a PNG/JPEG/TIFF/BMP frame as (H, W) uint8 (DICOM goes through :mod:`fetal_head.io.dicom_us`; the
    dispatcher that picks one by content is :func:`fetal_head.io.readers.read_image`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"image file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ImageReadError("the image file is empty (0 bytes)")
    try:
        with Image.open(path) as im:  # reads the header only
            check_pixel_count(im.width, im.height, getattr(im, "n_frames", 1) if im.format == "TIFF" else 1)
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
    except Image.DecompressionBombError as e:  # Pillow's own guard, at open (twice its limit)
        raise common.ImageTooLargeError(f"image is larger than the limit of {common.MAX_PIXELS} pixels ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot decode the image ({type(e).__name__}: {e})") from e
    gray = to_gray_uint8(array)
    if min(gray.shape) < MIN_SIDE:
        raise ImageReadError(f"image of {gray.shape[1]}x{gray.shape[0]} pixels is too small to segment")
    return gray


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
        try:
            with Image.open(path) as im:
                check_pixel_count(im.width, im.height)
                a = np.array(im)
        except Image.DecompressionBombError as e:
            raise common.ImageTooLargeError(f"label is larger than the limit of {common.MAX_PIXELS} pixels") from e
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
