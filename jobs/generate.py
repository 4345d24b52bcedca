"""Runner: one streaming Ray Data pipeline from the prompt table to images, embeddings and a manifest."""

from __future__ import annotations

import dataclasses
import logging

import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem

from jobs import prompts, retry
from jobs.folding import fold_identical
from jobs.preflight import generate_job, preflight  # noqa: F401 - preflight: part of this module's interface
from jobs.isolation import RERUN_ADVICE
from jobs.passes import (EMBEDDINGS_PART_ROWS, close_output, coalesced, decode_and_write, decode_in_flight,
                         decode_stored, open_output, stage_pool, write_manifest)
from jobs.resume import Summary
from jobs.spec import TASK_CPUS, JobSpec
from stages import columns as C
from stages.prior import PriorStage
from stages import footers, output
from stages.partitions import partitions
from stages.text import TextEncoder
from stages.writer import write_embeddings

log = logging.getLogger(__name__)
ALL_STAGES = ("text", "prior", "decoder")
READ_ROWS = 65536  # prompt rows a read yields at once: expansion starts at once, whatever the file's size


def run(spec: JobSpec, overwrite: bool = False, verbose: bool = False) -> Summary:
    """Validate, then generate every row without a manifest entry yet; returns the closing summary."""
    return generate_job(spec, overwrite, verbose)


def generate(spec: JobSpec, table: prompts.PromptTable, start: float, retry_failed: bool = False) -> Summary:
    """The pipeline for a checked spec on its claimed output: rows whose Stage C embeddings were stored
    before an interruption are decoded first, then every row without a manifest entry is made (with
    `retry_failed`, only the failed rows the prompt table still plans, their entries taken out first). Done rows
    are counted from Parquet footers and dropped inside Ray: nothing on the driver grows with the rows."""
    done, failed, folded = open_output(spec, start)
    # Listed before a retry takes embeddings/_closed away: only these parts may hold rows in flight.
    fresh = output.written_since_closed(spec.output, spec.storage_options) if retry_failed else None
    only, retried, stored, kept = retry.take_out_failed(
        spec, lambda ids, n: planned_among(spec, table, ids, n), done) if retry_failed else (None, 0, None, 0)
    # The retried rows that failed in Stage B/A (decoded from their stored Stage C output), then the rows in flight
    # (once the former have entries: a retried row may be in a fresh part) are done; the pass below drops them.
    advice = None if retry_failed else RERUN_ADVICE  # a retry's rows failed before: their failing again is no news
    redecoded = decode_stored(spec, stored, table.user_types, advice)
    decoded = redecoded + decode_in_flight(spec, done, table.user_types, advice, fresh)
    finished_rows = done + decoded
    planned = prompts.planned_rows(spec, table.rows)
    if retry_failed:
        todo = retried - redecoded  # the stored ones were decoded above
    else:  # the planned rows less the entries and the identical rows folded into them (decoded rows may add some)
        folded = footers.folded_rows(spec.output, spec.storage_options) if decoded else folded
        todo = planned - finished_rows - folded
    if todo > 0 or (not retry_failed and not all_made(spec, table, finished_rows)):
        write_manifest(spec, lambda tally: build_dataset(spec, table, finished_rows, tally, only, retried),
                       ALL_STAGES, max(todo, 0), advice)

    def unplanned(summary: Summary) -> tuple[int, int]:  # entries of rows the table no longer plans (failed ones
        # among them are no failure)
        if summary.rows + summary.folded <= planned:
            return 0, 0  # every entry is a planned row's: no join
        return retry.unplanned_entries(spec, lambda ids, n: planned_among(spec, table, ids, n), summary.rows,
                                       summary.failed)
    made_again = todo + decoded  # a retry's rows: remade whole, or decoded (also rows a killed retry took out)
    summary = close_output(spec, start, done, failed, retried=made_again if retry_failed else None, kept=kept,
                           planned=planned, unplanned=None if retry_failed else unplanned)
    if retry_failed:  # rows never made are not failed rows: say so (each planned row is an entry or folded)
        missing = planned - (summary.rows - summary.kept) - summary.folded
        summary = dataclasses.replace(summary, missing=max(missing, 0), redecoded=decoded)
    return summary


def all_made(spec: JobSpec, table: prompts.PromptTable, done_rows: int) -> bool:
    """Whether every planned row has a manifest entry, counted in Ray (the planned rows less the done ones); asked
    only where the counts say no row is left, as after a resume whose rows were all in flight: starting the
    stages' pools for no row would cost more (~20 s on a small machine)."""
    return left_to_make(spec, table, done_rows).count() == 0


def planned_among(spec: JobSpec, table: prompts.PromptTable, ids: ray.data.Dataset, count: int) -> ray.data.Dataset:
    """The ids of dataset `ids` (`count` of them: failed rows) that the prompt table plans: a semi-join with the
    planned rows' ids in Ray."""
    planned = expanded(spec, table).select_columns([C.ROW_ID])
    return ids.join(planned, join_type="left_semi", num_partitions=partitions(
        count, prompts.planned_rows(spec, table.rows)), on=(C.ROW_ID,))


def build_dataset(spec: JobSpec, table: prompts.PromptTable, done_rows: int = 0, tally=None,
                  only: ray.data.Dataset | None = None, only_rows: int = 0) -> ray.data.Dataset:
    """read → expand rows (bounded batches) → drop done rows (an anti-join with the manifest's ids, when
    `done_rows`; only the `only_rows` ids of dataset `only`, a semi-join, where given) → fold identical rows →
    text pool → Stage C pool → embeddings → Stage B/A pool → images."""
    ds = left_to_make(spec, table, done_rows, only, only_rows)
    # Rows after the join, at most: the planned rows (done ids the table no longer plans drop none of them).
    left = prompts.planned_rows(spec, table.rows) if only is None else only_rows
    ds = fold_identical(ds, left, tally, table.row_bytes)
    # Stream in blocks of one text batch, so every pool works in parallel and images land steadily.
    ds = ds.repartition(target_num_rows_per_block=spec.stages.text.batch_size)
    todo = left if only is not None else max(left - done_rows, 0)  # the pools' start (an estimate is fine)
    ds = stage_pool(ds, spec, TextEncoder, "text", tally, todo)
    ds = stage_pool(ds, spec, PriorStage, "prior", tally, todo)
    ds = coalesced(ds, left, EMBEDDINGS_PART_ROWS, spec)
    ds = ds.map_batches(write_embeddings, batch_format="numpy", num_cpus=TASK_CPUS,
                        fn_kwargs=dict(output=spec.output, storage_options=spec.storage_options,
                                       user_types=table.user_types))
    return decode_and_write(ds, spec, tally, left, table.user_types, todo)


def left_to_make(spec: JobSpec, table: prompts.PromptTable, done_rows: int = 0,
                 only: ray.data.Dataset | None = None, only_rows: int = 0) -> ray.data.Dataset:
    """The planned rows without a manifest entry (an anti-join with the manifest's ids, when `done_rows`), only
    the `only_rows` ids of dataset `only` (a semi-join) where given."""
    ds, planned = expanded(spec, table), prompts.planned_rows(spec, table.rows)
    if only is not None:  # a retry of failed rows
        ds = ds.join(only, join_type="left_semi", on=(C.ROW_ID,),
                     num_partitions=partitions(only_rows, planned, row_bytes=table.row_bytes))
    return output.drop_done(ds, spec.output, spec.storage_options, done_rows, rows=planned,
                            row_bytes=table.row_bytes)  # ds when none done


def expanded(spec: JobSpec, table: prompts.PromptTable) -> ray.data.Dataset:
    """The planned rows: each prompt row × sweep combination × image, with its row id (bounded batches)."""
    ds = ray.data.read_parquet(list(table.files), filesystem=PyFileSystem(FSSpecHandler(table.fs)),
                               num_cpus=TASK_CPUS, batch_size=READ_ROWS, schema=table.schema,  # as preflight read
                               partitioning=None, file_extensions=None)  # no key=value folder adds a column
    combos = prompts.sweep_combinations(spec.sweep)
    per_prompt = spec.generation.images_per_prompt
    return ds.map_batches(prompts.expand_table, batch_format="pyarrow", num_cpus=TASK_CPUS,
                          batch_size=prompts.expansion_batch(len(combos) * per_prompt),
                          fn_kwargs=dict(defaults=prompts.defaults_for(spec), images_per_prompt=per_prompt,
                                         model=dict(decoder=spec.model.decoder, dtype=spec.model.dtype),
                                         combos=combos))
