"""Runner: one streaming Ray Data pipeline from the prompt table to images, embeddings and a manifest."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

import ray
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from jobs import prompts, retry
from jobs.console import start_ray
from jobs.folding import fold_identical
from jobs.preflight import generate_job, preflight  # noqa: F401 - preflight: part of this module's interface
from jobs.isolation import RERUN_ADVICE, FailureWatch, isolating, load_error, load_warnings
from jobs.placement import CapacityWatch, cpu_warning, placing_gpus, stage_placement, wait_for_capacity
from jobs.progress import FOLDED_OTHER_VALUES, Progress, Tally, reporting
from jobs.report import build_report, record_run
from jobs.resume import Summary, summarize
from jobs.retries import configure_ray_data
from jobs.spec import TASK_CPUS, JobSpec, stage_kwargs
from jobs.watch import PassWatch
from stages import columns as C
from stages.decoder import DecoderStage
from stages.prior import PriorStage
from stages import compaction, footers, output, user_columns
from stages.partitions import partitions
from stages.sink import ManifestSink
from stages.text import TextEncoder
from stages.writer import (drop_unlisted_shards, read_back_embeddings, shard_columns, write_embeddings,
                           write_images, write_shard)

log = logging.getLogger(__name__)
ALL_STAGES = ("text", "prior", "decoder")
DECODE_STAGES = ("text", "decoder")
READ_ROWS = 65536  # prompt rows a read yields at once: expansion starts at once, whatever the file's size
# Rows per manifest / embeddings part a run writes: about RUN_PARTS parts per pass (a 10M-row run is not a
# million small objects before its closing compaction), at most these many rows each (the finished work a kill
# can leave unrecorded, made again on the resume; for embeddings, the Stage C rows before Stage B/A starts).
RUN_PARTS = 1000
MANIFEST_PART_ROWS = 1024
EMBEDDINGS_PART_ROWS = 256


def run(spec: JobSpec, overwrite: bool = False, verbose: bool = False) -> Summary:
    """Validate, then generate every row without a manifest entry yet; returns the closing summary."""
    return generate_job(spec, overwrite, verbose)


def generate(spec: JobSpec, table: prompts.PromptTable, start: float, verbose: bool = False,
             retry_failed: bool = False) -> Summary:
    """The pipeline for a checked spec on its claimed output: rows whose Stage C embeddings were stored
    before an interruption are decoded first, then every row without a manifest entry is made (with
    `retry_failed`, only the failed rows the prompt table still plans, their entries taken out first). Done rows
    are counted from Parquet footers and dropped inside Ray: nothing on the driver grows with the rows."""
    done, failed, folded = open_output(spec, start, verbose)
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


def decode_in_flight(spec: JobSpec, done: int, user_types, advice: str | None,
                     parts: list[str] | None = None) -> int:
    """Decode the rows whose Stage C embeddings the output stored before an interruption but whose entries were
    not written (in the embeddings `parts` where given), from those embeddings (read from the source again, they
    would be stored twice); how many."""
    return decode_stored(spec, output.in_flight(spec.output, spec.storage_options, done, parts), user_types, advice)


def decode_stored(spec: JobSpec, keys: ray.data.Dataset | None, user_types, advice: str | None) -> int:
    """Decode the output's stored Stage C rows named by `keys` (row_id, path; materialized; None: none) into
    manifest entries (a stage whose first rows all fail stops it, saying `advice`); how many."""
    if keys is None:
        return 0
    waiting = keys.count()
    write_manifest(spec, lambda tally: decode_dataset(spec, stored_embeddings(
        spec.output, spec.storage_options, keys), tally, waiting, user_types), DECODE_STAGES, waiting, advice)
    return waiting


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


def open_output(spec: JobSpec, start: float, verbose: bool = False) -> tuple[int, int, int]:
    """Record this invocation's start, join Ray (quietly unless `verbose`) with the stages' resources; returns
    the counts of manifest rows already there, of their failed rows and of input rows folded into them (from the
    footers, one pass)."""
    record_run(spec.output, spec.storage_options, start)
    connect(spec, verbose)
    if spec.output_format == "webdataset":  # a killed run's shards, written again below (reads every part)
        in_task(drop_unlisted_shards, spec.output, spec.storage_options)
    return footers.manifest_counts(spec.output, spec.storage_options)


def close_output(spec: JobSpec, start: float, done: int, failed: int, retried: int | None = None,
                 kept: int = 0, planned: int | None = None, unplanned=None) -> Summary:
    """Compact the manifest's small parts, then the closing summary, the invocation's record (the same
    figures), and the report rebuilt; compaction and report run in a Ray task, off the driver. `planned`: the
    rows this invocation planned; when its pass over them found none to make, <output>/_finished keeps that count
    and the entries' (a table that adds a copy of a made row plans more rows than entries + folded copies).
    `unplanned(summary)`: the entries of rows not planned and the failed ones among them (stale, kept), where not
    given."""
    in_task(compaction.compact, spec.output, output.MANIFEST, spec.storage_options)
    output.mark_closed(spec.output, spec.storage_options)  # every stored Stage C row has its entry now
    summary = summarize(spec, time.time() - start, before=(done, failed), retried=retried, kept=kept)
    if unplanned is not None:
        stale, kept = unplanned(summary)
        summary = dataclasses.replace(summary, stale=stale, kept=kept)
    record_run(spec.output, spec.storage_options, start, ended_at=start + summary.seconds, made=summary.made)
    in_task(build_report, spec.output, spec.storage_options)
    if retried is None:  # every planned row was made (--retry-failed makes only the failed ones)
        verified = dict(planned=planned, entries=summary.rows) if summary.new == 0 else {}
        output.mark_finished(spec.output, spec.storage_options, kept=summary.kept, stale=summary.stale,
                             **verified)  # a rerun may be answered from the footers, and says how many entries
        # (failed ones) are of rows no longer planned
    return summary


def in_task(fn, *args):
    """fn(*args) in a Ray task, off the driver (its memory, e.g. a pass over every manifest part's footer)."""
    return ray.get(ray.remote(num_cpus=TASK_CPUS)(fn).remote(*args))


def connect(spec: JobSpec, verbose: bool = False) -> None:
    """Join RAY_ADDRESS (or the caller's Ray) and wait for the stages' resources, else start a local Ray."""
    joined = ray.is_initialized() or os.environ.get("RAY_ADDRESS", "local") != "local"  # "local": start one
    start_ray(verbose)
    configure_ray_data()
    wait_for_capacity(spec, spec.placement_timeout_s if joined else 0.0)
    if warning := cpu_warning(spec, ray.cluster_resources()):
        print(warning, file=sys.stderr)


def write_manifest(spec: JobSpec, make, stages: tuple[str, ...], total: int, advice: str | None) -> None:
    """Run one pass, `make(tally)` → its dataset, with a progress line per stage; each finished block of rows
    becomes one manifest object. A stage whose first rows all fail stops it, saying `advice` (None: never)."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    tally = Tally.options(scheduling_strategy=here).remote()  # on the driver's node: it dies with no worker node
    try:
        ds = make(tally)
        checks = [CapacityWatch(spec, spec.placement_timeout_s)] + ([FailureWatch(tally, advice)] if advice else [])
        with Progress(tally, list(stages), total), PassWatch(*checks):
            try:
                ds.write_datasink(ManifestSink(spec.output, spec.storage_options),
                                  ray_remote_args={"num_cpus": TASK_CPUS})
            except Exception as err:
                raise load_error(err, ray.get(tally.failed_loads.remote())) or err
        for line in load_warnings(ray.get(tally.failed_loads.remote())):
            print(line, file=sys.stderr)
        if other := ray.get(tally.counts.remote()).get(FOLDED_OTHER_VALUES):
            first = ray.get(tally.examples.remote()).get(FOLDED_OTHER_VALUES, "")
            shown = first if len(first) <= 60 else first[:57] + "..."
            print(f"warning: {other} input rows made in this run were folded into an identical row (same prompt "
                  f"and settings) but hold other values in your own columns than the row the manifest keeps (first: "
                  f"prompt {shown!r}); the manifest's input_rows counts them: give such rows distinct seeds to make "
                  f"each its own image", file=sys.stderr)
    finally:
        tally.__ray_terminate__.options(max_task_retries=0).remote()  # after its queued counts (a kill of a pending
        # actor makes the GCS log); not retried: the exit it asks for is no failure


def stored_embeddings(output_uri: str, storage_options: dict, keys: ray.data.Dataset | None) -> ray.data.Dataset:
    """The stored Stage C rows of `output_uri` named by `keys` (row_id, path), or every one (keys None: each part
    read once, no shuffle), as Stage B/A input."""
    if keys is None:
        ds = output.read_parts(output_uri, output.EMBEDDINGS, storage_options)
    else:
        ds = output.stored_rows(keys, output_uri, storage_options)
    ds = ds.map_batches(user_columns.pack, batch_format="pyarrow", num_cpus=TASK_CPUS)  # as the reader does
    return ds.map_batches(read_back_embeddings, batch_format="numpy", num_cpus=TASK_CPUS)


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
    ds = _stage(ds, spec, TextEncoder, "text", tally, todo)
    ds = _stage(ds, spec, PriorStage, "prior", tally, todo)
    ds = coalesced(ds, left, EMBEDDINGS_PART_ROWS, spec)
    ds = ds.map_batches(write_embeddings, batch_format="numpy", num_cpus=TASK_CPUS,
                        fn_kwargs=dict(output=spec.output, storage_options=spec.storage_options,
                                       user_types=table.user_types))
    return _decode_and_write(ds, spec, tally, left, table.user_types, todo)


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


def coalesced(ds: ray.data.Dataset, rows: int, most: int, spec: JobSpec) -> ray.data.Dataset:
    """`ds` in blocks of about rows / RUN_PARTS rows (at most `most`), where that is more than the text batch
    the pipeline streams in: each block is written as one part."""
    part = min(-(-rows // RUN_PARTS), most)
    return ds.repartition(target_num_rows_per_block=part, strict=True) if part > spec.stages.text.batch_size else ds


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


def decode_dataset(spec: JobSpec, stored: ray.data.Dataset, tally=None, rows: int = 0,
                   user_types=None) -> ray.data.Dataset:
    """Stored Stage C rows (about `rows`) → text pool (for the decoder's text states) → Stage B/A pool →
    images (the prompt table's own columns written in `user_types`, a pyarrow schema, where given)."""
    stored = stored.repartition(target_num_rows_per_block=spec.stages.text.batch_size)
    text = _stage(stored, spec, TextEncoder, "text", tally, rows, prior=None)  # the decoder's tower only
    return _decode_and_write(text, spec, tally, rows, user_types, rows)


def _decode_and_write(ds: ray.data.Dataset, spec: JobSpec, tally, rows: int, user_types,
                      todo: int) -> ray.data.Dataset:
    """Stage B/A pool (started for `todo` rows) → images written → manifest parts of about rows / RUN_PARTS."""
    ds = _stage(ds, spec, DecoderStage, "decoder", tally, todo)
    kwargs = dict(output=spec.output, storage_options=spec.storage_options, image_format=spec.image_format,
                  user_types=user_types)
    if spec.output_format == "webdataset":  # shard blocks carry the encoded images and scalars only
        ds = ds.map_batches(shard_columns, batch_format="numpy", num_cpus=TASK_CPUS,
                            fn_kwargs=dict(image_format=spec.image_format))
        ds = ds.repartition(target_num_rows_per_block=spec.shard_size)
        return ds.map_batches(write_shard, batch_format="numpy", batch_size=spec.shard_size, num_cpus=TASK_CPUS,
                              fn_kwargs=kwargs)
    ds = ds.map_batches(write_images, batch_format="numpy", num_cpus=TASK_CPUS, fn_kwargs=kwargs)
    return coalesced(ds, rows, MANIFEST_PART_ROWS, spec)


def _stage(ds: ray.data.Dataset, spec: JobSpec, cls, name: str, tally, rows: int, **models) -> ray.data.Dataset:
    """One stage's actor pool for at most `rows` rows, placed from its spec (its `models` where given), reporting
    its finished rows to `tally` (if given)."""
    placed = stage_placement(spec, name, placing_gpus(ray.cluster_resources()), rows)
    stage = reporting(isolating(cls, tally, name), tally, name) if tally is not None else isolating(cls)
    return ds.map_batches(stage, fn_constructor_kwargs={**stage_kwargs(spec, name), **models}, **placed)
