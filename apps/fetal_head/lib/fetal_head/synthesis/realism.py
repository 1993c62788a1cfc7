"""How real do synthetic images look? Fréchet distance and KID in the feature space of the SAM image encoder the
app ships (no downloads: no Inception network), and a sample grid.

Features: the encoder's (256, 64, 64) embedding, global-average-pooled to 256 numbers per image. Neither number
means much alone (the feature space is not Inception's, so values are not comparable with published FID/KID);
the yardstick is the same distance between two disjoint halves of the real images. A synthetic set whose distance
to real images is near that real-vs-real value is as close to the real distribution as a second real sample is.

Both estimators are biased upwards at small sample sizes (FD strongly so: the covariance of n < 256 samples is
rank-deficient): compare only values computed with the same number of images.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm


def sam_features(predictor, images: Sequence[np.ndarray], batch_size: int = 4, progress: bool = True) -> np.ndarray:
    """(N, C) global-average-pooled SAM encoder features of (H, W) uint8 images."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="SAM features", unit="batch", disable=not progress):
        for emb in predictor.encode(list(images[i : i + batch_size])):
            out.append(emb.features.float().mean(dim=(-2, -1))[0].cpu().numpy())
    return np.stack(out).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to feature sets (N, C)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    if not np.isfinite(covmean).all():  # singular product (few samples): regularise, as the FID reference code does
        eps = 1e-6 * np.eye(a.shape[1])
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = np.real(covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: Optional[int] = None,
                    seed: int = 0) -> tuple:
    """KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
    subsets (default size: half the smaller set, capped at 1000, so subsets differ); returns (mean, std)."""
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    m = subset_size or max(2, min(1000, min(len(a), len(b)) // 2))
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def feature_scale(real: np.ndarray) -> tuple:
    """Per-feature mean and std of the real features: standardising with them puts all 256 channels on one scale
    (the raw encoder channels differ in scale by orders of magnitude, which would let a few dominate)."""
    return real.mean(0), real.std(0) + 1e-8


def compare(real: np.ndarray, other: np.ndarray, scale: tuple, kid_subsets: int = 50) -> dict:
    mu, sd = scale
    a, b = (real - mu) / sd, (other - mu) / sd
    kid, kid_std = kernel_distance(a, b, subsets=kid_subsets)
    return {"fd": frechet_distance(a, b), "kid": kid, "kid_std": kid_std, "n": [len(a), len(b)]}


def sample_grid(real_pairs, synthetic_pairs, path: str, title: str = "", columns: int = 4) -> str:
    """A PNG: a row block of real pairs over one of synthetic pairs, each image with its mask's outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("real", real_pairs[:columns]), ("synthetic", synthetic_pairs[:columns])]
    fig, axes = plt.subplots(2, columns, figsize=(3.2 * columns, 5.0), squeeze=False)
    for r, (name, pairs) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(pairs):
                continue
            image, mask = pairs[c]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            if np.asarray(mask).any():
                ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors=["#ffcc00"], linewidths=1.0)
            if c == 0:
                ax.set_title(name, loc="left", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
