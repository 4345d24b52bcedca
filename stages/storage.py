"""fsspec access to prompts, models and outputs, with the job's storage options where they apply."""

from __future__ import annotations

import hashlib
import os
import uuid
from contextlib import contextmanager

import fsspec
from fsspec.implementations.local import LocalFileSystem

LOCAL_PROTOCOLS = ("file", "local", "memory")

# Every S3 request rides out a store that refuses or drops connections, or answers 500/503/SlowDown: botocore's
# standard retry mode retries those with jittered exponential backoff capped at 20 s per wait; 10 attempts wait
# ~55 s on average (at most ~111 s) before the error reaches Ray Data, which retries the task (RETRIED_ERRORS).
# The job's own storage_options win, key by key. S3 requests also send their body without waiting for a
# `100 Continue` (stages/s3_session.py), so that a store that stops answering mid-request meets the read timeout.
# Listings are not cached either: a process (a reused Ray worker above all) that listed a folder would otherwise
# answer "no such file" for an object written there since, from its s3fs instance's cached listing.
S3_DEFAULTS = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 10}},
               "use_listings_cache": False}
S3_PROTOCOLS = ("s3", "s3a")
REMOTE_DEFAULTS = {protocol: S3_DEFAULTS for protocol in S3_PROTOCOLS}

# What a transient store failure reads like once botocore's retries are spent (class names and messages of
# botocore, aiohttp and s3fs's translations); Ray Data retries a task that fails with one of these.
TRANSIENT_ERRORS = [
    "EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError", "ReadTimeoutError",
    "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ConnectionResetError",
    "ConnectionRefusedError", "SlowDown", "Reduce your request rate", "ServiceUnavailable", "Service Unavailable",
    "InternalError", "We encountered an internal error", "reached max retries",
    "ServiceRequestError", "ServiceResponseError",  # azure-core (adlfs): a request not sent / no response
]
# A store's first request is tried this briefly: a mistyped endpoint or a store not started is named in seconds,
# not after botocore's ~75 s of retries (the run's own requests keep the retries above).
PROBE_OPTIONS = {"config_kwargs": {"retries": {"total_max_attempts": 3}, "connect_timeout": 10, "read_timeout": 10}}
CONNECT_ERRORS = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError",
                  "ReadTimeoutError")  # the last: a store that takes the connection and never answers


def merged(defaults: dict, options: dict) -> dict:
    """`defaults` updated by `options`, nested dicts merged key by key (the options' values win)."""
    out = dict(defaults)
    for key, value in options.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def url_to_fs(uri: str, storage_options: dict | None = None):
    """(filesystem, path) for a URI; storage options go to remote stores only (s3://, gs://, …), over the
    retry defaults of the store (REMOTE_DEFAULTS). In a chained URI (`tar://key.png::s3://b/shard.tar`, a
    WebDataset sample) they go to the store that holds the outermost file."""
    store = uri.rsplit("::", 1)[-1]
    protocol = store.split("://")[0] if "://" in store else "file"
    options = {} if protocol in LOCAL_PROTOCOLS else merged(REMOTE_DEFAULTS.get(protocol, {}), storage_options or {})
    if protocol in S3_PROTOCOLS:
        from stages.s3_session import NoContinueSession  # imports aiobotocore: only for S3

        options["config_kwargs"] = {"http_session_cls": NoContinueSession, **(options.get("config_kwargs") or {})}
    if store != uri:
        return fsspec.core.url_to_fs(uri, **({protocol: options} if options else {}))
    return fsspec.core.url_to_fs(uri, **options)


def uncached(fs):
    """The same store with its files read exactly as asked (S3: no readahead), for Parquet readers, which ask
    for the column chunks they need: s3fs's default 50 MiB readahead fetches a whole part to read one column."""
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if not set(protocols) & set(S3_PROTOCOLS):
        return fs
    return type(fs)(**{**fs.storage_options, "default_cache_type": "none"})


def unreachable(uri: str, storage_options: dict | None) -> str | None:
    """Why an S3 URI's store cannot be connected to at all (one quick request), or None: one that answers, even
    'no such key' or 'forbidden', is reachable; other stores are not probed."""
    if uri.split("://")[0] not in S3_PROTOCOLS or "://" not in uri:
        return None
    fs, path = url_to_fs(uri, merged(storage_options or {}, PROBE_OPTIONS))
    try:
        fs.info(path)
    except Exception as err:  # noqa: BLE001 - only a failed connection is an answer here
        failed = [e for e in causes(err) if any(name in f"{type(e).__name__}: {e}" for name in CONNECT_ERRORS)]
        return reason(failed[0]) if failed else None
    return None


def absolute(uri: str) -> str:
    """A local path made absolute (a leading `~/` is the home folder; against this process's working
    directory); a URI as it is."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri) if uri == "~" or uri.startswith("~/") else uri)


def canonical(uri: str) -> str:
    """One spelling of a location, as image_uri values are written (full_uri): file:// URIs and local paths as
    absolute paths, s3a:// as s3://, no trailing slash."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif uri.startswith("s3a://"):
        uri = "s3://" + uri[len("s3a://"):]
    return absolute(uri).rstrip("/") or "/"


def sample_uri(shard_uri: str, member: str) -> str:
    """The fsspec URI of one member of a tar (a WebDataset sample's image): `fsspec.open` reads it."""
    return f"tar://{member}::{shard_uri}"


def outer_uri(uri: str) -> str:
    """The object a URI lives in: the tar of a sample URI, else the URI itself."""
    return uri.rsplit("::", 1)[-1]


def transient(err: BaseException) -> bool:
    """Whether an error (or one it wraps) reads as a transient store failure."""
    text = " ".join(f"{type(e).__name__}: {e}" for e in causes(err))
    return any(pattern in text for pattern in TRANSIENT_ERRORS)


def causes(err: BaseException | None):
    """An exception and the ones it was raised from or during, outermost first."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def reason(err: BaseException) -> str:
    """An exception in a few words, for a one-line error: the OS's reason where there is one, else the
    first line of its message, else its type."""
    text = getattr(err, "strerror", None) or str(err).strip()
    text = text.splitlines()[0] if text else type(err).__name__
    if isinstance(err, PermissionError) and err.errno is None:  # a store's 403 (s3fs), not a local file's mode
        text += ": the store refused these credentials, or they lack the permission"
    return text


def join(uri: str, *parts: str) -> str:
    """Join URI path parts with '/'."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def full_uri(fs, path: str) -> str:
    """The full URI of a path on a filesystem (s3://bucket/key, /abs/path for local files)."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def remove_tree(fs, root: str, keep: str | None = None) -> None:
    """Delete everything under a folder but the file `keep`, one folder's listing at a time (s3fs's recursive
    rm lists every key first: 10M image paths, ~1.5 GB, on the caller); the folder too when `keep` is not there."""
    keep = fs._strip_protocol(keep) if keep else None
    for folder, _, names in fs.walk(root, topdown=False):
        files = [join(folder, name) for name in names if join(folder, name) != keep]
        if files:
            fs.rm(files)
        if isinstance(fs, LocalFileSystem) and folder != fs._strip_protocol(root):
            fs.rmdir(folder)  # empty now (object stores have no folders)
    if (keep is None or not fs.exists(keep)) and fs.exists(root):  # the folder, an object named like it, a marker
        fs.rm(root, recursive=True)


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


@contextmanager
def open_atomic(fs, path: str):
    """A file to stream into that appears at `path` whole or not at all: a hidden file renamed locally, the
    object store's own upload (visible once closed) elsewhere. An error while writing leaves nothing: fsspec's
    own `with fs.open(...)` would upload what was written so far (its exit commits), so the upload is discarded
    (s3fs aborts its multipart upload) and the file marked closed unwritten."""
    if not isinstance(fs, LocalFileSystem):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            f.discard()
            f.closed = True  # AbstractBufferedFile.close() would commit the buffer
            raise
        f.close()
        return
    folder_path, name = path.rsplit("/", 1)
    fs.makedirs(folder_path, exist_ok=True)
    tmp = join(folder_path, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


def sha256_hex(f) -> str:
    """Hex sha256 of an open binary file, read in 4 MiB chunks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 22), b""):
        digest.update(chunk)
    return digest.hexdigest()
