"""Before Ray or any model: answer a finished rerun from its manifest, check models, prompts and the output."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import lease, prompts
from jobs.resume import Summary, check_continuation, claim, finished
from jobs.prompt_checks import FLOAT_EXACT
from jobs.retries import check_reachable, storage_errors_named
from jobs.spec import JobSpec, SpecError
from stages import columns as C
from stages import footers, output, user_columns
from stages.conditioning import FILE_PARTS, conditioning, difference
from stages.refs import DECODER_SUBFOLDERS, PRIOR_SUBFOLDERS, ModelRefError, check_ref, prior_refs, ref_kind
from stages.storage import canonical, full_uri, reason


def check_models(spec: JobSpec, priors: bool = True) -> None:
    """Every model the job names (priors, sweep checkpoints, decoder; the decoder only where not `priors`: a
    re-decode) exists: one line naming the first that does not (a hub model neither cached nor reachable too)."""
    try:
        for field, prior in prior_fields(spec) if priors else ():
            for ref in prior_refs(prior):
                check_ref(ref, "prior", PRIOR_SUBFOLDERS, spec.storage_options, field)
        check_ref(spec.model.decoder, "decoder", DECODER_SUBFOLDERS, spec.storage_options)
    except ModelRefError as err:
        raise SpecError(str(err)) from None
    if priors:
        check_shared_conditioning(spec)


def prior_fields(spec: JobSpec) -> list[tuple[str, object]]:
    """(spec key, prior spec) of model.prior and of each swept checkpoint."""
    return [("model.prior", spec.model.prior)] + [
        (f"sweep.prior_checkpoint[{i}]", p) for i, p in enumerate(spec.sweep.get(C.PRIOR_CHECKPOINT, []))]


def check_shared_conditioning(spec: JobSpec) -> None:
    """Every prior of the job (an interpolation's B, each swept checkpoint) has model.prior's text encoder,
    tokenizer, scheduler and latent settings, which its rows are made with, and its Stage C architecture; else
    one line naming the first that differs."""
    base, refs = prior_refs(spec.model.prior)[0], {}
    for field, prior in prior_fields(spec):  # each checkpoint read once (a hub listing, a sha256 of its files),
        for ref in prior_refs(prior):  # named by the first field that holds it
            refs.setdefault(ref, field)
    refs.pop(base)
    if not refs:
        return
    name, ref = "model.prior", base
    try:
        expected = conditioning(base, spec.storage_options)
        for ref, name in refs.items():
            found = conditioning(ref, spec.storage_options)
            for part, value in expected.items():
                key = difference(part, value, found[part])
                if key is not None:
                    what = (f" ({key}: {found[part].get(key)!r}, not {value.get(key)!r})" if part not in FILE_PARTS
                            else f" ({part}/{key})" if key else " (no weights or files in common to compare)")
                    raise SpecError(
                        f"{name}: the {part.replace('_', ' ')} of {ref} differs from model.prior's ({base}){what}; "
                        f"the checkpoints of one job share model.prior's text encoder, scheduler, latent settings "
                        f"and Stage C architecture: run {ref} as a job of its own (model.prior: {ref})")
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001 - a store or hub failure is one line naming the model
        raise SpecError(f"{name}: cannot compare {ref}'s text encoder, scheduler and settings with model.prior's "
                        f"({reason(err)})") from None


def preflight(spec: JobSpec) -> prompts.PromptTable:
    """Every check that needs no model loaded: models exist, the table is Parquet with valid rows whose own
    columns have the types of the rows the output holds."""
    check_models(spec)
    return check_user_types(spec, prompts.scan(spec))


def check_user_types(spec: JobSpec, table: prompts.PromptTable) -> prompts.PromptTable:
    """A user column the output's manifest already holds keeps its type: parts of two types make the manifest
    unreadable as one table (evaluate, decode, your own reads). A column held as a dictionary of the table's type
    (the pandas categoricals an earlier version wrote so) is written so again."""
    names = user_columns.user_names(table.schema.names)
    if not names:
        return table
    try:
        held = footers.column_types(spec.output, output.MANIFEST, spec.storage_options, wanted=names)
    except Exception:  # noqa: BLE001 - an output that cannot be read yet is claim's to report
        return table
    if held is None:
        return table
    kept = {}
    for name in names:
        new = table.schema.field(name).type
        old = held.field(name).type if name in held.names else new
        if old != new and plain(old) == plain(new):
            kept[name] = old  # the same values in another layout (a dictionary; pandas writes large_string)
        elif old != new and _numbers(old, new) and (unfit := _unfit_value(table, name, old)) is None:
            kept[name] = old  # pandas reads an int64 column with nulls as float64 and writes it back so
        elif old != new and not pa.types.is_null(old) and not pa.types.is_null(new):
            why = f" ({unfit})" if _numbers(old, new) else ""
            raise SpecError(f"prompts: column '{name}' is {new}, but the rows {spec.output} holds have it as "
                            f"{old}{why}: keep its type, rename the column, or use another output")
    written = pa.schema([f.with_type(kept.get(f.name, f.type)) for f in table.schema])
    return dataclasses.replace(table, written=written) if kept else table


def _numbers(*kinds: pa.DataType) -> bool:
    return all(pa.types.is_integer(k) or pa.types.is_floating(k) for k in kinds)


def _unfit_value(table: prompts.PromptTable, name: str, kind: pa.DataType) -> str | None:
    """Why column `name` of the table's files cannot be written as `kind` without changing a value (a fraction, a
    number out of range or rounded, a float above 2^53 that may have been an integer pandas rounded), read file by
    file in bounded batches; None where every value fits."""
    for path in table.files:
        with table.fs.open(path, "rb") as file:
            parquet = pq.ParquetFile(file)
            if name not in parquet.schema_arrow.names:
                continue
            for batch in parquet.iter_batches(batch_size=65536, columns=[name], use_threads=False):
                if (why := _changed_by_cast(batch.column(0), kind)) is not None:
                    return f"{full_uri(table.fs, path)} holds {why}"
    return None


def _changed_by_cast(values: pa.Array, kind: pa.DataType) -> str | None:
    """Which of the numbers `values` would not be the same written as `kind` (None where all would)."""
    try:
        back = values.cast(kind).cast(values.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        return f"a value {kind} would not keep ({err})"
    same = pc.equal(values, back)
    if pa.types.is_floating(values.type):
        same = pc.or_(same, pc.and_(pc.is_nan(values), pc.is_nan(back)))
        if pa.types.is_integer(kind):
            same = pc.and_(same, pc.less_equal(pc.abs(values), FLOAT_EXACT))
    changed = pc.invert(pc.fill_null(same, True))
    if not pc.any(changed).as_py():
        return None
    return f"{pc.filter(values, changed)[0]}, a value {kind} would not keep"


def plain(kind: pa.DataType) -> pa.DataType:
    """`kind` with its large and view layouts (large_string, string_view, large_list…) as the plain ones, at any
    depth: two types equal so hold the same values."""
    if pa.types.is_dictionary(kind):
        return plain(kind.value_type)
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return pa.string()
    if pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return pa.binary()
    if any(is_(kind) for is_ in (pa.types.is_list, pa.types.is_large_list, pa.types.is_list_view,
                                 pa.types.is_large_list_view, pa.types.is_fixed_size_list)):
        item = pa.field("item", plain(kind.value_type), nullable=kind.value_field.nullable)  # a non-null item
        # type refuses a null at write time: kept apart
        return pa.list_(item, kind.list_size) if pa.types.is_fixed_size_list(kind) else pa.list_(item)
    if pa.types.is_struct(kind):
        return pa.struct([kind.field(i).with_type(plain(kind.field(i).type)) for i in range(kind.num_fields)])
    if pa.types.is_map(kind):
        return pa.map_(plain(kind.key_type), kind.item_field.with_type(plain(kind.item_type)))
    return kind


def answered(spec: JobSpec, started: float) -> Summary | None:
    """The summary of a finished generate job on this output, from metadata alone; None when work is left."""
    return finished(spec, lambda: prompts.planned_rows(spec, prompts.count_rows(spec)), started)


def answered_decode(spec: JobSpec, started: float, stored: Callable[[], int]) -> Summary | None:
    """The same for a re-decode: done when the output holds as many rows as the run stored embeddings (`stored()`,
    from the run's footers)."""
    return finished(spec, stored, started)


def stores(spec: JobSpec) -> dict[str, str | None]:
    """Every location the job reads or writes, by spec key: its tables, its output and its models."""
    models = {f"{name}[{i}]": ref for name, prior in prior_fields(spec) for i, ref in enumerate(prior_refs(prior))}
    return {"output": spec.output, "prompts": spec.prompts, "decoded_from": spec.decoded_from, **models,
            "model.decoder": spec.model.decoder}


def check_overwrite_keeps_inputs(spec: JobSpec, reads: tuple[str, ...] | None = None) -> None:
    """--overwrite deletes the output folder: refuse, in one line, where something the job reads (its prompt
    table, a run it decodes, a model folder; only the spec keys `reads` where given) lies inside it."""
    root = _place(spec.output) + "/"
    for key, uri in stores(spec).items():
        if key == "output" or not uri or (reads is not None and key not in reads) or (
                key.startswith(("model.", "sweep.")) and ref_kind(uri) in ("tiny", "hub")):
            continue
        if (_place(uri) + "/").startswith(root):
            raise SpecError(f"{key} {uri}: inside the output {spec.output}, which --overwrite deletes; move it out "
                            f"of the output folder, or choose another output")


def _place(uri: str) -> str:
    """Where a URI points, for comparing two: a local path with its symlinks resolved, a store's protocol by its
    filesystem's first name (gcs:// is gs://)."""
    uri = canonical(uri)
    if "://" not in uri:
        return os.path.realpath(uri)
    protocol, rest = uri.split("://", 1)
    try:
        protocol = fsspec.get_filesystem_class(protocol).protocol
    except (ImportError, ValueError):  # checked before (check_store); left as written
        return uri
    return f"{protocol if isinstance(protocol, str) else protocol[0]}://{rest}"


def generate_job(spec: JobSpec, overwrite: bool = False, verbose: bool = False, retry_failed: bool = False) -> Summary:
    """A whole `generate`: a finished rerun is answered from its manifest (without importing Ray, torch or a
    model); otherwise every check runs, Ray is joined and the output claimed (preflight.claimed), then the
    pipeline runs.
    `retry_failed`: only the rows whose manifest entry has an error are made again, their entries replaced."""
    started = time.time()
    if spec.decoded_from:
        raise SpecError(f"decoded_from: set by `decode` (the run whose Stage C it decodes), not by a generate job: "
                        f"continue a decode with `wuerstchen-batch decode {spec.decoded_from} {spec.output}` (with "
                        f"its --set options), or remove the key")
    check_reachable(stores(spec), spec.storage_options)
    if retry_failed and not output.read_job(spec.output, spec.storage_options):
        raise SpecError(f"--retry-failed: {spec.output} holds no run whose failed rows to make again (no "
                        f"{output.JOB_FILE}): check the output, or run without --retry-failed")
    summary = None if overwrite else answered(spec, started)
    if summary is not None and retry_failed:  # a finished run without failed rows it plans: nothing to retry
        summary = dataclasses.replace(summary, retried=0) if summary.failed == summary.kept else None
    if summary is not None:
        return summary
    if overwrite:
        check_overwrite_keeps_inputs(spec)
    from jobs.placement import check_ray  # imports Ray: not for a rerun answered above

    check_ray(spec)
    table = preflight(spec)
    for warning in table.warnings():
        print(warning, file=sys.stderr)
    with claimed(spec, overwrite, verbose):
        from jobs.generate import generate

        return generate(spec, table, started, retry_failed=retry_failed)


@contextlib.contextmanager
def claimed(spec: JobSpec, overwrite: bool, verbose: bool = False):
    """The refusals that only read the output first (another invocation on it, rows of another spec); then Ray
    joined, with the stages' resources (one that no node offers is refused before anything is written); then the
    output held by this invocation alone and claimed for the spec. A store that fails is one line naming it."""
    from jobs.passes import connect  # imports Ray

    try:
        lease.refuse_if_held(spec.output, spec.storage_options)
        check_continuation(spec, overwrite, delete=False)
    except SpecError:
        raise
    except Exception as err:  # noqa: BLE001 - permissions, a file in the way: one line
        raise SpecError(f"output {spec.output}: cannot write there ({reason(err)})") from None  # as claim says
    connect(spec, verbose)
    with lease.held(spec.output, spec.storage_options):
        claim(spec, overwrite)
        with storage_errors_named(spec.output):
            yield
