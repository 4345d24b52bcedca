"""evaluate's checks before any work: a --by axis's values, the CLIP reference."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.spec import SpecError
from stages import footers
from stages.refs import ModelRefError, check_local_weights, hub_entries, ref_kind
from stages.storage import join, url_to_fs

# What CLIPModel and CLIPProcessor load (the image processor's config under its older or its newer name; the
# weights whole or sharded).
CLIP_FILES = (("config.json",), ("preprocessor_config.json", "processor_config.json"), ("tokenizer_config.json",),
              ("model.safetensors", "model.safetensors.index.json"))  # CLIPModel loads safetensors only
AXIS_VALUES = 1000  # most values of one --by axis: each is a group of FID statistics (~32 MiB) and a result row


def check_axis_values(fs, files: list[str], axis: str) -> None:
    """An axis has at most AXIS_VALUES values (a per-row column would make a group of every row): its column is
    read part by part, in parallel, each read stopping once past the limit."""
    def values(file: str) -> set:
        seen = set()
        with fs.open(file, "rb", cache_type="none") as f:
            parquet = pq.ParquetFile(f)
            if footers.column_index(parquet.metadata, axis) < 0:
                return seen
            for batch in parquet.iter_batches(columns=[axis], batch_size=65_536):
                seen.update(v for v in pc.unique(batch.column(0)).to_pylist() if v == v)  # NaN: one group, not a
                if len(seen) > AXIS_VALUES:                                            # new one each batch
                    break
        return seen

    seen, pool = set(), ThreadPoolExecutor(max_workers=footers.THREADS)
    try:
        for found in pool.map(values, files):
            seen |= found
            if len(seen) > AXIS_VALUES:
                raise SpecError(f"--by {axis}: more than {AXIS_VALUES} distinct values; an axis groups the "
                                f"images by a setting (a sweep's decoder_guidance_scale, a style column), and "
                                f"each value gets its own metrics")
    finally:
        pool.shutdown(cancel_futures=True)  # past the limit: the parts not read yet are not read


def check_clip(model: str, storage_options: dict) -> dict:
    """Fail before any work on a CLIP reference that cannot load; returns its identity."""
    kind = ref_kind(model)
    hint = "a hub id, a directory saved by CLIPModel/CLIPProcessor.save_pretrained, or an object-store URI"
    if kind == "tiny":
        raise SpecError(f"--clip-model tiny: not a CLIP model; pass {hint}")
    if kind in ("local", "uri"):
        fs, path = url_to_fs(model, storage_options)
        _check_clip_files(model, [names[0] for names in CLIP_FILES
                                  if not any(fs.isfile(join(path, name)) for name in names)], hint)
        if kind == "local":  # a truncated or half-copied weights file, named here and not after Ray started
            try:
                check_local_weights(model, "--clip-model", [Path(path)])
            except ModelRefError as err:
                raise SpecError(str(err)) from None
        config = fs.cat_file(join(path, "config.json"))
        try:
            model_type = json.loads(config).get("model_type")
        except ValueError:
            model_type = "unreadable"
        if model_type != "clip":
            raise SpecError(f"--clip-model {model}: its config.json is a {model_type!r} model's, not CLIP's "
                            f"(model_type 'clip'); pass {hint}")
        return {"ref": model, "config_sha256": hashlib.sha256(config).hexdigest()}
    try:
        entries = hub_entries(model, f"--clip-model {model}")
    except ModelRefError as err:
        raise SpecError(str(err)) from None
    _check_clip_files(model, [names[0] for names in CLIP_FILES if not set(names) & entries], hint)
    return {"ref": model}


def _check_clip_files(model: str, missing: list[str], hint: str) -> None:
    """CLIPModel and CLIPProcessor both load: a folder of the model alone fails in every actor, after a minute."""
    if missing:
        raise SpecError(f"--clip-model {model}: no {', '.join(missing)} there; pass {hint}")
