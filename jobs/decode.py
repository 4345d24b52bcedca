"""Re-decode: run only Stage B/A again from a run's stored Stage C embeddings, into a new output."""

from __future__ import annotations

import dataclasses
import functools
import os
import posixpath
import time

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from jobs.folding import fold_keys
from jobs.isolation import DECODE_ADVICE
from jobs.preflight import answered_decode, check_models, check_overwrite_keeps_inputs, claimed
from jobs.resume import Summary
from jobs.retries import RUN_OPTIONS, check_reachable, run_folder_read
from jobs.row_ids import identify
from jobs.spec import TASK_CPUS, JobSpec, ModelSpec, SpecError, apply_overrides, check_key, spec_from_dict
from jobs.spec_rules import check_store
from stages import columns as C
from stages import footers, output
from stages.output import EMBEDDINGS, JOB_FILE, read_job
from stages.partitions import partitions
from stages.credentials import usable
from stages.storage import join, url_to_fs
from stages.writer import PARAMS_SCHEMA, stored_steps, write_embeddings

NEW_ID = "new_row_id"  # a stored row's id once re-decoded

# What a re-decode may change: everything downstream of the stored embeddings.
ROW_SETTINGS = ("decoder_steps", "decoder_guidance_scale")  # the generation keys among them: each row's own
DECODER_KEYS = (*(f"generation.{name}" for name in ROW_SETTINGS), "model.decoder", "model.dtype",
                "image_format", "output_format", "shard_size", "stages.", "placement_timeout_s", "storage_options")


def decode_spec(run: str, output: str, overrides: list[str], storage_options: dict | None) -> JobSpec:
    """The run's own spec, pointed at `output`, with decoder-side overrides only."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key == "output":
            raise SpecError("decode: output is decode's second argument, not a --set key")
        if not key.startswith(DECODER_KEYS):
            check_key(key)  # a misspelt key is named as unknown, not as one that cannot change
            raise SpecError(f"decode: {key} cannot change: the stored Stage C embeddings fix it "
                            f"(allowed: {', '.join(DECODER_KEYS)})")
    check_store("run", run)
    check_store("output", output)
    reading = read_options(overrides, storage_options)
    fs, root = url_to_fs(run, reading)
    with run_folder_read("decode", run):
        if not fs.exists(root):
            raise SpecError(f"decode: {run} does not exist")
        for needed in (JOB_FILE, EMBEDDINGS):
            if not fs.exists(join(root, needed)):
                raise SpecError(f"decode: {run} is not a run folder (no {needed}: give the folder generate wrote)")
        data = read_job(run, reading)
    out_fs, out_root = url_to_fs(output, reading)
    if type(out_fs) is type(fs) and same_place(fs, out_root, root):
        raise SpecError(f"decode: the output {output} is the run itself; decode writes a new output")
    if type(out_fs) is type(fs) and inside(fs, out_root, root):
        raise SpecError(f"decode: the output {output} is inside the run {run} (its --overwrite would delete it); "
                        f"choose a folder beside it")
    # The run's options without its masked credentials: those come from the command line or the environment.
    data["storage_options"] = storage_options if storage_options is not None else usable(data.get("storage_options") or {})
    data = apply_overrides(data, overrides)
    return spec_from_dict({**data, "output": output, "decoded_from": run})


def same_place(fs, one: str, other: str) -> bool:
    """Whether two paths of one store name the same folder (`a/./b`, `a/x/../b`; locally a link to it too)."""
    return _normal(fs, one) == _normal(fs, other)


def inside(fs, path: str, folder: str) -> bool:
    """Whether `path` lies under `folder` on one store."""
    return _normal(fs, path).startswith(_normal(fs, folder).rstrip("/") + "/")


def _normal(fs, path: str) -> str:
    return os.path.realpath(path) if isinstance(fs, LocalFileSystem) else posixpath.normpath(path.rstrip("/"))


def read_options(overrides: list[str], storage_options: dict | None) -> dict | None:
    """The storage options to read the run with (its job.yaml's are not known yet): --storage-options, under
    any `--set storage_options…`."""
    given = [item for item in overrides if item.partition("=")[0].strip().startswith("storage_options")]
    if not given:
        return storage_options
    return apply_overrides({"storage_options": dict(storage_options or {})}, given)["storage_options"]


def redecode_rows(batch: dict[str, np.ndarray], decoder_params: dict, model: dict) -> dict[str, np.ndarray]:
    """Give stored rows the new decoder settings (where overridden) and the row ids that follow from them; each
    keeps its id in the run as SOURCE_ROW_ID (a manifest column of decoded outputs only)."""
    n = len(batch[C.ROW_ID])
    batch[C.SOURCE_ROW_ID] = batch[C.ROW_ID].copy()
    for col, value in decoder_params.items():
        batch[col] = np.full(n, value)
    identify(batch, model)
    return batch


def run_decode(run: str, output: str, overrides: list[str] = (), storage_options: dict | None = None,
               overwrite: bool = False, verbose: bool = False) -> Summary:
    """Decode every stored Stage C row of `run` into `output` (resumable like generate; a finished one is
    answered from its manifest without Ray or a model)."""
    started = time.time()
    check_reachable({"run": run}, read_options(list(overrides), storage_options), RUN_OPTIONS)
    spec = decode_spec(run, output, list(overrides), storage_options)
    check_reachable({"output": output}, spec.storage_options)
    # The run's embeddings footers, read once where first asked: (stored rows, the prompt tables' column types).
    source = functools.cache(lambda: footers.rows_and_types(run, EMBEDDINGS, spec.storage_options))
    summary = None if overwrite else answered_decode(spec, started, lambda: source()[0])
    if summary is not None:  # its made rows without stored embeddings are said again
        return _with_source_gaps(summary, run, spec.storage_options, source()[0])
    check_models(spec, priors=False)  # Stage C ran: its embeddings and the decoder are all a decode reads
    if overwrite:
        check_overwrite_keeps_inputs(spec, reads=("decoded_from", "model.decoder"))
    from jobs.placement import check_ray  # imports Ray: not for a decode answered above

    check_ray(spec)
    with claimed(spec, overwrite, verbose):
        return _decode(spec, list(overrides), started, *source())


def made_unstored(run: str, storage_options: dict | None, stored: int) -> tuple[int, int]:
    """(the run's made rows, and its failed rows, without stored Stage C embeddings): decode can make neither (an
    embeddings part deleted; a row that failed in Stage C, before its output was stored). Rows that failed in
    Stage B/A stored theirs. The footers can only clear it (as many `stored` rows as entries); else a Ray
    anti-join of the made ids counts the first, and the entries without embeddings less those the second."""
    rows, failed, _ = footers.manifest_counts(run, storage_options)
    if stored >= rows:
        return 0, 0
    from jobs.console import start_ray

    start_ray()  # a finished decode's answer has not joined Ray yet
    made = output.read_parts(run, output.MANIFEST, storage_options, columns=[C.ROW_ID, C.ERROR]).map_batches(
        _made_ids, batch_format="pyarrow", num_cpus=TASK_CPUS)
    stored_ids = output.read_parts(run, output.EMBEDDINGS, storage_options, columns=[C.ROW_ID])
    if stored_ids is None:
        return rows - failed, failed
    unstored = made.join(stored_ids, join_type="left_anti", num_partitions=partitions(rows),
                         on=(C.ROW_ID,)).count()
    return unstored, max(rows - stored - unstored, 0)


def _made_ids(table):
    """The ids of the rows made without an error."""
    import pyarrow.compute as pc

    return table.filter(pc.is_null(table.column(C.ERROR))).select([C.ROW_ID])


def stored_keys(batch: dict[str, np.ndarray], decoder_params: dict, model: dict) -> dict[str, np.ndarray]:
    """(row_id, path, NEW_ID) of stored rows: NEW_ID is the id a row gets once re-decoded (see redecode_rows)."""
    rows = {k: v for k, v in batch.items() if k != output.PATH}
    rows[C.PRIOR_STEPS] = stored_steps(rows[C.PRIOR_STEPS])
    rows = redecode_rows(rows, decoder_params, model)
    return {C.ROW_ID: batch[C.ROW_ID], output.PATH: batch[output.PATH], NEW_ID: rows[C.ROW_ID],
            C.INPUT_ROWS: np.nan_to_num(np.asarray(batch[C.INPUT_ROWS], dtype=np.float64), nan=1).astype(np.int64)}


def stage_c_dtype(run: str, storage_options: dict | None) -> str:
    """The dtype Stage C ran at for a run's stored embeddings, as a stored row's checkpoint names it (`dtype=`;
    a decoded output's rows keep their source's: the source may have moved since)."""
    fs, parts = output.list_parts(run, output.EMBEDDINGS, storage_options)
    for path in parts:
        with output.parquet_part(fs, path) as parquet:
            column = parquet.read_row_group(0, columns=[C.CHECKPOINT]).column(0) if parquet.num_row_groups else []
        if len(column):
            return column[0].as_py().rpartition(" dtype=")[2].split(" ")[0]
    return (output.read_job(run, storage_options).get("model") or {}).get("dtype", ModelSpec.dtype)


def _decode(spec: JobSpec, overrides: list[str], started: float, stored: int, user_types) -> Summary:
    """Decode the run's `stored` Stage C rows (their own columns of `user_types`) that the output has no entry for."""
    from jobs.passes import (DECODE_STAGES, EMBEDDINGS_PART_ROWS, close_output, coalesced, decode_dataset,
                             decode_in_flight, open_output, stored_embeddings, write_manifest)

    run = spec.decoded_from
    done, failed, _ = open_output(spec, started)
    keys = {item.partition("=")[0].strip() for item in overrides}  # as decode_spec and the spec read them
    changed = {name: getattr(spec.generation, name) for name in ROW_SETTINGS if f"generation.{name}" in keys}
    model = dict(decoder=spec.model.decoder, dtype=spec.model.dtype,
                 prior_dtype=stage_c_dtype(run, spec.storage_options))  # the embeddings were made at this one
    finished = done + decode_in_flight(spec, done, user_types, DECODE_ADVICE)  # rows it stored before a kill
    every = not finished and not changed  # every stored row as it is: each part read once, no keys
    # A resume's keys: made once, counted (none left after a resume whose rows were all in flight: no pools start)
    # and kept in the object store for the pass (~150 bytes a row left: the pass's shuffles hold them all anyway).
    counted = _keys_left(spec, changed, model, finished, stored).materialize() if finished and stored else None
    left = counted.count() if counted is not None else stored

    def make(tally):
        keys = counted if counted is not None or every else _keys_left(spec, changed, model, finished, stored, tally)
        ds = stored_embeddings(run, spec.storage_options, keys)
        ds = ds.map_batches(redecode_rows, batch_format="numpy", num_cpus=TASK_CPUS,
                            fn_kwargs=dict(decoder_params=changed, model=model))
        ds = coalesced(ds, left, EMBEDDINGS_PART_ROWS, spec)
        ds = ds.map_batches(write_embeddings, batch_format="numpy", num_cpus=TASK_CPUS,
                            fn_kwargs=dict(output=spec.output, storage_options=spec.storage_options,
                                           user_types=user_types))
        return decode_dataset(spec, ds, tally, left, user_types)

    if left:  # none: none stored (every embeddings part deleted), or every row has its entry
        write_manifest(spec, make, DECODE_STAGES, left, DECODE_ADVICE)
    summary = close_output(spec, started, done, failed, planned=stored)
    return _with_source_gaps(summary, run, spec.storage_options, stored)


def _with_source_gaps(summary: Summary, run: str, storage_options: dict, stored: int) -> Summary:
    """The summary saying which of the run's rows could not be decoded (see made_unstored)."""
    unstored, failed = made_unstored(run, storage_options, stored)
    return dataclasses.replace(summary, unstored=unstored, unstored_failed=failed, source=run)


def _keys_left(spec: JobSpec, changed: dict, model: dict, finished: int, stored: int, tally=None):
    """(row_id, path[, input_rows]) of the run's stored rows to decode: those whose new id the output has no
    entry for (resumable like generate), one per new id where overridden settings make rows identical (made once,
    input_rows counting them, the folded copies counted in `tally`)."""
    keys = output.read_parts(spec.decoded_from, output.EMBEDDINGS, spec.storage_options, include_paths=True,
                             columns=[f.name for f in PARAMS_SCHEMA])
    keys = keys.map_batches(stored_keys, batch_format="numpy", num_cpus=TASK_CPUS,
                            fn_kwargs=dict(decoder_params=changed, model=model))
    if finished:
        keys = output.drop_done(keys, spec.output, spec.storage_options, finished, on=NEW_ID, rows=stored)
    if changed:
        keys = fold_keys(keys, NEW_ID, max(stored - finished, 0), tally)
    return keys.select_columns([C.ROW_ID, output.PATH] + [C.INPUT_ROWS] * bool(changed))

