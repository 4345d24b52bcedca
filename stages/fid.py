"""FID statistics: group keys, mean/covariance from sums, statistics files and the Fréchet distance."""

from __future__ import annotations

import io
import math

import numpy as np

from stages.storage import url_to_fs, write_atomic

ALL = "[]"  # the group key of every row; a slice's key is json [axis, value]


def plain(value):
    """A JSON-able Python scalar for a group value (numpy scalars unwrapped, NaN → None)."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, bytes):
        value = value.decode()
    return None if isinstance(value, float) and math.isnan(value) else value


def mean_cov(n: int, total: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance from n, Σx and Σxxᵀ."""
    mu = total / n
    sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
    return mu, (sigma + sigma.T) / 2


def save_stats(uri: str, moments, meta: dict[str, str], storage_options: dict | None = None) -> None:
    """Write a statistics .npz of `moments` (its n and mean_cov()): mu, sigma (float64), n and string metadata."""
    mu, sigma = moments.mean_cov()
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, n=np.int64(moments.n), **{k: np.str_(v) for k, v in meta.items()})
    fs, path = url_to_fs(uri, storage_options)
    write_atomic(fs, path, buffer.getvalue())


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix (eigh, negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrt_sigma1: np.ndarray | None = None) -> float:
    """|mu1-mu2|² + tr Σ1 + tr Σ2 - 2 tr √(Σ1Σ2), the trace from eigenvalues of Σ1^½ Σ2 Σ1^½ (float64); a distance,
    so a rounding error below 0 (a set against itself) is 0, not "-0.000"."""
    root = psd_sqrt(np.asarray(sigma1, np.float64)) if sqrt_sigma1 is None else sqrt_sigma1
    eig = np.linalg.eigvalsh(root @ np.asarray(sigma2, np.float64) @ root)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean), 0.0)  # NaN stays NaN
