"""Resume: what an output already holds (done rows, stored Stage C rows) and whether a spec may continue it."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import yaml
from pyarrow.fs import FSSpecHandler, PyFileSystem

from jobs.spec import JobSpec, SpecError, StagesSpec
from stages import columns as C
from stages.storage import join, url_to_fs

# Spec sections that change images: an output holds the rows of one setting of these.
IMAGE_KEYS = ("model", "generation", "image_format", "output_format")
# Stage settings that change the bits of the images (rows per model call, compiled kernels).
STAGE_IMAGE_KEYS = ("micro_batch", "compile")


def stored_ids(output: str, folder: str, storage_options: dict) -> np.ndarray:
    """Sorted row ids in <output>/<folder>/*.parquet (manifest or embeddings); empty if none."""
    fs, path = url_to_fs(join(output, folder), storage_options)
    if not fs.exists(path) or not fs.ls(path):
        return np.asarray([], dtype="U32")
    dataset = pads.dataset(path, filesystem=PyFileSystem(FSSpecHandler(fs)), format="parquet")
    return np.unique(dataset.to_table(columns=[C.ROW_ID]).column(C.ROW_ID).to_numpy(zero_copy_only=False)
                     .astype("U32"))


def check_continuation(spec: JobSpec, overwrite: bool) -> None:
    """Start afresh on --overwrite; refuse an output made by a different spec, naming the first difference."""
    fs, root = url_to_fs(spec.output, spec.storage_options)
    if overwrite:
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    job_file = join(root, "job.yaml")
    if not fs.exists(job_file):
        return
    before = yaml.safe_load(fs.cat_file(job_file))
    now = spec.to_dict()
    diffs = [_first_difference(before.get(key), now.get(key), key) for key in IMAGE_KEYS]
    diffs.append(_first_difference(_stage_bits(before), _stage_bits(now), "stages"))
    if not _only_adds(before.get("sweep") or {}, now.get("sweep") or {}):
        diffs.append(_first_difference(before.get("sweep"), now.get("sweep"), "sweep"))
    for diff in filter(None, diffs):
        raise SpecError(f"output {spec.output} holds a run of another spec ({diff}); "
                        f"use --overwrite to start afresh, or another output")


def _stage_bits(data: dict) -> dict:
    """{name: {key: value}} of the image-changing stage keys (defaults where a job.yaml predates them)."""
    defaults, stages = StagesSpec(), data.get("stages") or {}
    return {name: {key: (stages.get(name) or {}).get(key, getattr(getattr(defaults, name), key))
                   for key in STAGE_IMAGE_KEYS} for name in ("text", "prior", "decoder")}


def _first_difference(old, new, path: str) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{path}.{key}")
            if diff:
                return diff
        return None
    return None if old == new else f"{path}: {old!r} → {new!r}"


def _only_adds(old: dict, new: dict) -> bool:
    """A sweep that keeps every earlier value of every earlier axis only adds rows."""
    return set(old) == set(new) and all(all(v in new[axis] for v in values) for axis, values in old.items())


def skip_mask(row_ids: np.ndarray, skip: np.ndarray) -> np.ndarray:
    """True for rows whose id is in the sorted `skip` array."""
    if not len(skip):
        return np.zeros(len(row_ids), dtype=bool)
    return np.isin(np.asarray(row_ids, dtype="U32"), skip, assume_unique=False)


def filter_ids(batch: dict[str, np.ndarray], ids, keep: bool = True) -> dict[str, np.ndarray]:
    """The batch's rows whose id is (keep=True) or is not (keep=False) in `ids` (a sorted array or its ref)."""
    import ray

    mask = skip_mask(batch[C.ROW_ID], ray.get(ids) if isinstance(ids, ray.ObjectRef) else ids)
    return {k: v[mask == keep] for k, v in batch.items()}
