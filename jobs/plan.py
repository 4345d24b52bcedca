"""Plan: rows, shape buckets and per-stage FLOPs of a job, and the ratio of actors across stage groups."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextModel

from jobs import prompts
from jobs.preflight import preflight, stores
from jobs.retries import check_reachable
from jobs.spec import JobSpec
from stages import columns as C
from stages.effnet_terms import fill_effnet_terms, split_effnet_linears
from stages.text_terms import fill_text_terms, split_text_keys_values
from stages.models import prior_refs, ref_kind, resolve
from stages.refs import meta_model
from stages.prior import DEFAULT_PRIOR_STEPS, embedding_size
from stages.storage import join, url_to_fs

BUCKET = (C.HEIGHT, C.WIDTH, C.PRIOR_STEPS, C.PRIOR_GUIDANCE, C.DECODER_STEPS, C.DECODER_GUIDANCE)


@dataclass(frozen=True)
class Bucket:
    """Rows that share every shape and step count, with their per-image FLOPs by stage."""

    height: int
    width: int
    prior_steps: int
    prior_cfg: bool
    decoder_steps: int
    decoder_cfg: bool
    images: int


def count_buckets(spec: JobSpec, table: prompts.PromptTable) -> list[Bucket]:
    """Stream the prompt table and count images per bucket (guidance only matters as on/off)."""
    defaults, counts = prompts.defaults_for(spec), Counter()
    combos = Counter(_bucket_part(combo) for combo in prompts.sweep_combinations(spec.sweep))  # seeds: one bucket
    for path in table.files:
        parquet = pq.ParquetFile(table.fs.open(path, "rb"))
        present = [c for c in BUCKET if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=65536, columns=present or [C.PROMPT]):
            cols = {c: prompts.filled(batch.column(c).to_numpy(zero_copy_only=False) if c in present else None,
                                      defaults[c], batch.num_rows) for c in BUCKET}
            for combo, times in combos.items():  # a sweep value replaces the column for every row
                combo = dict(combo)
                swept = {c: np.full(batch.num_rows, combo[c]) if c in combo else v for c, v in cols.items()}
                swept[C.PRIOR_GUIDANCE] = swept[C.PRIOR_GUIDANCE] > 1
                swept[C.DECODER_GUIDANCE] = swept[C.DECODER_GUIDANCE] > 1
                grouped = pa.table(swept).group_by(list(BUCKET)).aggregate([([], "count_all")])
                for row in grouped.to_pylist():
                    counts[tuple(row[c] for c in BUCKET)] += row["count_all"] * times * spec.generation.images_per_prompt
    return [Bucket(*key, images=n) for key, n in sorted(counts.items())]


def _bucket_part(combo: dict) -> tuple:
    """The part of a sweep combination that decides a row's bucket, as a hashable key (a guidance as 2 when on,
    0 when off)."""
    return tuple(sorted((c, float(v > 1) * 2 if c in (C.PRIOR_GUIDANCE, C.DECODER_GUIDANCE) else v)
                        for c, v in combo.items() if c in BUCKET))


_UNREACHABLE: set[str] = set()  # hub ids already found unreachable: do not wait for them again


def _config(ref: str, role: str, subfolder: str, storage_options: dict) -> dict | None:
    """A component's config.json without loading weights; None when it cannot be read (offline hub id)."""
    kind = ref_kind(ref)
    if ref in _UNREACHABLE:
        return None
    try:
        if kind == "uri":
            fs, path = url_to_fs(join(ref, subfolder, "config.json"), storage_options)
            return json.loads(fs.cat_file(path))
        if kind == "hub":
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(ref, f"{subfolder}/config.json")
            if isinstance(cached, str):
                return json.loads(Path(cached).read_text())
            with tempfile.TemporaryDirectory() as folder:  # not into the hub cache: a snapshot of configs alone
                path = hf_hub_download(ref, "config.json", subfolder=subfolder, local_dir=folder)
                return json.loads(Path(path).read_text())
        return json.loads(open(join(resolve(ref, role), subfolder, "config.json")).read())
    except Exception:  # noqa: BLE001 - offline or missing: fall back to the official shapes
        _UNREACHABLE.add(ref)
        return None


OFFICIAL = {  # the official checkpoints' shapes, used when a hub config cannot be fetched
    "prior": dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24),
    "prior_text": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32),
    "decoder": {},
    "decoder_text": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24),
    "vqgan": {},
}


def meta_models(spec: JobSpec) -> dict[str, torch.nn.Module]:
    """Each stage's models built on the meta device from their configs (official shapes as fallback)."""
    opts, prior = spec.storage_options, prior_refs(spec.model.prior)[0]
    specs = {
        "prior": (WuerstchenPrior, _config(prior, "prior", "prior", opts), OFFICIAL["prior"]),
        "prior_text": (CLIPTextModel, _config(prior, "prior", "text_encoder", opts), OFFICIAL["prior_text"]),
        "decoder": (WuerstchenDiffNeXt, _config(spec.model.decoder, "decoder", "decoder", opts), OFFICIAL["decoder"]),
        "decoder_text": (CLIPTextModel, _config(spec.model.decoder, "decoder", "text_encoder", opts),
                         OFFICIAL["decoder_text"]),
        "vqgan": (PaellaVQModel, _config(spec.model.decoder, "decoder", "vqgan", opts), OFFICIAL["vqgan"]),
    }
    models = {name: meta_model(cls, config or fallback) for name, (cls, config, fallback) in specs.items()}
    split_effnet_linears(models["decoder"])  # as DecoderStage runs it: the effnet share once per micro-batch
    for name in ("prior", "decoder"):  # as the stages run them: the text's keys and values once per micro-batch
        split_text_keys_values(models[name])
    return models


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad(), torch.device("meta"):
        fn()
    return counter.get_total_flops()


def size_flops(models: dict, height: int, width: int) -> dict[str, int]:
    """FLOPs per image of one size, by term: the once-per-row ones (text encoders, the text's keys and values,
    Stage B's effnet share, VQGAN) and one step of Stage C and of Stage B, each for one guidance branch."""
    prior, decoder = models["prior"], models["decoder"]
    h, w = embedding_size(height, width)
    text_dim, dec_dim = prior.config.c_cond, decoder.config.clip_embd
    ids = torch.zeros(1, 77, dtype=torch.long)
    latent = (1, 4, int(h * 10.67), int(w * 10.67))
    effnet = (1, prior.config.c_in, h, w)
    return {
        "prior_text": _flops(lambda: models["prior_text"](ids)),
        "decoder_text": _flops(lambda: models["decoder_text"](ids)),
        "prior_once": _flops(lambda: fill_text_terms(prior, torch.randn(1, 77, text_dim))),
        "prior_step": _flops(lambda: prior(torch.randn(1, prior.config.c_in, h, w), torch.rand(1),
                                           torch.randn(1, 77, text_dim))),
        "decoder_once": _flops(lambda: fill_effnet_terms(decoder, torch.randn(effnet), latent[-2:]))
        + _flops(lambda: fill_text_terms(decoder, torch.randn(1, 77, dec_dim))),
        "decoder_step": _flops(lambda: decoder(torch.randn(latent), torch.rand(1), torch.randn(effnet),
                                               torch.randn(1, 77, dec_dim))),
        "vqgan": _flops(lambda: models["vqgan"].decode(torch.randn(latent))),
    }


def bucket_flops(models: dict, bucket: Bucket, sizes: dict | None = None) -> dict[str, float]:
    """FLOPs per image of each stage for one bucket, as the stages do the work (guidance doubles a stage's batch;
    the text's keys and values and Stage B's effnet share are computed once per micro-batch, not per step).
    `sizes`: size_flops by (height, width) counted so far, filled in (each size's forward passes counted once)."""
    sizes = {} if sizes is None else sizes
    key = (bucket.height, bucket.width)
    if key not in sizes:
        sizes[key] = size_flops(models, *key)
    f, prior_steps = sizes[key], bucket.prior_steps or DEFAULT_PRIOR_STEPS
    return {"text": f["prior_text"] * (1 + bucket.prior_cfg) + f["decoder_text"] * (1 + bucket.decoder_cfg),
            "prior": (f["prior_once"] + f["prior_step"] * prior_steps) * (1 + bucket.prior_cfg),
            "decoder": (f["decoder_once"] + f["decoder_step"] * bucket.decoder_steps) * (1 + bucket.decoder_cfg)
            + f["vqgan"]}


def plan(spec: JobSpec) -> str:
    """The report `wuerstchen-batch plan` prints."""
    check_reachable(stores(spec), spec.storage_options)  # a mistyped endpoint: one line in seconds, not a minute
    table = preflight(spec)
    buckets, models, sizes = count_buckets(spec, table), meta_models(spec), {}
    totals = {"text": 0.0, "prior": 0.0, "decoder": 0.0}
    lines = [f"{table.rows} prompt rows → {sum(b.images for b in buckets)} images in {len(buckets)} bucket(s) "
             f"(at most: identical rows, a repeated prompt or overlapping seeds, are made once)",
             *table.warnings(),
             "  size       prior steps/cfg  decoder steps/cfg  images   TFLOP per image: text / prior / decoder"]
    for b in buckets:
        flops = bucket_flops(models, b, sizes)
        for stage, value in flops.items():
            totals[stage] += value * b.images
        lines.append(f"  {b.height}x{b.width:<6} {b.prior_steps or 'default':>7} / {'on' if b.prior_cfg else 'off':<3}"
                     f"  {b.decoder_steps:>9} / {'on' if b.decoder_cfg else 'off':<3} {b.images:>9}   "
                     + " / ".join(f"{flops[s] / 1e12:.3g}" for s in totals))
    if _UNREACHABLE:
        lines.append(f"(configs of {', '.join(sorted(_UNREACHABLE))} unreadable here: counted with the official shapes)")
    whole = sum(totals.values())
    lines.append("total: " + ", ".join(f"{s} {totals[s] / 1e15:.3g} PFLOP ({100 * totals[s] / whole:.1f}%)"
                                       for s in totals))
    ratio = {s: totals[s] / totals["decoder"] for s in totals}
    lines.append("suggested GPUs per stage group, proportional to FLOPs (per decoder GPU): "
                 + " : ".join(f"{s} {ratio[s]:.2g}" for s in totals))
    return "\n".join(lines)
