"""A whole job on object storage: prompts, models and output on an S3 server (moto, loopback) via s3fs."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import make_batch, write_prompts
from PIL import Image
from safetensors.torch import load_file, save_file

from jobs.generate import run
from jobs.spec import SpecError, spec_from_dict
from stages import columns as C
from stages import output
from stages.decoder import DecoderStage
from stages.prior import PriorStage
from stages.text import TextEncoder

ROWS = [{C.PROMPT: "a lighthouse"}, {C.PROMPT: "a bowl of ramen", C.DECODER_GUIDANCE: 2.0}]


def darker_decoder(model_cache, target):
    """A copy of the tiny decoder whose pixels are darker: a run that fell back to `tiny` would show it."""
    shutil.copytree(model_cache / "decoder", target)
    weights = target / "vqgan" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["out_block.0.bias"] = tensors["out_block.0.bias"] - 0.2
    save_file(tensors, weights)
    return target


@pytest.fixture(scope="module")
def bucket(s3_server, model_cache, tmp_path_factory):
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("wuerstchen")
    local = tmp_path_factory.mktemp("s3-prompts")
    fs.put(write_prompts(local / "p.parquet", ROWS), "wuerstchen/prompts/p.parquet")
    fs.put(str(model_cache / "prior"), "wuerstchen/models/prior", recursive=True)
    decoder = darker_decoder(model_cache, local / "decoder")
    fs.put(str(decoder), "wuerstchen/models/decoder", recursive=True)
    return fs, s3_server, decoder


def snapshot(fs, folder: str) -> dict:
    """Every object under the run's images/, embeddings/ and manifest/ with its ETag and modification time."""
    fs.invalidate_cache()
    return {path: (info.get("ETag"), info.get("LastModified")) for sub in ("images", "embeddings", "manifest")
            for path, info in fs.find(f"{folder}/{sub}", detail=True).items()}


def test_job_with_everything_on_s3(bucket, ray_cluster, model_cache):
    fs, options, decoder = bucket
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
    batch = make_batch(ROWS)  # the S3 models' images, made here from local copies of them
    from_s3 = DecoderStage(str(decoder))(PriorStage(str(model_cache / "prior"))(
        TextEncoder(str(model_cache / "prior"), str(decoder))(dict(batch))))[C.IMAGE]
    preset = DecoderStage("tiny")(PriorStage("tiny")(TextEncoder("tiny", "tiny")(make_batch(ROWS))))[C.IMAGE]
    for row in manifest:
        assert row[C.IMAGE_URI].startswith("s3://wuerstchen/runs/one/images/")
        with fs.open(row[C.IMAGE_URI], "rb") as f:
            image = np.asarray(Image.open(f)).astype(float)
        i = [r[C.PROMPT] for r in ROWS].index(row[C.PROMPT])
        assert np.abs(image - from_s3[i]).max() <= 1  # made by the S3 models …
        assert np.abs(image - preset[i]).mean() >= 8  # … not by a fallback to the tiny preset
    before = snapshot(fs, "wuerstchen/runs/one")
    assert run(spec).new == 0
    assert snapshot(fs, "wuerstchen/runs/one") == before  # a rerun rewrites nothing
    assert fs.exists("wuerstchen/runs/one/job.yaml") and fs.ls("wuerstchen/runs/one/embeddings")
    copies = list((model_cache.parent / "models").iterdir())  # each S3 model copied once into the node cache
    assert len(copies) == 2 and all((c / "model_index.json").exists() for c in copies)


def test_missing_s3_prompts_and_models_are_named(bucket):
    _, options, _ = bucket
    base = {"output": "s3://wuerstchen/runs/bad", "storage_options": options}
    from jobs.generate import preflight

    with pytest.raises(SpecError, match="prompts: s3://wuerstchen/nothing-here does not exist"):
        preflight(spec_from_dict({**base, "prompts": "s3://wuerstchen/nothing-here"}))
    with pytest.raises(SpecError, match="model.decoder: s3://wuerstchen/models/nope does not exist"):
        preflight(spec_from_dict({**base, "prompts": "s3://wuerstchen/prompts/",
                                  "model": {"decoder": "s3://wuerstchen/models/nope"}}))


def test_a_process_that_listed_a_folder_still_reads_what_is_written_there_later(bucket):
    """A reused Ray worker lists manifest/ (a WebDataset resume's shard cleanup), another process writes a part,
    then a read task in the first worker opens it: found, not answered from the listing it made before."""
    fs, options, _ = bucket
    out = "s3://wuerstchen/listing-run"
    writer = s3fs.S3FileSystem(skip_instance_cache=True, **options)  # another process
    writer.pipe("wuerstchen/listing-run/manifest/a.parquet", b"x")
    worker_fs, parts = output.list_parts(out, output.MANIFEST, options)
    assert [p.rsplit("/", 1)[-1] for p in parts] == ["a.parquet"]
    writer.pipe("wuerstchen/listing-run/manifest/b.parquet", b"y")
    assert worker_fs.cat_file("wuerstchen/listing-run/manifest/b.parquet") == b"y"


def test_reading_one_column_of_a_part_fetches_that_column_not_the_part(bucket, monkeypatch):
    """A resume, --retry-failed and decode read only the row ids of every embeddings part (5.5 MiB each at 1024²):
    what comes over the network is about that column, not the whole part (s3fs's readahead fetched it all)."""
    import io

    import pyarrow as pa
    import pyarrow.dataset as pads

    from stages import footers

    fs, options, _ = bucket
    n = 256
    embeddings = np.random.default_rng(0).standard_normal((n, 16 * 24 * 24)).astype(np.float16)
    table = pa.table({C.ROW_ID: [f"{i:032x}" for i in range(n)], C.INPUT_ROWS: np.ones(n, np.int64),
                      "image_embeddings": pa.array(list(embeddings), pa.list_(pa.float16()))})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    fs.pipe("wuerstchen/column-run/manifest/a.parquet", sink.getvalue())
    fetched = []
    fetch = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", lambda f, start, end: fetched.append(
        len(data := fetch(f, start, end))) or data)
    part_fs, parts = output.list_parts("s3://wuerstchen/column-run", output.MANIFEST, options)
    ids = pads.dataset(parts, filesystem=output.arrow_fs(part_fs), format="parquet").to_table(columns=[C.ROW_ID])
    assert ids.num_rows == n and sum(fetched) < len(sink.getvalue()) / 20, (sum(fetched), len(sink.getvalue()))
    fetched.clear()
    assert footers.folded_rows("s3://wuerstchen/column-run", options) == 0
    assert 0 < sum(fetched) < len(sink.getvalue()) / 20, (sum(fetched), len(sink.getvalue()))


def test_a_refused_request_names_the_credentials():
    """S3 answers a HEAD with 403 and no body: s3fs's PermissionError says only "Forbidden"."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from stages.storage import reason

    refused = translate_boto_error(ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject"))
    assert reason(refused) == "Forbidden: the store refused these credentials, or they lack the permission"
    assert reason(PermissionError(13, "Permission denied")) == "Permission denied"  # a local file: its mode


def test_overwrite_deletes_a_run_one_folder_at_a_time(bucket, monkeypatch):
    """--overwrite on S3 deletes every object of the run, listing one folder at a time: s3fs's recursive rm
    would list every key of the run first (10M image paths on the driver)."""
    from jobs.resume import claim

    fs, options, _ = bucket
    keys = ["job.yaml", "manifest/a.parquet", "images/ab/ab1.png", "images/ab/ab2.png", "images/cd/cd1.png",
            "embeddings/_closed"]
    for key in keys:
        fs.pipe(f"wuerstchen/overwritten/{key}", b"x")
    fs.pipe("wuerstchen/overwritten-not/job.yaml", b"x")  # a sibling sharing the prefix stays
    monkeypatch.setattr(s3fs.S3FileSystem, "_find", lambda *a, **k: pytest.fail("listed every key at once"))
    claim(spec_from_dict({"prompts": "p.parquet", "output": "s3://wuerstchen/overwritten", "storage_options": options}),
          overwrite=True)
    monkeypatch.undo()
    fs.invalidate_cache()
    assert fs.find("wuerstchen/overwritten/") == ["wuerstchen/overwritten/job.yaml"]  # the new run's claim
    assert fs.cat("wuerstchen/overwritten/job.yaml") != b"x"
    assert fs.exists("wuerstchen/overwritten-not/job.yaml")


def test_the_store_defaults_merge_under_the_jobs_own_options():
    """botocore's standard retries (10 attempts) and uncached listings unless the job says otherwise, key by key:
    a job that sets only the attempts keeps the retry mode, and its other client settings stay."""
    from stages.storage import url_to_fs

    fs = url_to_fs("s3://b/k", {"key": "k", "secret": "s"})[0]
    assert fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 10}
    assert fs.dircache.use_listings_cache is False
    fs = url_to_fs("s3://b/k", {"key": "k", "secret": "s", "use_listings_cache": True,
                                "config_kwargs": {"retries": {"total_max_attempts": 2}, "read_timeout": 5}})[0]
    assert fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 2}
    assert fs.config_kwargs["read_timeout"] == 5 and fs.dircache.use_listings_cache is True
