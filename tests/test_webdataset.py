"""Dataset output: WebDataset tar shards with image, caption and params, listed shard by shard in the manifest."""

import io
import json
from pathlib import Path
import shutil

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from conftest import reference_image, write_prompts
from PIL import Image
from test_evaluate import clip_dir  # noqa: F401 - the fixture

import jobs.evaluate as J
from jobs.decode import run_decode
from jobs.generate import run
from jobs.spec import spec_from_dict
from stages import columns as C
from stages.samples import read_image_bytes

ROWS = [{C.PROMPT: f"a painting of number {i}", C.SEED: i, "label": i % 3,  # the user's own columns
         "weight": float("nan") if i == 2 else i / 2} for i in range(7)]


@pytest.fixture(scope="module")
def shards_run(tmp_path_factory, ray_cluster):
    tmp_path = tmp_path_factory.mktemp("wds")
    spec = spec_from_dict({
        "prompts": write_prompts(tmp_path / "p.parquet", ROWS), "output": str(tmp_path / "out"),
        "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2},
        "output_format": "webdataset", "shard_size": 3,
        "stages": {"text": {"batch_size": 4}, "prior": {"batch_size": 4}, "decoder": {"batch_size": 4}},
    })
    summary = run(spec)
    assert summary.rows == 7 and f"images in {tmp_path / 'out' / 'shards'}," in str(summary)  # where they are
    return tmp_path


def samples_of(out) -> dict:
    """{key: sample} of every shard under `out`."""
    return {s["__key__"]: s for s in wds.WebDataset([str(p) for p in sorted((out / "shards").glob("*.tar"))],
                                                    shardshuffle=False)}


def test_shards_are_readable_by_webdataset_and_ray(shards_run, ray_cluster, reference_pipe):
    tmp_path, rows = shards_run, ROWS
    manifest = {r[C.KEY]: r for r in pq.read_table(tmp_path / "out" / "manifest").to_pylist()}
    shards = sorted((tmp_path / "out" / "shards").glob("*.tar"))
    assert len(manifest) == 7 and all(r[C.SHARD] in {str(s) for s in shards} for r in manifest.values())

    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(manifest)
    for sample in samples:
        row = manifest[sample["__key__"]]
        assert sample["txt"].decode() == row[C.PROMPT] and json.loads(sample["json"])[C.SEED] == row[C.SEED]
        i = int(row[C.PROMPT].rsplit(" ", 1)[1])  # the input row this sample must come from
        meta = json.loads(sample["json"], parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
        assert meta["label"] == rows[i]["label"]  # a loader needs no join for the user's columns
        assert meta["weight"] == (None if i == 2 else rows[i]["weight"])  # NaN: null, as strict parsers need
        image = np.asarray(Image.open(io.BytesIO(sample["png"]))) / 255.0
        expected = reference_image(reference_pipe, rows[i])  # settings from the input, not the sample
        assert np.abs(image - expected).max() <= 1 / 255 + 1e-6, sample["__key__"]
        assert row[C.SHARD].endswith(".tar")

    stats = [json.loads(p.read_text()) for p in (tmp_path / "out" / "shard_stats").glob("*.json")]
    assert sum(s["samples"] for s in stats) == 7 and all(s["samples"] <= 3 for s in stats)
    assert ray_cluster.data.read_webdataset(str(tmp_path / "out" / "shards")).count() == 7


def test_a_sample_is_read_by_its_byte_range_not_through_its_shard(shards_run, tmp_path):
    """report and evaluate read a sample's image with one range read (shard_stats/ gives its range): fsspec's
    tar:// reads every header of the shard first, which on an object store downloads the whole tar per image."""
    out = tmp_path / "out"
    shutil.copytree(shards_run / "out", out)
    row = pq.read_table(out / "manifest").to_pylist()[0]
    member, shard = row[C.IMAGE_URI].removeprefix("tar://").split("::")
    tar = out / "shards" / shard.rsplit("/", 1)[1]
    expected = samples_of(out)[row[C.ROW_ID]]["png"]
    start, size = json.loads((out / "shard_stats" / f"{tar.stem}.json").read_text())["members"][member]
    length = tar.stat().st_size
    tar.write_bytes(bytes(start) + expected + bytes(length - start - size))  # every other byte zeroed: no headers
    uri = f"tar://{member}::{tar}"
    assert read_image_bytes(uri, {}) == expected
    with pytest.raises(Exception):  # what tar:// would have made of it
        with fsspec.open(uri, "rb") as f:
            f.read()


def test_a_shard_without_recorded_ranges_is_read_through_tar(shards_run, tmp_path):
    """Shards written before their stats recorded the images' ranges are read as before (fsspec's tar://)."""
    out = tmp_path / "out"
    shutil.copytree(shards_run / "out", out)
    for stats in (out / "shard_stats").glob("*.json"):
        stats.write_text(json.dumps({k: v for k, v in json.loads(stats.read_text()).items() if k != "members"}))
    samples = samples_of(out)
    for row in pq.read_table(out / "manifest").to_pylist():
        uri = row[C.IMAGE_URI].replace(str(shards_run / "out"), str(out))
        assert read_image_bytes(uri, {}) == samples[row[C.ROW_ID]]["png"]


def test_report_evaluate_and_decode_read_the_samples(shards_run, clip_dir):  # noqa: F811 - the fixture
    out = shards_run / "out"
    samples, manifest = samples_of(out), pq.read_table(out / "manifest").to_pylist()
    for row in manifest:  # image_uri opens the row's own sample with fsspec
        with fsspec.open(row[C.IMAGE_URI], "rb") as f:
            assert f.read() == samples[row[C.ROW_ID]]["png"]
    page = (out / "report" / "index.html").read_text()
    pixels = {k: np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"), dtype=float) for k, s in samples.items()}
    for row in manifest:  # every thumbnail (JPEG of a 128² image) is nearest its own row's image
        thumb = np.asarray(Image.open(out / "report" / "thumbs" / f"{row[C.ROW_ID]}.jpg"), dtype=float)
        distance = {k: np.abs(thumb - image).mean() for k, image in pixels.items()}
        assert min(distance, key=distance.get) == row[C.ROW_ID], distance
    assert "unreadable" not in page

    metrics = J.evaluate(J.EvalOptions(run=str(out), clip_model=clip_dir, pools=J.PoolOptions(batch_size=4)))
    assert metrics["images"] == 7 and not metrics["failures"]

    assert run_decode(str(out), str(shards_run / "again")).rows == 7  # same settings: the same samples, bit for bit
    again = samples_of(shards_run / "again")
    assert again.keys() == samples.keys() and all(again[k]["png"] == samples[k]["png"] for k in samples)
    assert run_decode(str(out), str(shards_run / "files"), ["output_format=files"]).rows == 7  # shards → files
    files = pq.read_table(shards_run / "files" / "manifest").to_pylist()
    assert {r[C.ROW_ID]: Path(r[C.IMAGE_URI]).read_bytes() for r in files} == {k: s["png"] for k, s in samples.items()}



def test_a_moved_run_keeps_its_shards_and_reads_its_samples_after_a_rerun(shards_run, ray_cluster):
    """A WebDataset run copied elsewhere (its manifest names shards at the old place) and run again there: its
    shards are its own, not a killed run's leftovers (none is deleted), and the report reads every sample under the
    new place even though the rerun recorded that place in job.yaml."""
    from jobs.preflight import generate_job
    from jobs.report import build_report

    copy = shards_run / "copied"
    shutil.copytree(shards_run / "out", copy)
    shards = sorted(p.name for p in (copy / "shards").glob("*.tar"))
    data = yaml.safe_load((copy / "job.yaml").read_text())
    spec = spec_from_dict({**data, "output": str(copy)})
    (copy / "_finished").unlink()  # as an earlier retry leaves it: the rerun takes the full path
    summary = generate_job(spec, retry_failed=True)  # which cleans shards/ up (no failed rows to make)
    assert summary.rows == 7 and sorted(p.name for p in (copy / "shards").glob("*.tar")) == shards
    assert yaml.safe_load((copy / "job.yaml").read_text())["output"] == str(copy)
    assert samples_of(copy).keys() == samples_of(shards_run / "out").keys()
    shutil.rmtree(copy / "report")
    (shards_run / "out" / "shards").rename(shards_run / "away")  # the old place's samples cannot be what is read
    try:
        page = Path(build_report(str(copy))).read_text()
    finally:
        (shards_run / "away").rename(shards_run / "out" / "shards")
    assert "unreadable" not in page and len(list((copy / "report" / "thumbs").glob("*.jpg"))) == 7
