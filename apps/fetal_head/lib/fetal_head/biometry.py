"""Fetal head biometry from a segmentation mask: head ellipse, HC, BPD and OFD.

No server dependency: works on a numpy mask and an optional pixel size.

Boundary convention: HC18's reference HC is the perimeter of the sonographer's ellipse, i.e. the centre
line of the drawn outline that the filled masks are flood-filled from. That outline is about 2.5 px thick
(outline pixels / perimeter = 2.5 on the 31 shipped annotations), and the outer contour of a filled mask
(scikit-image's iso-contour at 0.5) runs 1.35 px outside the ellipse the CSV's HC belongs to (measured on the
438 pool-split images: 1.35 +- 0.03 px, see tests/test_biometry.py). The fitted semi-axes are shrunk by
``boundary_offset_px`` (1.35 by default; 0.5 for masks filled from a 1-pixel outline) to land on that ellipse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from skimage import measure

PixelSize = Union[None, float, Sequence[float]]
HC18_BOUNDARY_OFFSET_PX = 1.35


class BiometryError(ValueError):
    """The mask has no head that an ellipse can be fitted to."""


@dataclass
class HeadBiometry:
    """Head ellipse and measurements. Pixel values are in the mask's (column, row) frame; the angle is the
    major axis' direction in degrees, counter-clockwise from the column (x) axis in image coordinates."""

    center_x_px: float
    center_y_px: float
    semi_major_px: float
    semi_minor_px: float
    angle_deg: float
    hc_px: float
    bpd_px: float
    ofd_px: float
    pixel_size_mm: Optional[Tuple[float, float]] = None  # (x, y) spacing in mm
    hc_mm: Optional[float] = None
    bpd_mm: Optional[float] = None
    ofd_mm: Optional[float] = None
    fit_residual_px: float = 0.0  # RMS distance of the contour to the fitted ellipse

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["pixel_size_mm"] is not None:
            d["pixel_size_mm"] = list(d["pixel_size_mm"])
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


def ellipse_perimeter(a: float, b: float) -> float:
    """Ramanujan's (first) approximation of the perimeter of an ellipse with semi-axes a and b."""
    return math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))


def _spacing(pixel_size: PixelSize) -> Optional[Tuple[float, float]]:
    if pixel_size is None:
        return None
    if isinstance(pixel_size, (int, float, np.floating)):
        sx = sy = float(pixel_size)
    else:
        sx, sy = (float(v) for v in pixel_size)
    if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
        raise ValueError(f"pixel size must be positive and finite, got {pixel_size!r}")
    return sx, sy


def _largest_contour(mask: np.ndarray) -> np.ndarray:
    """(row, col) points of the longest outer iso-contour of the largest connected component."""
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        raise BiometryError("the mask is empty: no head to measure")
    r0, r1 = np.flatnonzero(rows)[[0, -1]]
    c0, c1 = np.flatnonzero(cols)[[0, -1]]
    crop = mask[r0 : r1 + 1, c0 : c1 + 1]  # work on the head's bounding box: 5-10x less to label and trace
    labels = measure.label(crop, connectivity=2)
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    component = np.pad(labels == largest, 1).astype(np.float32)  # pad so a head touching the border closes
    contours = measure.find_contours(component, 0.5)
    contour = max(contours, key=len) - 1.0 + np.array([r0, c0])  # undo the padding and the crop
    if len(contour) < 6:
        raise BiometryError("the head region is too small to fit an ellipse")
    return contour


def _fit_ellipse(xy: np.ndarray):
    """Least-squares ellipse (xc, yc, a, b, theta, model) through points, via scikit-image."""
    if hasattr(measure.EllipseModel, "from_estimate"):  # scikit-image >= 0.26
        model = measure.EllipseModel.from_estimate(xy)
        ok = bool(model)
    else:
        model = measure.EllipseModel()
        ok = model.estimate(xy)
    if not ok:
        raise BiometryError("no ellipse could be fitted to the head outline")
    if hasattr(model, "center"):
        (xc, yc), (a, b), theta = model.center, model.axis_lengths, model.theta
    else:
        xc, yc, a, b, theta = model.params
    return float(xc), float(yc), float(a), float(b), float(theta), model


def measure_head(mask: np.ndarray, pixel_size: PixelSize = None, boundary_offset_px: float = HC18_BOUNDARY_OFFSET_PX) -> HeadBiometry:
    """Fit the head ellipse to ``mask`` (2D, nonzero = head) and measure HC, BPD and OFD.

    ``pixel_size`` is one number (isotropic) or (x, y) in mm; with it the fit happens in mm, so anisotropic
    pixels are measured correctly, and the mm fields are filled.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] in (1, 3, 4):
        mask = mask[..., 0]
    mask = np.squeeze(mask)
    if mask.ndim != 2:
        raise BiometryError(f"expected a 2D mask, got shape {mask.shape}")
    spacing = _spacing(pixel_size)
    contour = _largest_contour(mask > 0)
    xy_px = contour[:, ::-1].astype(np.float64)  # (col, row) = (x, y)

    sx, sy = spacing if spacing else (1.0, 1.0)
    xy = xy_px * np.array([sx, sy])
    xc, yc, a, b, theta, model = _fit_ellipse(xy)
    residuals = model.residuals(xy)
    rms = float(np.sqrt(np.mean(residuals**2)))
    if b > a:  # keep a as the semi-major axis
        a, b, theta = b, a, theta + math.pi / 2
    theta = (theta + math.pi / 2) % math.pi - math.pi / 2

    # Offset the outer boundary inwards by half a pixel (in the axis' own direction when anisotropic).
    off_a = boundary_offset_px * math.hypot(sx * math.cos(theta), sy * math.sin(theta))
    off_b = boundary_offset_px * math.hypot(sx * math.sin(theta), sy * math.cos(theta))
    a_c, b_c = max(a - off_a, 1e-6), max(b - off_b, 1e-6)

    # Pixel-frame values: the same ellipse expressed in pixels along each axis direction.
    pa = math.hypot(a_c * math.cos(theta) / sx, a_c * math.sin(theta) / sy)
    pb = math.hypot(b_c * math.sin(theta) / sx, b_c * math.cos(theta) / sy)
    bio = HeadBiometry(
        center_x_px=xc / sx,
        center_y_px=yc / sy,
        semi_major_px=pa,
        semi_minor_px=pb,
        angle_deg=math.degrees(theta),
        hc_px=ellipse_perimeter(pa, pb),
        bpd_px=2 * pb,
        ofd_px=2 * pa,
        fit_residual_px=rms / math.sqrt(sx * sy),
    )
    if spacing:
        bio.pixel_size_mm = spacing
        bio.hc_mm = ellipse_perimeter(a_c, b_c)
        bio.bpd_mm = 2 * b_c
        bio.ofd_mm = 2 * a_c
    return bio


def ellipse_mask(shape: Tuple[int, int], bio: HeadBiometry) -> np.ndarray:
    """Rasterise the fitted head ellipse (filled) into a mask of ``shape`` (rows, cols)."""
    from skimage.draw import ellipse

    # skimage.draw.ellipse's rotation runs the other way round than our angle (x towards y, rows down).
    rr, cc = ellipse(
        bio.center_y_px, bio.center_x_px, bio.semi_minor_px, bio.semi_major_px,
        shape=shape, rotation=-math.radians(bio.angle_deg),
    )
    out = np.zeros(shape, dtype=np.uint8)
    out[rr, cc] = 1
    return out
