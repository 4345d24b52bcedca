"""The reader: prompt tables are validated row by row before any model work; rows expand with stable ids."""

import hashlib
import json

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
    assert result.rows == 3 and len(result.files) == 2 and result.blank_warning() is None


def test_empty_and_whitespace_prompts_are_counted_for_a_warning(tmp_path):
    """An empty or whitespace prompt makes an unconditional image: allowed (a null prompt is not), but said, with
    the first such row named."""
    (tmp_path / "d").mkdir()
    table_at(tmp_path / "d", "a.parquet", prompt=["x", "y"])
    table_at(tmp_path / "d", "b.parquet", prompt=["z", " \t", "", "a cat"])
    table = scan(spec_for(tmp_path / "d"))
    assert table.blank == 2 and table.blank_warning() == (
        f"warning: 2 prompt rows are empty or only whitespace (first: {tmp_path / 'd' / 'b.parquet'} row 1): they "
        f"make unconditional images")


def test_a_column_a_sweep_replaces_is_warned_about(tmp_path):
    """A sweep value replaces the row's own (height and width for `resolution`): the table's column is not used,
    which the run says, naming the column and the axis, whichever file holds it."""
    (tmp_path / "d").mkdir()
    table_at(tmp_path / "d", "a.parquet", prompt=["x"])
    table_at(tmp_path / "d", "b.parquet", prompt=["z"], seed=[3], height=[256], decoder_steps=[4])
    sweep = {"seed": [0, 1], "resolution": [[128, 128]], "prior_steps": [2]}
    spec = spec_from_dict({"prompts": str(tmp_path / "d"), "output": str(tmp_path / "o"), "sweep": sweep})
    assert scan(spec).warnings() == [
        "warning: the prompt table's own values are not used for its seed column by sweep.seed; its height column "
        "by sweep.resolution (a sweep value replaces the row's): drop the column, or the axis"]
    assert scan(spec_for(tmp_path / "d")).warnings() == []
    repeated = spec_from_dict({"prompts": str(tmp_path / "d"), "output": str(tmp_path / "o"),
                               "sweep": {"prior_steps": [2, 3, 2]}})  # generate and plan print these
    assert scan(repeated).warnings() == [
        "warning: sweep.prior_steps[2]: 2 makes the same images as sweep.prior_steps[0] (2): give each value once"]


@pytest.mark.parametrize("cols, message", [
    ({"text": ["a"]}, "has no 'prompt' column"),
    ({"prompt": [1, 2]}, "column 'prompt' in"),
    ({"prompt": ["a", None]}, "row 1: prompt is null"),
    ({"prompt": ["a", "b"], "height": [1024, 1000]}, "row 1: height must be a positive multiple of 128 up to 2048, got 1000"),
    ({"prompt": ["a"], "height": [1048576]}, "row 0: height must be a positive multiple of 128 up to 2048"),
    ({"prompt": ["a"], "width": [-128]}, "row 0: width must be a positive multiple of 128"),
    ({"prompt": ["a", "b", "c"], "prior_guidance_scale": [1.0, None, -2.0]}, "row 2: prior_guidance_scale must not be negative"),
    ({"prompt": ["a"], "decoder_steps": [0]}, "row 0: decoder_steps must be at least 1"),
    ({"prompt": ["a"], "prior_steps": [0]}, "row 0: prior_steps must be at least 1"),
    ({"prompt": ["a", "b"], "decoder_steps": [12, 10 ** 12]}, "row 1: decoder_steps must be at least 1 and at most "
                                                              "1000, got 1000000000000"),
    ({"prompt": ["a"], "seed": [-1]}, "row 0: seed must not be negative"),
    ({"prompt": ["a"], "seed": [1.5]}, "row 0: seed must be a whole number"),
    ({"prompt": ["a"], "seed": ["one"]}, "column 'seed' in"),
    ({"prompt": ["a", "b"], "prior_guidance_scale": [4.0, float("inf")]}, "row 1: prior_guidance_scale must be a "
                                                                          "finite number, got inf"),
    ({"prompt": ["a"], "decoder_guidance_scale": [float("nan")]}, "row 0: decoder_guidance_scale must be a finite "
                                                                  "number, got nan"),
    ({"prompt": ["a"], "decoder_steps": [float("inf")]}, "row 0: decoder_steps must be a finite number"),
    ({"prompt": ["a"], "prior_steps": [1e19]}, "row 0: prior_steps is a floating-point column and its value is "
                                              "above 2^53"),
    ({"prompt": ["a", "b"], "decoder_steps": pa.array([2, 2**64 - 1], pa.uint64())},
     "row 1: decoder_steps must fit a signed 64-bit integer"),
    ({"prompt": ["a", "b"], "height": pa.array([1, 2], pa.int8())}, "row 0: height must be a positive multiple of "
                                                                  "128 up to 2048, got 1"),  # 128 > int8's range
    ({"prompt": ["a"], "negative_prompt": [3]}, "column 'negative_prompt' in"),
    ({"prompt": ["a"], "height ": [512]}, "column 'height ' in"),  # would pass through, every row at the default
    ({"prompt": ["a"], "negative prompt": ["blur"]}, "is not a per-row setting (did you mean 'negative_prompt'?"),
    ({"prompt": ["a"], "prior-steps": [4]}, "column 'prior-steps' in"),  # kept as the user's column: every row at
    ({"prompt": ["a"], "images per prompt": [2]}, "column 'images per prompt' in"),  # the job's value
    ({"prompt": ["a"], "num_inference_steps": [30]}, "is not a per-row setting (did you mean 'decoder_steps'?"),
    ({"prompt": ["a"], "guidance_scale": [7.5]}, "(did you mean 'prior_guidance_scale or decoder_guidance_scale'?"),
    ({"prompt": ["a"], "row_id": ["x"]}, "is set by the job itself, so its values would be replaced"),
    ({"prompt": ["a"], "error": ["x"]}, "column 'error' in"),
    ({"prompt": ["a"], "prior_checkpoint": ["tiny"]}, "is set by the job itself, so its values would be replaced: "
                                                      "rename the column (per-row checkpoints: use sweep"),
    ({"prompt": ["a", "b"], "images_per_prompt": [3, 1]}, "column 'images_per_prompt' in"),  # was kept as the
    # table's own column: every row made generation.images_per_prompt images
])
def test_bad_rows_are_named(tmp_path, cols, message):
    path = table_at(tmp_path, **cols)
    with pytest.raises(SpecError) as err:
        scan(spec_for(path))
    assert message in str(err.value) and "p.parquet" in str(err.value)


def test_a_column_given_twice_is_named(tmp_path):
    for names in (["prompt", "prompt"], ["prompt", "height", "height"], ["prompt", "tag", "tag"]):
        table = pa.Table.from_arrays([pa.array(["a"]) if n != "height" else pa.array([256]) for n in names], names)
        pq.write_table(table, tmp_path / "p.parquet")
        with pytest.raises(SpecError, match=f"^prompts: column '{names[-1]}' appears twice in .*p.parquet; rename"):
            scan(spec_for(str(tmp_path / "p.parquet")))


def test_missing_and_non_parquet_inputs(tmp_path):
    with pytest.raises(SpecError, match="prompts: .*nowhere.parquet does not exist"):
        scan(spec_for(tmp_path / "nowhere.parquet"))
    (tmp_path / "notes.parquet").write_text("prompt\nhello\n")
    with pytest.raises(SpecError, match="notes.parquet is not a readable Parquet file"):
        scan(spec_for(tmp_path / "notes.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="no Parquet files .* under"):
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


def test_every_sweep_combination_gets_every_image_once():
    """Prompt rows × sweep combinations × images_per_prompt, each once, in spans too (a combination index that
    ignored the image index made half the pairs twice, to be folded, and lost the others); resolution is
    [height, width]."""
    spec = spec_from_dict({"prompts": "x", "output": "o", "generation": {"images_per_prompt": 2, "seed": 10},
                           "sweep": {"decoder_guidance_scale": [0.0, 2.0], "resolution": [[256, 128], [128, 384]]}})
    out = expand(spec, prompt=["a", "b"])
    made = sorted(zip(out[C.PROMPT], out[C.DECODER_GUIDANCE], out[C.HEIGHT], out[C.WIDTH], out[C.IMAGE_INDEX],
                      out[C.SEED]))
    assert made == sorted((p, g, h, w, k, 10 + k) for p in "ab" for g in (0.0, 2.0)
                          for h, w in ((256, 128), (128, 384)) for k in (0, 1))
    assert len(set(out[C.ROW_ID])) == 16
    batch = {C.PROMPT: np.asarray(["a", "b"], dtype=object)}
    spans = [expand_rows(batch, defaults_for(spec), 2, dict(decoder=spec.model.decoder, dtype=spec.model.dtype),
                         sweep_combinations(spec.sweep), span)[C.ROW_ID] for span in ((0, 5), (5, 11), (11, 16))]
    assert sorted(np.concatenate(spans)) == sorted(out[C.ROW_ID])


def test_row_id_is_a_stable_hash_of_what_makes_the_image():
    spec = spec_for("x")
    first = expand(spec, prompt=["a cat", "a cat"])[C.ROW_ID]
    again = expand(spec, prompt=["a cat", "a cat"], prior_guidance_scale=[4, 4])[C.ROW_ID]
    assert first[0] == first[1] == again[0]  # same inputs (4 == 4.0) → same id
    assert expand(spec_for("x", seed=1), prompt=["a cat"])[C.ROW_ID][0] != first[0]
    assert expand(spec, prompt=["a cat"], decoder_guidance_scale=[2.0])[C.ROW_ID][0] != first[0]
    other_model = spec_from_dict({"prompts": "x", "output": "o", "model": {"prior": "warp-ai/wuerstchen-prior"}})
    assert expand(other_model, prompt=["a cat"])[C.ROW_ID][0] != first[0]


def row_id(columns: dict[str, np.ndarray], i: int) -> str:
    """The per-row definition of row i's id: a stable hash of everything that determines its image."""
    key = {col: columns[col][i].item() if hasattr(columns[col][i], "item") else columns[col][i]
           for col in (C.PROMPT, *C.OVERRIDABLE)}
    for col in C.FLOAT_PARAMS:
        key[col] = float(key[col])
    key[C.CHECKPOINT] = columns[C.CHECKPOINT][i]
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def test_row_ids_formed_column_wise_equal_the_per_row_definition():
    """Outputs written before keep their ids: quotes, escapes, control and non-ASCII characters, -0.0 beside 0.0,
    float reprs, huge seeds, two prior checkpoints; and one id pinned to its value."""
    from jobs.row_ids import identify

    n, awkward = 700, ['a "q"', "back\\slash", "nl\nx", "tab\t", "ctl\x01\x1f", "ünï €", "\u2028", "🎉", "", "p"]
    rows = {C.PROMPT: np.asarray([awkward[i % 10] + str(i % 37) for i in range(n)], dtype=object),
            C.NEGATIVE_PROMPT: np.asarray([awkward[i % 7] for i in range(n)], dtype=object),
            C.SEED: np.random.default_rng(0).integers(-2 ** 62, 2 ** 62, n), C.HEIGHT: np.full(n, 128),
            C.WIDTH: np.full(n, 96), C.PRIOR_STEPS: np.arange(n) % 3, C.DECODER_STEPS: np.full(n, 12),
            C.PRIOR_GUIDANCE: np.asarray([[0.1, 4.0, -0.0, 0.0, 1e-5, 1e20, 2.5][i % 7] for i in range(n)]),
            C.DECODER_GUIDANCE: np.asarray([[1 / 3, 0.0][i % 2] for i in range(n)]),
            C.PRIOR_CHECKPOINT: np.asarray([['{"x": 1}', "tiny"][i % 2] for i in range(n)], dtype=object)}
    identify(rows, dict(decoder="tiny", dtype="float32"))
    assert list(rows[C.ROW_ID]) == [row_id(rows, i) for i in range(n)]
    assert len(set(rows[C.ROW_ID][[2, 3]])) == 2  # -0.0 and 0.0 guidance: other JSON, other ids
    assert expand(spec_for("x"), prompt=["a cat"])[C.ROW_ID][0] == "3507be42f93f783798d6c5eb5023e5ee"


# The README's list of what determines an image, each changed alone: (spec changes, column changes).
BASE_GENERATION = dict(height=256, width=256, prior_steps=None, prior_guidance_scale=4.0, decoder_steps=12,
                       decoder_guidance_scale=0.0, negative_prompt="", seed=5)
MIX = {"interpolate": ["tiny", "warp-ai/wuerstchen-prior"], "alpha": 0.3}
DETERMINING = {
    "prompt": ({}, {"prompt": ["a dog"]}),
    "negative_prompt (spec)": ({"generation": {"negative_prompt": "blurry"}}, {}),
    "negative_prompt (column)": ({}, {"negative_prompt": ["blurry"]}),
    "seed": ({"generation": {"seed": 6}}, {}),
    "seed (column)": ({}, {"seed": [6]}),
    "height": ({"generation": {"height": 384}}, {}),
    "width": ({}, {"width": [384]}),
    "prior_steps (default schedule → 30 linear)": ({"generation": {"prior_steps": 30}}, {}),
    "prior_steps (column)": ({}, {"prior_steps": [2]}),
    "prior_guidance_scale": ({"generation": {"prior_guidance_scale": 4.5}}, {}),
    "prior_guidance_scale (column)": ({}, {"prior_guidance_scale": [3.0]}),
    "decoder_steps": ({"generation": {"decoder_steps": 11}}, {}),
    "decoder_guidance_scale": ({}, {"decoder_guidance_scale": [0.5]}),
    "model.prior": ({"model": {"prior": "warp-ai/wuerstchen-prior"}}, {}),
    "model.prior interpolation": ({"model": {"prior": MIX}}, {}),
    "prior_checkpoint (sweep)": ({"sweep": {"prior_checkpoint": [MIX]}}, {}),
    "model.decoder": ({"model": {"decoder": "warp-ai/wuerstchen"}}, {}),
    "model.dtype": ({"model": {"dtype": "bfloat16"}}, {}),
}
NOT_DETERMINING = {
    "a user column": ({}, {"Category": ["animals"]}),
    "stage batch sizes": ({"stages": {"text": {"batch_size": 3}, "prior": {"batch_size": 5}}}, {}),
    "images_per_prompt (image 0)": ({"generation": {"images_per_prompt": 3}}, {}),
    "output, output_format, shard_size": ({"output": "elsewhere", "output_format": "webdataset", "shard_size": 7}, {}),
    "seed given as a column equal to the default": ({}, {"seed": [5]}),
    "prior_steps null in a column (the default)": ({}, {"prior_steps": [None]}),
    "the same seed as a sweep value": ({"sweep": {"seed": [5]}}, {}),
}


def first_row_id(spec_changes: dict, column_changes: dict) -> str:
    """The row id of "a cat" (the first image of the first row) under BASE_GENERATION with the changes applied."""
    data = {"prompts": "x", "output": "o", "model": {"prior": "tiny", "decoder": "tiny", "dtype": "float32"},
            "generation": dict(BASE_GENERATION)}
    for key, value in spec_changes.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    out = expand(spec_from_dict(data), **{"prompt": ["a cat"], **column_changes})
    assert out[C.IMAGE_INDEX][0] == 0
    return out[C.ROW_ID][0]


@pytest.mark.parametrize("field", list(DETERMINING))
def test_each_field_that_determines_the_image_changes_the_row_id(field):
    assert first_row_id(*DETERMINING[field]) != first_row_id({}, {})


@pytest.mark.parametrize("field", list(NOT_DETERMINING))
def test_what_does_not_determine_the_image_keeps_the_row_id(field):
    assert first_row_id(*NOT_DETERMINING[field]) == first_row_id({}, {})


def test_row_ids_of_all_changes_are_distinct():
    ids = {field: first_row_id(*change) for field, change in DETERMINING.items()}
    same_value = [("negative_prompt (spec)", "negative_prompt (column)"), ("seed", "seed (column)"),
                  ("model.prior interpolation", "prior_checkpoint (sweep)")]
    for spec_route, other_route in same_value:  # one value given by the spec, a column or a sweep: one id
        assert ids[spec_route] == ids[other_route]
    assert len(set(ids.values())) == len(ids) - len(same_value)  # e.g. prompt and negative prompt don't hash alike


@pytest.mark.parametrize("where", ["model", "sweep"])
def test_alpha_written_as_an_integer_or_a_float_is_one_row_id(where):
    """alpha: 1 and alpha: 1.0 are one interpolation: a resume that spells it the other way finds its rows."""
    ids = []
    for alpha in (1, 1.0):
        prior = {"interpolate": ["tiny", "warp-ai/wuerstchen-prior"], "alpha": alpha}
        ids.append(first_row_id({"model": {"prior": prior}} if where == "model" else
                                {"sweep": {"prior_checkpoint": [prior]}}, {}))
    assert ids[0] == ids[1] != first_row_id({"model": {"prior": {**MIX, "alpha": 0.9}}}, {})


def test_a_folder_is_read_as_spark_arrow_and_ray_read_one(tmp_path):
    table_at(tmp_path, "part-0.parquet", prompt=["a", "b"])
    (tmp_path / "sub").mkdir()
    table_at(tmp_path / "sub", "x.PARQUET", prompt=["c"])
    table_at(tmp_path, "y.pq", prompt=["d"])
    (tmp_path / "_temporary" / "0").mkdir(parents=True)
    table_at(tmp_path / "_temporary" / "0", "part-0.parquet", prompt=["a", "b"])  # a Spark task's attempt
    table_at(tmp_path, ".hidden.parquet", prompt=["e"])
    for stray in ("_SUCCESS", ".part-0.parquet.crc", "README.txt"):
        (tmp_path / stray).write_text("not a table")
    result = scan(spec_for(tmp_path))
    assert result.rows == 4 and sorted(p.rsplit("/", 1)[-1] for p in result.files) == ["part-0.parquet", "x.PARQUET",
                                                                                      "y.pq"]


def test_path_mistakes_are_one_line(tmp_path):
    table_at(tmp_path, "q?x.parquet", prompt=["lost"])  # Ray's reader would read it as 0 rows
    with pytest.raises(SpecError, match=r"q\?x.parquet: a '\?' in a path cannot be read; rename it"):
        scan(spec_for(tmp_path))
    with pytest.raises(SpecError, match="does not exist .glob patterns are not expanded: give the folder"):
        scan(spec_for(tmp_path / "*.parquet"))


def test_a_corrupt_page_behind_an_intact_footer_is_named(tmp_path):
    path = table_at(tmp_path, prompt=[f"prompt number {i} " * 20 for i in range(2000)])
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    with pytest.raises(SpecError, match=r"p.parquet is not a readable Parquet file \(after row 0: "):
        scan(spec_for(path))


def test_a_prompt_that_is_not_utf8_names_its_row(tmp_path):
    prompts = pa.array([b"fine", b"\xff\xfe bad"], pa.binary()).view(pa.string())  # a writer that did not check
    path = table_at(tmp_path, prompt=prompts)
    with pytest.raises(SpecError, match=r"p.parquet row 1: prompt is not UTF-8 text, got b'\\xff\\xfe bad'"):
        scan(spec_for(path))
    path = table_at(tmp_path, prompt=["a", "b"], url=pa.array([b"ok", b"caf\xe9"], pa.binary()).view(pa.string()))
    with pytest.raises(SpecError, match=r"p.parquet row 1: url is not UTF-8 text, got b'caf\\xe9'"):
        scan(spec_for(path))  # a column of the user's own: packing it for the stages would fail mid-run
    tags = pa.ListArray.from_arrays(pa.array([0, 1, 3, 4], pa.int32()),
                                    pa.array([b"a", b"b", b"c", b"\xff"], pa.binary()).view(pa.string()))
    path = table_at(tmp_path, prompt=["a", "b", "c"], tags=tags)
    with pytest.raises(SpecError, match=r"p.parquet row 2: tags is not UTF-8 text$"):
        scan(spec_for(path))  # strings inside a list


def test_categorical_prompts_and_a_null_typed_empty_file_are_read(tmp_path):
    table_at(tmp_path, "a.parquet", prompt=pa.array(["x", "y", "x"]).dictionary_encode())  # a pandas categorical
    table_at(tmp_path, "b.parquet", prompt=pa.array([], pa.null()))  # pandas: a column of None, all dropped
    result = scan(spec_for(tmp_path))
    assert result.rows == 3 and result.schema.field(C.PROMPT).type == pa.string()


def test_a_setting_stored_as_floats_in_one_file_is_read_as_integers(tmp_path):
    table_at(tmp_path, "a.parquet", prompt=["x"], seed=pa.array([2 ** 60 + 1], pa.int64()))
    table_at(tmp_path, "b.parquet", prompt=["y", "z"], seed=[1.0, None])  # pandas: an int column with a gap
    assert scan(spec_for(tmp_path)).schema.field(C.SEED).type == pa.int64()  # a double would make 2^60 + 1 2^60


def test_rays_reader_sees_the_rows_preflight_checked(tmp_path, ray_cluster):
    from jobs.generate import expanded

    folder = tmp_path / "height=500"  # a hive-style folder name: not a column, so not a height
    folder.mkdir()
    table_at(folder, "a.parquet", prompt=pa.array(["x"]).dictionary_encode(), seed=pa.array([2 ** 60 + 1]))
    table_at(folder, "b.parquet", prompt=["y", "z"], seed=[1.0, None], tag=["t1", "t2"])
    spec = spec_for(tmp_path, height=256, seed=7)
    rows = sorted(expanded(spec, scan(spec)).take_all(), key=lambda r: r[C.PROMPT])
    assert [(r[C.PROMPT], r[C.SEED], r[C.HEIGHT]) for r in rows] == [("x", 2 ** 60 + 1, 256), ("y", 1, 256),
                                                                      ("z", 7, 256)]


@pytest.mark.parametrize("other", [pa.array([2 ** 64 - 1], pa.uint64()), pa.array([0.5])])
def test_a_column_whose_values_its_type_in_other_files_cannot_hold_is_named(tmp_path, other):
    table_at(tmp_path, "a.parquet", prompt=["x"], rank=pa.array([2 ** 60 + 1], pa.int64()))
    table_at(tmp_path, "b.parquet", prompt=["y"], rank=other)
    with pytest.raises(SpecError, match=r"prompts: column 'rank' in \S+.parquet is (uint64, read as int64|int64, read "
                                        r"as double) as in the other files, which cannot hold its values"):
        scan(spec_for(tmp_path))


def test_a_timestamp_column_that_no_unit_holds_for_every_file_is_named(tmp_path):
    table_at(tmp_path, "a.parquet", prompt=["x"], valid_to=pa.array([253402214400_000_000], pa.timestamp("us")))
    table_at(tmp_path, "b.parquet", prompt=["y"], valid_to=pa.array([0], pa.timestamp("ns")))  # year 9999 vs ns
    with pytest.raises(SpecError, match=r"column 'valid_to' in \S+a.parquet is timestamp\[us\], read as "
                                        r"timestamp\[ns\] as in the other files, which cannot hold its values"):
        scan(spec_for(tmp_path))


def test_row_bytes_are_the_packed_size_of_the_users_columns(tmp_path):
    """The fold and join partitions are sized from row_bytes: a repeated long text (dictionary-encoded in the file),
    a categorical one (one dictionary for many rows in a batch) and wide numbers count at their size in a block."""
    table_at(tmp_path, "t.parquet", prompt=["x"] * 10, caption=["y" * 3000] * 10)
    table_at(tmp_path, "c.parquet", prompt=["x"] * 10, label=pa.array(["y" * 3000] * 10).dictionary_encode())
    vectors = pa.array(list(np.random.default_rng(0).random((10, 1000), np.float32)), pa.list_(pa.float32()))
    table_at(tmp_path, "v.parquet", prompt=["x"] * 10, clip=vectors)
    for name, least in (("t", 3000), ("c", 3000), ("v", 4000)):
        assert scan(spec_for(tmp_path / f"{name}.parquet")).row_bytes > least, name
    assert scan(spec_for(table_at(tmp_path, "s.parquet", prompt=["x"] * 10))).row_bytes < 300


def test_a_settings_name_in_another_case_is_the_tables_own_column():
    """LAION's WIDTH and HEIGHT are the source image's size, not the image to make: kept as the user's columns."""
    from jobs.prompt_checks import check_schema

    schema = pa.schema([("prompt", pa.string()), ("WIDTH", pa.int64()), ("HEIGHT", pa.int64()), ("Seed", pa.int64())])
    assert check_schema(schema, "laion.parquet") == ("prompt",)
