"""`generate --retry-failed`: only the failed rows are made again; their entries are replaced, never doubled."""

import os
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from conftest import write_prompts
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from jobs.cli import main
from jobs.report import read_runs
from stages import columns as C
from stages import output

PROMPTS = [{C.PROMPT: f"prompt {i}"} for i in range(5)]


def fail_rows(manifest_dir, count):
    """Turn the first `count` entries of the manifest into failures, as the writer records them (error set, no
    image); returns their ids and deletes their images."""
    failed = []
    for part in sorted(manifest_dir.glob("*.parquet")):
        table = pq.read_table(part)
        rows = table.to_pylist()
        for row in rows[:count - len(failed)]:
            os.remove(row[C.IMAGE_URI])
            row[C.IMAGE_URI], row[C.ERROR] = None, "Stage B/A produced NaN or inf (try dtype float32)"
            failed.append(row[C.ROW_ID])
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)
    return failed


def without_row(folder, row_id):
    """Rewrite the Parquet part of `folder` holding `row_id` without it, or delete it if that was its only row
    (as a take-out does)."""
    for part in folder.glob("*.parquet"):
        table = pq.read_table(part)
        if row_id in table.column(C.ROW_ID).to_pylist():
            kept = table.filter(pc.not_equal(table.column(C.ROW_ID), row_id))
            if kept.num_rows:
                pq.write_table(kept, part)
            else:
                part.unlink()


def pixels(path):
    return np.asarray(Image.open(path))


def test_retry_failed_remakes_only_the_failed_rows_and_replaces_their_entries(tmp_path, ray_cluster, capsys):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "prompts": write_prompts(tmp_path / "p.parquet", PROMPTS), "output": str(tmp_path / "out"),
        "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2},
        "stages": {"text": {"batch_size": 2}, "prior": {"batch_size": 2}, "decoder": {"batch_size": 2}}}))
    assert main(["generate", str(tmp_path / "job.yaml")]) == 0
    capsys.readouterr()
    # No failed row: answered from the footers, the output still marked finished (a plain rerun stays instant).
    assert main(["generate", str(tmp_path / "job.yaml"), "--retry-failed"]) == 0
    assert capsys.readouterr().out.startswith("no failed rows to retry (5 rows in all); ")
    assert output.finished_record(str(tmp_path / "out"), {}) is not None
    # A mistyped output holds no run: one line, nothing created there.
    assert main(["generate", str(tmp_path / "job.yaml"), "--retry-failed", "--set", f"output={tmp_path / 'ot'}"]) == 2
    assert "holds no run whose failed rows to make again" in capsys.readouterr().err
    assert not (tmp_path / "ot").exists()
    before = {r[C.ROW_ID]: r for r in pq.read_table(tmp_path / "out" / "manifest").to_pylist()}
    images = {row_id: pixels(row[C.IMAGE_URI]) for row_id, row in before.items()}
    failed = fail_rows(tmp_path / "out" / "manifest", 3)
    stored = tmp_path / "out" / "embeddings"
    without_row(stored, failed[0])  # failed[0] failed in Stage C (no stored output), failed[1:] in Stage B/A
    # A --retry-failed killed after taking failed[1]'s entry out: the next run (here a retry) decodes it from its
    # stored Stage C output (no stored part is written again: Stage C is not redone), decodes failed[2] so too
    # (once: every part may hold rows in flight now, its own among them) and remakes failed[0] whole.
    without_row(tmp_path / "out" / "manifest", failed[1])
    output.unmark_closed(str(tmp_path / "out"), {})
    parts = {p.name: p.stat().st_mtime_ns for p in stored.glob("*.parquet")}
    assert main(["generate", str(tmp_path / "job.yaml"), "--retry-failed"]) == 0
    assert ("retried 3 failed rows (2 of them decoded from their stored Stage C output): 3 succeeded, 0 failed "
            "again (5 rows in all)") in capsys.readouterr().out
    now = {p.name: p.stat().st_mtime_ns for p in stored.glob("*.parquet")}
    assert {name: now.get(name) for name in parts} == parts and len(now) == len(parts) + 1  # failed[0]'s part
    assert read_runs(LocalFileSystem(), str(tmp_path / "out"))[-1]["made"] == 3  # the report's "images made"
    manifest = pq.read_table(tmp_path / "out" / "manifest")
    ids = manifest[C.ROW_ID].to_pylist()
    assert sorted(ids) == sorted(before) and len(set(ids)) == len(ids)  # each row exactly once
    assert pc.sum(pc.is_valid(manifest[C.ERROR])).as_py() in (0, None)
    after = {r[C.ROW_ID]: r for r in manifest.to_pylist()}
    for row_id, row in after.items():
        remade = row[C.FINISHED_AT] != before[row_id][C.FINISHED_AT]
        assert remade == (row_id in failed)  # only the failed rows were made again
        assert np.array_equal(pixels(row[C.IMAGE_URI]), images[row_id])  # the same bits, decoded or remade
    embedded = pq.read_table(stored, columns=[C.ROW_ID])[C.ROW_ID].to_pylist()
    assert sorted(embedded) == sorted(before)  # failed[0]'s Stage C output stored by the retry, none doubled


def test_retry_keeps_the_failed_rows_an_edited_table_no_longer_plans(tmp_path, ray_cluster, capsys):
    prompts = write_prompts(tmp_path / "p.parquet", PROMPTS)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "prompts": prompts, "output": str(tmp_path / "out"),
        "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2},
        "stages": {"text": {"batch_size": 4}, "prior": {"batch_size": 4}, "decoder": {"batch_size": 4}}}))
    assert main(["generate", str(tmp_path / "job.yaml")]) == 0
    failed = fail_rows(tmp_path / "out" / "manifest", 2)
    entries = {r[C.ROW_ID]: r for r in pq.read_table(tmp_path / "out" / "manifest").to_pylist()}
    gone = entries[failed[0]][C.PROMPT]
    edited = [p if p[C.PROMPT] != gone else {**p, C.PROMPT: "a prompt added in its place"} for p in PROMPTS]
    write_prompts(tmp_path / "p.parquet", edited)  # the user edits the table (as many rows as before)
    capsys.readouterr()

    parts = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "embeddings").glob("*.parquet")}
    assert main(["generate", str(tmp_path / "job.yaml"), "--retry-failed"]) == 0  # the retried row succeeded
    out = capsys.readouterr().out
    assert parts == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "embeddings").glob("*.parquet")}
    assert ("retried 1 failed rows (1 of them decoded from their stored Stage C output): 1 succeeded, 0 failed "
            "again (5 rows in all; 1 failed rows the prompt table no longer plans were left as they are); 1 planned "
            "rows have no entry yet: run without --retry-failed to make them") in out  # the prompt added in its place
    after = {r[C.ROW_ID]: r for r in pq.read_table(tmp_path / "out" / "manifest").to_pylist()}
    assert sorted(after) == sorted(entries)  # nothing lost, nothing doubled
    assert after[failed[0]][C.ERROR] == entries[failed[0]][C.ERROR] and after[failed[1]][C.ERROR] is None
    # A retry makes only failed rows, so the output is not marked finished: the next plain run is not answered
    # "nothing to do" from the footers (5 rows, 5 planned) and makes the added prompt.
    assert output.finished_record(str(tmp_path / "out"), {}) is None
    assert main(["generate", str(tmp_path / "job.yaml"), "--retry-failed"]) == 0  # no failed row it plans
    assert "no failed rows to retry (5 rows in all; 1 failed rows" in capsys.readouterr().out
    # A plain run makes the added prompt; the failed entry of the edited-out row is no failure of this table:
    # exit 0, and no hint to --retry-failed it (which would not touch it), then and on every rerun.
    assert main(["generate", str(tmp_path / "job.yaml")]) == 0
    out = capsys.readouterr().out
    stale = ("1 of the 6 rows are an earlier table's that this one no longer plans (1 of the failed ones), kept as "
             "they are: report and evaluate include them")
    assert re.search(rf"6 rows \(1 failed, 5 done earlier\); 1 made in .* images/s; {re.escape(stale)}", out), out
    assert main(["generate", str(tmp_path / "job.yaml")]) == 0  # answered from the footers
    out = capsys.readouterr().out
    assert f"6 rows (1 failed), all made earlier: nothing to do; {stale}" in out
    assert "--retry-failed" not in out


def test_a_retry_reads_each_stored_part_once(counted_s3, ray_cluster, tmp_path):
    """--retry-failed of a row that failed in Stage B/A, on S3: every embeddings part's row ids are read once (to
    find the retried rows whose Stage C output is stored), and the part holding the row once more (to decode it
    from there); no second pass over every part for rows in flight (the last pass ended: embeddings/_closed)."""
    import s3fs

    from jobs.generate import run
    from jobs.preflight import generate_job
    from jobs.spec import spec_from_dict

    options, requests = counted_s3
    fs, out = s3fs.S3FileSystem(**options), "s3://retry-reads/out"
    fs.mkdir("retry-reads")
    spec = spec_from_dict({
        "prompts": write_prompts(tmp_path / "p.parquet", PROMPTS), "output": out, "storage_options": options,
        "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2},
        "stages": {"text": {"batch_size": 2}, "prior": {"batch_size": 2}, "decoder": {"batch_size": 2}}})
    run(spec)
    time.sleep(1.1)  # S3 keeps times in whole seconds: a part stored in the second the pass ended may hold rows in
    output.mark_closed(out, options)  # flight (read again by a resume); a later pass ended: none does
    part = sorted(fs.glob("retry-reads/out/manifest/*.parquet"))[0]
    with fs.open(part, "rb") as f:
        table = pq.read_table(f)
    rows = table.to_pylist()
    fs.rm(rows[0][C.IMAGE_URI])  # a failure in Stage B/A, as the writer records it: its Stage C output stays
    rows[0][C.IMAGE_URI], rows[0][C.ERROR] = None, "Stage B/A produced NaN or inf (try dtype float32)"
    with fs.open(part, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), f)
    requests.seen.clear()
    stored = output.read_parts(out, output.EMBEDDINGS, options, columns=[C.ROW_ID], include_paths=True).take_all()
    once = requests.reads(output.EMBEDDINGS)  # one read of every part's row ids: what it costs
    holder = {r[output.PATH].rsplit("/", 1)[-1] for r in stored if r[C.ROW_ID] == rows[0][C.ROW_ID]}
    assert len(holder) == 1 and not output.written_since_closed(out, options)  # no part has rows in flight
    assert len(once) == 3

    requests.seen.clear()
    summary = generate_job(spec, retry_failed=True)
    assert (summary.retried, summary.redecoded, summary.new_failed) == (1, 1, 0)
    reads = requests.reads(output.EMBEDDINGS)  # each part's GETs: the old retry read every part twice
    assert {name: n for name, n in reads.items() if name not in holder} == {
        name: n for name, n in once.items() if name not in holder}
    assert all(reads[name] > once[name] for name in holder)  # its row decoded from there
    ids = pq.read_table("retry-reads/out/manifest", filesystem=fs).column(C.ROW_ID).to_pylist()
    assert sorted(ids) == sorted(r[C.ROW_ID] for r in stored)  # each row once
