"""evaluate's checks before any work: a --by axis's values, the CLIP model, the FID reference."""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.spec import SpecError
from stages import columns as C
from stages import evaluate as E
from stages import footers, output
from stages.refs import ModelRefError, check_local_weights, hub_entries, ref_kind
from stages.storage import full_uri, join, url_to_fs

# What CLIPModel and CLIPProcessor load (the image processor's config under its older or its newer name; the
# weights whole or sharded).
CLIP_FILES = (("config.json",), ("preprocessor_config.json", "processor_config.json"), ("tokenizer_config.json",),
              ("model.safetensors", "model.safetensors.index.json"))  # CLIPModel loads safetensors only
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")  # a reference folder's images
AXIS_VALUES = 1000  # most values of one --by axis: each is a group of FID statistics (~32 MiB) and a result row


def with_resolution(table: pa.Table) -> pa.Table:
    """`table` (manifest rows) with the resolution axis: each row's "HxW"."""
    sides = [pc.cast(table.column(c), pa.string()) for c in (C.HEIGHT, C.WIDTH)]
    return table.append_column(C.RESOLUTION, pc.binary_join_element_wise(*sides, "x"))


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


@dataclass(frozen=True)
class Reference:
    """Where the FID reference statistics come from: kind is 'npz', 'run' or 'images'."""

    uri: str
    kind: str
    images: tuple[str, ...] = ()
    fingerprint: str = ""  # what its statistics were made from (manifest part names, or image names and sizes)


def run_fingerprint(parts) -> str:
    """What a run's FID statistics are made from: its live manifest parts' names."""
    return _digest(p.rsplit("/", 1)[-1] for p in parts)


def check_reference(ref: str | None, storage_options: dict) -> Reference | None:
    """Classify --fid-reference: a .npz with mu and sigma, a run folder, or a folder of images."""
    if ref is None:
        return None
    fs, path = url_to_fs(ref, storage_options)
    if path.endswith(".npz") and fs.isfile(path):
        load_npz(ref, storage_options)  # validates now
        return Reference(ref, "npz")
    if fs.isdir(path) and fs.glob(join(path, output.MANIFEST, "*.parquet")):
        parts = output.list_parts(ref, output.MANIFEST, storage_options)[1]
        return Reference(ref, "run", fingerprint=run_fingerprint(parts))
    if fs.isdir(path):
        found = {p: info for p, info in fs.find(path, detail=True).items()
                 if p.lower().endswith(IMAGE_EXTENSIONS) and "/eval/" not in p[len(path):]}
        if len(found) == 1:  # a covariance needs two: said before the Inception pass, not after it
            raise SpecError(f"--fid-reference {ref}: one image; FID statistics need at least 2")
        if found:
            return Reference(ref, "images", tuple(full_uri(fs, p) for p in sorted(found)),
                             _digest(f"{p} {found[p].get('size')}" for p in sorted(found)))
    if not fs.exists(path):
        raise SpecError(f"--fid-reference {ref}: does not exist")
    if fs.isdir(path):
        raise SpecError(f"--fid-reference {ref}: a folder with no run (manifest/) and no image "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    raise SpecError(f"--fid-reference {ref}: not a run folder, an image folder or a .npz with mu and sigma")


def _digest(lines) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def load_npz(uri: str, storage_options: dict) -> dict:
    """mu, sigma (and any metadata) of a statistics file."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        with np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False) as data:
            stats = {key: data[key] for key in data.files}
    except Exception:  # noqa: BLE001 - a broken file is a user mistake: one line
        stats = {}
    if stats.get("mu", np.zeros(0)).shape != (E.FEATURE_DIM,) or \
            stats.get("sigma", np.zeros(0)).shape != (E.FEATURE_DIM, E.FEATURE_DIM):
        raise SpecError(f"--fid-reference {uri}: not a .npz with mu ({E.FEATURE_DIM},) and sigma "
                        f"({E.FEATURE_DIM}, {E.FEATURE_DIM})")
    return stats
