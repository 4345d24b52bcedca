"""Exact resume: a rerun makes only rows without a manifest entry, skips Stage C where it was done, survives kill -9."""

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_prompts
from PIL import Image

from jobs import prompts
from jobs.generate import all_made, expanded, run
from jobs.resume import check_continuation
from jobs.spec import SpecError, spec_from_dict
from stages import columns as C
from stages import output


def job_dict(tmp_path, rows=8, **extra):
    prompts = [{C.PROMPT: f"prompt {i}", C.SEED: i} for i in range(rows)]
    return {"prompts": write_prompts(tmp_path / "p.parquet", prompts), "output": str(tmp_path / "out"),
            "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2},
            "stages": {"text": {"batch_size": 2}, "prior": {"batch_size": 2}, "decoder": {"batch_size": 2}},
            **extra}


def manifest(tmp_path):
    return pq.read_table(tmp_path / "out" / "manifest").to_pylist()


def image_bytes(rows):
    return {r[C.ROW_ID]: open(r[C.IMAGE_URI], "rb").read() for r in rows}


def stamps(tmp_path) -> dict:
    """Every file under the output's images/, embeddings/ and manifest/ with its modification time (ns)."""
    return {str(p.relative_to(tmp_path)): p.stat().st_mtime_ns for sub in ("images", "embeddings", "manifest")
            for p in (tmp_path / "out" / sub).rglob("*") if p.is_file()}


def test_rerun_makes_only_missing_rows_and_skips_stage_c_where_stored(tmp_path, ray_cluster):
    spec = spec_from_dict(job_dict(tmp_path))
    first = run(spec)
    assert first.rows == first.new == 8
    before = manifest(tmp_path)
    originals = image_bytes(before)
    finished = {r[C.ROW_ID]: r[C.FINISHED_AT] for r in before}
    parts = sorted((tmp_path / "out" / "manifest").glob("*.parquet"))
    lost = pq.read_table(parts[0]).column(C.ROW_ID).to_pylist()
    parts[0].unlink()  # as if the job had died before writing these rows' manifest part …
    (tmp_path / "out" / output.EMBEDDINGS / output.CLOSED).unlink()  # … so it never marked its end
    for row_id in lost:
        (tmp_path / "out" / "images" / row_id[:2] / f"{row_id}.png").unlink()

    kept = stamps(tmp_path)
    second = run(spec)
    after = manifest(tmp_path)
    changed = {k for k, v in stamps(tmp_path).items() if kept.get(k, v) != v}
    assert not changed, f"a rerun rewrote finished rows' objects: {sorted(changed)[:3]}"
    assert all(r[C.FINISHED_AT] == finished[r[C.ROW_ID]] for r in after if r[C.ROW_ID] not in lost)
    assert second.rows == 8 and second.new == len(lost)
    assert sorted(r[C.ROW_ID] for r in after) == sorted(originals)  # every row exactly once
    redone = [r for r in after if r[C.ROW_ID] in lost]
    assert all(r[C.PRIOR_SECONDS] == 0 for r in redone)  # Stage C came from the stored embeddings
    assert image_bytes(redone) == {k: originals[k] for k in lost}  # and the images are the same bytes

    kept = stamps(tmp_path)
    third = run(spec)
    assert third.new == 0 and len(manifest(tmp_path)) == 8
    assert stamps(tmp_path) == kept  # nothing rewritten, nothing added

    # The user drops two prompts: their entries stay, and the summary says so, then and when answered from footers.
    write_prompts(tmp_path / "p.parquet", [{C.PROMPT: f"prompt {i}", C.SEED: i} for i in range(6)])
    for fourth in (run(spec), run(spec)):
        assert (fourth.rows, fourth.new, fourth.stale, fourth.kept) == (8, 0, 2, 0)
        assert "nothing to do; 2 of the 8 rows are an earlier table's that this one no longer plans, kept" in str(fourth)


def test_a_rerun_whose_counts_add_up_still_finds_a_row_edited_in_place(tmp_path, ray_cluster):
    """A rerun whose manifest holds as many rows as the table plans skips the stages only if every planned row
    has an entry: a prompt edited in place (same count) is still made."""
    spec = spec_from_dict(job_dict(tmp_path, rows=3))
    table = prompts.scan(spec)
    planned = [r[C.ROW_ID] for r in expanded(spec, table).take_all()]
    (tmp_path / "out" / "manifest").mkdir(parents=True)
    part = tmp_path / "out" / "manifest" / "part.parquet"
    pq.write_table(pa.table({C.ROW_ID: planned}), part)
    assert all_made(spec, table, 3)
    pq.write_table(pa.table({C.ROW_ID: planned[:2] + ["0" * 32]}), part)  # one row's prompt since edited
    assert not all_made(spec, table, 3)


def test_changed_spec_is_refused_unless_overwrite(tmp_path, ray_cluster, monkeypatch):
    import jobs.passes

    original, changed = (spec_from_dict({**job_dict(tmp_path, rows=2), "generation": {
        "height": height, "width": 128, "prior_steps": 2, "decoder_steps": 2}}) for height in (128, 256))
    held_row(tmp_path, original.to_dict())  # an output holding a row of the original spec
    with monkeypatch.context() as patched, pytest.raises(
            SpecError, match=r"holds a run of another spec \(generation.height: 128 → 256\)"):
        patched.setattr(jobs.passes, "connect", lambda *args: pytest.fail("joined Ray before refusing"))
        run(changed)
    summary = run(changed, overwrite=True)
    assert summary.rows == summary.new == 2 and {r[C.HEIGHT] for r in manifest(tmp_path)} == {256}
    with pytest.raises(SpecError, match=r"holds a run of another spec \(generation.height: 256 → 128\)"):
        run(original)  # the job.yaml the run wrote binds it too
    more = spec_from_dict({**job_dict(tmp_path, rows=3), "generation": changed.to_dict()["generation"],
                           "stages": {"decoder": {"batch_size": 1}}})
    assert run(more).new == 1  # more prompt rows and other batch sizes: the output continues


def held_row(tmp_path, job: dict) -> None:
    """Make the output look like a run's that holds a row, with job.yaml `job`."""
    (tmp_path / "out" / "manifest").mkdir(parents=True)
    (tmp_path / "out" / "job.yaml").write_text(yaml.safe_dump(job))
    pq.write_table(pa.table({C.ROW_ID: ["0" * 32]}), tmp_path / "out" / "manifest" / "part.parquet")


def test_kill_the_whole_job_then_rerun_completes_it(tmp_path, model_cache):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_dict(tmp_path, rows=40)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "jobs.cli", "generate", str(tmp_path / "job.yaml")]
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest_dir = tmp_path / "out" / "manifest"
    deadline = time.time() + 300
    while time.time() < deadline and not list(manifest_dir.glob("*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # driver, local Ray and its workers, mid-run
    proc.wait()
    before = {r[C.ROW_ID]: r[C.FINISHED_AT] for r in manifest(tmp_path)}
    assert 0 < len(before) < 40, "the kill should land mid-run"

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    after = manifest(tmp_path)
    assert len(after) == 40 and len({r[C.ROW_ID] for r in after}) == 40
    assert all(before[r[C.ROW_ID]] == r[C.FINISHED_AT] for r in after if r[C.ROW_ID] in before)  # not redone
    for row in after:  # every listed image is a complete object
        with Image.open(row[C.IMAGE_URI]) as image:
            image.verify()


@pytest.mark.parametrize("key, value, shown", [("micro_batch", 4, "stages.prior.micro_batch: 8 → 4"),
                                               ("compile", True, "stages.prior.compile: False → True")])
def test_stage_settings_that_change_bits_are_refused(tmp_path, key, value, shown):
    data = job_dict(tmp_path, rows=1)
    old = spec_from_dict(data).to_dict()
    del old["stages"]["prior"]["micro_batch"], old["stages"]["prior"]["compile"]  # a job.yaml from before the keys
    held_row(tmp_path, old)  # the output holds a row: only then does its spec bind
    check_continuation(spec_from_dict(data), overwrite=False)  # the defaults: the same run
    data["stages"]["prior"][key] = value
    with pytest.raises(SpecError, match=f"holds a run of another spec \\({shown}\\)"):
        check_continuation(spec_from_dict(data), overwrite=False)
    check_continuation(spec_from_dict({**data, "stages": {"prior": {"batch_size": 3}}}), overwrite=False)


def test_a_sweep_on_an_existing_output_may_only_gain_values(tmp_path):
    """Added values (on the same axes) only add rows; a value taken away, or an axis added or taken away, would
    leave the output holding rows the spec no longer plans: refused, naming the sweep."""
    data = job_dict(tmp_path, rows=1, sweep={"seed": [1, 2], "decoder_guidance_scale": [0.0]})
    held_row(tmp_path, spec_from_dict(data).to_dict())
    for sweep in ({"seed": [1, 2, 3], "decoder_guidance_scale": [0.0]},
                  {"seed": [3, 2, 1], "decoder_guidance_scale": [0.0, 2.0]}):
        check_continuation(spec_from_dict({**data, "sweep": sweep}), overwrite=False)
    for sweep, shown in (({"seed": [1], "decoder_guidance_scale": [0.0]}, r"sweep.seed: \[1, 2\] → \[1\]"),
                         ({"seed": [1, 2]}, r"sweep.decoder_guidance_scale: \[0.0\] → None"),
                         ({"seed": [1, 2], "decoder_guidance_scale": [0.0], "prior_steps": [2]},
                          r"sweep.prior_steps: None → \[2\]")):
        with pytest.raises(SpecError, match=f"holds a run of another spec \\({shown}\\)"):
            check_continuation(spec_from_dict({**data, "sweep": sweep}), overwrite=False)


def test_images_per_prompt_on_an_existing_output_may_only_grow(tmp_path):
    """Image k of a prompt has seed + k whatever the count, so a larger images_per_prompt only adds rows; a smaller
    one would leave rows the spec no longer plans: refused, naming the key."""
    data = job_dict(tmp_path, rows=1, generation={**job_dict(tmp_path)["generation"], "images_per_prompt": 2})
    held_row(tmp_path, spec_from_dict(data).to_dict())
    check_continuation(spec_from_dict({**data, "generation": {**data["generation"], "images_per_prompt": 3}}), False)
    with pytest.raises(SpecError, match=r"holds a run of another spec \(generation.images_per_prompt: 2 → 1\)"):
        check_continuation(spec_from_dict({**data, "generation": {**data["generation"], "images_per_prompt": 1}}),
                           overwrite=False)
    with pytest.raises(SpecError, match=r"holds a run of another spec \(generation.seed: 0 → 5\)"):
        check_continuation(spec_from_dict({**data, "generation": {**data["generation"], "images_per_prompt": 3,
                                                                   "seed": 5}}), overwrite=False)
