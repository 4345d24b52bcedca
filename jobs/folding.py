"""Identical input rows (same prompt and parameters, hence the same row id) folded into one row: made once, with
`input_rows` counting the input rows it stands for."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import prompts
from jobs.progress import FOLDED, FOLDED_OTHER_VALUES
from jobs.spec import TASK_CPUS
from stages import columns as C
from stages.partitions import shares

FOLD_BLOCK_ROWS = 200_000  # planned rows per fold hash partition (≈ 100 MB of short prompts and parameters) …
# … and at most partitions.PARTITION_BYTES of them: wide rows (the user's own columns) make more partitions


def fold_identical(ds, planned_rows: int, tally=None, row_bytes: int = 0):
    """`ds` with one row per row id. Every copy of an id is brought into one block, as Ray Data's own `map_groups`
    does: one block for a run of up to FOLD_BLOCK_ROWS rows (of about `row_bytes` each, at most
    PARTITION_BYTES), else a hash shuffle by row id; then each block keeps the first copy of each id. A barrier: no
    row reaches the stages before every planned row is expanded (seconds per million rows on a cluster)."""
    return _shuffled_by(ds, C.ROW_ID, planned_rows, row_bytes).map_batches(
        fold_block, batch_size=None, batch_format="pyarrow", num_cpus=TASK_CPUS, fn_kwargs=dict(tally=tally))


def fold_keys(ds, key: str, rows: int, tally=None):
    """`ds` (a few columns a row, `input_rows` among them) with one row per `key` value, whose input_rows is the
    sum of its copies' (a re-decode whose new settings make stored rows identical); shuffled as fold_identical."""
    return _shuffled_by(ds, key, rows).map_batches(_fold_keys_block, batch_size=None, batch_format="pyarrow",
                                                   num_cpus=TASK_CPUS, fn_kwargs=dict(key=key, tally=tally))


def fold_partitions(rows: int, row_bytes: int = 0) -> int:
    """Hash partitions for folding `rows` rows of about `row_bytes` each (1: no shuffle)."""
    return shares(rows, row_bytes, FOLD_BLOCK_ROWS)


def _shuffled_by(ds, key: str, rows: int, row_bytes: int = 0):
    """`ds` with every copy of a `key` value in one block: one block for a few rows (fold_partitions), else a
    hash shuffle."""
    partitions = fold_partitions(rows, row_bytes)
    return ds.repartition(partitions, keys=[key]) if partitions > 1 else ds.repartition(1)


def _first_of_each(block: pa.Table, key: str, weight: pa.Array) -> tuple[pa.Table, pa.Array, pa.Array]:
    """(the block's first row of each `key` value, the sum of `weight` over its copies, its position), in block
    order."""
    position = pa.array(np.arange(block.num_rows, dtype=np.int64))
    groups = (pa.table({key: block.column(key), "position": position, "weight": weight})
              .group_by(key, use_threads=False).aggregate([("position", "min"), ("weight", "sum")])
              .sort_by("position_min"))
    return block.take(groups.column("position_min")), groups.column("weight_sum"), groups.column("position_min")


def _fold_keys_block(block: pa.Table, key: str, tally=None) -> pa.Table:
    block = block.sort_by(C.ROW_ID)  # the row kept is the same however the shuffle ordered the block
    kept, copies, _ = _first_of_each(block, key, pc.fill_null(block.column(C.INPUT_ROWS), 1))  # null: not folded
    if tally is not None and kept.num_rows < block.num_rows:
        tally.add.remote(FOLDED, block.num_rows - kept.num_rows)
    return kept.drop_columns([C.INPUT_ROWS]).append_column(C.INPUT_ROWS, copies)


def fold_block(block: pa.Table, tally=None) -> pa.Table:
    """The block's first row of each row id, with `input_rows` its copies in the block; in shape order."""
    kept, copies, first = _first_of_each(block, C.ROW_ID, pa.array(np.ones(block.num_rows, dtype=np.int64)))
    kept = kept.append_column(C.INPUT_ROWS, copies)
    if tally is not None and kept.num_rows < block.num_rows:
        tally.add.remote(FOLDED, block.num_rows - kept.num_rows)
        if C.USER_VALUES in block.column_names:  # copies whose own columns (an id, a label) the manifest loses
            other, unlike = _unlike_the_kept(block, first)
            if other:
                tally.add.remote(FOLDED_OTHER_VALUES, other)
                tally.example.remote(FOLDED_OTHER_VALUES, block.column(C.PROMPT)[unlike].as_py())
    return kept.sort_by([(column, "ascending") for column in prompts.SHAPE_KEYS])


def _unlike_the_kept(block: pa.Table, kept: pa.Array) -> tuple[int, int | None]:
    """(the rows whose own columns differ from those of the row kept for their id (at a `kept` position), the
    position of the first of them)."""
    position = pa.array(np.arange(block.num_rows, dtype=np.int64))
    pairs = (pa.table({C.ROW_ID: block.column(C.ROW_ID), C.USER_VALUES: block.column(C.USER_VALUES),
                       "position": position}).group_by([C.ROW_ID, C.USER_VALUES], use_threads=False)
             .aggregate([("position", "min"), ("position", "count")]))
    same = pc.is_in(pairs.column("position_min"), value_set=kept)
    like = pc.sum(pc.if_else(same, pairs.column("position_count"), 0)).as_py() or 0
    return block.num_rows - like, pc.min(pc.filter(pairs.column("position_min"), pc.invert(same))).as_py()
