"""Benchmark: the Ray pipeline against diffusers' WuerstchenCombinedPipeline (one row per call) on the same rows."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from jobs.console import start_ray
from jobs.generate import run
from jobs.spec import apply_overrides, spec_from_dict
from stages import columns as C
from stages.models import reference_pipeline

_SUBJECTS = ["a red fox", "a lighthouse", "a bowl of ramen", "an astronaut", "a sailboat", "a cathedral",
             "a bonsai tree", "a vintage car"]
_STYLES = ["at dawn", "in watercolor", "as a pencil sketch", "in the rain", "on the moon", "in neon light"]


def benchmark_prompts(rows: int, source: str | None) -> list[str]:
    """`rows` prompts: from a Parquet/TSV table (PartiPrompts' `Prompt` column works), else generated."""
    if source:
        if source.endswith(".tsv"):
            table = pacsv.read_csv(source, parse_options=pacsv.ParseOptions(delimiter="\t"))
        else:
            table = pq.read_table(source)
        column = C.PROMPT if C.PROMPT in table.column_names else "Prompt"
        texts = table.column(column).to_pylist()
    else:
        texts = [f"{s} {t}" for t in _STYLES for s in _SUBJECTS]
    return [texts[i % len(texts)] for i in range(rows)]


def run_benchmark(args) -> dict:
    """Run both on the same rows and print images/s and their ratio."""
    work = Path(tempfile.mkdtemp(prefix="wuerstchen-bench-"))
    prompts = benchmark_prompts(args.rows, args.prompts)
    pq.write_table(pa.table({C.PROMPT: prompts, C.SEED: list(range(len(prompts)))}), work / "prompts.parquet")
    tiny = args.model == "tiny"
    prior, decoder = ("tiny", "tiny") if tiny else (str(Path(args.model) / "prior"), str(Path(args.model) / "decoder"))
    data = {
        "prompts": str(work / "prompts.parquet"),
        "output": str(work / "out"),
        "model": {"prior": prior, "decoder": decoder, "dtype": args.dtype or "float32"},
        "generation": {"height": args.height or (256 if tiny else 1024), "width": args.width or (256 if tiny else 1024)},
    }
    spec = spec_from_dict(apply_overrides(data, args.overrides))
    verbose = getattr(args, "verbose", False)
    start_ray(verbose)

    summary = run(spec, verbose=verbose)
    steady = steady_state_rate(spec.output, skip=spec.stages.text.batch_size)
    baseline = diffusers_rate(spec, prompts)
    figures = {
        "rows": len(prompts),
        "model": args.model,
        "height": spec.generation.height,
        "width": spec.generation.width,
        "dtype": spec.model.dtype,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "pipeline_images_per_s": steady,
        "pipeline_end_to_end_images_per_s": summary.images_per_s,
        "diffusers_images_per_s": baseline,
        "ratio": steady / baseline,
    }
    print(f"pipeline (steady state): {steady:.2f} images/s   end to end, with start-up: "
          f"{summary.images_per_s:.2f} images/s")
    print(f"diffusers combined pipeline, one row per call: {baseline:.2f} images/s")
    print(f"ratio pipeline / diffusers: {figures['ratio']:.2f}  ({len(prompts)} rows, {figures['height']}x"
          f"{figures['width']}, {spec.model.dtype}, {figures['device']})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


def steady_state_rate(output: str, skip: int) -> float:
    """Images/s after the first `skip` rows (one streaming block) are written: start-up excluded."""
    finished = np.sort(pq.read_table(Path(output) / "manifest", columns=[C.FINISHED_AT])[C.FINISHED_AT].to_numpy())
    if len(finished) <= 2 * skip:
        raise SystemExit(f"benchmark: --rows must exceed twice the text batch size ({skip}) to see a steady state")
    return (len(finished) - skip) / (finished[-1] - finished[skip - 1])


def diffusers_rate(spec, prompts: list[str]) -> float:
    """diffusers' combined pipeline, loaded once, called once per row with the row's seeded generator."""
    from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS

    pipe = reference_pipeline(spec.model.prior, spec.model.decoder, spec.model.dtype, spec.storage_options)
    gen = spec.generation
    kwargs = dict(height=gen.height, width=gen.width, prior_guidance_scale=gen.prior_guidance_scale,
                  num_inference_steps=gen.decoder_steps, decoder_guidance_scale=gen.decoder_guidance_scale,
                  negative_prompt=gen.negative_prompt, output_type="np")
    if gen.prior_steps:
        kwargs["prior_num_inference_steps"] = gen.prior_steps
    else:
        kwargs["prior_timesteps"] = DEFAULT_STAGE_C_TIMESTEPS
    pipe(prompt=prompts[0], generator=torch.Generator().manual_seed(0), **kwargs)  # warm-up
    start = time.perf_counter()
    for seed, prompt in enumerate(prompts):
        pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(prompts) / (time.perf_counter() - start)
