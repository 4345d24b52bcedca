"""Re-decode: Stage B/A again from a run's stored embeddings, byte for byte with unchanged settings."""

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import reference_image, write_prompts
from PIL import Image

from jobs import row_ids
from jobs.cli import main
from jobs.decode import run_decode
from jobs.generate import run
from jobs.spec import SpecError, spec_from_dict
from stages import columns as C


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_cluster):
    tmp_path = tmp_path_factory.mktemp("decode")
    rows = [{C.PROMPT: "a lighthouse"}, {C.PROMPT: "a fox", C.DECODER_GUIDANCE: 2.0, C.NEGATIVE_PROMPT: "dark"}]
    spec = spec_from_dict({
        "prompts": write_prompts(tmp_path / "p.parquet", rows), "output": str(tmp_path / "run"),
        "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2, "images_per_prompt": 2},
        "storage_options": {"key": "not-a-real-secret"},
    })
    run(spec)
    return tmp_path, {r[C.ROW_ID]: r for r in pq.read_table(tmp_path / "run" / "manifest").to_pylist()}


def read(path):
    return open(path, "rb").read()


def test_unchanged_settings_reproduce_the_images_byte_for_byte(first_run):
    tmp_path, original = first_run
    summary = run_decode(str(tmp_path / "run"), str(tmp_path / "same"))
    again = {r[C.ROW_ID]: r for r in pq.read_table(tmp_path / "same" / "manifest").to_pylist()}
    assert summary.rows == 4 and again.keys() == original.keys()
    for row_id, row in again.items():
        assert read(row[C.IMAGE_URI]) == read(original[row_id][C.IMAGE_URI])
    resolved = yaml.safe_load((tmp_path / "same" / "job.yaml").read_text())
    assert resolved["decoded_from"] == str(tmp_path / "run")
    assert "key" not in resolved["storage_options"]  # the run's masked key is never used as a credential


def test_the_images_come_from_the_stored_embeddings(first_run, tmp_path):
    """decode reads Stage C's output from embeddings/ (it does not make it again): a stored row whose
    embeddings are zeroed decodes to another image, every other row to the same bytes."""
    import shutil

    import pyarrow as pa

    source, original = first_run
    shutil.copytree(source / "run", tmp_path / "run")
    part = sorted((tmp_path / "run" / "embeddings").glob("*.parquet"))[0]
    table = pq.read_table(part)
    changed = table.column(C.ROW_ID)[0].as_py()
    column = table.column(C.IMAGE_EMBEDDINGS).to_pylist()
    column[0] = [0.0] * len(column[0])
    table = table.set_column(table.schema.get_field_index(C.IMAGE_EMBEDDINGS), C.IMAGE_EMBEDDINGS,
                             pa.array(column, table.schema.field(C.IMAGE_EMBEDDINGS).type))
    pq.write_table(table, part)
    run_decode(str(tmp_path / "run"), str(tmp_path / "out"))
    rows = {r[C.ROW_ID]: r for r in pq.read_table(tmp_path / "out" / "manifest").to_pylist()}
    assert rows.keys() == original.keys()
    for row_id, row in rows.items():
        image, before = (np.asarray(Image.open(r[C.IMAGE_URI]), dtype=float) / 255 for r in (row, original[row_id]))
        if row_id == changed:
            assert np.abs(image - before).mean() >= 8 / 255
        else:
            assert read(row[C.IMAGE_URI]) == read(original[row_id][C.IMAGE_URI])


def test_new_decoder_settings_make_new_rows(first_run, capsys, reference_pipe):
    tmp_path, original = first_run
    code = main(["decode", str(tmp_path / "run"), str(tmp_path / "more"), "--set", "generation.decoder_steps=3",
                 "--set", " generation.decoder_guidance_scale=1.5"])  # a space as a shell line may leave
    assert code == 0 and "4 rows" in capsys.readouterr().out
    rows = pq.read_table(tmp_path / "more" / "manifest").to_pylist()
    assert {r[C.DECODER_STEPS] for r in rows} == {3} and {r[C.DECODER_GUIDANCE] for r in rows} == {1.5}
    assert not {r[C.ROW_ID] for r in rows} & original.keys()
    assert {(r[C.PROMPT], r[C.SEED]) for r in rows} == {(r[C.PROMPT], r[C.SEED]) for r in original.values()}
    old = {(r[C.PROMPT], r[C.SEED]): r for r in original.values()}
    for row in rows:  # the images diffusers makes with the new settings, not the old ones renamed
        before = old[row[C.PROMPT], row[C.SEED]]
        assert row[C.SOURCE_ROW_ID] == before[C.ROW_ID] and C.SOURCE_ROW_ID not in before
        want = {k: before[k] for k in (C.PROMPT, C.NEGATIVE_PROMPT, C.SEED, C.HEIGHT, C.WIDTH, C.PRIOR_GUIDANCE,
                                       C.PRIOR_STEPS)}
        expected = reference_image(reference_pipe, {**want, C.DECODER_STEPS: 3, C.DECODER_GUIDANCE: 1.5})
        image = np.asarray(Image.open(row[C.IMAGE_URI])) / 255.0
        assert np.abs(image - expected).max() <= 1 / 255 + 1e-6
        assert np.abs(image - np.asarray(Image.open(before[C.IMAGE_URI])) / 255.0).mean() >= 8 / 255
    embeddings = pq.read_table(tmp_path / "more" / "embeddings").column(C.ROW_ID).to_pylist()
    assert sorted(embeddings) == sorted(r[C.ROW_ID] for r in rows)  # the new output can be decoded again


def test_stage_c_settings_cannot_change(first_run):
    tmp_path, _ = first_run
    with pytest.raises(SpecError, match="decode: generation.height cannot change"):
        run_decode(str(tmp_path / "run"), str(tmp_path / "bad"), ["generation.height=256"])
    with pytest.raises(SpecError, match="^generation.decoder_step: unknown key .did you mean 'decoder_steps'"):
        run_decode(str(tmp_path / "run"), str(tmp_path / "bad"), ["generation.decoder_step=3"])  # a typo
    with pytest.raises(SpecError, match="nothing does not exist"):
        run_decode(str(tmp_path / "nothing"), str(tmp_path / "bad"))
    (tmp_path / "empty").mkdir(exist_ok=True)
    with pytest.raises(SpecError, match="empty is not a run folder"):
        run_decode(str(tmp_path / "empty"), str(tmp_path / "bad"))
    job = (tmp_path / "run" / "job.yaml").read_bytes()
    (tmp_path / "link").unlink(missing_ok=True)
    (tmp_path / "link").symlink_to(tmp_path / "run")
    for same in (str(tmp_path / "run") + "/", f"{tmp_path}/x/../run", f"{tmp_path}/./run", str(tmp_path / "link")):
        with pytest.raises(SpecError, match="is the run itself; decode writes a new output"):
            run_decode(str(tmp_path / "run"), same, overwrite=True)  # --overwrite would delete the run
    assert (tmp_path / "run" / "job.yaml").read_bytes() == job  # the source run is left as it was
    assert len(list((tmp_path / "run" / "embeddings").glob("*.parquet")))
    with pytest.raises(SpecError, match="is inside the run .* choose a folder beside it"):
        run_decode(str(tmp_path / "run"), str(tmp_path / "link" / "new"))  # a later --overwrite of the run
    with pytest.raises(SpecError, match="output is decode's second argument"):
        run_decode(str(tmp_path / "run"), str(tmp_path / "bad"), [f"output={tmp_path / 'run'}"])


def test_storage_options_set_on_the_command_line_read_the_run_too(tmp_path, ray_cluster):
    """`--set storage_options.k=v` reads the run with it, and adds it to the run's own options (not instead)."""
    from jobs.decode import read_options

    assert read_options([], {"anon": True}) == {"anon": True}
    assert read_options(["storage_options.endpoint_url=http://x", "generation.decoder_steps=3"],
                        {"anon": True}) == {"anon": True, "endpoint_url": "http://x"}
    (tmp_path / "run" / "embeddings").mkdir(parents=True)
    (tmp_path / "run" / "job.yaml").write_text(yaml.safe_dump({
        "prompts": str(tmp_path / "p.parquet"), "output": str(tmp_path / "run"),
        "storage_options": {"auto_mkdir": True, "key": "***"}}))  # a masked credential is never used
    run_decode(str(tmp_path / "run"), str(tmp_path / "out"), ["storage_options.use_listings_cache=false"])
    written = yaml.safe_load((tmp_path / "out" / "job.yaml").read_text())  # a run with no stored row: none made
    assert written["storage_options"] == {"auto_mkdir": True, "use_listings_cache": False}


def test_a_decode_into_another_run_is_refused(first_run, tmp_path):
    """An output holding a generate run of the same settings (or another run's decode) is not merged into."""
    import shutil

    source, _ = first_run
    shutil.copytree(source / "run", tmp_path / "other")  # a run of its own, made from a prompt table
    job = (tmp_path / "other" / "job.yaml").read_bytes()
    with pytest.raises(SpecError, match=r"holds a run of another spec \(decoded_from: None → "):
        run_decode(str(source / "run"), str(tmp_path / "other"))
    assert (tmp_path / "other" / "job.yaml").read_bytes() == job


def test_an_interrupted_decode_resumes_with_only_its_missing_rows(first_run):
    """A decode rerun on its output makes only the rows without an entry (matched by their new ids), each once."""
    tmp_path, _ = first_run
    out, settings = tmp_path / "resumed", ["generation.decoder_steps=3"]  # new ids: the anti-join must map them
    run_decode(str(tmp_path / "run"), str(out), settings)
    parts = sorted((out / "manifest").glob("*.parquet"))
    rows = [r for part in parts for r in pq.read_table(part).to_pylist()]
    lost = rows[0]
    lost_bytes, kept = read(lost[C.IMAGE_URI]), {r[C.IMAGE_URI]: Path(r[C.IMAGE_URI]).stat().st_mtime_ns
                                                  for r in rows[1:]}
    for part in parts:  # as if the run died before writing the entry (and the image) of one row
        table = pq.read_table(part)
        pq.write_table(table.filter(pc.not_equal(table[C.ROW_ID], lost[C.ROW_ID])), part)
    Path(lost[C.IMAGE_URI]).unlink()
    (out / "_finished").unlink(missing_ok=True)
    (out / "embeddings" / "_closed").unlink()  # killed: the pass never ended; the row's embeddings are stored

    summary = run_decode(str(tmp_path / "run"), str(out), settings)
    again = pq.read_table(out / "manifest").column(C.ROW_ID).to_pylist()
    assert summary.new == 1 and sorted(again) == sorted(r[C.ROW_ID] for r in rows)
    stored = pq.read_table(out / "embeddings").column(C.ROW_ID).to_pylist()
    assert sorted(stored) == sorted(again)  # the row in flight was decoded from there, not stored twice
    assert read(lost[C.IMAGE_URI]) == lost_bytes
    assert {uri: Path(uri).stat().st_mtime_ns for uri in kept} == kept  # done rows were not made again


def test_a_decode_at_another_dtype_names_both_dtypes_in_its_ids(first_run):
    """Stage C ran at float32: a bfloat16 re-decode's rows are neither the run's nor a bfloat16 run's (whose
    Stage C ran at bfloat16), and decoding those back at float32 gives the run's own ids and bytes again."""
    tmp_path, original = first_run
    run_decode(str(tmp_path / "run"), str(tmp_path / "bf16"), ["model.dtype=bfloat16"])
    rows = pq.read_table(tmp_path / "bf16" / "manifest").to_pylist()
    assert {r[C.CHECKPOINT] for r in rows} == {'prior="tiny" decoder=tiny dtype=float32 decoder_dtype=bfloat16'}
    as_generated = {k: np.asarray([r[k] for r in rows], dtype=object) for k in (*row_ids.ID_COLUMNS, C.PRIOR_CHECKPOINT)}
    row_ids.identify(as_generated, dict(decoder="tiny", dtype="bfloat16"))
    ids = {r[C.ROW_ID] for r in rows}
    assert len(ids) == 4 and not ids & original.keys() and not ids & set(as_generated[C.ROW_ID])

    import shutil

    shutil.copytree(tmp_path / "bf16", tmp_path / "moved")  # its source run gone, its Stage C model too: a decode
    job = yaml.safe_load((tmp_path / "moved" / "job.yaml").read_text())  # needs neither
    job.update(decoded_from=str(tmp_path / "gone"), model={**job["model"], "prior": str(tmp_path / "no-prior")})
    (tmp_path / "moved" / "job.yaml").write_text(yaml.safe_dump(job))
    run_decode(str(tmp_path / "moved"), str(tmp_path / "back"), ["model.dtype=float32"])
    back = {r[C.ROW_ID]: r for r in pq.read_table(tmp_path / "back" / "manifest").to_pylist()}
    assert back.keys() == original.keys()
    assert all(read(row[C.IMAGE_URI]) == read(original[i][C.IMAGE_URI]) for i, row in back.items())


def test_made_rows_without_stored_embeddings_are_said_and_exit_1(first_run, tmp_path, capsys):
    """An embeddings part deleted from the run: its made rows cannot be decoded; the decode says how many and exits 1
    (it said "made" for the rest and exited 0), the rest decoded as before; rows that failed in the run's Stage C
    (nothing stored) are said too (the decode said nothing of them)."""
    import shutil

    import pyarrow as pa

    source, original = first_run
    shutil.copytree(source / "run", tmp_path / "run")
    part = sorted((tmp_path / "run" / "embeddings").glob("*.parquet"))[0]
    table = pq.read_table(part)
    assert table.num_rows >= 3
    pq.write_table(table.take([1, *range(3, table.num_rows)]), part.with_name("other.parquet"))  # rows 0, 2 lost
    part.unlink()
    lost = 1
    manifest = sorted((tmp_path / "run" / "manifest").glob("*.parquet"))[0]  # a row that failed in Stage B/A
    entries = pq.read_table(manifest)  # (its embeddings stored: "made − failed − stored" counted no row lost)
    ids = entries.column(C.ROW_ID).to_pylist()
    failed = {ids.index(table.column(C.ROW_ID)[1].as_py()): "Stage B/A: non-finite output",  # stored its Stage C
              ids.index(table.column(C.ROW_ID)[2].as_py()): "Stage C: non-finite output"}  # stored nothing
    errors = [failed.get(i) for i in range(entries.num_rows)]
    pq.write_table(entries.set_column(entries.schema.get_field_index(C.ERROR), C.ERROR, pa.array(errors, pa.string())),
                   manifest)
    assert main(["decode", str(tmp_path / "run"), str(tmp_path / "out")]) == 1
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{lost} made rows of {tmp_path / 'run'} have no stored Stage C embeddings" in line
    assert f"1 rows of {tmp_path / 'run'} failed before their Stage C output was stored and are not decoded" in line
    assert len(pq.read_table(tmp_path / "out" / "manifest").column(C.ROW_ID)) == len(original) - lost - 1
    assert main(["decode", str(tmp_path / "run"), str(tmp_path / "out")]) == 1  # a finished one says it again
    assert "have no stored Stage C embeddings" in capsys.readouterr().out


def test_rows_made_identical_by_new_settings_are_decoded_once(first_run, tmp_path):
    """A run whose rows differ only in a decoder setting (a sweep) re-decoded with one value for it: its rows
    become one row each, made once, its input_rows counting them (the manifest held each id twice)."""
    import shutil

    import pyarrow as pa

    source, original = first_run
    shutil.copytree(source / "run", tmp_path / "run")
    part = sorted((tmp_path / "run" / "embeddings").glob("*.parquet"))[0]
    table = pq.read_table(part)
    twin = table.slice(0, 1)  # the same Stage C row at another decoder guidance, as a sweep stores it
    twin = twin.set_column(twin.schema.get_field_index(C.ROW_ID), C.ROW_ID, pa.array(["f" * 32]))
    twin = twin.set_column(twin.schema.get_field_index(C.DECODER_GUIDANCE), C.DECODER_GUIDANCE, pa.array([5.0]))
    pq.write_table(twin, part.with_name("twin.parquet"))
    summary = run_decode(str(tmp_path / "run"), str(tmp_path / "out"), ["generation.decoder_guidance_scale=2.0"])
    rows = pq.read_table(tmp_path / "out" / "manifest").to_pylist()
    assert len({r[C.ROW_ID] for r in rows}) == len(rows) == len(original)
    assert sorted(r[C.INPUT_ROWS] for r in rows) == [1] * (len(original) - 1) + [2]
    assert summary.folded == 1
    stored = pq.read_table(tmp_path / "out" / "embeddings").column(C.ROW_ID).to_pylist()
    assert sorted(stored) == sorted(r[C.ROW_ID] for r in rows)


def test_stored_rows_without_input_rows_count_one_each():
    """A decode of a decode stores input_rows null (no fold ran): each such row is one input row, so rows made
    identical by new settings count them all (here 1 + 1 + 3), not 0 each."""
    import pyarrow as pa

    from jobs.decode import NEW_ID, stored_keys
    from stages import output
    from stages.writer import PARAMS_SCHEMA

    row = {C.PROMPT: "a fox", C.NEGATIVE_PROMPT: "", C.SEED: 7, C.HEIGHT: 128, C.WIDTH: 128, C.PRIOR_STEPS: 2,
           C.PRIOR_GUIDANCE: 4.0, C.DECODER_STEPS: 2, C.IMAGE_INDEX: 0, C.CHECKPOINT: "c", C.PRIOR_CHECKPOINT: "p"}
    rows = [{**row, C.ROW_ID: f"r{i}", C.DECODER_GUIDANCE: g, C.INPUT_ROWS: n}
            for i, (g, n) in enumerate([(1.0, None), (2.0, None), (3.0, 3)])]  # a sweep over decoder guidance
    table = pa.Table.from_pylist(rows, schema=PARAMS_SCHEMA)
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    batch[output.PATH] = np.asarray(["part.parquet"] * 3, dtype=object)
    keys = stored_keys(batch, {C.DECODER_GUIDANCE: 2.0}, {"decoder": "d", "dtype": "bfloat16"})
    assert len(set(keys[NEW_ID])) == 1  # one row once re-decoded ...
    assert keys[C.INPUT_ROWS].tolist() == [1, 1, 3]  # ... of 5 input rows


def test_a_resumed_decode_reads_each_stored_part_once_for_its_footer_and_once_for_its_keys(first_run, counted_s3):
    """A decode resumed on S3 reads each of the run's embeddings footers once (stored rows and column types in one
    pass) and each part's keys once (made, counted and kept in one pass), the part holding a row left once more
    (to decode it), and the first part for its Stage C dtype and schema."""
    import pyarrow as pa
    import s3fs

    from stages import footers, output
    from stages.writer import PARAMS_SCHEMA

    source, _ = first_run
    options, requests = counted_s3
    fs, run_uri, out = s3fs.S3FileSystem(**options), "s3://decode-reads/run", "s3://decode-reads/out"
    fs.mkdir("decode-reads")
    fs.put(str(source / "run" / "job.yaml"), "decode-reads/run/job.yaml")
    stored = pq.read_table(source / "run" / "embeddings")
    for i in range(stored.num_rows):  # a part a row
        with fs.open(f"decode-reads/run/embeddings/{i}.parquet", "wb") as f:
            pq.write_table(stored.slice(i, 1), f)
    requests.seen.clear()
    footers.part_counts(run_uri, output.EMBEDDINGS, options)
    footer = requests.reads("run/embeddings")  # what one read of each footer costs
    requests.seen.clear()
    keys = output.read_parts(run_uri, output.EMBEDDINGS, options, include_paths=True,
                             columns=[f.name for f in PARAMS_SCHEMA]).take_all()
    read_once = requests.reads("run/embeddings")  # … and one read of each part's keys
    assert len(footer) == len(read_once) == stored.num_rows == 4

    run_decode(run_uri, out, storage_options=options)
    lost = stored.column(C.ROW_ID)[1].as_py()  # the same id in the decode (the same settings)
    for part in fs.glob("decode-reads/out/*/*.parquet"):  # as if the decode died before storing the row
        with fs.open(part, "rb") as f:
            table = pq.read_table(f)
        with fs.open(part, "wb") as f:
            pq.write_table(table.filter(pc.not_equal(table[C.ROW_ID], pa.scalar(lost))), f)
    fs.rm("decode-reads/out/_finished")
    requests.seen.clear()
    assert run_decode(run_uri, out, storage_options=options).new == 1
    reads = requests.reads("run/embeddings")
    ids = pq.read_table("decode-reads/out/manifest", filesystem=fs).column(C.ROW_ID).to_pylist()
    assert sorted(ids) == sorted(stored.column(C.ROW_ID).to_pylist())  # each row once
    holder = {k[output.PATH].rsplit("/", 1)[-1] for k in keys if k[C.ROW_ID] == lost}
    for name in footer:
        once = footer[name] + read_once[name] + (name in holder)
        assert reads[name] <= once + 2 if name == "0.parquet" else reads[name] == once, (name, reads, once)
