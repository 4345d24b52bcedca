"""Before Ray: a finished rerun is answered from metadata, models and output are checked, job.yaml comes last."""

import os
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_prompts

from jobs.cli import main
from jobs.preflight import answered, check_models
from jobs.resume import claim
from jobs.spec import SpecError, spec_from_dict
from stages import columns as C
from stages import footers, output


def spec_at(tmp_path, rows=3, **extra):
    prompts = tmp_path / "p.parquet"
    if not prompts.exists() or rows != pq.ParquetFile(prompts).metadata.num_rows:
        write_prompts(prompts, [{C.PROMPT: f"prompt {i}"} for i in range(rows)])
    return spec_from_dict({"prompts": str(prompts), "output": str(tmp_path / "out"), **extra})


def write_part(folder, name, row_ids, errors=None):
    folder.mkdir(parents=True, exist_ok=True)
    errors = errors or [None] * len(row_ids)
    pq.write_table(pa.table({C.ROW_ID: row_ids, C.ERROR: pa.array(errors, pa.string())}), folder / f"{name}.parquet")


def finished_output(tmp_path, spec, rows):
    """An output as a finished run leaves it: job.yaml, then manifest and embeddings parts."""
    claim(spec, overwrite=False)
    time.sleep(0.01)
    ids = [f"id{i}" for i in range(rows)]
    write_part(tmp_path / "out" / "manifest", "a", ids[:2], ["nan in stage C", None])
    write_part(tmp_path / "out" / "manifest", "b", ids[2:])
    write_part(tmp_path / "out" / "embeddings", "a", ids)
    time.sleep(0.01)
    output.mark_closed(spec.output, {})  # the pass ended: every stored row has its entry
    output.mark_finished(spec.output, {})  # the invocation ended


def test_a_finished_output_is_answered_from_its_footers(tmp_path, monkeypatch):
    spec = spec_at(tmp_path, rows=3, generation={"images_per_prompt": 2})
    finished_output(tmp_path, spec, rows=6)
    counted, part_counts = [], footers.part_counts
    monkeypatch.setattr(footers, "part_counts", lambda out, name, *a, **k: counted.append(name) or part_counts(
        out, name, *a, **k))
    summary = answered(spec, time.time())
    assert "embeddings" not in counted  # 39k parts at 10M rows: no part was written since the pass ended
    assert (summary.rows, summary.failed, summary.new) == (6, 1, 0)
    assert "all made earlier: nothing to do (--retry-failed makes the 1 failed rows again)" in str(summary)
    assert "images/s" not in str(summary)
    assert footers.part_counts(spec.output, "manifest", {}, nulls_of=C.ERROR) == (6, 1)
    batch_sizes = spec_from_dict({**spec.to_dict(), "stages": {"prior": {"batch_size": 1}}})
    assert answered(batch_sizes, time.time()) is not None  # placement does not decide which rows there are


def test_work_left_is_not_answered(tmp_path):
    spec = spec_at(tmp_path, rows=3)
    finished_output(tmp_path, spec, rows=3)
    assert answered(spec, time.time()) is not None
    assert answered(spec_at(tmp_path, rows=3, generation={"seed": 5}), time.time()) is None  # another spec
    assert answered(spec_at(tmp_path, rows=3, sweep={"seed": [0, 1]}), time.time()) is None  # more rows
    write_part(tmp_path / "out" / "embeddings", "b", ["waiting"])  # Stage C done, decode pending
    assert answered(spec, time.time()) is None
    os.remove(tmp_path / "out" / "embeddings" / "b.parquet")
    assert answered(spec, time.time()) is not None
    later = time.time() + 5
    os.utime(tmp_path / "p.parquet", (later, later))  # the table changed after the run: its rows may differ
    assert answered(spec, time.time()) is None
    (tmp_path / "new").mkdir()
    assert answered(spec_at(tmp_path / "new"), time.time()) is None  # no output yet


def test_a_table_moved_into_place_is_not_answered(tmp_path):
    """`mv`, `cp -p`, `rsync -a` keep an older file's modification time: the table's rows may still differ."""
    spec = spec_at(tmp_path, rows=3)
    (tmp_path / "next").mkdir()
    pq.write_table(pa.table({C.PROMPT: ["other", "prompts", "here"]}), tmp_path / "next" / "p.parquet")
    earlier = time.time() - 60
    os.utime(tmp_path / "next" / "p.parquet", (earlier, earlier))  # written before the run below
    finished_output(tmp_path, spec, rows=3)
    assert answered(spec, time.time()) is not None
    time.sleep(0.01)
    os.replace(tmp_path / "next" / "p.parquet", tmp_path / "p.parquet")
    assert os.stat(tmp_path / "p.parquet").st_mtime == earlier
    assert answered(spec, time.time()) is None


def test_a_table_edited_before_an_attempt_that_died_is_not_answered(tmp_path):
    """A prompt edited in place (same row count), then a run that claimed the output and died before making the
    new row: its job.yaml is newer than the table, yet the new row is still to make."""
    spec = spec_at(tmp_path, rows=3)
    finished_output(tmp_path, spec, rows=3)
    assert answered(spec, time.time()) is not None
    earlier = time.time() - 5
    os.utime(tmp_path / "p.parquet", (earlier, earlier))  # the edit, before the next attempt claims the output
    claim(spec, overwrite=False)  # … which then dies (placement timeout, Ctrl-C, a store outage)
    assert answered(spec, time.time()) is None
    output.mark_finished(spec.output, {})  # the rerun that followed made every planned row
    assert answered(spec, time.time()) is not None


def test_a_user_column_keeps_the_type_the_output_holds(tmp_path):
    """A later table whose own column `tag` has another type than the rows already made is refused in one line
    (the manifest's parts would no longer read as one table); the same type, or a column of nulls, is fine. The
    type is the one of any part that holds the column with values: parts written by an earlier table without the
    column, or with only nulls in it, come first in name order here."""
    from jobs.preflight import preflight

    spec = spec_at(tmp_path)
    claim(spec, overwrite=False)
    (tmp_path / "out" / "manifest").mkdir()
    parts = {"00a": pa.table({C.ROW_ID: ["id0"]}), "00b": pa.table({C.ROW_ID: ["id1"], "tag": pa.nulls(1)}),
             "ff": pa.table({C.ROW_ID: ["id2"], "tag": pa.array([1], pa.int64())})}
    for name, part in parts.items():
        pq.write_table(part, tmp_path / "out" / "manifest" / f"{name}.parquet")
    for tags, refused in ((["x", "y", "z"], True), ([4, 5, None], False), ([None, None, None], False)):
        write_prompts(tmp_path / "p.parquet", [{C.PROMPT: f"prompt {i}", "tag": t} for i, t in enumerate(tags)])
        if refused:
            with pytest.raises(SpecError, match=r"^prompts: column 'tag' is string, but the rows .* holds have it "
                                                 r"as int64: keep its type"):
                preflight(spec)
        else:
            preflight(spec)
    categorical = pa.dictionary(pa.int32(), pa.string())  # how an earlier version wrote a pandas categorical
    pq.write_table(pa.table({C.ROW_ID: ["id3"], "style": pa.array(["a"], categorical)}),
                   tmp_path / "out" / "manifest" / "fe.parquet")
    write_prompts(tmp_path / "p.parquet", [{C.PROMPT: "p", "tag": 1, "style": "b"}])  # read as string now
    table = preflight(spec)
    assert table.user_types.field("style").type == categorical and table.schema.field("style").type == pa.string()


@pytest.mark.parametrize("held, values, new, refused", [
    (pa.int64(), [3.0, None, 2.0 ** 52], pa.float64(), None),  # pandas' floats for an int column with gaps
    (pa.int64(), [1234567890123456789.0], pa.float64(), "1234567890123456768"),  # pandas rounded it: not the id
    (pa.int64(), [2.5], pa.float64(), "truncated"),
    (pa.float32(), [0.5, float("nan"), None], pa.float64(), None),
    (pa.float32(), [0.1], pa.float64(), "0.1, a value float would not keep"),
    (pa.string(), ["a"], pa.large_string(), None),
    (pa.list_(pa.field("element", pa.string(), nullable=False)), [["a"]], pa.large_list(pa.large_string()),
     "as list<element: string not null>"),  # a nullable list's null item would fail the write of the held non-null list type
])
def test_a_later_table_is_written_in_the_held_type_only_where_no_value_changes(tmp_path, held, values, new, refused):
    from jobs.preflight import preflight

    spec = spec_at(tmp_path)
    claim(spec, overwrite=False)
    (tmp_path / "out" / "manifest").mkdir()
    pq.write_table(pa.table({C.ROW_ID: ["id0"], "tag": pa.array([values[0]], held)}),
                   tmp_path / "out" / "manifest" / "part.parquet")
    pq.write_table(pa.table({C.PROMPT: [f"p{i}" for i in range(len(values))], "tag": pa.array(values, new)}),
                   tmp_path / "p.parquet")
    if refused:
        with pytest.raises(SpecError, match=f"^prompts: column 'tag' is .*{refused}"):
            preflight(spec)
    else:
        assert preflight(spec).user_types.field("tag").type == held


def test_job_yaml_of_a_failed_attempt_does_not_refuse_the_corrected_spec(tmp_path):
    spec = spec_at(tmp_path, model={"prior": "tiny"})
    claim(spec, overwrite=False)  # the attempt stopped before any row was made
    corrected = spec_at(tmp_path, generation={"height": 512})
    claim(corrected, overwrite=False)
    assert yaml.safe_load((tmp_path / "out" / "job.yaml").read_text())["generation"]["height"] == 512
    write_part(tmp_path / "out" / "manifest", "a", ["id0"])  # now the output holds rows: a change is refused
    with pytest.raises(SpecError, match=r"holds a run of another spec \(generation.height: 512 → 1024\)"):
        claim(spec, overwrite=False)


@pytest.mark.parametrize("output, reason", [("{file}/out", "Not a directory"), ("{file}", "")])
def test_an_unwritable_output_is_one_line_naming_it(tmp_path, output, reason):
    (tmp_path / "file").write_text("not a folder")
    spec = spec_at(tmp_path)
    spec = spec_from_dict({**spec.to_dict(), "output": output.format(file=tmp_path / "file")})
    with pytest.raises(SpecError, match=f"^output {spec.output}: cannot write there \\(.*{reason}.*\\)$"):
        claim(spec, overwrite=False)


def test_missing_models_in_an_object_store_are_named(tmp_path, model_cache):
    fs = fsspec.filesystem("memory")
    fs.put(str(model_cache / "prior"), "/store/prior", recursive=True)
    fs.put(str(model_cache / "prior"), "/store/half", recursive=True)
    fs.rm("/store/half/scheduler", recursive=True)
    check_models(spec_at(tmp_path, model={"prior": "memory://store/prior"}))
    cases = [({"prior": "memory://store/nope"}, "model.prior: memory://store/nope does not exist"),
             ({"prior": "memory://store/half"}, "model.prior: memory://store/half lacks the subfolder(s) scheduler"),
             ({"decoder": "memory://store/prior"}, "model.decoder: memory://store/prior lacks the subfolder(s) "
                                                   "decoder, vqgan"),
             ({"prior": {"interpolate": ["tiny", "./none"], "alpha": 0.5}}, "model.prior: directory ./none")]
    for model, message in cases:
        with pytest.raises(SpecError, match=f"^{message.replace('(', '.').replace(')', '.')}"):
            check_models(spec_at(tmp_path, model=model))
    swept = spec_at(tmp_path, sweep={"prior_checkpoint": ["tiny", {"interpolate": ["tiny", "memory://store/nope"],
                                                                  "alpha": 0.5}]})
    with pytest.raises(SpecError, match=r"^sweep.prior_checkpoint\[1\]: memory://store/nope does not exist"):
        check_models(swept)  # the swept checkpoint is named where it is, not as model.prior


def test_a_finished_output_on_an_object_store_is_answered(s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.makedirs("quick", exist_ok=True)
    fs.put(write_prompts(tmp_path / "p.parquet", [{C.PROMPT: "a"}, {C.PROMPT: "b"}]), "quick/prompts/p.parquet")
    spec = spec_from_dict({"prompts": "s3://quick/prompts/", "output": "s3://quick/out", "storage_options": s3_server})
    claim(spec, overwrite=False)
    write_part(tmp_path / "parts", "a", ["id0", "id1"])
    fs.put(str(tmp_path / "parts" / "a.parquet"), "quick/out/manifest/a.parquet")
    assert answered(spec, time.time()) is None  # the invocation has not ended
    output.mark_finished(spec.output, s3_server)
    assert answered(spec, time.time()).rows == 2
    time.sleep(1.1)  # object stores keep modification times to the second
    fs.put(str(tmp_path / "p.parquet"), "quick/prompts/p.parquet")  # rewritten after the run
    assert answered(spec, time.time()) is None


def a_run(tmp_path, job_yaml: str | None = None) -> Path:
    """A job file (tiny models) and the run folder it made: job.yaml (`job_yaml` where given), embeddings/ and a
    manifest part (a run with rows, whose spec a rerun compares)."""
    job = {"prompts": write_prompts(tmp_path / "p.parquet", [{"prompt": "a"}]), "output": str(tmp_path / "run"),
           "model": {"prior": "tiny", "decoder": "tiny"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "run" / "embeddings").mkdir(parents=True)
    (tmp_path / "run" / "manifest").mkdir()
    write_prompts(tmp_path / "run" / "manifest" / "part-0.parquet", [{"prompt": "a"}])
    (tmp_path / "run" / "job.yaml").write_text(yaml.safe_dump(job) if job_yaml is None else job_yaml)
    return tmp_path / "run"


def test_an_unknown_or_uninstalled_store_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """A URI whose protocol fsspec does not know, or whose package is not installed (gs:// without gcsfs), is one
    line naming the key or argument, the URI and why, as the prompt table's is: before anything is written."""
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "nopkg",
                        {"class": "no_such_package.FileSystem", "err": "Please install no_such_package"})
    run, job = str(a_run(tmp_path)), str(tmp_path / "job.yaml")
    cases = [(["generate", job, "--set", "output=foo://bucket/out"], "output: cannot open foo://bucket/out "
                                                                     "(Protocol not known: foo)"),
             (["generate", job, "--set", "output=nopkg://bucket/out"], "output: cannot open nopkg://bucket/out "
                                                                       "(Please install no_such_package)"),
             (["generate", job, "--set", "prompts=foo://bucket/p"], "prompts: cannot read foo://bucket/p "
                                                                    "(Protocol not known: foo)"),
             (["report", "foo://bucket/run"], "run: cannot open foo://bucket/run (Protocol not known: foo)"),
             (["decode", run, "foo://bucket/out"], "output: cannot open foo://bucket/out (Protocol not known: foo)"),
             (["decode", "nopkg://bucket/run", str(tmp_path / "new")],
              "run: cannot open nopkg://bucket/run (Please install no_such_package)"),
             (["evaluate", "foo://bucket/run", "--clip-model", "clip"],
              "run: cannot open foo://bucket/run (Protocol not known: foo)")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.strip() == f"error: {message}", argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "p.parquet", "run"]


@pytest.mark.parametrize("text, why", [
    ("", "not a job spec (empty; expected a mapping of keys)"),
    ("- prompts\n- output\n", "not a job spec (a YAML list; expected a mapping of keys)"),
    ("prompts: p\nmodel: {prior: tiny\n", "job.yaml line 3: YAML syntax error: "),
])
def test_a_corrupt_job_yaml_in_a_run_is_one_line_naming_it(tmp_path, capsys, text, why):
    """A run's job.yaml emptied, edited into another shape or cut short: report, decode and a generate that
    continues the run each say so in one line naming the file, and write nothing."""
    run = a_run(tmp_path, text)
    for argv in (["report", str(run)], ["decode", str(run), str(tmp_path / "new")],
                 ["generate", str(tmp_path / "job.yaml")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {run / 'job.yaml'}") and why in err and "\n" not in err, (argv, err)
    assert sorted(os.listdir(run)) == ["embeddings", "job.yaml", "manifest"] and not (tmp_path / "new").exists()
    assert (run / "job.yaml").read_text() == text
