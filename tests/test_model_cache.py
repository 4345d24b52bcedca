"""Object-store models in the node cache: one copy per version of the objects (ETag), complete or absent."""

import json

import s3fs

from stages.models import resolve


def test_an_updated_model_on_the_store_is_copied_again(s3_server, model_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("WUERSTCHEN_BATCH_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("model-cache")
    fs.put(str(model_cache / "prior"), "model-cache/prior", recursive=True)
    first = resolve("s3://model-cache/prior", "prior", s3_server)
    assert resolve("s3://model-cache/prior", "prior", s3_server) == first  # copied once
    config = json.loads(fs.cat_file("model-cache/prior/scheduler/scheduler_config.json"))
    fs.pipe_file("model-cache/prior/scheduler/scheduler_config.json", json.dumps({**config, "s": 0.02}).encode())
    fs.invalidate_cache()
    second = resolve("s3://model-cache/prior", "prior", s3_server)
    assert second != first  # the new version (ETag) is noticed …
    assert json.loads(open(f"{second}/scheduler/scheduler_config.json").read())["s"] == 0.02  # … and used
    leftovers = [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".")]
    assert not leftovers  # no partial download is left beside the copies


def test_an_inception_replaced_on_the_store_is_copied_again(s3_server, tmp_path, monkeypatch):
    """An FID Inception read from a URI is copied once per version of the object: a file replaced at the same URI
    (new weights) is not served from the first copy."""
    from stages.evaluate import find_inception

    monkeypatch.setenv("WUERSTCHEN_BATCH_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("inception")
    fs.pipe_file("inception/fid/net.pt", b"first weights")
    first = find_inception("s3://inception/fid", s3_server)  # a folder holding one .pt
    assert find_inception("s3://inception/fid", s3_server) == first and open(first, "rb").read() == b"first weights"
    fs.pipe_file("inception/fid/net.pt", b"second weights")
    second = find_inception("s3://inception/fid", s3_server)
    assert second != first and open(second, "rb").read() == b"second weights"
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".")]
