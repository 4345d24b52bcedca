"""RUN/eval/scores.parquet: each manifest row once with its scores, made by Ray sorts and a streamed merge."""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from jobs.eval_checks import with_resolution
from jobs.spec import TASK_CPUS, SpecError
from stages import columns as C
from stages import evaluate as E
from stages import output
from stages.storage import join, open_atomic, url_to_fs

DROPPED = (C.ERROR, C.TEXT_SECONDS, C.PRIOR_SECONDS, C.DECODER_SECONDS, C.FINISHED_AT)  # not in scores.parquet
SCORES = (E.CLIP_SCORE, E.EVAL_ERROR, E.CLIP_TRUNCATED)
BATCH_ROWS = 4096  # rows the driver holds of each side at once


def parts_uri(run: str) -> str:
    """Where the pipeline's last task writes each block's scores (E.write_scores_part)."""
    return join(run, output.EVAL, E.SCORES_PARTS)


def write_scores(run: str, manifest, storage_options: dict) -> None:
    """RUN/eval/scores.parquet: row_id, clip_score, eval_error, clip_truncated and the manifest's params, in row_id
    order, one file written whole or not at all. Ray sorts the score parts and the manifest by row_id (tasks of bounded
    size); the driver walks both in step, BATCH_ROWS rows of each at a time, and holds nothing per row."""
    fs, parts = url_to_fs(parts_uri(run), storage_options)
    keep = [n for n in manifest.names if n not in DROPPED and n != C.ROW_ID]
    scores = ray.data.read_parquet(parts, filesystem=output.arrow_fs(fs), num_cpus=TASK_CPUS,
                                   partitioning=None)
    params = ray.data.read_parquet(list(manifest.files), filesystem=manifest.pyarrow_fs(), num_cpus=TASK_CPUS,
                                   partitioning=None, schema=manifest.schema)
    sides = [ds.select_columns(columns).sort(C.ROW_ID).iter_batches(batch_size=BATCH_ROWS, batch_format="pyarrow")
             for ds, columns in ((params, [C.ROW_ID, *keep]), (scores, [C.ROW_ID, *SCORES]))]
    out_fs, path = url_to_fs(join(run, output.EVAL, E.SCORES_FILE), storage_options)
    writer = None
    with open_atomic(out_fs, path) as sink:
        for batch, scored in aligned(*sides, run):
            carried = with_resolution(batch.select(keep)) if manifest.resolution else batch.select(keep)
            chunk = pa.table([batch.column(C.ROW_ID), *scored.columns, *carried.columns],
                             names=[C.ROW_ID, *SCORES, *carried.column_names])
            writer = writer or pq.ParquetWriter(sink, chunk.schema)
            writer.write_table(chunk)
        if writer is not None:
            writer.close()
    fs.rm(parts, recursive=True)


def aligned(params: Iterable[pa.Table], scores: Iterable[pa.Table], run: str) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Each batch of `params` with its rows' SCORES, row for row; both sides sorted by row_id. A row scored twice
    (a retried task) counts once; a manifest row without a score, or a score of no manifest row, is an error."""
    scores, pending, before = iter(scores), None, None
    for batch in params:
        if not batch.num_rows:
            continue
        _check_once(batch.column(C.ROW_ID), before, run)
        last = before = batch.column(C.ROW_ID)[-1]
        while pending is None or not pending.num_rows or pc.less_equal(pending.column(C.ROW_ID)[-1], last).as_py():
            more = next(scores, None)
            if more is None:
                break
            pending = pa.concat_tables([pending, more]) if pending is not None else more
        pending = pending if pending is not None else pa.table({C.ROW_ID: pa.array([], pa.string())})
        mine = int(pc.sum(pc.less_equal(pending.column(C.ROW_ID), last)).as_py() or 0)
        ours, pending = _first_of_each(pending.slice(0, mine)), pending.slice(mine)
        if not ours.column(C.ROW_ID).equals(batch.column(C.ROW_ID)):
            raise SpecError(_mismatch(run, batch.column(C.ROW_ID), ours.column(C.ROW_ID)))
        yield batch, ours.select(list(SCORES))
    rest = next((t for t in itertools.chain([pending], scores) if t is not None and t.num_rows), None)
    if rest is not None:
        raise SpecError(_mismatch(run, pa.array([], pa.string()), rest.column(C.ROW_ID)))


def _check_once(ids, before, run: str) -> None:
    """Sorted manifest ids (after the id `before`) hold each row once; else the one-line error: the metrics
    would count that row's image twice (two invocations wrote the output, which the second one said)."""
    ids = pa.chunked_array([pa.array([before.as_py()], ids.type), ids.combine_chunks()]) if before is not None else ids
    repeated = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)) if len(ids) > 1 else pa.array([], pa.bool_())
    if pc.any(repeated).as_py():
        row = ids[pc.index(repeated, True).as_py()]
        raise SpecError(f"{run}: the manifest holds row {row} more than once (two invocations wrote this output), "
                        f"so the metrics would count its image twice; run generate with --overwrite, then evaluate")


def _first_of_each(table: pa.Table) -> pa.Table:
    """The first row of each row_id of a table sorted by row_id."""
    ids = table.column(C.ROW_ID)
    if table.num_rows < 2:
        return table
    repeated = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    return table.filter(pa.concat_arrays([pa.array([True]), pc.invert(repeated).combine_chunks()]))


def _mismatch(run: str, wanted, got) -> str:
    unscored = pc.filter(wanted, pc.invert(pc.is_in(wanted, got)))
    if len(unscored):
        return f"{run}: the manifest row {unscored[0]} has no score (rerun evaluate)"
    stray = pc.filter(got, pc.invert(pc.is_in(got, wanted)))
    return f"{run}: a score for {stray[0]}, a row not in the manifest (rerun evaluate)"
