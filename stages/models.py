"""Model references (hub id, local dir, object-store URI, `tiny`) and loading of each component by subfolder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from stages.storage import url_to_fs

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PRIOR_SUBFOLDERS = ("prior", "text_encoder", "tokenizer", "scheduler")
DECODER_SUBFOLDERS = ("decoder", "text_encoder", "tokenizer", "vqgan", "scheduler")
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
    """Canonical text of a prior spec: the row column and the checkpoint identity."""
    return json.dumps(prior, sort_keys=True, ensure_ascii=False)


def prior_weights(prior, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """Stage C weights of a prior spec in float32 on the CPU; (1 - alpha)·A + alpha·B for an interpolation."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    def load(ref: str) -> dict[str, torch.Tensor]:
        root = resolve(ref, "prior", storage_options)
        return load_component(WuerstchenPrior, root, "prior", torch.float32, torch.device("cpu")).state_dict()

    if isinstance(prior, str):
        return load(prior)
    (a, b), alpha = (load(ref) for ref in prior["interpolate"]), prior["alpha"]
    return {name: a[name] * (1 - alpha) + b[name] * alpha for name in a}


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


def check_ref(ref: str, role: str, subfolders: tuple[str, ...], storage_options: dict) -> None:
    """Fail fast, before any model work, on a reference that cannot be loaded."""
    kind = ref_kind(ref)
    if kind == "local":
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ModelRefError(f"model.{role}: directory {ref} does not exist")
        missing = [s for s in subfolders if not (path / s).is_dir()]
        if missing:
            raise ModelRefError(f"model.{role}: {ref} lacks the subfolder(s) {', '.join(missing)}")
    elif kind == "uri":
        fs, path = url_to_fs(ref, storage_options)
        if not fs.isdir(path):
            raise ModelRefError(f"model.{role}: {ref} does not exist")


def resolve(ref: str, role: str, storage_options: dict | None = None) -> str:
    """Turn a reference into something `from_pretrained` loads: a local directory or a hub id."""
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
    """Copy an object-store model directory to this node's cache once (atomic rename)."""
    target = cache_root() / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if target.exists():
        return target
    fs, path = url_to_fs(uri, storage_options)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="copy-", dir=target.parent))
    fs.get(path.rstrip("/") + "/", str(staging), recursive=True)
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
    """The pipeline-level settings (latent_mean, resolution_multiple, …) from model_index.json."""
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
