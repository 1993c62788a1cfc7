"""A statistical shape model of real fetal heads: where the head ellipse sits, how big and how tilted it is.

The mask-conditioned diffusion scheme (:mod:`fetal_head.synthesis.diffusion`) draws its masks from here, so every synthetic
mask is a single filled ellipse by construction and only the image has to be generated.

Parameters are fitted per real mask with :func:`fetal_head.biometry.measure_head` (``boundary_offset_px=0``: the
ellipse of the mask's own outer boundary, which is what gets rasterised again), expressed as fractions of the
image size so one model serves any output resolution:

    cx / W, cy / H, log(a / W), log(b / a), cos(2 theta), sin(2 theta)

The angle enters as (cos 2θ, sin 2θ) because an ellipse's orientation is periodic in 180°; the axes as logs so
the Gaussian cannot produce negative sizes; b/a in (0, 1] keeps a the semi-major axis. Sampling is a multivariate
Gaussian over those six numbers, with draws outside the range seen in the real masks (centre, semi-axes, axis
ratio) rejected and redrawn, as are ellipses that do not fit inside the frame, so no sample is larger, smaller or more eccentric than a real head.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Iterable, List, Sequence, Tuple

import numpy as np

from ..biometry import BiometryError, HeadBiometry, ellipse_mask, measure_head


@dataclass
class HeadEllipse:
    """One head ellipse in a (height, width) frame: centre (x = column, y = row), semi-axes, angle (degrees,
    counter-clockwise from the x axis, the convention of :class:`fetal_head.biometry.HeadBiometry`)."""

    center_x: float
    center_y: float
    semi_major: float
    semi_minor: float
    angle_deg: float

    def rasterise(self, shape: Tuple[int, int]) -> np.ndarray:
        """Filled ellipse as a (rows, cols) bool mask."""
        bio = HeadBiometry(
            center_x_px=self.center_x, center_y_px=self.center_y, semi_major_px=self.semi_major,
            semi_minor_px=self.semi_minor, angle_deg=self.angle_deg, hc_px=0.0, bpd_px=0.0, ofd_px=0.0,
        )
        return ellipse_mask(shape, bio).astype(bool)


def _to_features(e: HeadEllipse, height: int, width: int) -> np.ndarray:
    theta = math.radians(e.angle_deg)
    return np.array([
        e.center_x / width, e.center_y / height, math.log(e.semi_major / width),
        math.log(e.semi_minor / e.semi_major), math.cos(2 * theta), math.sin(2 * theta),
    ])


def _from_features(f: np.ndarray, height: int, width: int) -> HeadEllipse:
    a = math.exp(f[2]) * width
    b = a * math.exp(min(f[3], 0.0))
    return HeadEllipse(
        center_x=f[0] * width, center_y=f[1] * height, semi_major=a, semi_minor=b,
        angle_deg=math.degrees(0.5 * math.atan2(f[5], f[4])),
    )


def _inside_frame(e: HeadEllipse, height: int, width: int) -> bool:
    """The whole ellipse lies in the frame (every real pool-split head does; a cut-off one would fail QC)."""
    t = math.radians(e.angle_deg)
    dx = math.hypot(e.semi_major * math.cos(t), e.semi_minor * math.sin(t))
    dy = math.hypot(e.semi_major * math.sin(t), e.semi_minor * math.cos(t))
    return e.center_x - dx >= 1 and e.center_y - dy >= 1 and e.center_x + dx <= width - 2 and e.center_y + dy <= height - 2


def fit_ellipse_to_mask(mask: np.ndarray) -> HeadEllipse:
    """The ellipse of a mask's outer boundary (no HC18 centre-line offset: we rasterise it again)."""
    bio = measure_head(mask, boundary_offset_px=0.0)
    return HeadEllipse(bio.center_x_px, bio.center_y_px, bio.semi_major_px, bio.semi_minor_px, bio.angle_deg)


@dataclass
class HeadShapeModel:
    """Multivariate Gaussian over normalised ellipse parameters, with the real range as hard bounds."""

    mean: np.ndarray  # (6,)
    cov: np.ndarray  # (6, 6)
    low: np.ndarray  # (6,) per-feature minimum seen in the real masks
    high: np.ndarray  # (6,) per-feature maximum
    n_fitted: int = 0
    skipped: List[str] = field(default_factory=list)

    FEATURES = ("cx/W", "cy/H", "log(a/W)", "log(b/a)", "cos2t", "sin2t")

    @classmethod
    def fit(cls, masks: Iterable[np.ndarray], names: Sequence[str] = ()) -> "HeadShapeModel":
        feats, skipped = [], []
        for i, m in enumerate(masks):
            try:
                e = fit_ellipse_to_mask(m)
            except BiometryError:
                skipped.append(names[i] if i < len(names) else str(i))
                continue
            h, w = np.asarray(m).shape[:2]
            feats.append(_to_features(e, h, w))
        if len(feats) < 3:
            raise ValueError(f"need at least 3 usable masks to fit a shape model, got {len(feats)}")
        x = np.stack(feats)
        # a small ridge keeps the covariance positive definite when few masks are given
        cov = np.cov(x, rowvar=False) + 1e-6 * np.eye(x.shape[1])
        return cls(mean=x.mean(0), cov=cov, low=x.min(0), high=x.max(0), n_fitted=len(x), skipped=skipped)

    def sample(self, rng: np.random.Generator, height: int, width: int, max_tries: int = 1000) -> HeadEllipse:
        """One ellipse in a (height, width) frame; draws outside the real range are redrawn."""
        # the angle features are bounded by the unit circle, not the box: only check the first four
        for _ in range(max_tries):
            f = rng.multivariate_normal(self.mean, self.cov)
            if np.all(f[:4] >= self.low[:4]) and np.all(f[:4] <= self.high[:4]):
                e = _from_features(f, height, width)
                if _inside_frame(e, height, width):
                    return e
        raise RuntimeError("the shape model could not draw an ellipse inside the real range")

    def sample_mask(self, rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, HeadEllipse]:
        e = self.sample(rng, height, width)
        return e.rasterise((height, width)), e

    def real_range(self, height: int, width: int) -> dict:
        """The real masks' semi-axis range in pixels of a (height, width) frame (for checks and reports)."""
        return {
            "semi_major": (math.exp(self.low[2]) * width, math.exp(self.high[2]) * width),
            "axis_ratio": (math.exp(self.low[3]), math.exp(self.high[3])),
            "center_x": (self.low[0] * width, self.high[0] * width),
            "center_y": (self.low[1] * height, self.high[1] * height),
        }

    # ---- persistence: plain JSON beside the diffusion checkpoint ----
    def to_json(self) -> str:
        return json.dumps({
            "features": list(self.FEATURES), "mean": self.mean.tolist(), "cov": self.cov.tolist(),
            "low": self.low.tolist(), "high": self.high.tolist(), "n_fitted": self.n_fitted,
        })

    @classmethod
    def from_json(cls, text: str) -> "HeadShapeModel":
        d = json.loads(text)
        return cls(mean=np.array(d["mean"]), cov=np.array(d["cov"]), low=np.array(d["low"]),
                   high=np.array(d["high"]), n_fitted=int(d.get("n_fitted", 0)))
