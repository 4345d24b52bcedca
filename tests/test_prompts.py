"""The reader: prompt tables are validated row by row before any model work; rows expand with stable ids."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.prompts import defaults_for, expand_rows, scan, sweep_combinations
from jobs.spec import SpecError, spec_from_dict
from stages import columns as C


def spec_for(prompts, **generation):
    return spec_from_dict({"prompts": str(prompts), "output": "unused", "generation": generation})


def table_at(tmp_path, name="p.parquet", **cols):
    path = tmp_path / name
    pq.write_table(pa.table(cols), path)
    return path


def test_scan_counts_rows_across_files(tmp_path):
    (tmp_path / "d").mkdir()
    table_at(tmp_path / "d", "a.parquet", prompt=["x", "y"])
    table_at(tmp_path / "d", "b.parquet", prompt=["z"], seed=[3])
    result = scan(spec_for(tmp_path / "d"))
    assert result.rows == 3 and len(result.files) == 2


@pytest.mark.parametrize("cols, message", [
    ({"text": ["a"]}, "has no 'prompt' column"),
    ({"prompt": [1, 2]}, "column 'prompt' in"),
    ({"prompt": ["a", None]}, "row 1: prompt is null"),
    ({"prompt": ["a", "b"], "height": [1024, 1000]}, "row 1: height must be a positive multiple of 128, got 1000"),
    ({"prompt": ["a"], "width": [-128]}, "row 0: width must be a positive multiple of 128"),
    ({"prompt": ["a", "b", "c"], "prior_guidance_scale": [1.0, None, -2.0]}, "row 2: prior_guidance_scale must not be negative"),
    ({"prompt": ["a"], "decoder_steps": [0]}, "row 0: decoder_steps must be at least 1"),
    ({"prompt": ["a"], "prior_steps": [0]}, "row 0: prior_steps must be at least 1"),
    ({"prompt": ["a"], "seed": [-1]}, "row 0: seed must not be negative"),
    ({"prompt": ["a"], "seed": [1.5]}, "row 0: seed must be a whole number"),
    ({"prompt": ["a"], "seed": ["one"]}, "column 'seed' in"),
    ({"prompt": ["a"], "negative_prompt": [3]}, "column 'negative_prompt' in"),
])
def test_bad_rows_are_named(tmp_path, cols, message):
    path = table_at(tmp_path, **cols)
    with pytest.raises(SpecError) as err:
        scan(spec_for(path))
    assert message in str(err.value) and "p.parquet" in str(err.value)


def test_missing_and_non_parquet_inputs(tmp_path):
    with pytest.raises(SpecError, match="prompts: .*nowhere.parquet does not exist"):
        scan(spec_for(tmp_path / "nowhere.parquet"))
    (tmp_path / "notes.parquet").write_text("prompt\nhello\n")
    with pytest.raises(SpecError, match="notes.parquet is not a readable Parquet file"):
        scan(spec_for(tmp_path / "notes.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="no .parquet files under"):
        scan(spec_for(tmp_path / "empty"))


def expand(spec, **cols):
    batch = {k: np.asarray(v, dtype=object if isinstance(v[0], str) or v[0] is None else None)
             for k, v in cols.items()}
    model = dict(decoder=spec.model.decoder, dtype=spec.model.dtype)
    return expand_rows(batch, defaults_for(spec), spec.generation.images_per_prompt, model,
                       sweep_combinations(spec.sweep))


def test_expand_fills_defaults_and_overrides(tmp_path):
    spec = spec_for("x", height=256, seed=10, images_per_prompt=2)
    out = expand(spec, prompt=["a", "b"], height=[np.nan, 512.0], negative_prompt=[None, "ugly"], Category=["p", "q"])
    assert list(out[C.PROMPT]) == ["a", "a", "b", "b"]
    assert list(out[C.HEIGHT]) == [256, 256, 512, 512]
    assert list(out[C.SEED]) == [10, 11, 10, 11]  # image k of a prompt uses seed + k
    assert list(out[C.NEGATIVE_PROMPT]) == ["", "", "ugly", "ugly"]
    assert list(out[C.PRIOR_STEPS]) == [0, 0, 0, 0]  # 0: the default Stage C schedule
    assert list(out["Category"]) == ["p", "p", "q", "q"]  # user columns pass through
    assert len(set(out[C.ROW_ID])) == 4


def test_row_id_is_a_stable_hash_of_what_makes_the_image():
    spec = spec_for("x")
    first = expand(spec, prompt=["a cat", "a cat"])[C.ROW_ID]
    again = expand(spec, prompt=["a cat", "a cat"], prior_guidance_scale=[4, 4])[C.ROW_ID]
    assert first[0] == first[1] == again[0]  # same inputs (4 == 4.0) → same id
    assert expand(spec_for("x", seed=1), prompt=["a cat"])[C.ROW_ID][0] != first[0]
    assert expand(spec, prompt=["a cat"], decoder_guidance_scale=[2.0])[C.ROW_ID][0] != first[0]
    other_model = spec_from_dict({"prompts": "x", "output": "o", "model": {"prior": "warp-ai/wuerstchen-prior"}})
    assert expand(other_model, prompt=["a cat"])[C.ROW_ID][0] != first[0]
