"""FID/CLIP statistics per group merged by Ray Data (groupby + AggregateFnV2); the driver gets finished scalars.

Cost (D = 2048 feature dimensions, a group = the run (ALL) or one value of one --by axis):
- `explode` writes each usable row once per group it is in (1 + number of axes): 8 KiB of float32 features
  and its key, into the shuffle's map task;
- the map task pre-aggregates per (block, group): the group's rows as float64 while it has at most RAW_MAX
  (= D) rows in the block (16 KiB a row), else n, Σclip, Σx and Σxxᵀ (D² float64 = 32 MiB); so a block ships
  at most 32 MiB + 16 KiB per group it holds, and only 16 KiB a row for the groups with few rows;
- an aggregator holds one accumulator (≤ 32 MiB) per group of its partitions, plus the shards Ray queues per
  partition (one per input block: the block's accumulators of that partition) until it compacts them into
  one. Ray's threshold (100 shards, doubling after each compaction up to 2000) lets ALL's partition queue
  2000 × 16 MiB at the default 1024-row blocks; `bounded_queue` makes it COMPACT_AT (8) for the merge, so a
  compaction merges ≤ COMPACT_AT + C - 1 shards and at most C run at once, C = the aggregator's threads
  (min(its partitions, 8): 1 when the cluster has as many CPUs as partitions). A shard of ALL is ≤ 16 MiB at
  1024-row blocks (16 KiB × the block's rows of that partition in general): ≤ 8 × 16 MiB = 128 MiB queued
  with C = 1, 8 × 15 × 16 MiB at worst with C = 8, plus one copy of what a compaction merges (Arrow concat);
  none of it grows with the run (tests/test_fid_agg.py measures the merge's fan-in);
- finalize turns a group into [n, Σclip, FID] (the FID against the reference inside the aggregator); only ALL
  also returns its mean and covariance (for fid_stats.npz): the driver holds 24 bytes a group, plus 32 MiB.
"""

from __future__ import annotations

import contextlib
import json
import warnings

import numpy as np
import ray
from ray.data.aggregate import AggregateFnV2
from ray.data.context import ShuffleStrategy

from stages.evaluate import CLIP_SCORE, EVAL_ERROR, FEATURES, write_scores_part
from stages.fid import ALL, frechet_distance, mean_cov, plain, psd_sqrt

GROUP = "group"
RESULT = "fid_group"
RAW_MAX = 2048  # rows a group keeps as raw features; one more and Σxxᵀ (D² floats) is the smaller form
COMPACT_AT = 8  # shards of a partition an aggregator queues before merging them into one
HEAD = 4  # accumulator: [n, Σclip, D, keep] then payload: n raw rows (n ≤ RAW_MAX) or Σx and Σxxᵀ


def explode(batch: dict[str, np.ndarray], by: tuple[str, ...] = (), integer: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """One row per (usable row, group): its group key (ALL and one per `by` axis), clip score and features.
    `integer`: the axes the manifest holds as integers (a block with a null there reads them as floats)."""
    ok = np.flatnonzero([not e for e in batch[EVAL_ERROR]])
    keys = [np.full(len(ok), ALL, dtype=object)]
    keys += [np.asarray([json.dumps([axis, _key(batch[axis][i], axis in integer)]) for i in ok], dtype=object)
             for axis in by]
    out = {GROUP: np.concatenate(keys).astype(str) if len(ok) else np.zeros(0, "<U2")}
    clip = np.asarray(batch[CLIP_SCORE], np.float64)[ok] if CLIP_SCORE in batch else np.zeros(len(ok))
    out[CLIP_SCORE] = np.tile(clip, 1 + len(by))
    if FEATURES in batch:
        out[FEATURES] = np.tile(np.asarray(batch[FEATURES], np.float32)[ok], (1 + len(by), 1))
    return out


def _key(value, integer: bool):
    value = plain(value)
    return int(value) if integer and isinstance(value, float) else value


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
    """n, Σclip, Σx, Σxxᵀ of each group; finalize gives [n, Σclip, FID] (+ mean, cov for ALL)."""

    def __init__(self, reference: "ray.ObjectRef | None" = None):
        self._reference, self._ref_stats = reference, None
        super().__init__(RESULT, zero_factory=lambda: _pack(0, 0.0, 0, False, np.zeros(0)), on=None,
                         ignore_nulls=False)

    def aggregate_block(self, block) -> np.ndarray:
        table = block.select([c for c in (GROUP, CLIP_SCORE, FEATURES) if c in block.column_names])
        keep = table.num_rows > 0 and table.column(GROUP)[0].as_py() == ALL
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
        values = np.asarray([0.0, 0.0, np.nan] if values is None else values, np.float64)  # none: no FID
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
                storage_options: dict | None = None, integer: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The pipeline's last task: write the block's per-row scores under `parts` (if given), then `explode`."""
    if parts:
        write_scores_part(batch, parts, storage_options)
    return explode(batch, by, integer)


def merge_groups(ds: "ray.data.Dataset", reference: dict | None = None, partitions: int = 16) -> dict[str, GroupResult]:
    """Group an `explode`d dataset by GROUP inside Ray; the driver receives one short row per group."""
    ref = None
    if reference is not None:
        sigma = np.asarray(reference["sigma"], np.float64)
        ref = ray.put({"mu": np.asarray(reference["mu"], np.float64), "sigma": sigma, "root": psd_sqrt(sigma)})
    groups = {key: GroupResult(value) for key, value in aggregate(ds, GroupStats(ref), partitions)}
    groups.setdefault(ALL, GroupResult())
    return groups


def aggregate(ds: "ray.data.Dataset", agg: AggregateFnV2, partitions: int) -> list[tuple[str, object]]:
    """(group, finalized value) of each GROUP of `ds`, aggregated by Ray's hash-shuffle aggregation (aggregator
    actors compacting queued block accumulators; the default shuffle's reduce task holds every block's
    accumulator of its partition at once), its queue bounded by `bounded_queue`."""
    ds.context.shuffle_strategy = ShuffleStrategy.HASH_SHUFFLE
    with bounded_queue():
        out = ds.groupby(GROUP, num_partitions=partitions).aggregate(agg)
        return [(str(row[GROUP]), row[agg.name]) for row in out.iter_rows()]


# Ray 2.60 has no setting for the compaction threshold: HashAggregateOperator reads these class attributes on
# the driver when it starts its aggregators (_get_min_max_partition_shards_compaction_thresholds) and hands
# them to the actors. Equal min and max: no doubling. tests/test_fid_agg.py measures the bound, so a Ray that
# renames or stops reading them fails there; here that Ray's own thresholds apply, with a warning.
_THRESHOLDS = ("_DEFAULT_MIN_NUM_SHARDS_COMPACTION_THRESHOLD", "_DEFAULT_MAX_NUM_SHARDS_COMPACTION_THRESHOLD")


@contextlib.contextmanager
def bounded_queue(shards: int = COMPACT_AT):
    """While open, Ray's hash aggregations started from this process compact every `shards` queued shards."""
    try:
        from ray.data._internal.execution.operators.hash_aggregate import HashAggregateOperator as op
    except ImportError:
        op = None
    saved = {name: vars(op)[name] for name in _THRESHOLDS if name in vars(op)} if op else {}
    if len(saved) < len(_THRESHOLDS):
        warnings.warn(f"ray {ray.__version__}: no compaction thresholds to set; the FID merge's aggregator "
                      "queues follow Ray's defaults (see stages/fid_agg.py)", stacklevel=3)
    try:
        for name in saved:
            setattr(op, name, shards)
        yield
    finally:
        for name, value in saved.items():
            setattr(op, name, value)
