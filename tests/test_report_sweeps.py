"""The report's sweep search over a manifest of many small batches: the swept prompts counted once each, the
first shown by name, unswept prompts (however their rows repeat) and a null against a value told apart."""

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import report_data, report_sweeps
from stages import columns as C
from stages.writer import MANIFEST_SCHEMA


def write_manifest(root, rows: list[dict], parts: int) -> None:
    folder = os.path.join(root, "manifest")
    os.makedirs(folder)
    for k in range(parts):
        chunk = rows[k::parts]
        table = pa.table({f.name: pa.array([r.get(f.name) for r in chunk], f.type) for f in MANIFEST_SCHEMA},
                         schema=MANIFEST_SCHEMA)
        pq.write_table(table, os.path.join(folder, f"part-{k:03d}.parquet"))


def row(prompt: str, n: int, seed, height=1024) -> dict:
    return {C.ROW_ID: f"{prompt}-{n}".ljust(32, "0"), C.PROMPT: prompt, C.SEED: seed, C.HEIGHT: height,
            C.WIDTH: 1024, C.IMAGE_URI: f"/nowhere/{prompt}-{n}.png"}


def hex_id(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()[:32]


def test_swept_prompts_are_counted_once_and_the_first_are_shown_by_name(tmp_path, monkeypatch):
    rows = [row(f"s{i:02d}", n, seed=n) for i in range(25) for n in range(3)]  # 25 swept on the seed
    rows += [row("s07", 1, seed=1)]  # a retried block's copy: the same row twice
    rows += [row(f"a{i:02d}", n, seed=9) for i in range(30) for n in range(2)]  # unswept, sorting first
    rows += [row("n-seed", 0, seed=None), row("n-seed", 1, seed=4)]  # a null against a value
    rows += [row("n-size", 0, seed=3, height=512), row("n-size", 1, seed=3)]  # resolution is not declared
    write_manifest(tmp_path, rows, parts=5)
    monkeypatch.setattr(report_data, "BATCH_ROWS", 7)
    monkeypatch.setattr(report_sweeps, "MERGE_ROWS", 4)  # partial results merged many times
    view = report_data.read_view(str(tmp_path), {}, [C.SEED])
    assert view.swept_prompts == 26
    shown = [prompt for prompt, _, _, _ in view.sweeps]
    assert shown == ["n-seed", *(f"s{i:02d}" for i in range(19))]
    assert {(p, tuple(axes), total) for p, axes, _, total in view.sweeps} == \
        {("n-seed", (C.SEED,), 2), *((f"s{i:02d}", (C.SEED,), 3) for i in range(19))}
    by_size = report_data.read_view(str(tmp_path), {}, ["resolution"])
    assert [p for p, _, _, _ in by_size.sweeps] == ["n-size"] and by_size.swept_prompts == 1


def test_a_grid_of_a_prompt_with_many_rows_is_its_first_rows_counted_once(tmp_path, monkeypatch):
    """A prompt's grid is read a batch at a time (bounded however many images it has): its first rows in grid
    order, wherever they lie among the parts, each id once with its latest success, its rows counted once."""
    rows = [{**row("many", n, seed=(n * 37) % 100), C.ROW_ID: hex_id(n)} for n in range(100)]  # seeds unordered
    first = sorted(rows, key=lambda r: r[C.SEED])[:3]
    failed = {**first[1], C.IMAGE_URI: None, C.ERROR: "NaN", C.FINISHED_AT: 1}
    rows += [failed, {**first[1], C.FINISHED_AT: 2}, {**first[1], C.IMAGE_URI: None, C.ERROR: "NaN"}]  # copies
    rows += [{**first[0], C.IMAGE_URI: None, C.ERROR: "NaN", C.FINISHED_AT: t} for t in range(3, 9)]  # 7 of one id
    rows += [{**row("other", n, seed=n, height=512 if n else 1024), C.ROW_ID: hex_id(100 + n)} for n in range(2)]
    write_manifest(tmp_path, rows, parts=6)
    monkeypatch.setattr(report_data, "BATCH_ROWS", 5)
    monkeypatch.setattr(report_sweeps, "MERGE_ROWS", 4)
    monkeypatch.setattr(report_sweeps, "MAX_GRID", 3)
    view = report_data.read_view(str(tmp_path), {}, [C.SEED, "resolution"])
    (prompt, axes, shown, total), other = view.sweeps
    assert (prompt, axes, total) == ("many", [C.SEED], 100)
    assert [r[C.ROW_ID] for r in shown] == [r[C.ROW_ID] for r in first]
    assert shown[1][C.ERROR] is None and shown[1][C.FINISHED_AT] == 2  # the latest success of the copies
    assert other[0] == "other" and other[1] == [C.SEED, "resolution"] and other[3] == 2
