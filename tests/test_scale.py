"""Scale: done rows dropped inside Ray (no row lost or doubled), atomic manifest compaction, and the streaming
report's counts, over a few hundred thousand synthetic manifest rows."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.report import build_report
from jobs.report_data import read_view
from stages import columns as C
from stages import compaction, footers, output, partitions
from stages.writer import MANIFEST_SCHEMA

ROWS = 300_000
PARTS = 150


def random_ids(n: int, seed: int) -> list[str]:
    raw = np.random.default_rng(seed).integers(0, 256, size=(n, 16), dtype=np.uint8)
    return [bytes(r).hex() for r in raw]


def manifest_table(ids: list[str], failed: bool = False, prompt: str = "p", input_rows: int | None = None) -> pa.Table:
    n = len(ids)
    columns = {C.ROW_ID: ids, C.PROMPT: [f"{prompt} {i}" for i in range(n)], C.SEED: np.arange(n),
               C.IMAGE_URI: [None if failed else f"/nowhere/{i}.png" for i in ids],
               C.ERROR: ["boom" if failed else None] * n, C.DECODER_SECONDS: np.full(n, 0.5),
               C.INPUT_ROWS: [input_rows] * n}
    return pa.table({f.name: pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
                     for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA)


def write_parts(root, ids: list[str], parts: int, name: str = "part", **kwargs) -> None:
    folder = os.path.join(root, output.MANIFEST)
    os.makedirs(folder, exist_ok=True)
    for k, chunk in enumerate(np.array_split(np.asarray(ids, dtype=object), parts)):
        pq.write_table(manifest_table(list(chunk), **kwargs), os.path.join(folder, f"{name}-{k:05d}.parquet"))


def id_set(ids: list[str]):
    """(dataset, count) of row ids, as --retry-failed hands them on inside Ray."""
    import ray

    return ray.data.from_arrow(pa.table({C.ROW_ID: sorted(set(ids))})), len(set(ids))


def live_ids(root) -> list[str]:
    fs, files = output.list_parts(str(root), output.MANIFEST, {})
    return pq.ParquetDataset(files).read(columns=[C.ROW_ID]).column(C.ROW_ID).to_pylist()


def test_done_rows_are_dropped_inside_ray_exactly(tmp_path, ray_cluster):
    """A rerun's rows minus the manifest's: every new row stays once, no done row survives (anti-join)."""
    done, new = random_ids(ROWS, 1), random_ids(1000, 2)
    write_parts(tmp_path, done, PARTS)
    planned = ray_cluster.data.from_arrow(pa.table({C.ROW_ID: done[::3] + new, "payload": range(len(done[::3]) + 1000)}))
    left = output.drop_done(planned, str(tmp_path), {}, done_rows=ROWS).take_all()
    kept = [r[C.ROW_ID] for r in left]
    assert len(kept) == len(new) and set(kept) == set(new)
    assert {r["payload"] for r in left} == set(range(len(done[::3]), len(done[::3]) + 1000))  # rows kept whole


def test_a_resume_with_few_rows_done_joins_in_partitions_sized_by_the_planned_rows(tmp_path, ray_cluster, monkeypatch):
    """A resume at 1% done: each join task holds ~ROWS_PER_PARTITION of the planned rows, not half of them
    (at 10M planned rows, 5M rows of ~330 B in one task)."""
    monkeypatch.setattr(partitions, "ROWS_PER_PARTITION", 500)
    done, new = random_ids(50, 3), random_ids(5000, 4)
    write_parts(tmp_path, done, 2)
    planned = ray_cluster.data.from_arrow(pa.table({C.ROW_ID: done + new}))
    left = output.drop_done(planned, str(tmp_path), {}, done_rows=len(done), rows=len(done) + len(new))
    blocks = [len(block[C.ROW_ID]) for block in left.iter_batches(batch_size=None)]
    assert sum(blocks) == len(new) and max(blocks) <= 2 * partitions.ROWS_PER_PARTITION, blocks


def test_in_flight_rows_read_back_only_from_their_parts(tmp_path, ray_cluster):
    """Stored Stage C rows without a manifest entry come back whole, each once; done ones are not read."""
    ids = random_ids(3000, 3)
    write_parts(tmp_path, ids[:2500], 5)
    folder = tmp_path / output.EMBEDDINGS
    folder.mkdir()
    for k in range(5):  # 700 rows a part: part 2 holds done rows and rows in flight, parts 3 and 4 only the latter
        chunk = ids[k * 700:(k + 1) * 700]
        pq.write_table(pa.table({C.ROW_ID: chunk, "vector": [[k, i] for i in range(len(chunk))]}),
                       folder / f"e{k}.parquet")
    os.remove(tmp_path / output.MANIFEST / "part-00004.parquet")  # rows 2000-2499 in flight too
    pending = output.in_flight(str(tmp_path), {}, done_rows=2000)
    rows = output.stored_rows(pending, str(tmp_path), {}).take_all()
    assert sorted(r[C.ROW_ID] for r in rows) == sorted(ids[2000:])
    assert all(list(r["vector"])[0] == ids.index(r[C.ROW_ID]) // 700 for r in rows)
    assert output.in_flight(str(tmp_path), {}, done_rows=0) is not None  # nothing done: everything in flight


def test_in_flight_rows_are_looked_for_only_in_parts_written_since_the_last_clean_end(tmp_path, ray_cluster):
    """A resume reads only the embeddings parts written after the last pass that ended (embeddings/_closed): an
    older part is not opened at all (here one is not even Parquet), newer ones are, in flight rows found."""
    ids = random_ids(400, 4)
    write_parts(tmp_path, ids[:300], 3)
    folder = tmp_path / output.EMBEDDINGS
    folder.mkdir()
    for k in range(3):  # parts of a pass that ended: every row has its entry
        pq.write_table(pa.table({C.ROW_ID: ids[k * 100:(k + 1) * 100]}), folder / f"old{k}.parquet")
    (folder / "old1.parquet").write_bytes(b"not parquet: would fail if it were read")
    past = os.stat(folder / "old0.parquet").st_mtime - 60
    for k in range(3):
        os.utime(folder / f"old{k}.parquet", (past, past))
    output.mark_closed(str(tmp_path), {})
    pq.write_table(pa.table({C.ROW_ID: ids[250:400]}), folder / "new.parquet")  # 100 rows in flight
    pending = output.in_flight(str(tmp_path), {}, done_rows=300)
    assert sorted(r[C.ROW_ID] for r in pending.take_all()) == sorted(ids[300:])


def test_parts_of_other_schemas_are_compacted_apart(tmp_path):
    """Parts with a user column added in a later pass, and parts where that column's type changed but its Parquet
    storage did not (int64 → timestamp), merge only with parts of their own schema: no value is cast."""
    ids = random_ids(420, 5)
    folder = tmp_path / output.MANIFEST
    write_parts(tmp_path, ids[:140], 70, name="a")
    for name, kind, chunk_ids in (("b", pa.int64(), ids[140:280]), ("c", pa.timestamp("us"), ids[280:])):
        for k, chunk in enumerate(np.array_split(np.asarray(chunk_ids, dtype=object), 70)):
            table = manifest_table(list(chunk)).append_column("batch", pa.array(np.arange(len(chunk)), kind))
            pq.write_table(table, folder / f"{name}-{k:05d}.parquet")
    assert compaction.compact(str(tmp_path), output.MANIFEST, {}) == 210
    fs, files = output.list_parts(str(tmp_path), output.MANIFEST, {})
    assert len(files) == 3 and all(f.rsplit("/", 1)[-1].startswith(output.COMPACTED_PREFIX) for f in files)
    found = {}
    for file in files:
        table = pq.read_table(file)
        kind = table.schema.field("batch").type if "batch" in table.column_names else None
        found[str(kind)] = sorted(table.column(C.ROW_ID).to_pylist())
    assert found == {"None": sorted(ids[:140]), "int64": sorted(ids[140:280]), "timestamp[us]": sorted(ids[280:])}


def test_compaction_keeps_every_row_once_at_every_step(tmp_path):
    """Small parts merge into compacted ones; an interrupted compaction (sources still there) and a finished
    one both list each row exactly once, and the next compaction clears the leftovers."""
    ids = random_ids(ROWS, 4)
    write_parts(tmp_path, ids, PARTS)
    folder = tmp_path / output.MANIFEST
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)
    replaced = compaction.compact(str(tmp_path), output.MANIFEST, {}, target_rows=100_000)
    assert replaced == PARTS
    compacted = sorted(os.listdir(folder))
    assert len(compacted) == 3 and all(n.startswith(output.COMPACTED_PREFIX) for n in compacted)
    assert sorted(live_ids(tmp_path)) == sorted(ids)
    for name in os.listdir(backup):  # the state a compaction cut off before its deletes leaves
        shutil.copy(backup / name, folder / name)
    assert sorted(live_ids(tmp_path)) == sorted(ids)
    assert footers.part_counts(str(tmp_path), output.MANIFEST, {}) == (ROWS, 0)
    assert compaction.compact(str(tmp_path), output.MANIFEST, {}) == 0 and sorted(os.listdir(folder)) == compacted


def test_a_later_compaction_merges_only_the_new_small_parts_into_parts_of_the_target_size(tmp_path):
    """Compacted parts stay as they are (not rewritten at each run's end); small parts fill a part up to exactly
    `target_rows` (parts of 25 rows, target 50: parts of 50)."""
    ids = random_ids(3200, 6)
    write_parts(tmp_path, ids[:1600], 64, name="a")
    assert compaction.compact(str(tmp_path), output.MANIFEST, {}, target_rows=50) == 64
    folder = tmp_path / output.MANIFEST
    first = {name: os.stat(folder / name).st_mtime_ns for name in os.listdir(folder)}
    assert len(first) == 32 and all(pq.read_metadata(folder / n).num_rows == 50 for n in first)
    write_parts(tmp_path, ids[1600:], 64, name="b")
    assert compaction.compact(str(tmp_path), output.MANIFEST, {}, target_rows=50) == 64
    after = {name: os.stat(folder / name).st_mtime_ns for name in os.listdir(folder)}
    assert len(after) == 64 and all(after[name] == first[name] for name in first)
    assert sorted(live_ids(tmp_path)) == sorted(ids)


def test_a_compaction_that_fails_midway_on_s3_leaves_no_part(s3_server, monkeypatch):
    """On an object store a compaction that fails while merging (here a part deleted after its footer was read)
    uploads nothing: a half-written compacted part would name every part it meant to replace, and readers would
    skip them all."""
    import s3fs

    direct = s3fs.S3FileSystem(**s3_server)
    direct.mkdir("compaction")
    root = "s3://compaction/run"
    ids = random_ids(640, 7)
    for k, chunk in enumerate(np.array_split(np.asarray(ids, dtype=object), 64)):
        with direct.open(f"compaction/run/{output.MANIFEST}/part-{k:05d}.parquet", "wb") as f:
            pq.write_table(manifest_table(list(chunk)), f)
    read_footers = compaction._footers

    def footers_then_a_part_vanishes(fs, files):
        footers = read_footers(fs, files)
        direct.rm(files[-1])  # gone before the merge reaches it
        return footers
    monkeypatch.setattr(compaction, "_footers", footers_then_a_part_vanishes)
    with pytest.raises(FileNotFoundError):
        compaction.compact(root, output.MANIFEST, s3_server)
    direct.invalidate_cache()
    names = [p.rsplit("/", 1)[-1] for p in direct.ls(f"compaction/run/{output.MANIFEST}")]
    assert len(names) == 63 and not any(n.startswith(output.COMPACTED_PREFIX) for n in names)
    fs, files = output.list_parts(root, output.MANIFEST, s3_server)
    live = pq.ParquetDataset(files, filesystem=fs).read(columns=[C.ROW_ID]).column(C.ROW_ID).to_pylist()
    assert sorted(live) == sorted(ids[:630])


def test_streaming_report_counts_each_row_once(tmp_path):
    """300k rows, some failed, a retried block written twice, failures later made good: the report's counts
    are the distinct rows' (the folded input rows too), and it lists only failures that never succeeded."""
    ids = random_ids(ROWS, 5)
    write_parts(tmp_path, ids[1000:-2000], PARTS)
    write_parts(tmp_path, ids[:1000], 1, name="folded", input_rows=3)  # 2000 identical input rows folded
    write_parts(tmp_path, ids[-2000:], 2, name="failed", failed=True)  # 2000 failures ...
    write_parts(tmp_path, ids[-500:], 1, name="retried")  # ... 500 of them made good later
    write_parts(tmp_path, ids[:1000], 1, name="again", input_rows=3)  # a block written twice
    page = open(build_report(str(tmp_path))).read()
    summary = dict(re.findall(r"<tr><th>(rows|succeeded|failed)</th><td>(\d+)</td></tr>", page))
    assert summary == {"rows": str(ROWS), "succeeded": str(ROWS - 1500), "failed": "1500"}
    assert "<tr><th>identical input rows folded</th><td>2000 (made once each" in page  # 4000 counting the copy
    listed = re.findall(r'<tr><td><code>([0-9a-f]{32})</code></td>', page)
    assert listed == sorted(ids[-2000:-500])[:500] and "Showing 500 of 1500 failed rows" in page
    assert re.search(r"decoder</th><td class=\"num\">(\d+)<", page).group(1) == str(ROWS)  # timed once each


def test_a_run_writes_few_large_parts(tmp_path, ray_cluster, monkeypatch):
    """A run writes about RUN_PARTS manifest and embeddings parts whatever its text batch (here 4 parts of
    6 rows for 24 rows in text batches of 2), each row once."""
    from conftest import write_prompts

    from jobs import generate, passes
    from jobs.spec import spec_from_dict

    monkeypatch.setattr(passes, "RUN_PARTS", 4)  # a 24-row run stands for a big one: 6 rows a part
    rows = [{C.PROMPT: f"prompt {i}", C.SEED: i} for i in range(24)]
    out = tmp_path / "out"
    job = {"prompts": write_prompts(tmp_path / "p.parquet", rows), "output": str(out),
           "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2},
           "stages": {name: {"batch_size": 2} for name in ("text", "prior", "decoder")}}
    generate.run(spec_from_dict(job))
    for folder in ("embeddings", "manifest"):
        sizes = [pq.ParquetFile(p).metadata.num_rows for p in (out / folder).glob("*.parquet")]
        assert sorted(sizes) == [6, 6, 6, 6], (folder, sizes)
    ids = pq.read_table(out / "manifest").column(C.ROW_ID).to_pylist()
    assert len(ids) == len(set(ids)) == 24 and len(list((out / "images").rglob("*.png"))) == 24


def test_rows_made_again_after_a_compaction_are_listed(tmp_path, ray_cluster):
    """A pass's sink writes 2-row parts, compaction merges them, --retry-failed takes one part's failed rows
    out, the next pass writes those same rows again: every row is listed once (a new part is never taken for
    a part the compaction replaced)."""
    from jobs.retry import drop_failed
    from stages.sink import ManifestSink

    ids = random_ids(128, 3)
    blocks = [manifest_table(ids[k:k + 2], failed=k == 10) for k in range(0, 128, 2)]
    ManifestSink(str(tmp_path), {}).write(blocks, None)
    assert compaction.compact(str(tmp_path), output.MANIFEST, {}) == 64
    drop_failed(str(tmp_path), {}, *id_set(ids[10:12]))
    assert sorted(live_ids(tmp_path)) == sorted(ids[:10] + ids[12:])
    ManifestSink(str(tmp_path), {}).write([manifest_table(ids[10:12])], None)  # the retry's pass
    assert sorted(live_ids(tmp_path)) == sorted(ids)


def compacting_after_listing(monkeypatch, root) -> list:
    """Make the next manifest listing stale: the listing is taken, then a real compaction of the manifest runs
    (merging and deleting the parts listed), then the listing is handed to the reader."""
    listed = output.list_parts
    ran = []

    def stale(*args, **kwargs):
        fs, files = listed(*args, **kwargs)
        if not ran and args[1] == output.MANIFEST:
            ran.append(compaction.compact(str(root), output.MANIFEST, {}))
        return fs, files
    monkeypatch.setattr(output, "list_parts", stale)
    return ran


def test_a_report_read_while_a_compaction_deletes_its_parts_counts_each_row_once(tmp_path, monkeypatch):
    """The report lists the manifest, a run closing on the same output compacts it, the report reads what it
    listed: it reads again from a fresh listing, and counts every row once."""
    ids = random_ids(ROWS // 3, 6)
    write_parts(tmp_path, ids, PARTS)
    ran = compacting_after_listing(monkeypatch, tmp_path)
    view = read_view(str(tmp_path), {}, [])
    assert ran == [PARTS] and (view.rows, view.succeeded) == (len(ids), len(ids))


def test_a_ray_read_that_lost_its_parts_to_a_compaction_names_the_part(tmp_path, ray_cluster, monkeypatch, capsys):
    """A reader in Ray (evaluate, decode) whose listed parts a compaction deleted fails with an error that
    names the part, which the command line turns into one line asking to run again."""
    write_parts(tmp_path, random_ids(1000, 7), PARTS)
    ran = compacting_after_listing(monkeypatch, tmp_path)
    with pytest.raises(Exception) as err:
        output.read_parts(str(tmp_path), output.MANIFEST, {}, columns=[C.ROW_ID]).take_all()
    assert ran == [PARTS] and re.fullmatch(rf"{tmp_path}/manifest/part-\d+\.parquet", output.vanished_part(err.value))
    from jobs import cli

    def failing(args):
        raise err.value  # as a command reading the manifest in Ray meets it
    monkeypatch.setattr(cli, "_dispatch", failing)
    assert cli.main(["report", str(tmp_path)]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith(f"error: {tmp_path}/manifest/part-") and "run the command again" in message


def test_failed_rows_are_taken_out_of_compacted_and_small_parts_exactly(tmp_path, ray_cluster):
    """--retry-failed's take-out over 300k rows: a compacted part (4 row groups) and small parts lose exactly the
    failed rows; a part of failed rows only is deleted; the compacted part keeps its footer (the parts it
    replaces) and is rewritten a row group at a time (its 4 row groups kept)."""
    from jobs.retry import drop_failed

    ids = random_ids(ROWS, 8)
    write_parts(tmp_path, ids[:200_000], 100)
    assert compaction.compact(str(tmp_path), output.MANIFEST, {}) == 100
    write_parts(tmp_path, ids[200_000:], 50, name="late")  # 2000 rows a part
    failed = ids[5:100_000:1000] + ids[200_000:202_000]  # 100 rows of the compacted part, and all of late-00000
    drop_failed(str(tmp_path), {}, *id_set(failed))
    assert sorted(live_ids(tmp_path)) == sorted(set(ids) - set(failed))
    folder = tmp_path / output.MANIFEST
    assert not (folder / "late-00000.parquet").exists() and (folder / "late-00001.parquet").exists()
    [compacted] = [pq.ParquetFile(p) for p in folder.iterdir() if p.name.startswith(output.COMPACTED_PREFIX)]
    assert compacted.metadata.num_row_groups == 4 and output.COMPACTED_FROM in compacted.schema_arrow.metadata


def test_failed_rows_of_a_compacted_part_whose_sources_are_still_there_stay_out(tmp_path, ray_cluster):
    """A compaction cut off before deleting the parts it merged, then --retry-failed takes out every row of the
    compacted part (all failed): the parts it replaced must not come back with their old error entries."""
    from jobs.retry import drop_failed

    ids = random_ids(640, 9)
    write_parts(tmp_path, ids, 64, failed=True)
    folder = tmp_path / output.MANIFEST
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)
    assert compaction.compact(str(tmp_path), output.MANIFEST, {}) == 64
    for name in os.listdir(backup):  # the state a compaction cut off before its deletes leaves
        shutil.copy(backup / name, folder / name)
    drop_failed(str(tmp_path), {}, *id_set(ids))
    assert output.list_parts(str(tmp_path), output.MANIFEST, {})[1] == []  # no part left: no old entry back
    assert footers.part_counts(str(tmp_path), output.MANIFEST, {}, nulls_of=C.ERROR) == (0, 0)


def test_a_column_is_found_in_footers_by_its_chunks(tmp_path):
    """The footer column lookup the counts use is a leaf-column index (a struct column of two fields comes first:
    the Arrow field index would be one short), and -1 for a missing column."""
    table = pa.table({"size": [{"h": 1, "w": 2}, {"h": 3, "w": 4}], C.ROW_ID: ["a", "b"], C.ERROR: [None, "boom"]})
    pq.write_table(table, tmp_path / "nested.parquet")
    meta = pq.ParquetFile(tmp_path / "nested.parquet").metadata
    assert footers.column_index(meta, C.ERROR) == 3 and footers.column_index(meta, "missing") == -1
    assert meta.row_group(0).column(3).statistics.null_count == 1
    assert footers.part_counts(str(tmp_path), ".", {}, nulls_of=C.ERROR) == (2, 1)


def test_manifest_counts_read_in_one_pass_equal_the_separate_counts(tmp_path):
    """Rows, failed rows and folded input rows (Σ input_rows - 1): from the footers where their statistics say
    (no entry stands for more than one input row), else from the input_rows column."""
    folder = tmp_path / output.MANIFEST
    write_parts(tmp_path, random_ids(10, 5), 1, name="plain")  # no input_rows column
    for name, values in (("ones", [1, 1, 1]), ("nulls", [None, None, None]), ("folded", [1, 3, None])):
        table = manifest_table(random_ids(3, hash(name) % 1000), failed=name == "folded")
        table = table.set_column(table.schema.get_field_index(C.INPUT_ROWS), C.INPUT_ROWS,
                                 pa.array(values, table.schema.field(C.INPUT_ROWS).type))
        pq.write_table(table, folder / f"{name}.parquet")
    counts = footers.manifest_counts(str(tmp_path), {})
    assert counts == (*footers.part_counts(str(tmp_path), output.MANIFEST, {}, nulls_of=C.ERROR),
                      footers.folded_rows(str(tmp_path), {})) == (19, 3, 2)
