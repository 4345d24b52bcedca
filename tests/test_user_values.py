"""Nothing the user gave is silently changed: 64-bit seeds end to end, guidance in float32 in every dtype."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_batch, reference_image
from PIL import Image

from jobs.generate import run
from jobs.prompts import scan
from jobs.spec import SpecError, spec_from_dict
from stages import columns as C
from stages.prior import PriorStage
from stages.text import TextEncoder

BIG_SEEDS = [2**63 - 1, 2**53 + 1, 2**53, None]  # None: the spec's seed (an int64 column with nulls)
GENERATION = {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2, "seed": 5}


def seed_job(tmp_path, seeds=BIG_SEEDS, seed_type=pa.int64(), **generation):
    pq.write_table(pa.table({C.PROMPT: ["a lighthouse at dawn"] * len(seeds),
                             C.SEED: pa.array(seeds, type=seed_type)}), tmp_path / "p.parquet")
    return spec_from_dict({"prompts": str(tmp_path / "p.parquet"), "output": str(tmp_path / "out"),
                           "generation": {**GENERATION, **generation},
                           "stages": {"text": {"batch_size": 4}, "prior": {"batch_size": 4},
                                      "decoder": {"batch_size": 4}}})


def test_64_bit_seeds_are_kept_exactly_end_to_end(tmp_path, ray_cluster, reference_pipe):
    spec = seed_job(tmp_path)
    assert run(spec).rows == 4
    manifest = {r[C.SEED]: r for r in pq.read_table(tmp_path / "out" / "manifest").to_pylist()}
    assert sorted(manifest) == sorted([2**63 - 1, 2**53 + 1, 2**53, 5])
    stored = pq.read_table(tmp_path / "out" / "embeddings", columns=[C.SEED]).column(C.SEED).to_pylist()
    assert sorted(stored) == sorted(manifest)
    images = {seed: np.asarray(Image.open(row[C.IMAGE_URI]), dtype=np.int16) for seed, row in manifest.items()}
    assert np.abs(images[2**53 + 1] - images[2**53]).mean() > 5  # two seeds, two images
    for seed in (2**63 - 1, 2**53 + 1):  # made from the user's seed itself, as diffusers makes it
        expected = reference_image(reference_pipe, {C.PROMPT: "a lighthouse at dawn", C.SEED: seed})
        assert np.abs(images[seed] - np.round(expected * 255)).max() <= 1


@pytest.mark.parametrize("seeds, seed_type, generation, message", [
    ([2**63 - 1], pa.int64(), {"images_per_prompt": 2}, "row 0: seed must be at most 2^63 - 2 "),
    ([1, 2**64 - 1], pa.uint64(), {}, "row 1: seed must be at most 2^63 - 1 .*, got 18446744073709551615"),
    ([3.0, 2.0**53 + 2], pa.float64(), {}, "row 1: seed is a floating-point column and its value is above 2^53"),
])
def test_seeds_that_cannot_be_kept_are_refused_naming_the_row(tmp_path, seeds, seed_type, generation, message):
    with pytest.raises(SpecError, match=message.replace("^", r"\^").replace("(", r"\(")):
        scan(seed_job(tmp_path, seeds, seed_type, **generation))


def test_a_spec_seed_whose_images_overflow_is_refused(tmp_path):
    with pytest.raises(SpecError, match=r"generation.seed: must be at most 2\^63 - 3"):
        spec_from_dict(
            {"prompts": "p", "output": "o", "generation": {"seed": 2**63 - 2, "images_per_prompt": 3}})
    with pytest.raises(SpecError, match=r"sweep.seed\[1\]: must be at most"):
        spec_from_dict({"prompts": "p", "output": "o", "sweep": {"seed": [0, 2**63]}})


def test_guidance_is_applied_in_float32_in_half_precision(model_cache):
    """4.0 and 4.01 are one bfloat16 value (its step at 4 is 1/32): the guidance must stay float32."""
    rows = [{C.PROMPT: "a red fox", C.SEED: 3, C.PRIOR_GUIDANCE: g} for g in (4.0, 4.01)]
    batch = TextEncoder("tiny", "tiny", dtype="bfloat16")(make_batch(rows))
    embeddings = PriorStage("tiny", dtype="bfloat16")(batch)[C.IMAGE_EMBEDDINGS].astype(np.float32)
    assert not np.array_equal(embeddings[0], embeddings[1])


def test_packed_rows_unpack_to_every_column_of_the_table_in_its_type():
    """A part whose rows came from a file without one of the table's columns still writes that column (null), so
    every manifest part has every column; a float with a fraction bound for an integer column is kept whole, as a
    float, not cut to an integer."""
    import pickle

    from stages.user_columns import typed, unpack

    types = pa.schema([("topic", pa.string()), ("score", pa.int64())])
    columns = unpack(np.asarray([pickle.dumps({"score": 3}), pickle.dumps({})], dtype=object), types)
    assert columns["topic"].type == pa.string() and columns["topic"].to_pylist() == [None, None]
    assert columns["score"].type == pa.int64() and columns["score"].to_pylist() == [3, None]
    kept = typed([2.5, 1.0], pa.int64())  # pa.array would give [2, 1]
    assert kept.type == pa.float64() and kept.to_pylist() == [2.5, 1.0]
