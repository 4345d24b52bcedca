"""FID/CLIP statistics per group merged by Ray Data (groupby + AggregateFnV2); the driver gets finished scalars.

Cost (D = 2048 feature dimensions, a group = the run (ALL) or one value of one --by axis):
- `explode` writes each usable row once per group it is in (1 + number of axes): 8 KiB of float32 features
  and its key, into the shuffle's map task;
- the map task pre-aggregates per (block, group): the group's rows as float64 while it has at most RAW_MAX
  (= D) rows in the block (16 KiB a row), else n, Σclip, Σx and Σxxᵀ (D² float64 = 32 MiB); so a block ships
  at most 32 MiB + 16 KiB per group it holds, and only 16 KiB a row for the groups with few rows;
- an aggregator holds one accumulator (≤ 32 MiB) per group of its partitions, plus the block accumulators Ray
  queues before compacting them (Ray's threshold: 100 shards, doubling up to 2000). The partition holding ALL
  receives one accumulator per block (≤ 16 MiB with the default 1024-row blocks): up to 1.6 GB queued at the
  first threshold, more later on very large runs (Ray's thresholds are not configurable);
- finalize turns a group into [n, Σclip, FID] (the FID against the reference inside the aggregator); only ALL
  also returns its mean and covariance (for fid_stats.npz): the driver holds 24 bytes a group, plus 32 MiB.
"""

from __future__ import annotations

import json

import numpy as np
import ray
from ray.data.aggregate import AggregateFnV2
from ray.data.context import ShuffleStrategy

from stages.evaluate import CLIP_SCORE, EVAL_ERROR, FEATURES, write_scores_part
from stages.fid import ALL, frechet_distance, mean_cov, plain, psd_sqrt

GROUP = "group"
RESULT = "fid_group"
RAW_MAX = 2048  # rows a group keeps as raw features; one more and Σxxᵀ (D² floats) is the smaller form
HEAD = 4  # accumulator: [n, Σclip, D, keep] then payload: n raw rows (n ≤ RAW_MAX) or Σx and Σxxᵀ


def explode(batch: dict[str, np.ndarray], by: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """One row per (usable row, group): its group key (ALL and one per `by` axis), clip score and features."""
    ok = np.flatnonzero([not e for e in batch[EVAL_ERROR]])
    keys = [np.full(len(ok), ALL, dtype=object)]
    keys += [np.asarray([json.dumps([axis, plain(batch[axis][i])]) for i in ok], dtype=object) for axis in by]
    out = {GROUP: np.concatenate(keys).astype(str) if len(ok) else np.zeros(0, "<U2")}
    clip = np.asarray(batch[CLIP_SCORE], np.float64)[ok] if CLIP_SCORE in batch else np.zeros(len(ok))
    out[CLIP_SCORE] = np.tile(clip, 1 + len(by))
    if FEATURES in batch:
        out[FEATURES] = np.tile(np.asarray(batch[FEATURES], np.float32)[ok], (1 + len(by), 1))
    return out


def _pack(n: int, clip: float, d: int, keep: bool, payload: np.ndarray) -> np.ndarray:
    return np.concatenate([[n, clip, d, float(keep)], payload.ravel()])


def _sums(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Σx and Σxxᵀ of an accumulator (formed from its raw rows while it holds them)."""
    n, d = int(acc[0]), int(acc[2])
    body = acc[HEAD:]
    if n > RAW_MAX:
        return body[:d], body[d:].reshape(d, d)
    x = body.reshape(n, d)
    return x.sum(0), x.T @ x


class GroupStats(AggregateFnV2):
    """n, Σclip, Σx, Σxxᵀ of each group; finalize gives [n, Σclip, FID] (+ mean, cov for ALL when `keep_all`)."""

    def __init__(self, reference: "ray.ObjectRef | None" = None, keep_all: bool = True):
        self._reference, self._ref_stats, self._keep_all = reference, None, keep_all
        super().__init__(RESULT, zero_factory=lambda: _pack(0, 0.0, 0, False, np.zeros(0)), on=None,
                         ignore_nulls=False)

    def aggregate_block(self, block) -> np.ndarray:
        table = block.select([c for c in (GROUP, CLIP_SCORE, FEATURES) if c in block.column_names])
        keep = self._keep_all and table.num_rows > 0 and table.column(GROUP)[0].as_py() == ALL
        clip = float(np.asarray(table.column(CLIP_SCORE)).sum())
        if FEATURES not in table.column_names:
            return _pack(table.num_rows, clip, 0, keep, np.zeros(0))
        x = _features(table).astype(np.float64)
        payload = x if len(x) <= RAW_MAX else np.concatenate([x.sum(0), (x.T @ x).ravel()])
        return _pack(len(x), clip, x.shape[1], keep, payload)

    def combine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if b[0] == 0 or a[0] == 0:
            return a if b[0] == 0 else b
        n, clip, d, keep = int(a[0] + b[0]), a[1] + b[1], int(max(a[2], b[2])), bool(a[3] or b[3])
        if d == 0 or n <= RAW_MAX:
            return _pack(n, clip, d, keep, np.concatenate([a[HEAD:], b[HEAD:]]))
        (sa, oa), (sb, ob) = _sums(a), _sums(b)
        return _pack(n, clip, d, keep, np.concatenate([sa + sb, (oa + ob).ravel()]))

    def finalize(self, acc: np.ndarray) -> np.ndarray:
        acc = np.asarray(acc, np.float64)
        n, clip, d, keep = int(acc[0]), acc[1], int(acc[2]), bool(acc[3])
        if d == 0 or n < 2:
            return np.asarray([n, clip, np.nan])
        mu, sigma = mean_cov(n, *_sums(acc))
        fid = np.nan
        if self._reference is not None:
            if self._ref_stats is None:
                self._ref_stats = ray.get(self._reference)
            ref = self._ref_stats
            fid = frechet_distance(ref["mu"], ref["sigma"], mu, sigma, ref["root"])
        head = np.asarray([n, clip, fid])
        return np.concatenate([head, mu, sigma.ravel()]) if keep else head


def _features(table) -> np.ndarray:
    """A (rows, D) array of the table's fixed-shape tensor column of features."""
    from ray.data.block import BlockAccessor

    return np.asarray(BlockAccessor.for_block(table.select([FEATURES])).to_numpy(FEATURES))


class GroupResult:
    """A group's finished metrics: n, mean clip score, FID (None without a reference) and, for ALL, mean/cov."""

    def __init__(self, values=None):
        values = np.zeros(3) if values is None else np.asarray(values, np.float64)
        self.n, self.clip = int(values[0]), float(values[1])
        self.fid = None if np.isnan(values[2]) else float(values[2])
        rest = values[3:]
        d = int(round((-1 + np.sqrt(1 + 4 * len(rest))) / 2)) if len(rest) else 0
        self._stats = (rest[:d], rest[d:].reshape(d, d)) if d else None

    def clip_score(self) -> float | None:
        return self.clip / self.n if self.n else None

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Mean and unbiased covariance (kept for the group ALL only), else None."""
        return self._stats


def score_block(batch: dict[str, np.ndarray], by: tuple[str, ...] = (), parts: str | None = None,
                storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """The pipeline's last task: write the block's per-row scores under `parts` (if given), then `explode`."""
    if parts:
        write_scores_part(batch, parts, storage_options)
    return explode(batch, by)


def merge_groups(ds: "ray.data.Dataset", reference: dict | None = None, partitions: int = 16,
                 keep_all: bool = True) -> dict[str, GroupResult]:
    """Group an `explode`d dataset by GROUP inside Ray; the driver receives one short row per group.

    Ray's hash-shuffle aggregation (aggregator actors that compact queued block accumulators) rather than the
    default shuffle, whose reduce task holds every block's accumulator of its partition at once.
    """
    ref = None
    if reference is not None:
        sigma = np.asarray(reference["sigma"], np.float64)
        ref = ray.put({"mu": np.asarray(reference["mu"], np.float64), "sigma": sigma, "root": psd_sqrt(sigma)})
    ds.context.shuffle_strategy = ShuffleStrategy.HASH_SHUFFLE
    out = ds.groupby(GROUP, num_partitions=partitions).aggregate(GroupStats(ref, keep_all))
    groups = {str(row[GROUP]): GroupResult(row[RESULT]) for row in out.iter_rows()}
    groups.setdefault(ALL, GroupResult())
    return groups
