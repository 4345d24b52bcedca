"""`generate --retry-failed`: take the failed rows' entries out of an output so that only they are made again."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.resume import filter_ids
from jobs.spec import TASK_CPUS
from stages import columns as C
from stages.compaction import remove_leftovers
from stages import output as out
from stages.output import PATH, list_parts, read_parts
from stages.storage import open_atomic


def take_out_failed(spec, planned_among) -> tuple[np.ndarray, int]:
    """Remove the manifest entries that have an error and whose row the prompt table still plans
    (`planned_among(ids)`), and those rows' stored Stage C output (they are made whole again). Returns their
    sorted ids and the count of failed entries kept because the table no longer plans their rows (never lost)."""
    failed = failed_ids(spec.output, spec.storage_options)
    planned = planned_among(failed) if len(failed) else failed
    drop_failed(spec.output, spec.storage_options, planned)
    return planned, len(failed) - len(planned)


def drop_failed(output: str, storage_options: dict, ids: np.ndarray) -> None:
    """Take the rows `ids` out of the embeddings, then out of the manifest: a kill in between leaves the error
    entries for the next --retry-failed, and no reader ever sees a row's old entry beside its new one."""
    if len(ids):
        for folder in ("embeddings", "manifest"):
            remove_leftovers(output, folder, storage_options)  # else deleting a compacted part would revive them
            drop_rows(output, folder, storage_options, ids)


def _parts(output: str, folder: str, storage_options: dict):
    """The live parts (a compacted part's replaced leftovers are not rows; its footer is kept on rewrite)."""
    return list_parts(output, folder, storage_options)


def failed_ids(output: str, storage_options: dict) -> np.ndarray:
    """Sorted ids of the manifest's rows with an error (parts without one are skipped from their footers)."""
    fs, files = _parts(output, "manifest", storage_options)
    found = []
    for path in files:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            meta = parquet.metadata
            column = out.column_index(meta, C.ERROR)
            if column < 0:
                continue
            groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
            if all(g.column(column).statistics is not None and g.column(column).statistics.has_null_count
                   and g.column(column).statistics.null_count == g.num_rows for g in groups):
                continue  # no error in this part
            table = parquet.read(columns=[C.ROW_ID, C.ERROR])
        found.append(table.filter(pc.is_valid(table[C.ERROR]))[C.ROW_ID].to_numpy(zero_copy_only=False))
    return np.unique(np.concatenate(found).astype("U32")) if found else np.asarray([], dtype="U32")


def drop_rows(output: str, folder: str, storage_options: dict, ids: np.ndarray) -> None:
    """Rewrite the parts of <output>/<folder> that hold one of `ids` without those rows: the parts found by a read
    of their row ids in Ray (any number of parts, in parallel), each rewritten by one task, a row group at a time,
    atomically (a part left empty is deleted)."""
    import ray

    ds = read_parts(output, folder, storage_options, columns=[C.ROW_ID], include_paths=True)
    if ds is None:
        return
    fs = out.folder(output, folder, storage_options)[0]
    ref = ray.put(ids)
    hits = ds.map_batches(filter_ids, batch_format="pyarrow", num_cpus=TASK_CPUS, fn_kwargs=dict(ids=ref))
    hits.groupby(PATH).map_groups(_rewrite_without, batch_format="pyarrow", num_cpus=TASK_CPUS,
                                  fn_kwargs=dict(fs=fs, ids=ref)).materialize()


def _rewrite_without(hits: pa.Table, fs, ids) -> pa.Table:
    """Rewrite the part the rows `hits` (row_id, path) come from without the rows whose id is in `ids`."""
    import ray

    path = hits.column(PATH)[0].as_py()
    drop = pa.array(ray.get(ids) if isinstance(ids, ray.ObjectRef) else ids, pa.string())
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        if hits.num_rows >= parquet.metadata.num_rows:  # every row goes
            fs.rm(path)
            return hits.slice(0, 0)
        with open_atomic(fs, path) as sink, pq.ParquetWriter(sink, parquet.schema_arrow) as writer:
            for i in range(parquet.num_row_groups):  # the part's own row groups: bounded memory, same layout
                group = parquet.read_row_group(i)
                writer.write_table(group.filter(pc.invert(pc.is_in(group.column(C.ROW_ID), value_set=drop))))
    return hits.slice(0, 0)
