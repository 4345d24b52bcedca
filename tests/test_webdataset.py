"""Dataset output: WebDataset tar shards with image, caption and params, listed shard by shard in the manifest."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from conftest import reference_image, write_prompts
from PIL import Image

from jobs.generate import run
from jobs.spec import spec_from_dict
from stages import columns as C


def test_shards_are_readable_by_webdataset_and_ray(tmp_path, ray_cluster, reference_pipe):
    rows = [{C.PROMPT: f"a painting of number {i}", C.SEED: i} for i in range(7)]
    spec = spec_from_dict({
        "prompts": write_prompts(tmp_path / "p.parquet", rows), "output": str(tmp_path / "out"),
        "generation": {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2},
        "output_format": "webdataset", "shard_size": 3,
        "stages": {"text": {"batch_size": 4}, "prior": {"batch_size": 4}, "decoder": {"batch_size": 4}},
    })
    assert run(spec).rows == 7
    manifest = {r[C.KEY]: r for r in pq.read_table(tmp_path / "out" / "manifest").to_pylist()}
    shards = sorted((tmp_path / "out" / "shards").glob("*.tar"))
    assert len(manifest) == 7 and all(r[C.SHARD] in {str(s) for s in shards} for r in manifest.values())

    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(manifest)
    for sample in samples:
        row = manifest[sample["__key__"]]
        assert sample["txt"].decode() == row[C.PROMPT] and json.loads(sample["json"])[C.SEED] == row[C.SEED]
        image = np.asarray(Image.open(io.BytesIO(sample["png"]))) / 255.0
        i = int(row[C.PROMPT].rsplit(" ", 1)[1])  # the input row this sample must come from
        expected = reference_image(reference_pipe, rows[i])  # settings from the input, not the sample
        assert np.abs(image - expected).max() <= 1 / 255 + 1e-6, sample["__key__"]
        assert row[C.SHARD].endswith(".tar")

    stats = [json.loads(p.read_text()) for p in (tmp_path / "out" / "shard_stats").glob("*.json")]
    assert sum(s["samples"] for s in stats) == 7 and all(s["samples"] <= 3 for s in stats)
    assert ray_cluster.data.read_webdataset(str(tmp_path / "out" / "shards")).count() == 7
