"""Read one image of a run by its manifest image_uri: an image object, or a WebDataset sample by its byte range."""

from __future__ import annotations

import functools
import json
import tarfile

from stages.output import IMAGES, SHARD_STATS, SHARDS
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


def relocation(run: str) -> str:
    """The folder a run is read from, spelled as image_uri values spell folders (see relocated)."""
    return canonical(run)


def relocated(uri: str | None, here: str) -> str | None:
    """An image_uri of the run read from folder `here`: an object the run wrote under another folder (it was moved
    or copied since, or a later invocation wrote it from elsewhere) is read at its place in the run's layout under
    `here` (<run>/images/ab/<id>.png; a WebDataset sample's shard, <run>/shards/<name>.tar)."""
    if not uri:
        return uri
    inner, sep, outer = uri.rpartition("::")
    if outer.startswith(here + "/"):
        return uri
    tail = outer.rsplit("/", 2 if sep else 3)[1:]
    if tail[:1] != [SHARDS if sep else IMAGES] or len(tail) != (2 if sep else 3):
        return uri  # not the run's layout: read as written
    return inner + sep + here + "/" + "/".join(tail)


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
