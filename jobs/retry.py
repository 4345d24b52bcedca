"""`generate --retry-failed`: take the failed rows' entries out of an output so that only they are made again."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.resume import skip_mask
from stages import columns as C
from stages.output import list_parts
from stages.storage import write_atomic


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
        drop_rows(output, "embeddings", storage_options, ids)
        drop_rows(output, "manifest", storage_options, ids)


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
            column = meta.schema.to_arrow_schema().get_field_index(C.ERROR)
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
    """Rewrite each part of <output>/<folder> that holds one of `ids` whole without those rows (one atomic write;
    a part left empty is deleted)."""
    fs, files = _parts(output, folder, storage_options)
    for path in files:
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            marks = skip_mask(parquet.read(columns=[C.ROW_ID])[C.ROW_ID].to_numpy(zero_copy_only=False), ids)
            if not marks.any():
                continue
            kept = parquet.read().filter(pa_mask(~marks))
        if kept.num_rows:
            sink = io.BytesIO()
            pq.write_table(kept, sink)
            write_atomic(fs, path, sink.getvalue())
        else:
            fs.rm(path)


def pa_mask(mask: np.ndarray):
    """A numpy bool mask as an Arrow filter."""
    import pyarrow as pa

    return pa.array(mask, type=pa.bool_())
