"""Model loading: references resolved to local folders, each component by its own class and subfolder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from stages.dtypes import DTYPE_NAMES
from stages.refs import (  # noqa: F401 - the reference helpers are part of this module's interface
    DECODER_SUBFOLDERS,
    PRIOR_SUBFOLDERS,
    ModelRefError,
    cache_root,
    check_ref,
    prior_id,
    prior_refs,
    ref_kind,
)
from stages.storage import url_to_fs

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def prior_weights(prior, storage_options: dict | None = None,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Stage C weights of a prior spec on the CPU, loaded as a model of `dtype` loads them; (1 - alpha)·A + alpha·B
    for an interpolation, computed in float32."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    def load(ref: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        root = resolve(ref, "prior", storage_options)
        return load_component(WuerstchenPrior, root, "prior", dtype, torch.device("cpu")).state_dict()

    if isinstance(prior, str):
        return load(prior, dtype)
    (a, b), alpha = (load(ref, torch.float32) for ref in prior["interpolate"]), prior["alpha"]
    # in place (two checkpoints held at the peak, not three), the same roundings as a * (1 - alpha) + b * alpha
    return {name: a[name].mul_(1 - alpha).add_(b[name].mul_(alpha)) if a[name].is_floating_point() else a[name]
            for name in a}


def quiet_libraries() -> None:
    """Model loading without transformers', diffusers' and the hub's info lines and progress bars (an actor's
    stderr reaches the driver); errors still show. WUERSTCHEN_BATCH_VERBOSE=1 (set by --verbose) keeps them."""
    if os.environ.get("WUERSTCHEN_BATCH_VERBOSE") == "1":
        return
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    hub_utils.disable_progress_bars()


def resolve(ref: str, role: str, storage_options: dict | None = None) -> str:
    """Turn a reference into something `from_pretrained` loads: a local directory or a hub id."""
    quiet_libraries()
    kind = ref_kind(ref)
    if kind == "tiny":
        from stages.presets import ensure_tiny_model  # imports diffusers: only when the preset is used

        return str(ensure_tiny_model(cache_root()) / role)
    if kind == "uri":
        return str(_copy_once(ref, storage_options or {}))
    if kind == "local":
        return str(Path(ref).expanduser())
    return ref


def _copy_once(uri: str, storage_options: dict) -> Path:
    """Copy an object-store model directory to this node's cache once per version of its objects (their ETags; see
    copy_version). A store that no longer lists the model serves the newest copy already here."""
    fs, path = url_to_fs(uri, storage_options)
    files = fs.find(path, detail=True)
    if not files:
        copies = sorted((cache_root() / "models").glob(f"{_cache_name(uri)}-*"), key=lambda p: p.stat().st_mtime)
        if copies:
            return copies[-1]
    return copy_version(uri, version_of(files, path),
                        lambda staging: fs.get(path.rstrip("/") + "/", str(staging), recursive=True))


def copy_version(uri: str, version: str, fetch) -> Path:
    """<cache>/models/<uri's digest>-<version>, filled once per node by `fetch(folder)`: one process per node
    fetches (a file lock), into a hidden folder renamed into place when complete, so a failed download leaves
    nothing and an updated object is copied again."""
    from filelock import FileLock

    models = cache_root() / "models"
    target = models / f"{_cache_name(uri)}-{version}"
    if target.exists():
        return target
    (cache_root() / "locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_root() / "locks" / f"{target.name}.lock")):
        if target.exists():  # another process of this node copied it while this one waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=_mkdir(models)))
        try:
            fetch(staging)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _cache_name(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def version_of(files: dict, root: str) -> str:
    """A digest of objects under `root` ({path: info}): each one's path and ETag (size and time where a store has
    none)."""
    tags = sorted((name[len(root):], str(info.get("ETag") or info.get("md5Hash") or
                                        (info.get("size"), info.get("mtime") or info.get("LastModified"))))
                  for name, info in files.items())
    return hashlib.sha256(json.dumps(tags).encode()).hexdigest()[:16]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA when this process sees a GPU, else CPU; anything else names the device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_component(cls, root: str, subfolder: str, dtype: torch.dtype, device: torch.device):
    """Load one diffusers/transformers component from `root/subfolder`, safetensors only."""
    model = cls.from_pretrained(root, subfolder=subfolder, torch_dtype=dtype, use_safetensors=True)
    return model.to(device).eval().requires_grad_(False)


def pipeline_config(root: str) -> dict:
    """The pipeline-level settings (latent_mean, resolution_multiple, …) from a folder's model_index.json; {} for
    a hub id: every actor uses the official values (no hub call per actor, no node differing from another)."""
    path = Path(root) / "model_index.json"
    return json.loads(path.read_text()) if path.exists() else {}


def reference_pipeline(prior: str, decoder: str, dtype: str = "float32", storage_options: dict | None = None):
    """diffusers' WuerstchenCombinedPipeline from the same components, for parity and the benchmark."""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import (
        PaellaVQModel,
        WuerstchenCombinedPipeline,
        WuerstchenDiffNeXt,
        WuerstchenPrior,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    prior_root, decoder_root = resolve(prior, "prior", storage_options), resolve(decoder, "decoder", storage_options)
    torch_dtype, device = DTYPES[dtype], pick_device()
    pipe = WuerstchenCombinedPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(decoder_root, subfolder="tokenizer"),
        text_encoder=load_component(CLIPTextModel, decoder_root, "text_encoder", torch_dtype, device),
        decoder=load_component(WuerstchenDiffNeXt, decoder_root, "decoder", torch_dtype, device),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(decoder_root, subfolder="scheduler"),
        vqgan=load_component(PaellaVQModel, decoder_root, "vqgan", torch_dtype, device),
        prior_tokenizer=CLIPTokenizer.from_pretrained(prior_root, subfolder="tokenizer"),
        prior_text_encoder=load_component(CLIPTextModel, prior_root, "text_encoder", torch_dtype, device),
        prior_prior=load_component(WuerstchenPrior, prior_root, "prior", torch_dtype, device),
        prior_scheduler=DDPMWuerstchenScheduler.from_pretrained(prior_root, subfolder="scheduler"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
