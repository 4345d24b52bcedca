"""FID statistics: per-block sums (n, Σx, Σxxᵀ in float64) per slice, merged on the driver; the Fréchet distance."""

from __future__ import annotations

import io
import json
import math

import numpy as np

from stages.evaluate import CLIP_SCORE, EVAL_ERROR, FEATURES, write_scores_part
from stages.storage import url_to_fs, write_atomic

ALL = "[]"  # the group key of every row; a slice's key is json [axis, value]


def plain(value):
    """A JSON-able Python scalar for a group value (numpy scalars unwrapped, NaN → None)."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, bytes):
        value = value.decode()
    return None if isinstance(value, float) and math.isnan(value) else value


def group_rows(batch: dict[str, np.ndarray], ok: np.ndarray, by: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Indices of the usable rows: all of them under ALL, and per value of each `by` axis."""
    idx = np.flatnonzero(ok)
    groups = {ALL: idx}
    for axis in by:
        for i in idx:
            key = json.dumps([axis, plain(batch[axis][i])])
            groups.setdefault(key, []).append(i)
    return {key: np.asarray(rows, dtype=np.int64) for key, rows in groups.items()}


def block_stats(batch: dict[str, np.ndarray], by: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """One row per group of this block: n, sum of CLIP scores and, with features, Σx and Σxxᵀ (float64)."""
    ok = np.asarray([not e for e in batch[EVAL_ERROR]], dtype=bool)
    groups = group_rows(batch, ok, by)
    out = {"group": np.asarray(list(groups), dtype=object),
           "n": np.asarray([len(rows) for rows in groups.values()], dtype=np.int64)}
    if CLIP_SCORE in batch:
        out[CLIP_SCORE] = np.asarray([batch[CLIP_SCORE][rows].sum() for rows in groups.values()])
    if FEATURES in batch:
        x = np.asarray(batch[FEATURES], dtype=np.float64)
        out["sum"] = np.stack([x[rows].sum(0) for rows in groups.values()])
        out["outer"] = np.stack([x[rows].T @ x[rows] for rows in groups.values()])
    return out


def score_block(batch: dict[str, np.ndarray], by: tuple[str, ...] = (), parts: str | None = None,
                storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """The pipeline's last task: write the block's per-row scores under `parts` (if given), then `block_stats`."""
    if parts:
        write_scores_part(batch, parts, storage_options)
    return block_stats(batch, by)


class Moments:
    """Running n, Σ clip score, Σx and Σxxᵀ of one group, merged from block rows."""

    def __init__(self):
        self.n, self.clip, self.sum, self.outer = 0, 0.0, None, None

    def add(self, row: dict) -> None:
        self.n += int(row["n"])
        self.clip += float(row.get(CLIP_SCORE, 0.0))
        if "sum" in row:
            s, o = np.asarray(row["sum"], np.float64), np.asarray(row["outer"], np.float64)
            self.sum = s if self.sum is None else self.sum + s
            self.outer = o if self.outer is None else self.outer + o

    def clip_score(self) -> float | None:
        return self.clip / self.n if self.n else None

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Mean and unbiased covariance (as np.cov), or None below two samples or without features."""
        if self.sum is None or self.n < 2:
            return None
        return mean_cov(self.n, self.sum, self.outer)


def mean_cov(n: int, total: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance from n, Σx and Σxxᵀ."""
    mu = total / n
    sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
    return mu, (sigma + sigma.T) / 2


def merge_stats(rows) -> dict[str, Moments]:
    """Fold block rows (from `block_stats`) into one Moments per group."""
    merged: dict[str, Moments] = {}
    for row in rows:
        merged.setdefault(str(row["group"]), Moments()).add(row)
    return merged


def save_stats(uri: str, moments: Moments, meta: dict[str, str], storage_options: dict | None = None) -> None:
    """Write a statistics .npz: mu, sigma (float64), n and string metadata (how the features were made)."""
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
    """|mu1-mu2|² + tr Σ1 + tr Σ2 - 2 tr √(Σ1Σ2), the trace from eigenvalues of Σ1^½ Σ2 Σ1^½ (float64)."""
    root = psd_sqrt(np.asarray(sigma1, np.float64)) if sqrt_sigma1 is None else sqrt_sigma1
    eig = np.linalg.eigvalsh(root @ np.asarray(sigma2, np.float64) @ root)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
