"""The footers of an output's Parquet parts: row and failure counts, folded input rows and column types, read
without reading the rows (each part once, in threads), and without building a footer's Arrow schema where a
column's chunks will do (see column_index)."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages import columns as C
from stages import output as layout  # (`output` names the run folder's URI below)

THREADS = 16  # footer readers (object stores answer in parallel)
NULL_TRIES = 8  # parts read for a column of nulls before it counts as untyped (column_types)


@layout.relisted
def part_counts(output: str, name: str, storage_options: dict | None, nulls_of: str | None = None) -> tuple[int, int]:
    """(rows, rows with a value in column `nulls_of`) over the live parts of <output>/<name>, from footers."""
    counts = _per_part(output, name, storage_options, lambda parquet: _counts(parquet, nulls_of))
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


@layout.relisted
def manifest_counts(output: str, storage_options: dict | None) -> tuple[int, int, int]:
    """(rows, failed rows, folded input rows) over the live manifest parts: part_counts and folded_rows in one
    pass over the parts."""
    counts = _per_part(output, layout.MANIFEST, storage_options,
                       lambda parquet: (*_counts(parquet, C.ERROR), _folded(parquet)), cache_type="none")
    return tuple(sum(c[i] for c in counts) for i in range(3))


def check_parts(fs, files: list[str]) -> None:
    """Open every listed part's footer: one that is no Parquet file, or no part of the run, raises (see
    parquet_part)."""
    _each_part(fs, files, lambda parquet: None, cache_type="none")


def _per_part(output: str, name: str, storage_options: dict | None, read, **open_options) -> list:
    """`read(parquet)` of each live part of <output>/<name>, the parts opened in threads with `open_options`."""
    return _each_part(*layout.list_parts(output, name, storage_options), read, **open_options)


def _each_part(fs, files: list[str], read, **open_options) -> list:
    """`read(parquet)` of each of the parts `files`, opened in threads with `open_options`."""
    def one(file: str):
        with layout.parquet_part(fs, file, **open_options) as parquet:
            return read(parquet)

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return list(pool.map(one, files))


def _counts(parquet: pq.ParquetFile, nulls_of: str | None) -> tuple[int, int]:
    """(rows, rows with a value in column `nulls_of`) of one part: from its footer's statistics where they say."""
    meta = parquet.metadata
    column = column_index(meta, nulls_of) if nulls_of else -1
    if column < 0:
        return meta.num_rows, 0
    nulls = known_nulls(meta, column)
    if nulls is None:
        nulls = parquet.read(columns=[nulls_of]).column(0).null_count
    return meta.num_rows, meta.num_rows - nulls


def known_nulls(meta, column: int) -> int | None:
    """The nulls of a footer's column `column` (an index: see column_index) where every row group's statistics
    count them, else None."""
    stats = [meta.row_group(i).column(column).statistics for i in range(meta.num_row_groups)]
    if all(s is not None and s.has_null_count for s in stats):
        return sum(s.null_count for s in stats)
    return None


def column_index(meta, name: str) -> int:
    """The index of column `name`'s chunks in a Parquet footer's row groups, -1 without one (or without row
    groups). Read from the first row group's chunks: building the footer's schema (`meta.schema`, or the Arrow
    one) churns ~47 KB a file that the C allocator keeps: +470 MiB on the driver over 10k manifest parts."""
    paths = chunk_paths(meta)
    return paths.index(name) if name in paths else -1


def chunk_paths(meta) -> list[str]:
    """The column paths of a Parquet footer's first row group (none without row groups): see column_index."""
    if not meta.num_row_groups:
        return []
    return [meta.row_group(0).column(j).path_in_schema for j in range(meta.num_columns)]


@layout.relisted
def folded_rows(output: str, storage_options: dict | None) -> int:
    """Input rows folded into an identical row (Σ input_rows - 1) over the live manifest parts, one column read."""
    return sum(_per_part(output, layout.MANIFEST, storage_options, _folded,
                         cache_type="none"))  # one column, not the bytes after it


def _folded(parquet: pq.ParquetFile) -> int:
    """Input rows folded into the entries of one part: 0 from the footer where no entry stands for more than one
    input row (the statistics' max is 1, or the column is all null), else its input_rows column read."""
    meta = parquet.metadata
    column = column_index(meta, C.INPUT_ROWS)
    if column < 0:
        return 0
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    stats = [g.column(column).statistics for g in groups]
    if all(s is not None and ((s.has_min_max and s.max <= 1) or (s.has_null_count and s.null_count == g.num_rows))
           for s, g in zip(stats, groups)):
        return 0
    return folded_in(parquet.read(columns=[C.INPUT_ROWS]).column(0))


def folded_in(input_rows) -> int:
    """Σ (input_rows - 1) of an Arrow column (null: an entry made without folding, one input row)."""
    return (pc.sum(input_rows).as_py() or 0) - (len(input_rows) - input_rows.null_count)


def column_types(output: str, name: str, storage_options: dict | None, wanted=None) -> pa.Schema | None:
    """Each column's type over the live parts of <output>/<name> (None without parts), as rows_and_types gives
    it. `wanted`: only these columns (None: every column)."""
    return rows_and_types(output, name, storage_options, wanted)[1]


@layout.relisted
def rows_and_types(output: str, name: str, storage_options: dict | None, wanted=None) -> tuple[int, pa.Schema | None]:
    """(rows, each column's type) over the live parts of <output>/<name>: one footer read a part. A column takes its
    type from the first part that holds it with values (parts written before a table gained a column lack it):
    footers are scanned by their column paths, and only the few parts that give a column not typed yet are read
    as Arrow schemas (see column_index)."""
    fs, files = layout.list_parts(output, name, storage_options)
    if not files:
        return 0, None

    def held(file: str) -> tuple[int, set[str]]:
        with layout.parquet_part(fs, file) as parquet:
            rows, paths = parquet.metadata.num_rows, chunk_paths(parquet.metadata)
        if wanted is None:
            return rows, {path.split(".")[0] for path in paths}
        return rows, {c for c in wanted if any(path == c or path.startswith(c + ".") for path in paths)}

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        counted = list(pool.map(held, files))
    fields, tries = {}, Counter()  # tries: parts read for a column that had only nulls so far
    for file, (_, columns) in zip(files, counted):
        untyped = {c for c in columns if c not in fields and tries[c] < NULL_TRIES}
        if untyped:
            with fs.open(file, "rb") as f:
                typed = [field for field in pq.read_schema(f) if field.name in untyped]
            tries.update(field.name for field in typed)
            fields.update((field.name, field) for field in typed if not pa.types.is_null(field.type))
    return sum(rows for rows, _ in counted), pa.schema(list(fields.values()))
