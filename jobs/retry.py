"""`generate --retry-failed`: take the failed rows' entries out of an output so that only they are made again
(decoded again from their stored Stage C output where they failed in Stage B/A)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.spec import TASK_CPUS
from stages import columns as C
from stages import footers
from stages import output as out
from stages.compaction import remove_leftovers
from stages.output import PATH, list_parts, read_parts
from stages.partitions import partitions
from stages.storage import open_atomic


def take_out_failed(spec, planned_among, entries: int) -> tuple[object, int, object, int]:
    """Remove the manifest entries that have an error and whose row the prompt table still plans
    (`planned_among(failed ids dataset, count)`, a dataset of those ids). A row whose Stage C output is stored
    failed in Stage B/A: it keeps that output, to be decoded again from the keys returned (Stage C, most of a row's
    work, is not redone; the bits are the same). Returns (the planned failed ids as a Ray dataset in the object
    store, or None; their count; (row_id, path) of those whose Stage C output is stored, materialized, or None; the
    count of failed entries kept because the table no longer plans their rows: never lost). The ids stay inside
    Ray: the driver holds counts only. `entries`: the manifest's rows (the joins' size)."""
    failed = failed_ids(spec.output, spec.storage_options)
    total = failed.count() if failed is not None else 0
    if not total:
        return None, 0, None, 0
    planned = planned_among(failed, total).materialize()
    count = planned.count()
    stored = stored_keys(spec.output, spec.storage_options, planned, count, entries) if count else None
    if stored is not None:  # a kill from here on, before the run ends (writing _closed again), leaves their
        # decoding to the next run's pass over stored rows without an entry: it reads every part then
        out.unmark_closed(spec.output, spec.storage_options)
    drop_failed(spec.output, spec.storage_options, planned, count, entries)
    return planned, count, stored, total - count


def stored_keys(output: str, storage_options: dict, ids, count: int, rows: int):
    """(row_id, path) of the stored Stage C rows among the ids of dataset `ids` (`count` of them; of `rows`): a
    semi-join of the embeddings' ids with them in Ray (each part's row ids read once), materialized; one key per
    stored copy (a row is stored once); None when none is stored."""
    stored = read_parts(output, out.EMBEDDINGS, storage_options, columns=[C.ROW_ID], include_paths=True)
    if stored is None:
        return None
    keys = stored.join(ids, join_type="left_semi", num_partitions=partitions(count, rows),
                       on=(C.ROW_ID,)).materialize()
    return keys if keys.count() else None


def unplanned_entries(spec, planned_among, entries: int, failed: int) -> tuple[int, int]:
    """(entries, failed entries) of the manifest whose rows the prompt table no longer plans (an earlier table's:
    kept as they are): one semi-join of every entry's id with the planned ids (`planned_among` as for
    take_out_failed) in Ray; the driver holds counts only. `entries`, `failed`: the manifest's rows and failed rows
    (from its footers)."""
    ids = read_parts(spec.output, "manifest", spec.storage_options, columns=[C.ROW_ID, C.ERROR])
    if ids is None:
        return 0, 0
    planned = planned_among(ids, entries).materialize()  # counted twice below
    planned_failed = planned.map_batches(_failed_only, batch_format="pyarrow", num_cpus=TASK_CPUS).count()
    return entries - planned.count(), failed - planned_failed


def drop_failed(output: str, storage_options: dict, ids, count: int, entries: int = 0) -> None:
    """Take the rows of the ids dataset `ids` (`count` ids; of `entries` rows) out of the manifest, a part at a
    time: no reader ever sees a row's old entry beside its new one, and a kill leaves each row either with its
    error entry (for the next --retry-failed) or with none (made, or decoded from its stored Stage C output, by
    the next run). Their stored Stage C output stays."""
    if count:
        remove_leftovers(output, out.MANIFEST, storage_options)  # else deleting a compacted part would revive them
        drop_rows(output, out.MANIFEST, storage_options, ids, count, entries)


def failed_ids(output: str, storage_options: dict):
    """The ids of the manifest's rows with an error, as a Ray dataset in the object store (None without parts
    that may hold one: parts whose footer says no error are not read)."""
    import ray

    fs, files = list_parts(output, "manifest", storage_options)
    with ThreadPoolExecutor(max_workers=footers.THREADS) as pool:  # footers only, read in parallel
        files = [path for path, may in zip(files, pool.map(lambda path: _may_hold_errors(fs, path), files)) if may]
    if not files:
        return None
    ds = ray.data.read_parquet(files, filesystem=out.arrow_fs(fs), columns=[C.ROW_ID, C.ERROR], num_cpus=TASK_CPUS,
                               partitioning=None)
    return ds.map_batches(_failed_only, batch_format="pyarrow", num_cpus=TASK_CPUS).materialize()


def _failed_only(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_valid(table.column(C.ERROR))).select([C.ROW_ID])


def _may_hold_errors(fs, path: str) -> bool:
    """False where the part's footer statistics say its error column is all null (or it has none)."""
    with out.parquet_part(fs, path) as parquet:
        meta = parquet.metadata
    column = footers.column_index(meta, C.ERROR)
    if column < 0:
        return False
    nulls = footers.known_nulls(meta, column)
    return nulls is None or nulls < meta.num_rows


def drop_rows(output: str, folder: str, storage_options: dict, ids, count: int, rows: int = 0) -> None:
    """Rewrite the parts of <output>/<folder> that hold one of the ids of dataset `ids` without those rows: the
    parts found by a semi-join of their row ids with `ids` in Ray (any number of parts, in parallel), each
    rewritten by one task, a row group at a time, atomically (a part left empty is deleted)."""
    ds = read_parts(output, folder, storage_options, columns=[C.ROW_ID], include_paths=True)
    if ds is None:
        return
    fs = out.folder(output, folder, storage_options)[0]
    hits = ds.join(ids, join_type="left_semi", num_partitions=partitions(count, rows), on=(C.ROW_ID,))
    hits.groupby(PATH).map_groups(_rewrite_without, batch_format="pyarrow", num_cpus=TASK_CPUS,
                                  fn_kwargs=dict(fs=fs)).materialize()


def _rewrite_without(hits: pa.Table, fs) -> pa.Table:
    """Rewrite the part the rows `hits` (row_id, path) come from without those rows."""
    path = hits.column(PATH)[0].as_py()
    drop = hits.column(C.ROW_ID).combine_chunks()
    with out.parquet_part(fs, path) as parquet:
        if hits.num_rows >= parquet.metadata.num_rows:  # every row goes
            fs.rm(path)
            return hits.slice(0, 0)
        with open_atomic(fs, path) as sink, pq.ParquetWriter(sink, parquet.schema_arrow) as writer:
            for i in range(parquet.num_row_groups):  # the part's own row groups: bounded memory, same layout
                group = parquet.read_row_group(i)
                writer.write_table(group.filter(pc.invert(pc.is_in(group.column(C.ROW_ID), value_set=drop))))
    return hits.slice(0, 0)
