"""A whole job on object storage: prompts, models and output on an S3 server (moto, loopback) via s3fs."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import write_prompts
from PIL import Image

from jobs.generate import run
from jobs.spec import SpecError, spec_from_dict
from stages import columns as C


@pytest.fixture(scope="module")
def bucket(s3_server, model_cache, tmp_path_factory):
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("wuerstchen")
    local = tmp_path_factory.mktemp("s3-prompts")
    rows = [{C.PROMPT: "a lighthouse"}, {C.PROMPT: "a bowl of ramen", C.DECODER_GUIDANCE: 2.0}]
    fs.put(write_prompts(local / "p.parquet", rows), "wuerstchen/prompts/p.parquet")
    fs.put(str(model_cache / "prior"), "wuerstchen/models/prior", recursive=True)
    fs.put(str(model_cache / "decoder"), "wuerstchen/models/decoder", recursive=True)
    return fs, s3_server


def test_job_with_everything_on_s3(bucket, ray_cluster, model_cache):
    fs, options = bucket
    spec = spec_from_dict({
        "prompts": "s3://wuerstchen/prompts/",
        "output": "s3://wuerstchen/runs/one",
        "storage_options": options,
        "model": {"prior": "s3://wuerstchen/models/prior", "decoder": "s3://wuerstchen/models/decoder"},
        "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2},
        "stages": {"text": {"batch_size": 2}, "prior": {"batch_size": 2}, "decoder": {"batch_size": 2}},
    })
    summary = run(spec)
    assert summary.rows == 2 and summary.failed == 0
    manifest = pq.read_table("wuerstchen/runs/one/manifest", filesystem=fs).to_pylist()
    assert {r[C.PROMPT] for r in manifest} == {"a lighthouse", "a bowl of ramen"}
    for row in manifest:
        assert row[C.IMAGE_URI].startswith("s3://wuerstchen/runs/one/images/")
        with fs.open(row[C.IMAGE_URI], "rb") as f:
            assert np.asarray(Image.open(f)).shape == (128, 128, 3)
    assert fs.exists("wuerstchen/runs/one/job.yaml") and fs.ls("wuerstchen/runs/one/embeddings")
    copies = list((model_cache.parent / "models").iterdir())  # each S3 model copied once into the node cache
    assert len(copies) == 2 and all((c / "model_index.json").exists() for c in copies)


def test_missing_s3_prompts_and_models_are_named(bucket):
    _, options = bucket
    base = {"output": "s3://wuerstchen/runs/bad", "storage_options": options}
    from jobs.generate import preflight

    with pytest.raises(SpecError, match="prompts: s3://wuerstchen/nothing-here does not exist"):
        preflight(spec_from_dict({**base, "prompts": "s3://wuerstchen/nothing-here"}))
    with pytest.raises(SpecError, match="model.decoder: s3://wuerstchen/models/nope does not exist"):
        preflight(spec_from_dict({**base, "prompts": "s3://wuerstchen/prompts/",
                                  "model": {"decoder": "s3://wuerstchen/models/nope"}}))
