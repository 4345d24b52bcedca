"""The job spec: YAML loading, defaults, overrides and the one-line errors users see."""

import pytest

from jobs.spec import JobSpec, SpecError, apply_overrides, load_spec, spec_from_dict, stage_kwargs

BASE = {"prompts": "p.parquet", "output": "out"}


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_defaults_match_the_reference_pipelines():
    spec = spec_from_dict(BASE)
    assert isinstance(spec, JobSpec)
    gen = spec.generation
    assert (gen.height, gen.width, gen.prior_steps, gen.prior_guidance_scale) == (1024, 1024, None, 4.0)
    assert (gen.decoder_steps, gen.decoder_guidance_scale, gen.negative_prompt) == (12, 0.0, "")
    assert (spec.stages.text.batch_size, spec.stages.prior.batch_size, spec.stages.decoder.batch_size) == (64, 16, 32)
    assert spec.model.prior == "tiny" and spec.model.dtype == "float32" and spec.image_format == "png"


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "prompts: a.parquet\noutput: s3://b/run\nstages: {prior: {batch_size: 4}}\n")
    spec = load_spec(path, ["generation.height=512", "generation.prior_steps=20", "stages.prior.concurrency=[1, 3]",
                            "generation.negative_prompt=blurry"])
    assert spec.generation.height == 512 and spec.generation.prior_steps == 20
    assert spec.stages.prior.batch_size == 4 and spec.stages.prior.concurrency == [1, 3]
    assert spec.stages.text.batch_size == 64  # untouched stages keep their defaults
    assert spec.generation.negative_prompt == "blurry"


def test_local_paths_travel_absolute_and_uris_as_written(tmp_path, monkeypatch):
    """A worker on another node has its own working directory: a relative path means the driver's."""
    monkeypatch.chdir(tmp_path)
    spec = spec_from_dict({"prompts": "prompts/p.parquet", "output": "out/run", "decoded_from": "../runs/a"})
    assert (spec.prompts, spec.output) == (str(tmp_path / "prompts" / "p.parquet"), str(tmp_path / "out" / "run"))
    assert spec.decoded_from == str(tmp_path.parent / "runs" / "a")
    remote = spec_from_dict({"prompts": "s3://bucket/p.parquet", "output": "file:///data/run"})
    assert (remote.prompts, remote.output, remote.decoded_from) == ("s3://bucket/p.parquet", "file:///data/run", None)


def test_spec_is_frozen():
    spec = spec_from_dict(BASE)
    with pytest.raises(AttributeError):
        spec.output = "elsewhere"


@pytest.mark.parametrize("data, message", [
    ({**BASE, "generation": {"heigth": 512}}, "generation.heigth: unknown key (did you mean 'height'?)"),
    ({**BASE, "outptu": "x"}, "outptu: unknown key (did you mean 'output'?)"),
    ({**BASE, "stages": {"prior": {"batchsize": 2}}}, "stages.prior.batchsize: unknown key"),
    ({"output": "x"}, "prompts: required key is missing"),
    ({**BASE, "generation": {"height": 1000}}, "generation.height: must be a positive multiple of 128"),
    ({**BASE, "generation": {"width": 0}}, "generation.width: must be a positive multiple of 128"),
    ({**BASE, "generation": {"prior_guidance_scale": -1}}, "generation.prior_guidance_scale: must not be negative"),
    ({**BASE, "generation": {"decoder_steps": 0}}, "generation.decoder_steps: must be at least 1"),
    ({**BASE, "generation": {"prior_steps": 0}}, "generation.prior_steps: must be at least 1"),
    ({**BASE, "generation": {"seed": -3}}, "generation.seed: must not be negative"),
    ({**BASE, "generation": {"height": "big"}}, "generation.height: expected int"),
    ({**BASE, "model": {"dtype": "float8"}}, "model.dtype: unknown dtype 'float8'"),
    ({**BASE, "image_format": "gif"}, "image_format: 'gif' is not one of png | jpeg | webp"),
    ({**BASE, "stages": {"decoder": {"concurrency": [3, 1]}}}, "stages.decoder.concurrency"),
    ({**BASE, "stages": {"prior": {"micro_batch": 0}}}, "stages.prior.micro_batch: must be at least 1, got 0"),
    ({**BASE, "stages": {"decoder": {"compile": "yes"}}},
     "stages.decoder.compile: expected true, false or max-autotune, got 'yes'"),
    ({**BASE, "stages": {"decoder": {"compile": 1}}}, "stages.decoder.compile: expected bool or str, got 1"),
    ({**BASE, "generation": {"height": 65536}}, "generation.height: must be a positive multiple of 128 up to 2048, "
                                                "got 65536"),
    ({**BASE, "model": "tiny"}, "model: expected a mapping, got 'tiny'"),
    ({**BASE, "stages": {"prior": 3}}, "stages.prior: expected a mapping, got 3"),
    ({**BASE, "prompts": "memory://p.parquet"}, "prompts: memory:// lives in one process's memory"),
    ({**BASE, "output": "memory://out"}, "output: memory:// lives in one process's memory, which the job's Ray"),
    ({**BASE, "generation": {"prior_guidance_scale": float("inf")}}, "generation.prior_guidance_scale: must be a "
                                                                     "finite number, got inf"),
    ({**BASE, "sweep": {"negative_prompt": ["", "\ud800"]}}, "sweep.negative_prompt[1]: not valid Unicode text "
                                                             "(surrogates not allowed at character 0)"),
    ({**BASE, "generation": {"negative_prompt": "blurry \udc80"}}, "generation.negative_prompt: not valid Unicode"),
    ({**BASE, "stages": {"text": {"resources": {"memory": "1G"}}}}, "stages.text.resources.memory: expected a "
                                                                    "non-negative number"),
    ({**BASE, "placement_timeout_s": float("nan")}, "placement_timeout_s: expected seconds, at least 0, got nan"),
    ({**BASE, "generation": {"images_per_prompt": 2**63}}, "generation.images_per_prompt: must be at least 1 and "
                                                           "at most 2^63 - 1"),  # it blamed a row's seed
    ({**BASE, "prompts": ""}, "prompts: empty; give a path or URI"),  # "${PROMPTS}" unset: not the working dir
    ({**BASE, "output": " "}, "output: empty; give a path or URI"),
    ({**BASE, "output": "runs/q?x"}, "output runs/q?x: a '?' in the path reads as a pattern"),  # a resume missed
    # its rows and made them again
    ({**BASE, "output": "s3://b/run[1]"}, "output s3://b/run[1]: a '[' in the path reads as a pattern"),
])
def test_bad_specs_name_the_field(data, message):
    with pytest.raises(SpecError) as err:
        spec_from_dict(data)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_brackets_of_a_host_are_no_pattern():
    assert spec_from_dict({**BASE, "output": "http://[::1]:8000/runs/a"}).output == "http://[::1]:8000/runs/a"


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "prompts: a.parquet\noutput: [unclosed\n")
    with pytest.raises(SpecError, match=r"job.yaml line \d+: YAML syntax error"):
        load_spec(path)


def test_a_key_given_twice_is_refused_naming_it(tmp_path):
    """YAML keeps the last of two `generation:` blocks without a word: the first block's settings would vanish."""
    path = write(tmp_path, "prompts: a.parquet\noutput: out\ngeneration:\n  height: 256\nmodel: {}\n"
                           "generation:\n  width: 256\n")
    with pytest.raises(SpecError, match=r"job.yaml line 6: key 'generation' appears twice in one mapping"):
        load_spec(path)
    path = write(tmp_path, "prompts: a.parquet\noutput: out\nstages:\n  prior: &stage {num_cpus: 2, batch_size: 8}\n"
                           "  decoder:\n    <<: *stage\n    batch_size: 4\n")  # a merge key's keys may be set again
    spec = load_spec(path)
    assert (spec.stages.decoder.num_cpus, spec.stages.decoder.batch_size, spec.stages.prior.batch_size) == (2, 4, 8)
    with pytest.raises(SpecError, match=r"job.yaml line \d+: YAML syntax error"):
        load_spec(write(tmp_path, "prompts: a.parquet\n? [a, b]\n: 1\n"))  # an unhashable key


def test_an_output_inside_the_prompts_folder_is_refused():
    """Every Parquet file under the prompts folder is read as prompts: the run's own parts would be, next time."""
    for prompts, out in (("s3://b/prompts/", "s3://b/prompts/run"), ("s3://b/prompts", "s3://b/prompts"),
                         ("s3a://b/prompts", "s3://b/prompts/run")):
        with pytest.raises(SpecError, match=f"^output {out}: inside the prompts folder"):
            spec_from_dict({"prompts": prompts, "output": out})
    spec_from_dict({"prompts": "s3://b/prompts", "output": "s3://b/prompts-run"})  # a sibling is fine


def test_bad_override_is_reported(tmp_path):
    path = write(tmp_path, "prompts: a.parquet\noutput: out\n")
    with pytest.raises(SpecError, match="generation.hieght: unknown key"):
        load_spec(path, ["generation.hieght=512"])
    with pytest.raises(SpecError, match="expected key=value"):
        load_spec(path, ["generation.height"])
    with pytest.raises(SpecError, match=r"^--set =5: expected key=value$"):  # no key: not an "unknown key ''"
        load_spec(path, ["=5"])
    path = write(tmp_path, "prompts: a.parquet\noutput: out\ngeneration: {height: 512}\n")
    for item, part in (("generation.height.x=1", "height"), ("prompts.x=1", "prompts")):  # into a value: no
        with pytest.raises(SpecError, match=rf"^--set {item}: {part} is not a mapping$"):  # item assignment error
            load_spec(path, [item])


def test_example_jobs_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "jobs" / "examples").glob("*.yaml")):
        assert load_spec(path).prompts


def test_micro_batch_and_compile_per_stage_reach_the_stage_classes(tmp_path):
    spec = load_spec(write(tmp_path, "prompts: a.parquet\noutput: out\n"),
                     ["stages.prior.micro_batch=4", "stages.decoder.compile=true", "stages.text.compile=max-autotune"])
    assert (spec.stages.text.micro_batch, spec.stages.prior.micro_batch, spec.stages.decoder.micro_batch) == (8, 4, 8)
    assert stage_kwargs(spec, "prior")["micro_batch"] == 4 and not stage_kwargs(spec, "prior")["compile"]
    assert stage_kwargs(spec, "decoder")["compile"] is True and stage_kwargs(spec, "text")["compile"] == "max-autotune"
    assert set(stage_kwargs(spec, "text")) == {"prior", "decoder", "dtype", "storage_options", "micro_batch", "compile"}


def test_sweep_values_that_make_the_same_images_are_warned_about():
    """A repeat, 1 and 1.0, two guidance scales of 1 or less (no guidance either way), alpha 1 and 1.0, an
    interpolation's end and its checkpoint: warned about naming both (not refused: an output made with such a
    sweep, and its decode, read the same job.yaml)."""
    from jobs.spec_rules import sweep_warnings

    ends = [{"interpolate": ["a", "b"], "alpha": alpha} for alpha in (1, 1.0, 0, 0.5)]
    sweep = {"seed": [0, 1, 0], "decoder_guidance_scale": [0.0, 4, 0.5], "prior_guidance_scale": [4, 4.0],
             "resolution": [[128, 256], [256, 128]], "prior_checkpoint": [*ends[:2], "b", ends[2], "a", ends[3]]}
    assert sweep_warnings(spec_from_dict({**BASE, "sweep": sweep}).sweep) == [
        "warning: sweep.seed[2]: 0 makes the same images as sweep.seed[0] (0): give each value once",
        "warning: sweep.decoder_guidance_scale[2]: 0.5 makes the same images as sweep.decoder_guidance_scale[0] "
        "(0.0) (a guidance of 1 or less is no guidance): give each value once",
        "warning: sweep.prior_guidance_scale[1]: 4.0 makes the same images as sweep.prior_guidance_scale[0] (4): "
        "give each value once",
        "warning: sweep.prior_checkpoint[1]: {'interpolate': ['a', 'b'], 'alpha': 1.0} makes the same images as "
        "sweep.prior_checkpoint[0] ({'interpolate': ['a', 'b'], 'alpha': 1}): give each value once",
        "warning: sweep.prior_checkpoint[2]: 'b' makes the same images as sweep.prior_checkpoint[0] ({'interpolate': "
        "['a', 'b'], 'alpha': 1}): give each value once",
        "warning: sweep.prior_checkpoint[4]: 'a' makes the same images as sweep.prior_checkpoint[3] ({'interpolate': "
        "['a', 'b'], 'alpha': 0}): give each value once"]


def test_a_run_is_named_one_way_whatever_its_spelling():
    """decode's source run and a moved run's old place compare as image_uri values are written: a rerun of
    `decode s3://b/run/ OUT` continues `decode s3://b/run OUT`; a run written to s3a:// or file:// is found."""
    from stages.samples import relocated, relocation

    spec = spec_from_dict({"prompts": "s3://b/p", "output": "s3://b/out", "decoded_from": "s3a://b/run/"})
    assert spec.decoded_from == "s3://b/run"
    here = relocation("s3a://b/copy/")
    assert relocated("s3://b/run/images/ab/ab1.png", here) == "s3://b/copy/images/ab/ab1.png"
    assert relocated("s3://b/copy/images/ab/ab1.png", here) == "s3://b/copy/images/ab/ab1.png"
    here = relocation("file:///data/copy")
    assert relocated("tar://k.png::/data/run/shards/s.tar", here) == "tar://k.png::/data/copy/shards/s.tar"
    assert relocated("/elsewhere/x.png", here) == "/elsewhere/x.png"  # not the run's layout: as written
    here = relocation("/t/run")  # moved from a folder whose name starts with the new one's
    assert relocated("/t/run2/images/ab/ab1.png", here) == "/t/run/images/ab/ab1.png"
    assert relocated("tar://k.png::/t/run2/shards/s.tar", here) == "tar://k.png::/t/run/shards/s.tar"


def test_an_override_given_twice_is_refused_and_one_into_a_bare_section_works(tmp_path):
    """`--set` twice for one key would drop the first value without a word (as a YAML key twice, refused); a bare
    `model:` in the YAML (null) takes `--set model.dtype=...` as an empty section would."""
    with pytest.raises(SpecError, match=r"^--set generation\.height: given twice$"):
        apply_overrides(BASE, ["generation.height=256", "generation.height=512"])
    path = write(tmp_path, "prompts: a.parquet\noutput: out\nmodel:\n")
    assert load_spec(path, ["model.dtype=bfloat16"]).model.dtype == "bfloat16"
    # a value holding "=" (a SAS token, a prompt) splits at the first one: the key's
    assert apply_overrides(BASE, ["generation.negative_prompt=a=b"])["generation"]["negative_prompt"] == "a=b"
