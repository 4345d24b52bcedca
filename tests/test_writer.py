"""Writers: image encodings, atomic objects, and manifest rows for good and failed rows."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages import columns as C
from stages.writer import MANIFEST_SCHEMA, encode_image, write_embeddings, write_images


def batch(n=2, errors=("", "")):
    rng = np.random.default_rng(0)
    return {
        C.ROW_ID: np.asarray([f"ab{i:030d}" for i in range(n)], dtype=object),
        C.PROMPT: np.asarray(["p"] * n, dtype=object), C.NEGATIVE_PROMPT: np.asarray([""] * n, dtype=object),
        C.SEED: np.arange(n), C.HEIGHT: np.full(n, 128), C.WIDTH: np.full(n, 128),
        C.PRIOR_STEPS: np.asarray([0, 3][:n]), C.PRIOR_GUIDANCE: np.full(n, 4.0),
        C.DECODER_STEPS: np.full(n, 12), C.DECODER_GUIDANCE: np.zeros(n), C.IMAGE_INDEX: np.zeros(n, dtype=int),
        C.CHECKPOINT: np.asarray(["tiny"] * n, dtype=object), C.ERROR: np.asarray(errors, dtype=object),
        C.TEXT_SECONDS: np.ones(n), C.PRIOR_SECONDS: np.ones(n), C.DECODER_SECONDS: np.ones(n),
        C.IMAGE: rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8),
        C.IMAGE_EMBEDDINGS: rng.standard_normal((n, 16, 3, 3)).astype(np.float16),
        C.GENERATOR_STATE: rng.integers(0, 256, (n, 5056), dtype=np.uint8),
        "user_column": np.asarray(["x", "y"][:n], dtype=object),
    }


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encodings_decode_back(fmt):
    pixels = np.random.default_rng(1).integers(0, 256, (64, 32, 3), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(pixels, fmt))))
    assert decoded.shape == pixels.shape
    if fmt == "png":
        assert np.array_equal(decoded, pixels)  # lossless: the format for evaluation runs


def test_manifest_rows_for_good_and_failed_rows(tmp_path):
    table = write_images(batch(errors=("", "Stage C produced NaN")), str(tmp_path), {}, "png")
    assert table.schema.names[:len(MANIFEST_SCHEMA)] == MANIFEST_SCHEMA.names
    good, bad = table.to_pylist()
    assert good[C.ERROR] is None and good[C.PRIOR_STEPS] is None and bad[C.PRIOR_STEPS] == 3
    assert good[C.IMAGE_URI] == str(tmp_path / "images" / "ab" / f"{good[C.ROW_ID]}.png")
    assert Image.open(good[C.IMAGE_URI]).size == (128, 128)
    assert bad[C.IMAGE_URI] is None and bad[C.ERROR] == "Stage C produced NaN"
    assert not (tmp_path / "images" / "ab" / f"{bad[C.ROW_ID]}.png").exists()
    assert good["user_column"] == "x" and C.IMAGE not in table.schema.names
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_embeddings_round_trip(tmp_path):
    data = batch()
    write_embeddings(data, str(tmp_path), {})
    (row, _) = pq.read_table(tmp_path / "embeddings").to_pylist()
    stored = np.asarray(row[C.IMAGE_EMBEDDINGS], dtype=np.float16).reshape(row[C.EMBEDDING_SHAPE])
    assert np.array_equal(stored, data[C.IMAGE_EMBEDDINGS][0])
    assert row[C.GENERATOR_STATE] == data[C.GENERATOR_STATE][0].tobytes()


def test_failed_rows_are_not_stored_in_embeddings(tmp_path):
    """A failed row is made afresh on a resume or a --retry-failed, never decoded from a bad Stage C output."""
    data = batch(errors=("", "Stage C produced NaN"))
    write_embeddings(data, str(tmp_path), {})
    assert pq.read_table(tmp_path / "embeddings").column(C.ROW_ID).to_pylist() == [data[C.ROW_ID][0]]
    write_embeddings(batch(errors=("NaN", "NaN")), str(tmp_path / "none"), {})
    assert not (tmp_path / "none").exists()


def test_shard_rows_carry_their_encoded_images_and_a_shard_of_failures_only_is_not_written(tmp_path):
    """WebDataset: shard_columns encodes each image (the raw pixels do not travel into the shard's block); a
    shard is its good rows' samples; a block whose every row failed writes no empty tar and no stats."""
    import tarfile

    from stages.writer import shard_columns, write_shard

    rows = shard_columns(batch(errors=("", "Stage C produced NaN")), "png")
    assert C.IMAGE not in rows and rows[C.IMAGE_FILE][1] is None
    good, bad = write_shard(rows, str(tmp_path), {}, "png").to_pylist()
    with tarfile.open(good[C.SHARD]) as tar:
        assert tar.extractfile(f"{good[C.ROW_ID]}.png").read() == rows[C.IMAGE_FILE][0]
    assert bad[C.SHARD] is None and bad[C.IMAGE_URI] is None
    failed = shard_columns(batch(n=1, errors=("Stage B/A produced NaN",)), "png")
    (row,) = write_shard({**failed, C.ROW_ID: np.asarray(["cd" + "0" * 30], dtype=object)}, str(tmp_path), {},
                         "png").to_pylist()
    assert row[C.SHARD] is None and row[C.ERROR] == "Stage B/A produced NaN"
    assert len(list((tmp_path / "shards").iterdir())) == 1 and len(list((tmp_path / "shard_stats").iterdir())) == 1
    (stats,) = [json.loads(p.read_text()) for p in (tmp_path / "shard_stats").iterdir()]
    assert (stats["samples"], stats["failed"]) == (1, 1)  # the README's per-shard counts: the good row, the failed


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_shard_stats_give_each_image_s_byte_range_in_the_tar(tmp_path, fmt):
    """report and evaluate read a sample's image with one range read at shard_stats' offset and size, in any
    image format (a range that missed, or no range for a .jpg member, meant reading every header of the tar)."""
    from stages.writer import EXTENSIONS, shard_columns, write_shard

    rows = shard_columns(batch(), fmt)
    written = write_shard(rows, str(tmp_path), {}, fmt).to_pylist()
    (stats,) = [json.loads(p.read_text()) for p in (tmp_path / "shard_stats").iterdir()]
    tar = open(written[0][C.SHARD], "rb").read()
    for i, row in enumerate(written):
        offset, size = stats["members"][f"{row[C.ROW_ID]}.{EXTENSIONS[fmt]}"]
        assert tar[offset:offset + size] == rows[C.IMAGE_FILE][i]


def test_a_write_cut_short_leaves_nothing_under_its_name(tmp_path, monkeypatch):
    """A local write that fails halfway (a full disk, a kill) leaves no truncated part or image under the name
    readers list: the bytes go to a hidden file, renamed once whole."""
    from fsspec.implementations.local import LocalFileSystem

    from stages.storage import write_atomic

    whole = LocalFileSystem.pipe_file

    def cut_short(self, path, value, **kwargs):
        whole(self, path, value[: len(value) // 2], **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LocalFileSystem, "pipe_file", cut_short)
    with pytest.raises(OSError):
        write_atomic(LocalFileSystem(), f"{tmp_path}/manifest/part-0.parquet", b"x" * 1000)
    assert not (tmp_path / "manifest" / "part-0.parquet").exists()
