"""The report's swept prompts in memory of ~70 bytes a prompt, whatever its text (a grouping by prompt text took
~400): one pass hashes each row's prompt and declared axes' values, a second finds the first swept prompts by
name, a third reads only their rows, keeping each one's first grid rows and 8 bytes per row."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from jobs import report_data
from jobs.report_data import MAX_GRID, MAX_PROMPTS, ORDER, SHOWN, _member, _top, batches, row_order
from stages import columns as C

MERGE_ROWS = 1 << 20  # per-prompt partial results merged once this many are pending (or as many as merged)
BUCKETS = 16
BUCKET_SPAN = 1 << 60  # 2^64 / BUCKETS
SEED = 0x5EED  # polars' hashes are stable for one seed within a process: both passes use this one


def find_sweeps(dataset: pads.Dataset, axes: list[str]) -> tuple[list, int]:
    """(prompt, varying axes, rows in grid order, rows in all) of the first MAX_PROMPTS swept prompts (by name),
    and the number of swept prompts. A prompt is swept when its rows differ on a declared axis (nulls count)."""
    columns = [c for a in axes for c in ((C.HEIGHT, C.WIDTH) if a == C.RESOLUTION else (a,))]
    swept = swept_keys(dataset, columns)
    prompts = first_prompts(dataset, swept, MAX_PROMPTS)
    if not prompts:  # no prompt varies on a declared axis (a one-value sweep): no grid
        return [], 0
    grids = {prompt: Grid() for prompt in prompts}
    for batch in batches(dataset, SHOWN, pc.field(C.PROMPT).isin(prompts)):
        table = pa.Table.from_batches([batch])
        for prompt in pc.unique(table.column(C.PROMPT)).to_pylist():
            grids[prompt].add(table.filter(pc.equal(table.column(C.PROMPT), prompt)), axes)
    return [(prompt, *grids[prompt].result(axes)) for prompt in prompts], len(swept)


class Grid:
    """One swept prompt's grid, read a batch at a time in bounded memory however many rows the prompt has: its
    first ids in ORDER, each its latest row (a running top-k), its distinct row ids (8 bytes each) and the axes its
    rows differ on."""

    def __init__(self):
        self.kept, self.keys, self.pending, self.first, self.varies = None, np.zeros(0, np.uint64), [], {}, set()

    def add(self, rows: pa.Table, axes: list[str]) -> None:
        both = rows if self.kept is None else pa.concat_tables([self.kept, rows])
        self.kept = _top(latest_rows(both), ORDER, MAX_GRID)
        self.pending.append(report_data.id_keys(rows.column(C.ROW_ID)))
        if sum(map(len, self.pending)) >= max(MERGE_ROWS, len(self.keys)):  # merges cost O(rows log rows) in all
            self.keys, self.pending = np.unique(np.concatenate([self.keys, *self.pending])), []
        for axis in axes:
            columns = [C.HEIGHT, C.WIDTH] if axis == C.RESOLUTION else [axis]
            values = rows.select(columns).group_by(columns, use_threads=False).aggregate([]).to_pylist()
            self.first.setdefault(axis, values[0])
            if len(values) > 1 or values[0] != self.first[axis]:
                self.varies.add(axis)

    def result(self, axes: list[str]) -> tuple[list[str], list[dict], int]:
        """(the axes its rows differ on, its first MAX_GRID rows in grid order, its rows)."""
        group = sorted(self.kept.to_pylist(), key=row_order)
        return [a for a in axes if a in self.varies], group, len(np.unique(np.concatenate([self.keys, *self.pending])))


def latest_rows(table: pa.Table) -> pa.Table:
    """One row per id, as report_data._latest: its latest success, else its latest failure."""
    keys = pa.table({"id": table.column(C.ROW_ID), "ok": pc.is_null(table.column(C.ERROR)),
                     "at": table.column(C.FINISHED_AT)})
    table = table.take(pc.sort_indices(keys, sort_keys=[("id", "ascending", "at_start"), ("ok", "ascending", "at_start"),
                                                        ("at", "ascending", "at_start")]))
    ids = table.column(C.ROW_ID).combine_chunks()
    last = pc.not_equal(ids.slice(0, len(ids) - 1), ids.slice(1)) if len(ids) > 1 else pa.array([], pa.bool_())
    return table.filter(pa.concat_arrays([last, pa.array([True])])) if len(ids) else table


def swept_keys(dataset: pads.Dataset, columns: list[str]) -> np.ndarray:
    """The sorted prompt hashes whose rows hash differently on `columns`: per prompt, the least and greatest hash
    of its rows' axis values, merged as batches come in BUCKETS by hash, so that a merge's temporaries are one
    bucket's (a 64-bit hash: two prompts or two settings share one with probability ~n²/2^65)."""
    merged, pending = [None] * BUCKETS, [[] for _ in range(BUCKETS)]
    for frame in gathered(batches(dataset, [C.PROMPT, *columns])):
        part = pl.DataFrame({"p": frame[C.PROMPT].hash(SEED), "a": frame.select(columns).hash_rows(SEED)})
        part = part.group_by("p").agg(lo=pl.col("a").min(), hi=pl.col("a").max(), b=pl.col("p").first() // BUCKET_SPAN)
        for (bucket,), piece in part.partition_by("b", as_dict=True, include_key=False).items():
            pending[bucket].append(piece)
            if sum(map(len, pending[bucket])) >= max(MERGE_ROWS // BUCKETS, _len(merged[bucket])):
                merged[bucket], pending[bucket] = _merge([merged[bucket], *pending[bucket]]), []
    swept = []
    for bucket in range(BUCKETS):
        done, merged[bucket], pending[bucket] = _merge([merged[bucket], *pending[bucket]]), None, []
        if done is not None:
            swept.append(done.filter(pl.col("lo") != pl.col("hi"))["p"].to_numpy())
    return np.sort(np.concatenate(swept)) if swept else np.zeros(0, np.uint64)


def gathered(record_batches) -> pl.DataFrame:
    """The batches as frames of at least report_data.BATCH_ROWS rows (small parts, one polars call each, took most
    of the time)."""
    held, rows = [], 0
    for batch in record_batches:
        held.append(batch)
        rows += batch.num_rows
        if rows >= report_data.BATCH_ROWS:
            yield pl.from_arrow(pa.Table.from_batches(held))
            held, rows = [], 0
    if held:
        yield pl.from_arrow(pa.Table.from_batches(held))


def _merge(parts: list) -> pl.DataFrame | None:
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return pl.concat(parts).group_by("p").agg(lo=pl.col("lo").min(), hi=pl.col("hi").max())


def _len(frame: pl.DataFrame | None) -> int:
    return 0 if frame is None else len(frame)


def first_prompts(dataset: pads.Dataset, swept: np.ndarray, n: int) -> list[str]:
    """The first n prompts by name whose hash is in `swept` (a running top-n)."""
    if not len(swept):
        return []
    best = pl.Series(C.PROMPT, [], pl.String)
    for frame in gathered(batches(dataset, [C.PROMPT])):
        prompts = frame[C.PROMPT]
        chosen = prompts.filter(_member(prompts.hash(SEED).to_numpy(), swept))
        best = pl.concat([best, chosen]).unique().sort().head(n)
    return best.to_list()
