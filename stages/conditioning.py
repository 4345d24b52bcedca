"""What the priors of one job must share with model.prior, compared file by file and setting by setting."""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

from stages.refs import HUB_TIMEOUT_S, ref_kind
from stages.storage import sha256_hex, url_to_fs

# The text stage encodes each row once with model.prior's text encoder and tokenizer; the scheduler and latent
# settings are model.prior's (an interpolation's A); each Stage C actor loads every checkpoint's weights into one
# model of model.prior's architecture.
FILE_PARTS = ("text_encoder", "tokenizer", "scheduler")
LATENT_DEFAULTS = {"latent_mean": 42.0, "latent_std": 1.0, "resolution_multiple": 42.67}  # as the stages default
ARCHITECTURE = "Stage C architecture"
SHAPE_KEYS = ("c_in", "c", "c_cond", "c_r", "depth", "nhead")  # WuerstchenPrior's shapes and heads (not dropout)


def conditioning(ref: str, storage_options: dict | None = None) -> dict[str, dict]:
    """{part: value} of a prior reference: for the text encoder, tokenizer and scheduler {file: sha256, or the
    store's version tag}; its latent settings (model_index.json) and Stage C architecture (prior/config.json),
    defaults filled in as the stages fill them."""
    from stages.models import resolve  # the tiny preset is built where it is named

    kind = ref_kind(ref)
    if kind == "hub":
        return _hub_conditioning(ref)
    root = resolve(ref, "prior") if kind in ("tiny", "local") else ref
    fs, path = url_to_fs(root, storage_options) if kind == "uri" else url_to_fs(str(Path(root).expanduser()))
    path = path.rstrip("/")
    found = {part: {name.rsplit(f"/{part}/", 1)[-1]: _file_identity(fs, name, info, kind)
                    for name, info in fs.find(f"{path}/{part}", detail=True).items()} for part in FILE_PARTS}

    def read(name: str) -> dict:
        return json.loads(fs.cat_file(f"{path}/{name}")) if fs.exists(f"{path}/{name}") else {}
    return {**found, **_settings(read)}


def difference(part: str, expected: dict, found: dict) -> str | None:
    """The first key of `part` whose value differs ('' where two file sets share no file, or no text encoder
    weights), None where they agree. Files: those both sides hold (a hub snapshot holds what loading fetched)."""
    if part in FILE_PARTS:
        keys = expected.keys() & found.keys()
        if not keys or (part == "text_encoder" and not any(k.endswith(".safetensors") for k in keys)):
            return ""  # nothing (or not the weights) to compare
    else:
        keys = expected.keys() | found.keys()
    return next((k for k in sorted(keys) if expected.get(k) != found.get(k)), None)


def _settings(read) -> dict[str, dict]:
    """The latent settings and the Stage C architecture of a prior, from `read(name) -> dict` ({} for a missing
    file)."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    index, config = read("model_index.json"), read("prior/config.json")
    defaults = {k: p.default for k, p in inspect.signature(WuerstchenPrior.__init__).parameters.items()}
    return {"latent settings": {k: index.get(k, default) for k, default in LATENT_DEFAULTS.items()},
            ARCHITECTURE: {k: config.get(k, defaults[k]) for k in SHAPE_KEYS}}


def _file_identity(fs, name: str, info: dict, kind: str) -> str:
    """A local file's content digest (sha256, as the hub's LFS pointers give it); an object's ETag on a store."""
    if kind == "uri":
        return str(info.get("ETag") or info.get("md5Hash") or info.get("size"))
    with fs.open(name, "rb") as f:
        return sha256_hex(f)


def _hub_conditioning(repo: str) -> dict[str, dict]:
    """The same for a hub model: from the hub (the LFS files' sha256, the small files read from a download into a
    temporary folder), or from its cached snapshot where the hub is out of reach or HF_HUB_OFFLINE is set."""
    from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        if constants.HF_HUB_OFFLINE:
            raise LocalEntryNotFoundError("HF_HUB_OFFLINE is set")
        info = HfApi().model_info(repo, files_metadata=True, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - out of reach: the snapshot loading would use, if there is one
        try:
            return conditioning(snapshot_download(repo, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError):
            raise err from None
    with tempfile.TemporaryDirectory() as folder:  # not the hub cache: its snapshot would look partial

        def download(name: str) -> Path:
            return Path(hf_hub_download(repo, name, revision=info.sha, local_dir=folder, etag_timeout=HUB_TIMEOUT_S))

        def identity(sibling) -> str:
            if sibling.lfs:
                return sibling.lfs.sha256
            with download(sibling.rfilename).open("rb") as f:
                return sha256_hex(f)

        def read(name: str) -> dict:
            try:
                return json.loads(download(name).read_text())
            except RemoteEntryNotFoundError:  # no such file on the hub (a failed download is an error)
                return {}
        found = {part: {s.rfilename.split("/", 1)[1]: identity(s) for s in info.siblings
                        if s.rfilename.startswith(f"{part}/")} for part in FILE_PARTS}
        return {**found, **_settings(read)}
