"""Hash partition counts for the joins on row ids and the fold shuffle: rows and bytes a partition, capped."""

from __future__ import annotations

ROWS_PER_PARTITION = 500_000  # done ids per join partition (≈ 40 MB in one aggregator)
PARTITION_BYTES = 256 << 20  # and at most this much of a wide side's rows (prompts with the user's own columns)
MAX_PARTITIONS = 1024  # a shuffle's cost grows with blocks × partitions; Ray's aggregators are at most 128 anyway


def partitions(*rows: int, row_bytes: int = 0) -> int:
    """Join partitions for sides of `rows` rows (the larger of about `row_bytes` each, where given): a partition's
    task holds both sides' share, so the larger side sets the count (see shares; a resume at 1% done joins all
    planned rows)."""
    return max(2, shares(max(rows), row_bytes, ROWS_PER_PARTITION))


def shares(rows: int, row_bytes: int, rows_each: int) -> int:
    """Hash partitions for `rows` rows of about `row_bytes` each: at most `rows_each` rows and PARTITION_BYTES a
    partition, at most MAX_PARTITIONS partitions."""
    return min(MAX_PARTITIONS, max(-(-rows // rows_each), -(-rows * row_bytes // PARTITION_BYTES)))
