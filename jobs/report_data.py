"""What the report shows, read from the manifest with Arrow, streaming: counts over compact ids, per-stage
sums, nodes, the swept prompts (jobs/report_sweeps.py), and only the rows the page shows as Python rows."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from stages import columns as C
from stages import footers, output
from stages.writer import MANIFEST_SCHEMA

MAX_SHEET = 200  # thumbnails on the contact sheet
MAX_PROMPTS = 20  # sweeps shown
MAX_GRID = 200  # thumbnails per sweep grid
MAX_FAILED = 500  # failed rows listed
BATCH_ROWS = 65536
SCAN = pads.ParquetFragmentScanOptions(pre_buffer=False)  # no whole-file buffering on object stores
AXES = (C.SEED, C.PRIOR_GUIDANCE, C.DECODER_GUIDANCE, C.PRIOR_STEPS, C.DECODER_STEPS, C.NEGATIVE_PROMPT,
        C.RESOLUTION, C.CHECKPOINT)
STAGES = (("text", C.TEXT_SECONDS, C.TEXT_NODE), ("prior", C.PRIOR_SECONDS, C.PRIOR_NODE),
          ("decoder", C.DECODER_SECONDS, C.DECODER_NODE))
SWEEP_COLUMNS = {"prior_checkpoint": C.CHECKPOINT}  # sweep axis → the manifest column that shows it
# Contact-sheet and grid order (prompt, then every axis, nulls first), as Arrow sort keys.
ORDER = [(c, "ascending", "at_start") for c in (C.PROMPT, *(c for a in AXES for c in ((C.HEIGHT, C.WIDTH)
                                                if a == C.RESOLUTION else (a,))), C.ROW_ID)]
SHOWN = [C.ROW_ID, C.PROMPT, C.IMAGE_URI, C.ERROR, C.FINISHED_AT, *(k for k, _, _ in ORDER[1:-1])]


@dataclass
class StageFigures:
    """One stage's rows timed, busy seconds and rows per node."""

    timed: int = 0
    busy: float = 0.0
    nodes: Counter = field(default_factory=Counter)


@dataclass
class ManifestView:
    """The report's figures and the few rows it shows."""

    rows: int = 0
    succeeded: int = 0
    folded: int = 0  # input rows folded into an identical row
    stages: dict = field(default_factory=lambda: {name: StageFigures() for name, _, _ in STAGES})
    failed_rows: list = field(default_factory=list)  # the first MAX_FAILED by row id
    sheet: list = field(default_factory=list)  # the first MAX_SHEET images in ORDER
    sweeps: list = field(default_factory=list)  # (prompt, axes, rows shown, rows in all) of the first MAX_PROMPTS
    swept_prompts: int = 0

    @property
    def failed(self) -> int:
        return self.rows - self.succeeded


@output.relisted
def read_view(output_uri: str, storage_options: dict, axes: list[str]) -> ManifestView:
    """Everything the page needs, in three streaming passes over a few columns; a row id written twice (a
    retried block) counts once, its latest success winning."""
    fs, files = output.list_parts(output_uri, output.MANIFEST, storage_options)
    view = ManifestView()
    if not files:
        return view
    footers.check_parts(fs, files)  # one cut short, or a file put there by hand, is named in one line (the passes
    # below would fail on it, or count a stray table's rows)
    dataset = pads.dataset(files, filesystem=output.arrow_fs(fs), format="parquet", schema=MANIFEST_SCHEMA)
    ok = count_rows(dataset, view)
    view.failed_rows = failed_rows(dataset, ok)
    view.sheet = first_images(dataset)
    if axes:
        from jobs.report_sweeps import find_sweeps  # it reads this module's helpers

        view.sweeps, view.swept_prompts = find_sweeps(dataset, axes)
    return view


def batches(dataset: pads.FileSystemDataset, columns: list[str], filter=None):
    """The dataset's record batches (only `columns`, only rows passing `filter`), one file at a time with
    little read ahead: memory stays a few batches and one file's metadata whatever the rows and files."""
    for path in dataset.files:
        part = pads.dataset(path, filesystem=dataset.filesystem, format="parquet", schema=dataset.schema)
        yield from part.to_batches(columns=columns, filter=filter, batch_size=BATCH_ROWS, batch_readahead=2,
                                   fragment_scan_options=SCAN)


def id_keys(ids) -> np.ndarray:
    """8-byte keys of row ids (the first 64 of their 128 bits): two distinct ids share one with probability
    ~n²/2^65 (3e-6 at 10M rows), which would only make a report count one row less."""
    return compact_ids(ids).view("<u8").reshape(-1, 2)[:, 0].copy()


def count_rows(dataset: pads.Dataset, view: ManifestView) -> np.ndarray:
    """Distinct ids and succeeded ids (8-byte keys, sorted in place), per-stage sums and nodes; returns the
    sorted keys of the succeeded ids (about 16 bytes a row at the peak)."""
    every, ok = [], []
    columns = [C.ROW_ID, C.ERROR, C.INPUT_ROWS, *(c for _, seconds, node in STAGES for c in (seconds, node))]
    for batch in batches(dataset, columns):
        keys = id_keys(batch.column(C.ROW_ID))
        view.folded += footers.folded_in(batch.column(C.INPUT_ROWS))
        every.append(keys)
        ok.append(keys[pc.is_null(batch.column(C.ERROR)).to_numpy(zero_copy_only=False)])
        for name, seconds, node in STAGES:
            figures, times = view.stages[name], batch.column(seconds)
            figures.timed += len(times) - times.null_count
            figures.busy += pc.sum(times).as_py() or 0.0
            nodes = pc.value_counts(batch.column(node))
            figures.nodes.update({node_label(v["values"].as_py()): v["counts"].as_py() for v in nodes})
    keys = _sorted(every)
    repeated = keys[1:] == keys[:-1]
    view.rows = len(keys) - int(repeated.sum())
    if repeated.any():
        drop_copies(dataset, np.unique(keys[1:][repeated]), view)
    del keys, repeated
    ok_keys = _sorted(ok)
    ok_keys = ok_keys[np.concatenate([[True], ok_keys[1:] != ok_keys[:-1]])] if len(ok_keys) else ok_keys
    view.succeeded = len(ok_keys)
    return ok_keys


def _sorted(chunks: list[np.ndarray]) -> np.ndarray:
    keys = np.concatenate(chunks) if chunks else np.zeros(0, "<u8")
    chunks.clear()
    keys.sort()
    return keys


def drop_copies(dataset: pads.Dataset, repeated: np.ndarray, view: ManifestView) -> None:
    """Take out of the stage figures and the folded count every copy of a repeated id but the one that counts
    (rare: one more pass, keeping only the repeated ids' rows)."""
    rows = []
    columns = [C.ROW_ID, C.ERROR, C.FINISHED_AT, C.INPUT_ROWS,
               *(c for _, seconds, node in STAGES for c in (seconds, node))]
    for batch in batches(dataset, columns):
        mask = _member(id_keys(batch.column(C.ROW_ID)), repeated)
        if mask.any():
            rows += pa.Table.from_batches([batch]).filter(pa.array(mask)).to_pylist()
    counted = {id(r) for r in _latest(rows)}
    for row in (r for r in rows if id(r) not in counted):
        view.folded -= (row[C.INPUT_ROWS] or 1) - 1  # as folded_in counts an entry (null: one input row)
        for name, seconds, node in STAGES:
            figures = view.stages[name]
            if row[seconds] is not None:
                figures.timed -= 1
                figures.busy -= row[seconds]
            figures.nodes[node_label(row[node])] -= 1
            figures.nodes += Counter()  # drops the nodes left with no row


def node_label(value) -> str:
    """A node column's value as the report lists it."""
    return "(not recorded)" if value is None else value or "(no Ray)"


def _member(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    if not len(sorted_ids):
        return np.zeros(len(ids), dtype=bool)
    at = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
    return sorted_ids[at] == ids


def failed_rows(dataset: pads.Dataset, ok_ids: np.ndarray) -> list[dict]:
    """The first MAX_FAILED failed rows by id whose id never succeeded."""
    kept = None
    for batch in batches(dataset, [C.ROW_ID, C.PROMPT, C.ERROR], pc.field(C.ERROR).is_valid()):
        table = pa.Table.from_batches([batch])
        table = table.filter(pa.array(~_member(id_keys(table.column(C.ROW_ID)), ok_ids)))
        kept = _top(table if kept is None else pa.concat_tables([kept, table]), ORDER[-1:], MAX_FAILED)
    return _distinct(kept.to_pylist()) if kept is not None else []


def first_images(dataset: pads.Dataset) -> list[dict]:
    """The first MAX_SHEET rows with an image in ORDER (a running top-k: bounded whatever the row count)."""
    kept = None
    for batch in batches(dataset, SHOWN, pc.field(C.IMAGE_URI).is_valid()):
        table = pa.Table.from_batches([batch])
        kept = _top(table if kept is None else pa.concat_tables([kept, table]), ORDER, 2 * MAX_SHEET)
    return _distinct(kept.to_pylist())[:MAX_SHEET] if kept is not None else []


def _top(table: pa.Table, keys, n: int) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=keys)[:n])


def _distinct(rows: list[dict]) -> list[dict]:
    """One row per id, keeping the order of first appearance."""
    return list({r[C.ROW_ID]: r for r in reversed(rows)}.values())[::-1]


def _latest(rows: list[dict]) -> list[dict]:
    """One row per id: its latest success, else its latest failure."""
    latest = {}
    for row in sorted(rows, key=lambda r: (r[C.ERROR] is None, _order(r[C.FINISHED_AT]))):
        latest[row[C.ROW_ID]] = row
    return list(latest.values())


def declared_axes(job: dict) -> list[str]:
    """The axes the job varies on purpose: its sweep's, and the seed when images_per_prompt > 1."""
    sweep = [SWEEP_COLUMNS.get(axis, axis) for axis in (job.get("sweep") or {})]
    return [a for a in AXES if a in sweep or (a == C.SEED and images_per_prompt(job) > 1)]


def images_per_prompt(job: dict) -> int:
    """The job's images_per_prompt (1 where job.yaml does not say)."""
    return (job.get("generation") or {}).get("images_per_prompt") or 1


def axis_value(row: dict, axis: str):
    """A row's value on a sweep axis (resolution is (height, width))."""
    return (row[C.HEIGHT], row[C.WIDTH]) if axis == C.RESOLUTION else row[axis]


def _order(value) -> tuple:
    """Sort key that puts None first and never compares None with a value."""
    return (value is not None, value if value is not None else 0)


def row_order(row: dict) -> tuple:
    """Contact-sheet and grid order: prompt, then every sweep axis (as ORDER)."""
    return (row[C.PROMPT], *(_order(axis_value(row, a)) for a in AXES), row[C.ROW_ID])


_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def compact_ids(ids) -> np.ndarray:
    """Row ids as 16-byte values ('S16'), the same whatever batch an id comes in: a 32-hex-digit id's own 128
    bits (vectorized), any other id's MD5."""
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    n = len(ids)
    out = np.zeros(n, dtype="S16")
    fast = np.zeros(n, dtype=bool)
    if n and ids.null_count == 0 and pa.types.is_string(ids.type):
        offsets = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset:ids.offset + n + 1].astype(np.int64)
        fast = np.diff(offsets) == 32
        data = np.frombuffer(ids.buffers()[2], np.uint8) if ids.buffers()[2] is not None else np.zeros(0, np.uint8)
        where = offsets[:-1][fast][:, None] + np.arange(32)
        digits = _HEX[data[where]] if fast.any() else np.zeros((0, 32), np.uint8)
        valid = ~(digits == 255).any(axis=1)
        fast[np.flatnonzero(fast)[~valid]] = False
        digits = digits[valid]
        out[fast] = np.ascontiguousarray((digits[:, 0::2] << 4) | digits[:, 1::2]).view("S16").ravel()
    rest = np.flatnonzero(~fast)
    if len(rest):
        values = ids.take(pa.array(rest)).to_pylist()
        out[rest] = [hashlib.md5(str(v).encode()).digest() for v in values]
    return out
