"""A pass over an output: open and close it, run one pass into manifest parts; the pools from Stage B/A on."""

from __future__ import annotations

import dataclasses
import sys
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from jobs.console import joined_cluster, start_ray
from jobs.isolation import FailureWatch, isolating, load_error, load_warnings
from jobs.placement import CapacityWatch, cpu_warning, placing_gpus, stage_placement, wait_for_capacity
from jobs.progress import FOLDED_OTHER_VALUES, Progress, Tally, reporting
from jobs.report import build_report, record_run
from jobs.resume import Summary, summarize
from jobs.retries import configure_ray_data
from jobs.spec import TASK_CPUS, JobSpec, stage_kwargs
from jobs.watch import PassWatch
from stages import compaction, footers, output, user_columns
from stages.decoder import DecoderStage
from stages.sink import ManifestSink
from stages.text import TextEncoder
from stages.writer import drop_unlisted_shards, read_back_embeddings, shard_columns, write_images, write_shard

DECODE_STAGES = ("text", "decoder")
# Rows per manifest / embeddings part a run writes: about RUN_PARTS parts per pass (a 10M-row run is not a
# million small objects before its closing compaction), at most these many rows each (the finished work a kill
# can leave unrecorded, made again on the resume; for embeddings, the Stage C rows before Stage B/A starts).
RUN_PARTS = 1000
MANIFEST_PART_ROWS = 1024
EMBEDDINGS_PART_ROWS = 256


def open_output(spec: JobSpec, start: float) -> tuple[int, int, int]:
    """Record this invocation's start (Ray joined already: preflight.claimed); returns the counts of manifest rows
    already there, of their failed rows and of input rows folded into them (from the footers, one pass)."""
    record_run(spec.output, spec.storage_options, start)
    counts = footers.manifest_counts(spec.output, spec.storage_options)  # first: a bad part is named on the driver
    if spec.output_format == "webdataset":  # a killed run's shards, written again below (reads every part)
        in_task(drop_unlisted_shards, spec.output, spec.storage_options)
    return counts


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
    """Join RAY_ADDRESS (or the caller's Ray, or a `ray start` cluster of this machine) and wait for the stages'
    resources, else start a local Ray (nothing can join it: no wait); quietly unless `verbose`."""
    start_ray(verbose)
    configure_ray_data()
    wait_for_capacity(spec, spec.placement_timeout_s if joined_cluster() else 0.0)
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


def stored_embeddings(output_uri: str, storage_options: dict, keys: ray.data.Dataset | None) -> ray.data.Dataset:
    """The stored Stage C rows of `output_uri` named by `keys` (row_id, path), or every one (keys None: each part
    read once, no shuffle), as Stage B/A input."""
    if keys is None:
        ds = output.read_parts(output_uri, output.EMBEDDINGS, storage_options)
    else:
        ds = output.stored_rows(keys, output_uri, storage_options)
    ds = ds.map_batches(user_columns.pack, batch_format="pyarrow", num_cpus=TASK_CPUS)  # as the reader does
    return ds.map_batches(read_back_embeddings, batch_format="numpy", num_cpus=TASK_CPUS)


def decode_dataset(spec: JobSpec, stored: ray.data.Dataset, tally=None, rows: int = 0,
                   user_types=None) -> ray.data.Dataset:
    """Stored Stage C rows (about `rows`) → text pool (for the decoder's text states) → Stage B/A pool →
    images (the prompt table's own columns written in `user_types`, a pyarrow schema, where given)."""
    stored = stored.repartition(target_num_rows_per_block=spec.stages.text.batch_size)
    text = stage_pool(stored, spec, TextEncoder, "text", tally, rows, prior=None)  # the decoder's tower only
    return decode_and_write(text, spec, tally, rows, user_types, rows)


def decode_and_write(ds: ray.data.Dataset, spec: JobSpec, tally, rows: int, user_types,
                      todo: int) -> ray.data.Dataset:
    """Stage B/A pool (started for `todo` rows) → images written → manifest parts of about rows / RUN_PARTS."""
    ds = stage_pool(ds, spec, DecoderStage, "decoder", tally, todo)
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


def stage_pool(ds: ray.data.Dataset, spec: JobSpec, cls, name: str, tally, rows: int, **models) -> ray.data.Dataset:
    """One stage's actor pool for at most `rows` rows, placed from its spec (its `models` where given), reporting
    its finished rows to `tally` (if given)."""
    placed = stage_placement(spec, name, placing_gpus(ray.cluster_resources()), rows)
    stage = reporting(isolating(cls, tally, name), tally, name) if tally is not None else isolating(cls)
    return ds.map_batches(stage, fn_constructor_kwargs={**stage_kwargs(spec, name), **models}, **placed)


def coalesced(ds: ray.data.Dataset, rows: int, most: int, spec: JobSpec) -> ray.data.Dataset:
    """`ds` in blocks of about rows / RUN_PARTS rows (at most `most`), where that is more than the text batch
    the pipeline streams in: each block is written as one part."""
    part = min(-(-rows // RUN_PARTS), most)
    return ds.repartition(target_num_rows_per_block=part, strict=True) if part > spec.stages.text.batch_size else ds
