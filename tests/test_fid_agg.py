"""The FID merge's aggregators: the shards Ray queues for one group are bounded, whatever the number of blocks."""

from __future__ import annotations

import numpy as np
from ray.data.aggregate import VectorizedAggregateFnV2
from ray.data.block import BlockColumnAccessor

from stages import fid_agg as G


def test_merge_queues_at_most_compact_at_shards_of_a_group(ray_cluster):
    """300 one-row blocks of one group (Ray alone would queue 100, then 200, before merging): every merge the
    aggregator does takes ≤ COMPACT_AT (+ one per other aggregator thread) of them; all 300 are counted."""
    import ray
    from ray.data._internal.execution.operators.hash_aggregate import HashAggregateOperator

    class FanIn(VectorizedAggregateFnV2):
        """[blocks, most accumulators of the group Ray merged at once]: Ray hands a vectorized aggregation each
        compaction's (and the final merge's) accumulators of a group as one column."""

        def __init__(self):
            super().__init__("fan_in", zero_factory=lambda: np.zeros(2), on=None, ignore_nulls=False)

        def aggregate_block(self, block) -> np.ndarray:
            return np.asarray([1.0, 1.0])

        def _combine_column(self, column) -> np.ndarray:
            accs = np.stack(BlockColumnAccessor.for_column(column).to_pylist())
            return np.asarray([accs[:, 0].sum(), max(len(accs), accs[:, 1].max())])

        def finalize(self, acc) -> np.ndarray:
            return np.asarray(acc)

    before = {name: vars(HashAggregateOperator)[name] for name in G._THRESHOLDS}  # the names this Ray reads
    ds = ray.data.range(300, override_num_blocks=300).map_batches(
        lambda b: {G.GROUP: np.full(len(b["id"]), "all")}, batch_size=None)
    (key, (blocks, fan_in)), = G.aggregate(ds, FanIn(), partitions=2)
    assert key == "all" and blocks == 300
    assert 2 <= fan_in <= G.COMPACT_AT + 7, fan_in  # ≤ 8 threads an aggregator
    assert {name: vars(HashAggregateOperator)[name] for name in G._THRESHOLDS} == before  # scoped to the merge


def test_groups_merged_across_the_raw_rows_limit_give_numpy_statistics():
    """Two blocks' accumulators of a group merged to exactly RAW_MAX rows, one fewer or one more, either way round:
    raw rows below and at the limit, sums above it (a merge that packed exactly RAW_MAX rows as sums, then read
    them as raw rows, crashed evaluate)."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    rng = np.random.default_rng(0)
    agg = G.GroupStats()
    for sizes in ((1024, 1024), (2047, 1), (1, 2047), (2048, 1), (1, 2048), (2049, 3)):
        x = rng.standard_normal((sum(sizes), 8)).astype(np.float32)
        parts = np.split(x, [sizes[0]])
        accs = [agg.aggregate_block(pa.table({G.GROUP: [G.ALL] * len(p), G.CLIP_SCORE: np.full(len(p), 0.5),
                                              G.FEATURES: ArrowTensorArray.from_numpy(p)})) for p in parts]
        values = G.GroupResult(agg.finalize(agg.combine(*accs)))
        mu, sigma = values.mean_cov()
        assert values.n == len(x) and values.clip_score() == 0.5, sizes
        assert np.allclose(mu, x.astype(np.float64).mean(0)) and np.allclose(sigma, np.cov(x.astype(np.float64),
                                                                                            rowvar=False)), sizes
