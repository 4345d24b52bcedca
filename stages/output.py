"""The run folder, one owner: its layout, job.yaml, manifest parts (listing; counting in stages/footers.py), the
done row ids and the stored Stage C rows, read inside Ray so that nothing on the driver grows with the rows."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pyarrow.fs import FSSpecHandler, PyFileSystem

from stages import columns as C
from stages.partitions import partitions
from stages.storage import causes, full_uri, join, uncached, url_to_fs

# Layout of an output: <output>/<folder>/...
JOB_FILE = "job.yaml"
MANIFEST = "manifest"  # Parquet parts of finished rows (one per finished block, or compacted)
EMBEDDINGS = "embeddings"  # Parquet parts of Stage C rows
IMAGES = "images"
SHARDS = "shards"
SHARD_STATS = "shard_stats"
REPORT = "report"
RUNS = "runs"
EVAL = "eval"

COMPACTED_FROM = b"wuerstchen_batch.compacted_from"  # a compacted part's footer: the part names it replaces
COMPACTED_PREFIX = "compacted-"
PATH = "path"  # the column Ray Data's include_paths adds
CLOSED = "_closed"  # embeddings/_closed, written as an invocation ends: an older part's rows all have entries
FINISHED = "_finished"  # <output>/_finished, written as an invocation ends; a claim removes it first
READ_ATTEMPTS, REREAD_PAUSE_S = 5, 2.0  # a read that lost a listed part to a compaction (see relisted)


def folder(output: str, name: str, storage_options: dict | None) -> tuple[object, str]:
    """(filesystem, path) of <output>/<name>."""
    return url_to_fs(join(output, name), storage_options)


def arrow_fs(fs) -> PyFileSystem:
    """A pyarrow filesystem over an fsspec one (for pyarrow.dataset and Ray's readers), reading only what
    pyarrow asks for (the columns wanted; see uncached)."""
    return PyFileSystem(FSSpecHandler(uncached(fs)))


def read_job(output: str, storage_options: dict | None) -> dict:
    """The run's resolved spec from <output>/job.yaml ({} when there is none); one emptied, edited into another
    shape or cut short is a one-line error naming the file."""
    from jobs.spec import SpecError, syntax_error

    fs, path = url_to_fs(join(output, JOB_FILE), storage_options)
    if not fs.exists(path):
        return {}
    try:
        job = yaml.safe_load(fs.cat_file(path))
    except yaml.YAMLError as err:
        raise syntax_error(join(output, JOB_FILE), err) from None
    if not isinstance(job, dict):
        shape = "empty" if job is None else f"a YAML {type(job).__name__}"
        raise SpecError(f"{join(output, JOB_FILE)}: not a job spec ({shape}; expected a mapping of keys)")
    return job


def list_parts(output: str, name: str, storage_options: dict | None) -> tuple[object, list[str]]:
    """The live Parquet parts of <output>/<name>, sorted: parts that a compacted part replaces are left out,
    so a reader listing during or after a compaction sees each row once (one listing, plus one footer per
    compacted part)."""
    fs, files, replaced = listing(output, name, storage_options)
    return fs, [f for f in files if f not in replaced]


def listing(output: str, name: str, storage_options: dict | None) -> tuple[object, list[str], set[str]]:
    """(fs, every part, the parts a compacted part replaces)."""
    fs, path = folder(output, name, storage_options)
    fs.invalidate_cache(path)  # fsspec keeps listings per filesystem instance: a listing asks the store afresh
    try:
        files = sorted(fs.glob(join(path, "*.parquet")))
    except FileNotFoundError:
        return fs, [], set()
    replaced: set[str] = set()
    for part in (f for f in files if f.rsplit("/", 1)[-1].startswith(COMPACTED_PREFIX)):
        replaced.update(join(path, n) for n in _replaces(fs, part))
    return fs, files, replaced


def _replaces(fs, part: str) -> list[str]:
    with parquet_part(fs, part) as parquet:
        meta = parquet.schema_arrow.metadata or {}
    return json.loads(meta.get(COMPACTED_FROM, b"[]"))


class UnreadablePart(ValueError):
    """A part of a run folder that is no Parquet file (cut short: a crash between a local write and its disk)."""

    def __init__(self, uri: str, err: Exception):
        way = ("its rows without a manifest entry are made again (those with one keep their images, but decode "
               "cannot make them again)" if _folder_of(uri) == EMBEDDINGS else "its rows are made again")
        super().__init__(f"{uri}: not a readable Parquet part ({str(err).splitlines()[0]}); delete it and run the "
                         f"job again: {way}")

    def __reduce__(self):  # raised in a Ray task: its message travels, not the arguments it was made from
        return _rebuilt, (type(self), str(self))


def _rebuilt(kind: type, message: str) -> UnreadablePart:
    err = kind.__new__(kind)
    ValueError.__init__(err, message)
    return err


class ForeignPart(UnreadablePart):
    """A Parquet file in a run's folder that no run wrote there (no row_id column): put there by hand."""

    def __init__(self, uri: str):
        ValueError.__init__(self, f"{uri}: not a part of this run ({C.ROW_ID} is not among its columns); move it out "
                                  f"of {_folder_of(uri)}/ and run the command again")


def _folder_of(uri: str) -> str:
    """The run folder (manifest, embeddings) a part's URI is in."""
    return uri.rstrip("/").rsplit("/", 2)[-2]


@contextlib.contextmanager
def parquet_part(fs, path: str, **open_options):
    """A part's pq.ParquetFile, open while in the block; one that is no Parquet file is an UnreadablePart, one
    without row ids a ForeignPart."""
    with fs.open(path, "rb", **open_options) as f:
        try:
            parquet = pq.ParquetFile(f)
        except pa.ArrowInvalid as err:  # not an OSError: a store's failure is no reason to delete the part
            raise UnreadablePart(full_uri(fs, path), err) from None
        meta = parquet.metadata  # its column chunks' paths: no schema built (see footers.column_index)
        if meta.num_row_groups and not any(meta.row_group(0).column(i).path_in_schema == C.ROW_ID
                                           for i in range(meta.num_columns)):
            raise ForeignPart(full_uri(fs, path))
        yield parquet


def unreadable_part(err: BaseException) -> UnreadablePart | None:
    """The UnreadablePart `err` was raised from (in this process or a Ray task), if any."""
    found = next((e for e in causes(err) if isinstance(e, UnreadablePart)), None)
    return getattr(found, "cause", found)  # a RayTaskError subclassing it: its str() is the remote traceback


def vanished_part(err: BaseException) -> str | None:
    """The manifest part `err` names, when it is a part a reader listed and then did not find (a run closing on
    the same output compacted the manifest in between); else None."""
    for e in causes(err):
        if isinstance(e, FileNotFoundError):
            found = re.search(rf"[^\s'\"]*/{MANIFEST}/[^\s'\"/]+\.parquet", str(e))
            if found:
                return found.group(0)
    return None


def relisted(read):
    """`read` (which lists the manifest, then reads what it listed) run again from a fresh listing when a
    compaction deleted a listed part meanwhile, up to READ_ATTEMPTS times: the compacted part holds its rows."""
    @functools.wraps(read)
    def again(*args, **kwargs):
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                return read(*args, **kwargs)
            except FileNotFoundError as err:
                if attempt == READ_ATTEMPTS or vanished_part(err) is None:
                    raise
                time.sleep(REREAD_PAUSE_S)  # the compaction may still be deleting
    return again


def read_parts(output: str, name: str, storage_options: dict | None, columns=None, include_paths: bool = False,
               parts: list[str] | None = None):
    """A Ray dataset over the live parts of <output>/<name> (only `columns`; only `parts`, as listed, where
    given); None when there are none."""
    import ray

    from jobs.spec import TASK_CPUS

    fs, files = list_parts(output, name, storage_options) if parts is None else (
        folder(output, name, storage_options)[0], parts)
    if not files:
        return None
    try:
        return ray.data.read_parquet(files, filesystem=arrow_fs(fs), columns=list(columns) if columns else None,
                                     include_paths=include_paths, num_cpus=TASK_CPUS,
                                     partitioning=None)  # a key=value folder in the output's path adds no column
    except pa.ArrowInvalid:  # a footer Ray Data read for the schema: name the part
        for path in files:
            with parquet_part(fs, path):
                pass
        raise


def drop_done(ds, output: str, storage_options: dict | None, done_rows: int, on: str = C.ROW_ID, rows: int = 0,
              row_bytes: int = 0):
    """The rows of `ds` (`rows` of them, where known, about `row_bytes` each) whose `on` id has no manifest entry
    in `output`: a hash-partitioned anti-join inside Ray; `ds` itself when the output holds none."""
    ids = read_parts(output, MANIFEST, storage_options, columns=[C.ROW_ID]) if done_rows else None
    if ids is None:
        return ds
    count = partitions(done_rows, rows, row_bytes=row_bytes)
    if on != C.ROW_ID:
        return ds.join(ids, join_type="left_anti", num_partitions=count, on=(on,), right_on=(C.ROW_ID,))
    return ds.join(ids, join_type="left_anti", num_partitions=count, on=(C.ROW_ID,))


def in_flight(output: str, storage_options: dict | None, done_rows: int, parts: list[str] | None = None):
    """(row_id, path) of the stored Stage C rows without a manifest entry (rows in flight at an interruption) in
    the embeddings parts written since the last pass ended (or in `parts`, listed so before), materialized in the
    object store (at most the rows that were in flight); None when there are none."""
    parts = written_since_closed(output, storage_options) if parts is None else parts
    stored = read_parts(output, EMBEDDINGS, storage_options, columns=[C.ROW_ID], include_paths=True, parts=parts)
    if stored is None:
        return None
    pending = drop_done(stored, output, storage_options, done_rows).materialize()
    return pending if pending.count() else None


def mark_closed(output: str, storage_options: dict | None) -> None:
    """Record that every stored Stage C row so far has its manifest entry (a pass ended): a resume looks for
    rows in flight only in the embeddings parts written after this (the store's clock decides)."""
    from stages.storage import write_atomic

    fs, root = folder(output, EMBEDDINGS, storage_options)
    if fs.exists(root):
        write_atomic(fs, join(root, CLOSED), b"")


def unmark_closed(output: str, storage_options: dict | None) -> None:
    """Take embeddings/_closed away: a resume then looks for stored Stage C rows without an entry in every part
    (--retry-failed does so before it takes out the entries of rows that keep their stored output)."""
    fs, root = folder(output, EMBEDDINGS, storage_options)
    try:
        fs.rm(join(root, CLOSED))
    except FileNotFoundError:
        pass


def mark_finished(output: str, storage_options: dict | None, finished: bool = True, planned: int | None = None,
                  entries: int | None = None, kept: int = 0, stale: int = 0) -> None:
    """Record that the invocation which last claimed the output ended with every planned row made, with the
    counts of rows it planned and of entries where given, and of entries (failed ones) of rows it did not plan (or
    take the record away, as a claim does first): only then may a rerun be answered from the footers alone."""
    from stages.storage import write_atomic

    fs, path = url_to_fs(join(output, FINISHED), storage_options)
    if finished:
        record = {"planned": planned, "entries": entries, "kept": kept, "stale": stale}
        write_atomic(fs, path, json.dumps(record).encode())
    elif fs.exists(path):
        fs.rm(path)


def finished_record(output: str, storage_options: dict | None) -> dict | None:
    """The counts the last invocation that claimed the output ended with (see mark_finished); None when it did
    not end, {} from a version that wrote no counts."""
    fs, path = url_to_fs(join(output, FINISHED), storage_options)
    if not fs.exists(path):
        return None
    data = fs.cat_file(path)
    return {k: v for k, v in json.loads(data).items() if v is not None} if data.strip() else {}


def written_since_closed(output: str, storage_options: dict | None) -> list[str]:
    """The embeddings parts written since the last pass ended (see mark_closed): the only ones that may hold
    rows without a manifest entry. Two listings, no footer read."""
    fs, files = list_parts(output, EMBEDDINGS, storage_options)
    return _since_closed(fs, folder(output, EMBEDDINGS, storage_options)[1], files) if files else []


def _since_closed(fs, root: str, files: list[str]) -> list[str]:
    """The parts among `files` modified at or after embeddings/_closed (all of them without one, or where the
    store gives no modification times)."""
    try:
        closed = modified_at(fs.info(join(root, CLOSED)))
    except FileNotFoundError:
        return files
    times = {entry["name"]: modified_at(entry) for entry in fs.ls(root, detail=True, refresh=True)}
    return [f for f in files if closed is None or times.get(f) is None or times[f] >= closed]


def modified_at(entry: dict) -> float | None:
    """A listing entry's modification time in seconds (local mtime, S3 LastModified), else None."""
    value = entry.get("mtime", entry.get("LastModified"))
    return value.timestamp() if hasattr(value, "timestamp") else float(value) if value is not None else None


def stored_rows(keys, output: str, storage_options: dict | None):
    """The stored Stage C rows named by `keys` (row_id, path, and any column whose value they set): each part
    holding one is read once, with only its named rows kept."""
    from jobs.spec import TASK_CPUS

    fs, _ = folder(output, EMBEDDINGS, storage_options)
    return keys.groupby(PATH).map_groups(_read_named_rows, batch_format="pyarrow", num_cpus=TASK_CPUS,
                                         fn_kwargs=dict(fs=fs))


def _read_named_rows(group: pa.Table, fs) -> pa.Table:
    path = group.column(PATH)[0].as_py()
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    table = table.filter(pa.compute.is_in(table.column(C.ROW_ID), value_set=group.column(C.ROW_ID)))
    carried = [c for c in group.column_names if c not in (PATH, C.ROW_ID)]
    if not carried:
        return table
    at = pa.compute.index_in(table.column(C.ROW_ID), value_set=group.column(C.ROW_ID))  # each row's key
    for column in carried:
        values = group.column(column).take(at)
        table = (table.set_column(table.schema.get_field_index(column), column, values)
                 if column in table.column_names else table.append_column(column, values))
    return table
