"""Runner: one streaming Ray Data pipeline from the prompt table to images, embeddings and a manifest."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.dataset as pads
import ray
import yaml
from ray.autoscaler.sdk import request_resources
from pyarrow.fs import FSSpecHandler, PyFileSystem

from jobs import prompts
from jobs.report import build_report
from jobs.resume import check_continuation, filter_ids, stored_ids
from jobs.spec import JobSpec, SpecError, StageSpec, stage_kwargs
from stages import columns as C
from stages.decoder import DecoderStage
from stages.models import DECODER_SUBFOLDERS, PRIOR_SUBFOLDERS, ModelRefError, check_ref, prior_refs
from stages.prior import PriorStage
from stages.storage import join, url_to_fs, write_atomic
from stages.text import TextEncoder
from stages.writer import ManifestSink, read_back_embeddings, write_embeddings, write_images, write_shard

log = logging.getLogger(__name__)
TASK_CPUS = 0.25  # reading, expanding and writing are light: never let them wait behind the actors
ACTOR_CPUS = 0.1  # a stage actor's default CPU reservation: its work is on the GPU, or in torch threads
LISTING_CPUS = 1.0  # Ray Data lists the input files in one task that always asks for a whole CPU


@dataclass(frozen=True)
class Summary:
    """What a finished job reports."""

    rows: int
    failed: int
    seconds: float
    output: str
    new: int  # rows made by this run (the rest were done before it)

    @property
    def images_per_s(self) -> float:
        return self.new / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        earlier = f", {self.rows - self.new} done earlier" if self.new != self.rows else ""
        return (f"{self.rows} rows ({self.failed} failed{earlier}); {self.new} made in {self.seconds:.1f} s, "
                f"{self.images_per_s:.2f} images/s; images in {join(self.output, 'images')}, "
                f"manifest in {join(self.output, 'manifest')}, report in {join(self.output, 'report', 'index.html')}")


def preflight(spec: JobSpec) -> prompts.PromptTable:
    """Every check that needs no model: models exist, the table is Parquet with valid rows."""
    try:
        for ref in prior_refs(spec.model.prior, *spec.sweep.get(C.PRIOR_CHECKPOINT, [])):
            check_ref(ref, "prior", PRIOR_SUBFOLDERS, spec.storage_options)
        check_ref(spec.model.decoder, "decoder", DECODER_SUBFOLDERS, spec.storage_options)
    except ModelRefError as err:
        raise SpecError(str(err)) from None
    return prompts.scan(spec)


def run(spec: JobSpec, overwrite: bool = False) -> Summary:
    """Validate, then generate every row without a manifest entry yet; returns the closing summary."""
    table, start = preflight(spec), time.time()
    done = open_output(spec, overwrite)
    embedded = np.setdiff1d(stored_ids(spec.output, "embeddings", spec.storage_options), done)
    if len(embedded):  # rows whose Stage C finished before an interruption: decode only
        write_manifest(spec, decode_dataset(spec, stored_embeddings(spec.output, spec.storage_options, embedded)))
    write_manifest(spec, build_dataset(spec, table, skip=np.union1d(done, embedded)))
    return close_output(spec, start, done)


def open_output(spec: JobSpec, overwrite: bool) -> np.ndarray:
    """Check the output may take this spec, record the spec, join Ray; returns the row ids already done."""
    check_continuation(spec, overwrite)
    fs, out = url_to_fs(spec.output, spec.storage_options)
    write_atomic(fs, join(out, "job.yaml"), yaml.safe_dump(spec.public_dict(), sort_keys=False).encode())
    connect(spec)
    return stored_ids(spec.output, "manifest", spec.storage_options)


def close_output(spec: JobSpec, start: float, done: np.ndarray) -> Summary:
    """The closing summary, and the report rebuilt."""
    summary = summarize(spec, time.time() - start, before=len(done))
    build_report(spec.output, spec.storage_options)
    return summary


def connect(spec: JobSpec) -> None:
    """Join RAY_ADDRESS (or the caller's Ray) and wait for the stages' resources, else start a local Ray."""
    joined = ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    wait_for_capacity(spec, spec.placement_timeout_s if joined else 0.0)


def write_manifest(spec: JobSpec, ds: ray.data.Dataset) -> None:
    """Run the pipeline; each finished block of rows becomes one manifest object."""
    ds.write_datasink(ManifestSink(spec.output, spec.storage_options), ray_remote_args={"num_cpus": TASK_CPUS})


def stored_embeddings(output: str, storage_options: dict, keep: np.ndarray) -> ray.data.Dataset:
    """The stored Stage C rows of `output` whose ids are in `keep`, as Stage B/A input."""
    fs, path = url_to_fs(join(output, "embeddings"), storage_options)
    ds = ray.data.read_parquet(path, filesystem=PyFileSystem(FSSpecHandler(fs)), num_cpus=TASK_CPUS)
    ds = ds.map_batches(filter_ids, batch_format="numpy", num_cpus=TASK_CPUS, fn_kwargs=dict(ids=ray.put(keep)))
    return ds.map_batches(read_back_embeddings, batch_format="numpy", num_cpus=TASK_CPUS)


def build_dataset(spec: JobSpec, table: prompts.PromptTable, skip: np.ndarray = ()) -> ray.data.Dataset:
    """read → expand rows → text pool → Stage C pool → embeddings → Stage B/A pool → images."""
    ds = ray.data.read_parquet(list(table.files), filesystem=PyFileSystem(FSSpecHandler(table.fs)),
                               num_cpus=TASK_CPUS)
    ds = ds.map_batches(prompts.expand_rows, batch_format="numpy", num_cpus=TASK_CPUS, fn_kwargs=dict(
        defaults=prompts.defaults_for(spec), images_per_prompt=spec.generation.images_per_prompt,
        model=dict(decoder=spec.model.decoder, dtype=spec.model.dtype), combos=prompts.sweep_combinations(spec.sweep),
        skip=ray.put(np.asarray(skip, dtype="U32"))))
    # Stream in blocks of one text batch, so every pool works in parallel and images land steadily.
    ds = ds.repartition(target_num_rows_per_block=spec.stages.text.batch_size)
    ds = _stage(ds, spec, TextEncoder, "text")
    ds = _stage(ds, spec, PriorStage, "prior")
    ds = ds.map_batches(write_embeddings, batch_format="numpy", num_cpus=TASK_CPUS,
                        fn_kwargs=dict(output=spec.output, storage_options=spec.storage_options))
    return _decode_and_write(ds, spec)


def decode_dataset(spec: JobSpec, stored: ray.data.Dataset) -> ray.data.Dataset:
    """Stored Stage C rows → text pool (for the decoder's text states) → Stage B/A pool → images."""
    stored = stored.repartition(target_num_rows_per_block=spec.stages.text.batch_size)
    return _decode_and_write(_stage(stored, spec, TextEncoder, "text"), spec)


def _decode_and_write(ds: ray.data.Dataset, spec: JobSpec) -> ray.data.Dataset:
    ds = _stage(ds, spec, DecoderStage, "decoder")
    kwargs = dict(output=spec.output, storage_options=spec.storage_options, image_format=spec.image_format)
    if spec.output_format == "webdataset":
        ds = ds.repartition(target_num_rows_per_block=spec.shard_size)
        return ds.map_batches(write_shard, batch_format="numpy", batch_size=spec.shard_size, num_cpus=TASK_CPUS,
                              fn_kwargs=kwargs)
    return ds.map_batches(write_images, batch_format="numpy", num_cpus=TASK_CPUS, fn_kwargs=kwargs)


def _stage(ds: ray.data.Dataset, spec: JobSpec, cls, name: str) -> ray.data.Dataset:
    """One stage's actor pool, placed from its spec."""
    placed = placement(getattr(spec.stages, name), name, ray.cluster_resources().get("GPU", 0))
    return ds.map_batches(cls, fn_constructor_kwargs=stage_kwargs(spec, name), **placed)


# GPU shares when a stage's num_gpus is not set: one GPU shared by all three pools, or whole GPUs
# for Stage C and Stage B/A (text encoding is ~0.1% of the FLOPs) when the cluster has several.
_GPU_SHARES = {"text": (0.1, 0.25), "prior": (0.45, 1.0), "decoder": (0.45, 1.0)}


def placement(stage: StageSpec, name: str, cluster_gpus: float) -> dict:
    """map_batches keyword arguments for a stage's actor pool, from its spec and the cluster."""
    if stage.num_gpus is not None:
        num_gpus = stage.num_gpus
    elif cluster_gpus:
        num_gpus = _GPU_SHARES[name][0 if cluster_gpus < 3 else 1]
    else:
        num_gpus = 0
    concurrency = stage.concurrency or 1
    args = dict(
        batch_size=stage.batch_size,
        batch_format="numpy",
        concurrency=tuple(concurrency) if isinstance(concurrency, list) else concurrency,
        num_gpus=num_gpus,
        num_cpus=stage.num_cpus if stage.num_cpus is not None else ACTOR_CPUS,
    )
    for key in ("resources", "accelerator_type", "label_selector"):
        if getattr(stage, key):
            args[key] = getattr(stage, key)
    return args


def wait_for_capacity(spec: JobSpec, timeout: float) -> None:
    """Ask the autoscaler for the stages' minimum pools and wait up to `timeout` s; then a clear error."""
    deadline, announced = time.time() + timeout, False
    while True:
        try:
            return check_capacity(spec, ray.cluster_resources())
        except SpecError as err:
            if time.time() >= deadline:
                raise SpecError(f"{err} (after waiting {timeout:g} s)" if timeout else str(err)) from None
            if not announced:
                print(f"waiting up to {timeout:g} s for the Ray cluster to offer: {err}", file=sys.stderr)
                request_resources(bundles=minimum_bundles(spec))
                announced = True
            time.sleep(min(2.0, max(deadline - time.time(), 0)))


def minimum_pools(spec: JobSpec, cluster: dict) -> list[tuple[str, int, dict]]:
    """(stage, minimum actor count, one actor's resource ask) for each stage."""
    pools = []
    for name in ("text", "prior", "decoder"):
        args = placement(getattr(spec.stages, name), name, cluster.get("GPU", 0))
        conc = args["concurrency"]
        ask = {"CPU": args["num_cpus"], "GPU": args["num_gpus"], **args.get("resources", {})}
        pools.append((name, conc[0] if isinstance(conc, tuple) else conc, {k: v for k, v in ask.items() if v}))
    return pools


def minimum_bundles(spec: JobSpec) -> list[dict]:
    """One resource bundle per actor of the minimum pools (what the autoscaler is asked for)."""
    return [ask for _, count, ask in minimum_pools(spec, ray.cluster_resources()) for _ in range(count)]


def check_capacity(spec: JobSpec, cluster: dict) -> None:
    """Refuse a job whose minimum actor pools cannot all be placed: Ray would otherwise wait forever."""
    need: dict[str, float] = {"CPU": LISTING_CPUS}
    for name, count, ask in minimum_pools(spec, cluster):
        for resource, amount in ask.items():
            if resource not in cluster:
                offered = sorted(k for k in cluster if not k.startswith("node:") and "memory" not in k)
                raise SpecError(f"stages.{name}: no node of the Ray cluster offers {resource} "
                                f"(the cluster offers {', '.join(offered)})")
            need[resource] = need.get(resource, 0) + count * amount
    for resource, amount in need.items():
        have = cluster.get(resource, 0)
        if amount > have + 1e-9:
            raise SpecError(f"stages: the minimum actor pools and Ray Data's file listing need {amount:g} {resource}, "
                            f"the Ray cluster has {have:g}; lower a stage's concurrency or its {resource} ask")


def summarize(spec: JobSpec, seconds: float, before: int = 0) -> Summary:
    """Count the manifest's rows and failures (read back from storage); `before` rows were there already."""
    fs, out = url_to_fs(join(spec.output, "manifest"), spec.storage_options)
    manifest = pads.dataset(out, filesystem=PyFileSystem(FSSpecHandler(fs)), format="parquet")
    errors = manifest.to_table(columns=[C.ERROR]).column(C.ERROR)
    return Summary(rows=len(errors), failed=len(errors) - errors.null_count, seconds=seconds,
                   output=spec.output, new=len(errors) - before)
