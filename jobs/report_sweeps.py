"""The report's swept prompts in memory of ~70 bytes a prompt, whatever its text (a grouping by prompt text took
~400): one pass hashes each row's prompt and declared axes' values, a second finds the first swept prompts by
name, a third reads only their rows."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from jobs import report_data
from jobs.report_data import (MAX_GRID, MAX_PROMPTS, RESOLUTION, SHOWN, _latest, _member, axis_value, batches,
                              row_order)
from stages import columns as C

MERGE_ROWS = 1 << 20  # per-prompt partial results merged once this many are pending (or as many as merged)
BUCKETS = 16
BUCKET_SPAN = 1 << 60  # 2^64 / BUCKETS
SEED = 0x5EED  # polars' hashes are stable for one seed within a process: both passes use this one


def find_sweeps(dataset: pads.Dataset, axes: list[str]) -> tuple[list, int]:
    """(prompt, varying axes, rows in grid order, rows in all) of the first MAX_PROMPTS swept prompts (by name),
    and the number of swept prompts. A prompt is swept when its rows differ on a declared axis (nulls count)."""
    columns = [c for a in axes for c in ((C.HEIGHT, C.WIDTH) if a == RESOLUTION else (a,))]
    swept = swept_keys(dataset, columns)
    prompts = first_prompts(dataset, swept, MAX_PROMPTS)
    if not prompts:  # no prompt varies on a declared axis (a one-value sweep): no grid
        return [], 0
    rows = _latest(dataset.to_table(columns=SHOWN, filter=pc.field(C.PROMPT).isin(prompts)).to_pylist())
    by_prompt = defaultdict(list)
    for row in rows:
        by_prompt[row[C.PROMPT]].append(row)
    sweeps = []
    for prompt in prompts:
        group = sorted(by_prompt[prompt], key=row_order)
        axes_here = [a for a in axes if len({axis_value(r, a) for r in group}) > 1]
        sweeps.append((prompt, axes_here, group[:MAX_GRID], len(group)))
    return sweeps, len(swept)


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
