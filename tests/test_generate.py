"""End to end through a real local Ray: a prompt table in, images + embeddings + manifest out."""

import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import reference_image, write_prompts
from PIL import Image

from jobs.generate import run
from jobs.spec import spec_from_dict
from stages import columns as C

# The user's own columns: `rank` an int64 column with a null, `note` a string column null in most rows (so whole
# blocks of the run hold only nulls of it); values Python objects or pandas would change: a NaN that is not a null,
# a uint64 above 2^63, nanoseconds.
PROMPTS = [
    {C.PROMPT: "a lighthouse at dawn", "topic": "sea", "rank": 3, "note": None, "score": float("nan"),
     "hash": 2 ** 64 - 1, "at": 1_700_000_000_123_456_789},
    {C.PROMPT: "a bowl of ramen", C.NEGATIVE_PROMPT: "blurry", C.DECODER_GUIDANCE: 2.0, "topic": "food",
     "rank": None, "note": None, "score": None, "hash": 5, "at": 5},
    {C.PROMPT: "an astronaut riding a horse", C.HEIGHT: 256, C.SEED: 40, "topic": "space", "rank": 1, "note": None},
    {C.PROMPT: "猫 in Tōkyō 🌭", C.WIDTH: 256, C.PRIOR_GUIDANCE: 1.0, "topic": "city", "rank": 2, "note": None},
    {C.PROMPT: "a vintage car", C.DECODER_STEPS: 3, C.SEED: 7, "topic": "road", "rank": 5, "note": "keep"},
]
TYPES = {"hash": pa.uint64(), "at": pa.timestamp("ns")}


def job(tmp_path, name, **stages):
    return spec_from_dict({
        "prompts": write_prompts(tmp_path / "prompts.parquet", PROMPTS, TYPES),
        "output": str(tmp_path / name),
        "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2, "seed": 100,
                       "images_per_prompt": 2},
        "stages": stages or {"text": {"batch_size": 4}, "prior": {"batch_size": 3}, "decoder": {"batch_size": 2}},
    })


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_cluster):
    tmp_path = tmp_path_factory.mktemp("generate")
    spec = job(tmp_path, "run1")
    summary = run(spec)
    return tmp_path, spec, summary, pq.read_table(tmp_path / "run1" / "manifest").to_pylist()


def test_every_row_in_the_manifest_exactly_once(first_run):
    _, spec, summary, manifest = first_run
    assert summary.rows == len(manifest) == 2 * len(PROMPTS) and summary.failed == 0
    assert len({r[C.ROW_ID] for r in manifest}) == len(manifest)
    by_prompt = {}
    for row in manifest:
        by_prompt.setdefault(row[C.PROMPT], []).append(row)
    for prompt in PROMPTS:
        rows = sorted(by_prompt[prompt[C.PROMPT]], key=lambda r: r[C.IMAGE_INDEX])
        base_seed = prompt.get(C.SEED, 100)
        assert [r[C.SEED] for r in rows] == [base_seed, base_seed + 1]
        for column in ("topic", "rank", "note"):  # the user's columns pass through
            assert all(r[column] == prompt[column] for r in rows), column
    exact = pq.read_table(first_run[0] / "run1" / "manifest", columns=[C.PROMPT, "score", "hash", "at"])
    exact = {row[C.PROMPT]: row for row in exact.cast(pa.schema([
        (C.PROMPT, pa.string()), ("score", pa.float64()), ("hash", pa.uint64()), ("at", pa.int64())])).to_pylist()}
    assert math.isnan(exact["a lighthouse at dawn"]["score"]) and exact["a bowl of ramen"]["score"] is None
    assert [exact[p[C.PROMPT]]["hash"] for p in PROMPTS] == [p.get("hash") for p in PROMPTS]
    assert [exact[p[C.PROMPT]]["at"] for p in PROMPTS] == [p.get("at") for p in PROMPTS]
    for row in manifest:
        assert row[C.ERROR] is None and row[C.PRIOR_STEPS] == 2
        assert row[C.IMAGE_URI].endswith(f"/images/{row[C.ROW_ID][:2]}/{row[C.ROW_ID]}.png")
        assert row[C.PRIOR_SECONDS] > 0 and row[C.DECODER_SECONDS] > 0
    assert "images/s" in str(summary) and str(spec.output) in str(summary)


def expected_rows(spec) -> dict[tuple[str, int], dict]:
    """(prompt, image k) → the settings the row must be made with: the spec's defaults, the table's
    overrides, seed + k. Computed from the input, never from the manifest under test."""
    gen = spec.generation
    defaults = {C.NEGATIVE_PROMPT: gen.negative_prompt, C.SEED: gen.seed, C.HEIGHT: gen.height, C.WIDTH: gen.width,
                C.PRIOR_GUIDANCE: gen.prior_guidance_scale, C.DECODER_GUIDANCE: gen.decoder_guidance_scale,
                C.PRIOR_STEPS: gen.prior_steps, C.DECODER_STEPS: gen.decoder_steps}
    rows = {}
    for prompt in PROMPTS:
        settings = {**defaults, **{k: v for k, v in prompt.items() if k in defaults}}
        for k in range(gen.images_per_prompt):
            rows[prompt[C.PROMPT], k] = {C.PROMPT: prompt[C.PROMPT], **settings, C.SEED: settings[C.SEED] + k}
    return rows


def test_images_match_diffusers_for_each_row_alone(first_run, reference_pipe):
    _, spec, _, manifest = first_run
    expected = expected_rows(spec)
    assert {(r[C.PROMPT], r[C.IMAGE_INDEX]) for r in manifest} == set(expected)
    for row in manifest:
        want = expected[row[C.PROMPT], row[C.IMAGE_INDEX]]
        assert {k: row[k] for k in want} == want  # the manifest records what was asked
        image = np.asarray(Image.open(row[C.IMAGE_URI]))
        reference = reference_image(reference_pipe, want)
        assert image.shape == (want[C.HEIGHT], want[C.WIDTH], 3)
        assert np.abs(image / 255.0 - reference).max() <= 1 / 255 + 1e-6, row[C.PROMPT]


def test_embeddings_and_resolved_spec_are_stored(first_run):
    tmp_path, spec, _, manifest = first_run
    embeddings = pq.read_table(tmp_path / "run1" / "embeddings")
    assert sorted(embeddings.column(C.ROW_ID).to_pylist()) == sorted(r[C.ROW_ID] for r in manifest)
    row = embeddings.slice(0, 1).to_pylist()[0]
    values = np.asarray(row[C.IMAGE_EMBEDDINGS], dtype=np.float32).reshape(row[C.EMBEDDING_SHAPE])
    assert values.shape[0] == 16 and np.isfinite(values).all()
    assert len(row[C.GENERATOR_STATE]) > 0
    resolved = yaml.safe_load((tmp_path / "run1" / "job.yaml").read_text())
    assert resolved["generation"]["images_per_prompt"] == 2 and resolved["prompts"] == spec.prompts
    assert not list((tmp_path / "run1").rglob("*.tmp-*")), "no temporary objects left behind"


def test_same_bytes_across_batch_sizes_and_actor_counts(first_run):
    tmp_path, _, _, manifest = first_run
    other = job(tmp_path, "run2", text={"batch_size": 1}, prior={"batch_size": 5, "concurrency": 2},
                decoder={"batch_size": 3, "concurrency": 2})
    run(other)
    second = {r[C.ROW_ID]: r for r in pq.read_table(tmp_path / "run2" / "manifest").to_pylist()}
    assert second.keys() == {r[C.ROW_ID] for r in manifest}
    for row in manifest:
        with open(row[C.IMAGE_URI], "rb") as a, open(second[row[C.ROW_ID]][C.IMAGE_URI], "rb") as b:
            assert a.read() == b.read()


def readme_manifest_columns() -> list[str]:
    """The manifest columns README.md promises (its Output section)."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    output_section = text.split("\n## Output\n", 1)[1]
    block = output_section.split("<output>/manifest/*.parquet", 1)[1].split("<output>/report", 1)[0]
    block = re.sub(r"\(.*?\)|your own columns", "", block)
    return [c.strip() for c in block.replace("\n", " ").split(",") if c.strip()]


def test_manifest_has_the_readme_columns_filled(first_run):
    _, _, _, manifest = first_run
    columns = readme_manifest_columns()
    assert len(columns) >= 20 and "row_id" in columns and "decoder_node" in columns
    nullable = {C.ERROR, C.SHARD, C.KEY}  # null on a successful files run, as README says
    for row in manifest:
        missing = [c for c in columns if c not in row]
        assert not missing, missing
        assert not [c for c in columns if c not in nullable and row[c] is None], row


def test_user_columns_keep_their_types_in_every_part(first_run):
    """Every manifest and embeddings part holds the user's columns in the prompt table's types, though numpy
    turns an int column's nulls into NaN between stages and a block of nulls has no type of its own."""
    tmp_path = first_run[0]
    parts = sorted((tmp_path / "run1" / "manifest").glob("*.parquet"))
    parts += sorted((tmp_path / "run1" / "embeddings").glob("*.parquet"))
    assert len(parts) > 2
    for part in parts:
        schema = pq.read_schema(part)
        assert (schema.field("rank").type, schema.field("note").type, schema.field("topic").type) == (
            pa.int64(), pa.string(), pa.string()), part.name


def test_rows_added_through_pandas_join_the_run(first_run):
    """pandas 3 writes text columns as large_string, and an int64 column with nulls as float64: a table read,
    extended and written back by pandas adds its new rows to the run made from the original table, each column
    written in the run's type, so every part still reads as one table; a value pandas changed on the way is
    refused naming it (uint64 2^64 - 1 became the double 2^64)."""
    import dataclasses
    import shutil

    from jobs.spec import SpecError

    tmp_path, spec = first_run[0], first_run[1]
    shutil.copytree(tmp_path / "run1", tmp_path / "run_pandas")
    frame = pq.read_table(spec.prompts).to_pandas()
    frame.loc[len(frame)] = {**frame.iloc[-1].to_dict(), C.PROMPT: "a red kite", "topic": "sky", "rank": 4, "note": "new"}
    frame.to_parquet(tmp_path / "pandas.parquet", index=False)
    written = pq.read_schema(tmp_path / "pandas.parquet")
    assert (written.field("topic").type, written.field("rank").type) == (pa.large_string(), pa.float64())
    added = dataclasses.replace(spec, prompts=str(tmp_path / "pandas.parquet"), output=str(tmp_path / "run_pandas"))
    with pytest.raises(SpecError, match=r"^prompts: column 'hash' is double, but .* as uint64 \(.*pandas.parquet "
                                        r"holds a value uint64 would not keep"):
        run(added)
    frame.drop(columns=["hash"]).to_parquet(tmp_path / "pandas.parquet", index=False)
    summary = run(added)
    manifest = pq.read_table(tmp_path / "run_pandas" / "manifest")
    assert summary.new == 2 and manifest.num_rows == 2 * len(PROMPTS) + 2
    for part in (tmp_path / "run_pandas" / "manifest").glob("*.parquet"):
        assert (pq.read_schema(part).field("topic").type, pq.read_schema(part).field("rank").type) == (
            pa.string(), pa.int64()), part.name
    kites = manifest.filter(pa.compute.equal(manifest[C.PROMPT], "a red kite")).to_pylist()
    assert [(r["topic"], r["rank"], r["note"]) for r in kites] == [("sky", 4, "new")] * 2
