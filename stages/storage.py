"""fsspec access to prompts, models and outputs, with the job's storage options where they apply."""

from __future__ import annotations

import hashlib
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

LOCAL_PROTOCOLS = ("file", "local", "memory")


def url_to_fs(uri: str, storage_options: dict | None = None):
    """(filesystem, path) for a URI; storage options go to remote stores only (s3://, gs://, …)."""
    protocol = uri.split("://")[0] if "://" in uri else "file"
    options = {} if protocol in LOCAL_PROTOCOLS else dict(storage_options or {})
    return fsspec.core.url_to_fs(uri, **options)


def reason(err: BaseException) -> str:
    """An exception in a few words, for a one-line error: the OS's reason where there is one, else the
    first line of its message, else its type."""
    text = getattr(err, "strerror", None) or str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def join(uri: str, *parts: str) -> str:
    """Join URI path parts with '/'."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def full_uri(fs, path: str) -> str:
    """The full URI of a path on a filesystem (s3://bucket/key, /abs/path for local files)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def block_name(row_ids) -> str:
    """A deterministic object name for a block of rows: a retried Ray task overwrites, never duplicates."""
    return hashlib.sha256("\n".join(map(str, row_ids)).encode()).hexdigest()[:32]


def write_atomic(fs, path: str, data: bytes) -> None:
    """Make `path` appear complete or not at all: one PUT on object stores, write-then-rename locally."""
    if isinstance(fs, LocalFileSystem):
        folder, name = path.rsplit("/", 1)
        fs.makedirs(folder, exist_ok=True)
        tmp = f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"  # hidden: Parquet readers skip dot-files
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)
