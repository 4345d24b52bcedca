"""Model references (hub id, local dir, object-store URI, `tiny`) and the checks that they name a loadable model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from stages.storage import reason, url_to_fs

PRIOR_SUBFOLDERS = ("prior", "text_encoder", "tokenizer", "scheduler")
DECODER_SUBFOLDERS = ("decoder", "text_encoder", "tokenizer", "vqgan", "scheduler")
WEIGHT_SUBFOLDERS = ("prior", "text_encoder", "decoder", "vqgan")  # loaded from .safetensors files only
# Their tensor names are checked against the config (transformers renames the text encoder's across its versions)
CHECKED_TENSORS = ("prior", "decoder", "vqgan")
MAX_HEADER = 100_000_000  # bytes: the largest safetensors header the safetensors library reads
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # what diffusers loads (no variant such as .fp16) …
WEIGHTS_INDEX = f"{WEIGHTS_FILE}.index.json"  # … or, where this index is, the shards it lists
CONFIGS = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json"}  # else config.json
HUB_TIMEOUT_S = 5.0  # an unreachable hub is reported after this long, not after the actors' retries
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelRefError(ValueError):
    """A model reference that names nothing loadable."""


def prior_refs(*priors) -> list[str]:
    """The model references inside prior specs (a reference, or {interpolate: [A, B], alpha})."""
    refs = []
    for prior in priors:
        refs += prior["interpolate"] if isinstance(prior, dict) else [prior]
    return list(dict.fromkeys(refs))


def prior_id(prior) -> str:
    """Canonical text of a prior spec: the row column and the checkpoint identity (alpha 1 and 1.0: one id)."""
    if isinstance(prior, dict):
        prior = {**prior, "alpha": float(prior["alpha"])}
    return json.dumps(prior, sort_keys=True, ensure_ascii=False)


def cache_root() -> Path:
    """Where the tiny preset and copies of object-store models live on this node."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wuerstchen-batch"
    return Path(os.environ.get("WUERSTCHEN_BATCH_CACHE", default))


def ref_kind(ref: str) -> str:
    """Classify a model reference: 'tiny', 'uri', 'local' or 'hub'."""
    if ref == "tiny":
        return "tiny"
    if "://" in ref:
        return "uri"
    if ref.startswith(("/", ".", "~")) or os.path.exists(ref) or not _HUB_ID.match(ref):
        return "local"
    return "hub"


def check_ref(ref: str, role: str, subfolders: tuple[str, ...], storage_options: dict,
              field: str | None = None) -> None:
    """Fail fast, before any model work, on a reference that cannot be loaded; the error names `field` (the spec
    key that holds the reference, model.<role> unless said)."""
    name = field or f"model.{role}"
    kind = ref_kind(ref)
    if kind == "local" or ref.startswith("file://"):  # a file:// URI is a local folder: every check reads it
        path = Path(ref.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise ModelRefError(f"{name}: directory {ref} does not exist")
        _check_subfolders(ref, name, subfolders, {p.name for p in path.iterdir() if p.is_dir()})
        models = {folder: _check_config(ref, name, folder, lambda config: (path / config).read_bytes())
                  for folder in subfolders}
        check_local_weights(ref, name, [path / s for s in subfolders if s in WEIGHT_SUBFOLDERS], models)
    elif kind == "uri":
        _check_uri(ref, name, subfolders, storage_options)
    elif kind == "hub":
        try:
            entries = hub_entries(ref, name, subfolders)
        except ModelRefError as err:  # `models/decoder` may have been meant as a folder here
            raise ModelRefError(f"{err}; nor is there a local folder {os.path.abspath(ref)}") from None
        _check_subfolders(ref, name, subfolders, entries)


def _check_subfolders(ref: str, name: str, subfolders: tuple[str, ...], present: set[str]) -> None:
    missing = [s for s in subfolders if s not in present]
    if missing:
        raise ModelRefError(f"{name}: {ref} lacks the subfolder(s) {', '.join(missing)}")


def _check_config(ref: str, name: str, folder: str, read):
    """A component's config exists and is JSON (`read(relative path)` its bytes): else each stage actor fails to
    load it, in a flood of tracebacks. Returns the component built on the meta device (None for a non-model)."""
    config = f"{folder}/{CONFIGS.get(folder, 'config.json')}"
    try:
        values = json.loads(read(config))
    except FileNotFoundError:
        raise ModelRefError(f"{name}: {ref} lacks {config}") from None
    except (ValueError, OSError) as err:
        raise ModelRefError(f"{name}: {ref.rstrip('/')}/{config} is not a readable JSON file ({reason(err)})") from None
    return _check_builds(ref, name, folder, values)


def component_classes() -> dict:
    """The model class of each weights subfolder."""
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextModel

    return {"prior": WuerstchenPrior, "decoder": WuerstchenDiffNeXt, "vqgan": PaellaVQModel,
            "text_encoder": CLIPTextModel}


def meta_model(cls, config: dict):
    """A component built from its config on the meta device (no memory, no weights)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    values = {k: v for k, v in config.items() if not k.startswith("_")} if isinstance(config, dict) else config
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**values)) if cls is CLIPTextModel else cls.from_config(values)


def _check_builds(ref: str, name: str, folder: str, config: dict):
    """The model of a weights subfolder builds from its config: a config of another component (Stage C's in
    decoder/) is named here, not in each stage actor's traceback."""
    models = component_classes()
    if folder not in models:
        return None
    named = config.get("_class_name") if isinstance(config, dict) else None
    if named != models[folder].__name__ and named in {cls.__name__ for cls in models.values()}:
        raise ModelRefError(f"{name}: {ref.rstrip('/')}/{folder}/config.json is a {named}'s, not a "
                            f"{models[folder].__name__}'s (a component copied into the wrong folder?)")
    try:
        return meta_model(models[folder], config)
    except Exception as err:  # noqa: BLE001 - TypeError, ValueError…: one line naming the file
        raise ModelRefError(f"{name}: {ref.rstrip('/')}/{folder}/config.json does not describe a "
                            f"{models[folder].__name__} ({type(err).__name__}: {reason(err)})") from None


def check_local_weights(ref: str, name: str, folders: list[Path], models: dict | None = None) -> None:
    """Every weights subfolder holds .safetensors files whose header and size agree (safetensors checks both):
    a truncated or half-copied file is named here, not in a traceback from each stage actor that loads it; and
    they hold the tensors of the folder's meta-built model in `models`."""
    from safetensors import safe_open

    for folder in folders:
        files, shapes = sorted(folder.glob("*.safetensors")), {}
        if not files:
            raise _no_weights(name, ref, folder.name)
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as tensors:
                    shapes[file.name] = {key: tensors.get_slice(key).get_shape() for key in tensors.keys()}
            except Exception as err:  # noqa: BLE001 - SafetensorError or OSError: one line naming the file
                raise ModelRefError(f"{name}: {file} is not a complete safetensors file ({reason(err)}); "
                                    f"copy it again") from None
        if models and folder.name in CHECKED_TENSORS:
            where = f"{name}: {ref.rstrip('/')}/{folder.name}"
            loaded = loaded_files(where, set(shapes), lambda index: (folder / index).read_bytes())
            check_tensors(where, models[folder.name], {k: v for f in loaded for k, v in shapes[f].items()})


def loaded_files(where: str, names: set[str], read) -> list[str]:
    """Of a diffusers component folder's .safetensors files (`names`), those loading it reads, as diffusers picks
    them: the shards its index lists, else WEIGHTS_FILE (`read(name)`: a file's bytes); else one line."""
    try:
        index = read(WEIGHTS_INDEX)
    except FileNotFoundError:
        index = None
    if index is None and WEIGHTS_FILE not in names:
        raise ModelRefError(f"{where}: no {WEIGHTS_FILE} (nor its index), which diffusers loads: "
                            f"{sorted(names)[0]} is not (a variant such as .fp16 is loaded only when asked for)")
    if index is None:
        return [WEIGHTS_FILE]
    try:
        shards = sorted(set(json.loads(index)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ModelRefError(f"{where}/{WEIGHTS_INDEX} is not a weights index ({reason(err)})") from None
    if missing := [shard for shard in shards if shard not in names]:
        raise ModelRefError(f"{where}: {WEIGHTS_INDEX} lists {missing[0]}, which is not there (a partial copy?)")
    return shards


def check_tensors(where: str, model, shapes: dict[str, list[int]]) -> None:
    """The weights' tensors (name → shape) are those the config's diffusers model expects: a wrong shape fails in
    every stage actor, and a missing one is left unloaded (on the meta device) and fails there too. (None of the
    Würstchen classes has the deprecated attention blocks whose names diffusers rewrites on load.)"""
    expected = {key: list(value.shape) for key, value in model.state_dict().items()}
    wrong = [key for key in expected if key in shapes and list(shapes[key]) != expected[key]]
    missing = [key for key in expected if key not in shapes]
    if wrong:
        raise ModelRefError(f"{where}: tensor {wrong[0]} has shape {list(shapes[wrong[0]])} where its "
                            f"config.json makes {expected[wrong[0]]} ({len(wrong)} such): the weights and the "
                            f"config are of different models")
    if missing:
        raise ModelRefError(f"{where}: the weights lack {len(missing)} of the {len(expected)} tensors of "
                            f"{type(model).__name__} (e.g. {missing[0]}): another model's weights, or a partial copy")


def _no_weights(name: str, ref: str, folder: str) -> ModelRefError:
    return ModelRefError(f"{name}: {ref} has no .safetensors weights in {folder}/ (pickle weights are never loaded)")


def _check_uri(ref: str, name: str, subfolders: tuple[str, ...], storage_options: dict) -> None:
    try:
        fs, path = url_to_fs(ref, storage_options)
        if not fs.isdir(path):
            raise ModelRefError(f"{name}: {ref} does not exist")
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
        _check_subfolders(ref, name, subfolders, present)
        root = path.rstrip("/")
        weights = {s: fs.glob(f"{root}/{s}/*.safetensors") for s in subfolders if s in WEIGHT_SUBFOLDERS}
        empty = [folder for folder, files in weights.items() if not files]
        if empty:
            raise _no_weights(name, ref, empty[0])
        models = {s: _check_config(ref, name, s, lambda config: fs.cat_file(f"{root}/{config}")) for s in subfolders}
        for folder, files in weights.items():
            if folder in CHECKED_TENSORS:
                where, names = f"{name}: {ref.rstrip('/')}/{folder}", {f.rsplit("/", 1)[-1] for f in files}
                loaded = loaded_files(where, names, lambda index: fs.cat_file(f"{root}/{folder}/{index}"))
                shapes = _stored_shapes(fs, [f"{root}/{folder}/{file}" for file in loaded], name)
                check_tensors(where, models[folder], shapes)
    except ModelRefError:
        raise
    except Exception as err:  # noqa: BLE001 - any store failure is one line naming the model
        raise ModelRefError(f"{name}: cannot read {ref} ({reason(err)})") from None


def _stored_shapes(fs, files: list[str], name: str) -> dict[str, list[int]]:
    """Tensor name → shape from the headers of stored .safetensors files (a little-endian 8-byte length, then that
    much JSON, at most MAX_HEADER bytes): two ranged reads a file, no weights fetched; a file that is none (a
    git-lfs pointer) is named."""
    shapes = {}
    for file in files:
        try:
            size = int.from_bytes(fs.cat_file(file, start=0, end=8), "little")
            if not 2 <= size <= MAX_HEADER:
                raise ValueError(f"its header would be {size} bytes")
            header = json.loads(fs.cat_file(file, start=8, end=8 + size))
            shapes.update({key: value["shape"] for key, value in header.items() if key != "__metadata__"})
        except Exception as err:  # noqa: BLE001 - a short file, not JSON, no shapes: one line naming the file
            raise ModelRefError(f"{name}: {fs.unstrip_protocol(file)} is not a complete safetensors file "
                                f"({reason(err)}); copy it again") from None
    return shapes


def hub_entries(repo: str, name: str, needed: tuple[str, ...] = ()) -> set[str]:
    """Top-level files and folders of a hub model: from the local Hugging Face cache if it holds a snapshot with
    the `needed` folders (loading fetches only what it loads: a swept checkpoint's snapshot holds prior/), else
    from the hub (short timeout); a one-line ModelRefError naming `name` when neither can tell."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo, local_files_only=True))
        cached = {p.name for p in snapshot.iterdir()}
        if constants.HF_HUB_OFFLINE or set(needed) <= cached:
            return cached
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelRefError(f"{name}: hub model {repo} is not in the local Hugging Face cache "
                            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set")
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ModelRefError(f"{name}: hub model {repo} is gated: accept its terms and log in (HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelRefError(f"{name}: hub model {repo} does not exist (or is private: log in with HF_TOKEN)") from None
    except Exception as err:  # noqa: BLE001 - network and HTTP failures alike: one line, what to do
        raise ModelRefError(f"{name}: cannot reach the Hugging Face Hub for {repo} ({reason(err)}); check "
                            f"the network, or put the model in the cache and set HF_HUB_OFFLINE=1") from None
    return {s.rfilename.split("/")[0] for s in info.siblings or ()}
