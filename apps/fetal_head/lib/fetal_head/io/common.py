"""What every reader shares (a leaf module: it imports no other reader, so the readers never import each other):
the error a bad file raises, the smallest usable frame, the pixel limit, and turning any frame into 8-bit gray."""

from __future__ import annotations

import numpy as np

MIN_SIDE = 2  # a prompt needs at least a 2x2 grid; a 1x1 "image" is refused with a message
MAX_PIXELS = 64_000_000  # guard against decompression bombs; far above any ultrasound frame (--conf max_image_pixels)


class ImageReadError(ValueError):
    """The file is not a usable 2D image (corrupt, empty, truncated, unsupported)."""


class ImageTooLargeError(ImageReadError):
    """The image's header announces more pixels than the limit (checked before decoding: decompression bombs)."""


def set_max_pixels(limit) -> int:
    """Set the pixel limit every reader checks before decoding (the app's ``--conf max_image_pixels``)."""
    global MAX_PIXELS
    value = int(float(limit))
    if value < MIN_SIDE * MIN_SIDE:
        raise ValueError(f"max_image_pixels must be at least {MIN_SIDE * MIN_SIDE}, got {limit!r}")
    MAX_PIXELS = value
    from PIL import Image

    # Pillow's own guard (a DecompressionBombError above twice its limit) must not fire below ours
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, value)
    return value


def check_pixel_count(width: int, height: int, frames: int = 1) -> None:
    """Refuse, from the header's sizes alone, an image larger than :data:`MAX_PIXELS` (all frames together)."""
    total = int(width) * int(height) * max(int(frames), 1)
    if total > MAX_PIXELS:
        what = f"{int(width)}x{int(height)}" + (f"x{int(frames)} frames" if int(frames) > 1 else "")
        raise ImageTooLargeError(f"image of {what} = {total} pixels is larger than the limit of {MAX_PIXELS} pixels "
                                 "(server option max_image_pixels)")


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
