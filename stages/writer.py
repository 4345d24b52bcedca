"""Writers: Stage C embeddings to Parquet, images to object storage, and the manifest rows for them."""

from __future__ import annotations

import base64
import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from stages import columns as C
from stages import user_columns
from stages.footers import THREADS, column_index
from stages.output import EMBEDDINGS, IMAGES, MANIFEST, SHARD_STATS, SHARDS, folder, list_parts, parquet_part
from stages.samples import MEMBERS, member_ranges
from stages.storage import block_name, full_uri, join, sample_uri, write_atomic

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
PARAMS_SCHEMA = pa.schema([
    (C.ROW_ID, pa.string()),
    (C.PROMPT, pa.string()),
    (C.NEGATIVE_PROMPT, pa.string()),
    (C.SEED, pa.int64()),
    (C.HEIGHT, pa.int64()),
    (C.WIDTH, pa.int64()),
    (C.PRIOR_STEPS, pa.int64()),  # null: diffusers' DEFAULT_STAGE_C_TIMESTEPS
    (C.PRIOR_GUIDANCE, pa.float64()),
    (C.DECODER_STEPS, pa.int64()),
    (C.DECODER_GUIDANCE, pa.float64()),
    (C.IMAGE_INDEX, pa.int64()),
    (C.CHECKPOINT, pa.string()),
    (C.PRIOR_CHECKPOINT, pa.string()),
    (C.INPUT_ROWS, pa.int64()),  # null where no fold ran (a re-decode): one input row
])
MANIFEST_SCHEMA = pa.schema([
    *PARAMS_SCHEMA,
    (C.IMAGE_URI, pa.string()),  # null when the row failed
    (C.ERROR, pa.string()),  # null when the row succeeded
    (C.SHARD, pa.string()),  # output_format webdataset: the tar holding the sample, and its key
    (C.KEY, pa.string()),
    *[(name, pa.float64()) for name in (C.TEXT_SECONDS, C.PRIOR_SECONDS, C.DECODER_SECONDS, C.FINISHED_AT)],
    *[(name, pa.string()) for name in (C.TEXT_NODE, C.PRIOR_NODE, C.DECODER_NODE)],
])

def _params_table(batch: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """The scalar columns of a batch in a fixed schema ('' errors and 0 prior_steps become null)."""
    arrays = {}
    for f in schema:
        values = batch.get(f.name)
        if f.name == C.PRIOR_STEPS:
            values = [int(v) or None for v in values]
        elif f.name == C.ERROR:
            values = [v or None for v in values]
        arrays[f.name] = pa.array(list(values) if values is not None else [None] * len(batch[C.ROW_ID]),
                                  type=f.type)
    return pa.table(arrays, schema=schema)


def write_embeddings(batch: dict[str, np.ndarray], output: str, storage_options: dict,
                     user_types: pa.Schema | None = None) -> dict:
    """Persist Stage C output (embeddings, generator state after Stage C, params) of the rows without an error
    under <output>/embeddings/ (a failed row is made afresh on a resume)."""
    ok = np.asarray([not error for error in batch[C.ERROR]], dtype=bool)
    if not ok.any():
        return batch
    stored = {k: v[ok] for k, v in batch.items()}
    fs, root = folder(output, EMBEDDINGS, storage_options)
    table = _with_user_columns(_params_table(stored, PARAMS_SCHEMA), stored, user_types)
    embeddings = list(stored[C.IMAGE_EMBEDDINGS])
    value_type = pa.float16() if embeddings[0].dtype == np.float16 else pa.float32()
    table = table.append_column(C.IMAGE_EMBEDDINGS, pa.array([e.ravel() for e in embeddings],
                                                             type=pa.list_(value_type)))
    table = table.append_column(C.EMBEDDING_SHAPE, pa.array([list(e.shape) for e in embeddings],
                                                            type=pa.list_(pa.int32())))
    table = table.append_column(C.GENERATOR_STATE, pa.array([s.tobytes() for s in stored[C.GENERATOR_STATE]],
                                                            type=pa.binary()))
    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_atomic(fs, join(root, f"{block_name(stored[C.ROW_ID])}.parquet"), sink.getvalue())
    return batch


def stored_steps(values) -> np.ndarray:
    """A stored prior_steps column as the stages take it: null (NaN in a numpy batch) is 0, diffusers' default."""
    return np.nan_to_num(np.asarray(values, dtype=np.float64)).astype(np.int64)


def read_back_embeddings(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored Stage C rows (see write_embeddings) back into the columns Stage B/A takes."""
    from stages.batching import scatter  # imports torch: only in the tasks that read embeddings back

    n = len(batch[C.ROW_ID])
    out = {k: v for k, v in batch.items() if k not in (C.IMAGE_EMBEDDINGS, C.EMBEDDING_SHAPE, C.GENERATOR_STATE)}
    out[C.PRIOR_STEPS] = stored_steps(batch[C.PRIOR_STEPS])
    out[C.IMAGE_EMBEDDINGS] = scatter(n, [(np.arange(n), [
        np.asarray(values).reshape(tuple(shape)) for values, shape in zip(batch[C.IMAGE_EMBEDDINGS],
                                                                         batch[C.EMBEDDING_SHAPE])])])
    out[C.GENERATOR_STATE] = np.stack([np.frombuffer(s, dtype=np.uint8) for s in batch[C.GENERATOR_STATE]])
    out[C.ERROR] = np.full(n, "", dtype=object)
    out[C.PRIOR_SECONDS] = np.zeros(n)
    out[C.PRIOR_NODE] = np.full(n, "", dtype=object)
    return out


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    """PNG (lossless, for evaluation), JPEG or WebP bytes of an (H, W, 3) uint8 array."""
    buffer = io.BytesIO()
    options = {} if image_format == "png" else {"quality": 95}
    Image.fromarray(pixels).save(buffer, format=image_format.upper(), **options)
    return buffer.getvalue()


def write_images(batch: dict[str, np.ndarray], output: str, storage_options: dict, image_format: str,
                 user_types: pa.Schema | None = None) -> pa.Table:
    """Write each finished image as <output>/images/<row_id[:2]>/<row_id>.<ext>; return its manifest rows."""
    fs, root = folder(output, IMAGES, storage_options)
    uris, finished = [], []
    for row, error, pixels in zip(batch[C.ROW_ID], batch[C.ERROR], batch[C.IMAGE]):
        if error:
            uris.append(None)
        else:
            path = join(root, row[:2], f"{row}.{EXTENSIONS[image_format]}")
            write_atomic(fs, path, encode_image(pixels, image_format))
            uris.append(full_uri(fs, path))
        finished.append(time.time())
    batch = {**batch, C.IMAGE_URI: np.asarray(uris, dtype=object), C.FINISHED_AT: np.asarray(finished)}
    return _with_user_columns(_params_table(batch, MANIFEST_SCHEMA), batch, user_types)


def _with_user_columns(table: pa.Table, batch: dict[str, np.ndarray], types: pa.Schema | None) -> pa.Table:
    """Append the prompt table's own columns, which pass through every stage, in the table's types (`types`)."""
    if C.USER_VALUES in batch:
        for name, values in user_columns.unpack(batch[C.USER_VALUES], types).items():
            table = table.append_column(name, values)
    for name, values in batch.items():  # unpacked ones (rows given to a writer directly)
        if name not in table.schema.names and name not in MANIFEST_SCHEMA.names and name not in C.INTERNAL:
            table = table.append_column(name, user_columns.typed(list(values), user_columns.type_of(name, types)))
    return table


def shard_columns(batch: dict[str, np.ndarray], image_format: str) -> dict[str, np.ndarray]:
    """What write_shard needs of a decoded batch: each image encoded (here, in parallel, not one by one in the
    shard's task) and the scalar columns (no text states or embeddings), so that a shard's rows gathered into one
    block stay small (a 1024² PNG ~1.5 MB, a JPEG ~0.2 MB, against 3 MB of pixels)."""
    files = np.asarray([None if error else encode_image(image, image_format)
                        for image, error in zip(batch[C.IMAGE], batch[C.ERROR])], dtype=object)
    return {**{k: v for k, v in batch.items() if k not in C.TRANSIENT}, C.IMAGE_FILE: files}


def write_shard(batch: dict[str, np.ndarray], output: str, storage_options: dict, image_format: str,
                user_types: pa.Schema | None = None) -> pa.Table:
    """Write a batch as one WebDataset tar under <output>/shards/ (image, .txt caption, .json params and the
    table's own columns per sample; a value JSON lacks, e.g. a timestamp, as text) and its stats under
    <output>/shard_stats/ (none where every row failed); return manifest rows naming shard and key."""
    params = _with_user_columns(_params_table(batch, PARAMS_SCHEMA), batch, user_types).to_pylist()  # + the user's
    ok = [i for i, error in enumerate(batch[C.ERROR]) if not error]
    shard = _write_tar(batch, params, ok, output, storage_options, image_format) if ok else None
    n = len(params)
    member = f"{{}}.{EXTENSIONS[image_format]}"  # image_uri reads the sample's image through fsspec's tar://
    uris = [sample_uri(shard, member.format(r)) if not e else None for r, e in zip(batch[C.ROW_ID], batch[C.ERROR])]
    batch = {**batch, C.IMAGE_URI: np.asarray(uris, dtype=object), C.FINISHED_AT: np.full(n, time.time()),
             C.SHARD: np.asarray([shard if not e else None for e in batch[C.ERROR]], dtype=object),
             C.KEY: np.asarray([r if not e else None for r, e in zip(batch[C.ROW_ID], batch[C.ERROR])], dtype=object)}
    return _with_user_columns(_params_table(batch, MANIFEST_SCHEMA), batch, user_types)


def _write_tar(batch: dict[str, np.ndarray], params: list[dict], ok: list[int], output: str, storage_options: dict,
               image_format: str) -> str:
    """The tar of the `ok` rows' samples and its stats, each written whole; returns the tar's URI."""
    from webdataset import TarWriter  # ~1 s to import: only in the tasks that write shards

    fs, root = folder(output, SHARDS, storage_options)
    name = block_name(batch[C.ROW_ID])
    shard = join(root, f"{name}.tar")
    buffer = io.BytesIO()
    with TarWriter(buffer) as tar:
        for i in ok:
            tar.write({"__key__": batch[C.ROW_ID][i], EXTENSIONS[image_format]: batch[C.IMAGE_FILE][i],
                       "txt": params[i][C.PROMPT], "json": json.dumps(json_safe(params[i]), ensure_ascii=False,
                                                                       allow_nan=False, default=str)})
    buffer.seek(0)
    ranges = member_ranges(buffer, f".{EXTENSIONS[image_format]}")  # a reader's one range read of an image
    local = isinstance(fs, LocalFileSystem)  # local files take the tar's bytes without a copy of them
    write_atomic(fs, shard, buffer.getbuffer() if local else buffer.getvalue())
    stats = {"shard": full_uri(fs, shard), "samples": len(ok), "failed": len(params) - len(ok),
             "bytes": buffer.getbuffer().nbytes, "image_format": image_format, MEMBERS: ranges}
    stats_fs, stats_root = folder(output, SHARD_STATS, storage_options)  # beside, so readers of
    write_atomic(stats_fs, join(stats_root, f"{name}.json"), json.dumps(stats).encode())  # shards/ see tars only
    return stats["shard"]


def json_safe(value):
    """A value strict JSON parsers read: NaN and ±inf as null, bytes as base64 text (nested values too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _shards_named(fs, part: str) -> list[str]:
    """The names of the shards one manifest part names (its shard column read a row group at a time: a compacted
    part of 1M rows held ~60 MB of URIs at once)."""
    import pyarrow.compute as pc

    names = set()
    with parquet_part(fs, part, cache_type="none") as table:
        if column_index(table.metadata, C.SHARD) < 0:
            return []
        for group in range(table.num_row_groups):
            shards = pc.unique(table.read_row_group(group, columns=[C.SHARD]).column(C.SHARD)).drop_null()
            names.update(shard.rsplit("/", 1)[-1] for shard in shards.to_pylist())
    return list(names)


def drop_unlisted_shards(output: str, storage_options: dict) -> int:
    """Delete what <output>/shards/ holds that no manifest entry names by its name (a shard written by a run killed
    before its manifest entry, whose rows the resume writes again; a leftover temporary file), with its stats;
    returns how many. Readers of shards/ then find each sample once. Reads the live manifest parts' shard
    column, THREADS parts at a time (memory: their columns and the set of shard names)."""
    fs, root = folder(output, SHARDS, storage_options)
    if not fs.exists(root):
        return 0
    manifest_fs, parts = list_parts(output, MANIFEST, storage_options)
    listed: set[str] = set()
    with ThreadPoolExecutor(max_workers=THREADS) as pool:  # a resume at 60% of 10M rows: ~6k parts
        for shards in pool.map(lambda part: _shards_named(manifest_fs, part), parts):
            listed.update(shards)
    stats_fs, stats_root = folder(output, SHARD_STATS, storage_options)
    dropped = [path for path in fs.find(root) if path.rsplit("/", 1)[-1] not in listed]  # by name: a moved or
    # copied run's manifest names its old place
    for path in dropped:
        fs.rm(path)
        stats = join(stats_root, path.rsplit("/", 1)[-1].removesuffix(".tar") + ".json")
        if path.endswith(".tar") and stats_fs.exists(stats):
            stats_fs.rm(stats)
    return len(dropped)
