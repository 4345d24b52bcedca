"""Read one image of a run by its manifest image_uri: an image object, or a WebDataset sample by its byte range."""

from __future__ import annotations

import functools
import json
import tarfile

from stages.output import SHARD_STATS, SHARDS
from stages.storage import canonical, url_to_fs

MEMBERS = "members"  # in shard_stats/<name>.json: {image member: [offset of its data, size]} (see write_shard)
CACHED_SHARDS = 64  # shard indexes one process keeps (about 60 B a sample)


def member_ranges(tar, suffix: str) -> dict[str, list[int]]:
    """{member name: [offset of its data, size]} of the members of an open tar file whose names end in
    `suffix` (headers only are read)."""
    with tarfile.open(fileobj=tar, mode="r:") as archive:
        return {m.name: [m.offset_data, m.size] for m in archive.getmembers() if m.name.endswith(suffix)}


def read_image_bytes(uri: str, storage_options: dict | None) -> bytes:
    """The bytes of the image at a manifest's image_uri. A WebDataset sample (tar://<member>::<shard>) is one
    range read of its shard where the shard's stats give its range; else fsspec's tar:// reads it, which indexes
    the whole shard first (every header: the whole tar, on an object store, for each image)."""
    if uri.startswith("tar://") and "::" in uri:
        member, shard = uri.removeprefix("tar://").split("::", 1)
        where = shard_index(shard, storage_options).get(member)
        if where is not None:
            fs, path = url_to_fs(shard, storage_options)
            return fs.cat_file(path, start=where[0], end=where[0] + where[1])
    fs, path = url_to_fs(uri, storage_options)
    return fs.cat_file(path)


def relocation(job: dict, run: str) -> tuple[str, str] | None:
    """(the folder a run was written to, the folder it is read from) when they differ (the run was moved or
    copied: its image_uri values name the first), else None. `job`: the run's job.yaml."""
    written, here = canonical(job.get("output") or run), canonical(run)
    return (written, here) if written != here else None


def relocated(uri: str | None, moved: tuple[str, str] | None) -> str | None:
    """An image_uri of a run read where it is now (see relocation): the object under the folder the run was
    written to is read under the folder it is in now (a WebDataset sample: its shard)."""
    if not uri or moved is None:
        return uri
    inner, sep, outer = uri.rpartition("::")
    if outer.startswith(moved[0] + "/"):
        outer = moved[1] + outer[len(moved[0]):]
    return inner + sep + outer


def stats_uri(shard: str) -> str | None:
    """<output>/shard_stats/<name>.json of <output>/shards/<name>.tar; None for a tar elsewhere."""
    parts = shard.rsplit("/", 2)
    if len(parts) != 3 or parts[1] != SHARDS or not parts[2].endswith(".tar"):
        return None
    return f"{parts[0]}/{SHARD_STATS}/{parts[2].removesuffix('.tar')}.json"


def shard_index(shard: str, storage_options: dict | None) -> dict[str, list[int]]:
    """The shard's image ranges from its stats ({} for a shard written before they were recorded, or whose
    stats cannot be read now: its samples are then read through tar://)."""
    uri = stats_uri(shard)
    if uri is None:
        return {}
    try:
        return _read_index(uri, _Options(storage_options or {}))
    except Exception:  # noqa: BLE001 - a store blip, no stats: tar:// reads the sample (not cached: tried again)
        return {}


class _Options(dict):
    """Storage options as a cache key (by their JSON; the options themselves are passed on)."""

    def __hash__(self):
        return hash(json.dumps(self, sort_keys=True, default=repr))

    def __eq__(self, other):
        return json.dumps(self, sort_keys=True, default=repr) == json.dumps(other, sort_keys=True, default=repr)


@functools.lru_cache(maxsize=CACHED_SHARDS)
def _read_index(uri: str, storage_options: _Options) -> dict[str, list[int]]:
    fs, path = url_to_fs(uri, dict(storage_options))
    return json.loads(fs.cat_file(path)).get(MEMBERS) or {}
