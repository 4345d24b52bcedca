"""The benchmark's baseline: diffusers' own Würstchen pipelines on the same rows, run as a strong user would."""

from __future__ import annotations

import time

import numpy as np
import torch

from jobs.bench_stages import release, sync
from jobs.spec import JobSpec
from stages.models import pick_device

# How each baseline runs, as printed and kept in the benchmark's JSON; both on SDPA attention.
MODES = {
    "combined": "combined pipeline, one row per call (a loop by hand: it cannot take distinct prompts at once)",
    "batched": "prior pipeline on micro_batch rows per call (a seeded generator each), decoder pipeline one row "
               "per call (diffusers' decoder repeats a batch's text states: distinct prompts cannot share a call)",
}


def baseline(spec: JobSpec, compile_models: bool = False):
    """diffusers' combined pipeline from the run's components; its prior on SDPA attention (WuerstchenPrior sets
    the classic processor); with `compile_models`, prior and decoder compiled as diffusers' Würstchen docs say."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from stages.models import reference_pipeline

    pipe = reference_pipeline(spec.model.prior, spec.model.decoder, spec.model.dtype, spec.storage_options)
    pipe.prior_pipe.prior.set_attn_processor(AttnProcessor2_0())
    if compile_models:  # the docs set pipeline.prior_prior / .decoder; the sub-pipelines hold the models they call
        pipe.prior_pipe.prior = torch.compile(pipe.prior_pipe.prior, mode="reduce-overhead", fullgraph=True)
        pipe.decoder_pipe.decoder = torch.compile(pipe.decoder_pipe.decoder, mode="reduce-overhead", fullgraph=True)
    return pipe


def make_images(pipe, spec: JobSpec, texts: list[str], seeds: list[int], mode: str = "batched") -> list[np.ndarray]:
    """Each row's image, in one of MODES. Batched: Stage C for `micro_batch` rows per call, each row drawing from
    its own generator, which then goes on to that row's Stage B/A call, as the combined pipeline's single
    generator does."""
    from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS

    gen = spec.generation
    steps = (dict(num_inference_steps=gen.prior_steps) if gen.prior_steps
             else dict(timesteps=DEFAULT_STAGE_C_TIMESTEPS))
    if mode == "combined":
        prior_steps = {f"prior_{key}": value for key, value in steps.items()}
        return [pipe(prompt=text, negative_prompt=gen.negative_prompt, height=gen.height, width=gen.width,
                     prior_guidance_scale=gen.prior_guidance_scale, num_inference_steps=gen.decoder_steps,
                     decoder_guidance_scale=gen.decoder_guidance_scale, generator=torch.Generator().manual_seed(seed),
                     output_type="np", **prior_steps).images[0] for text, seed in zip(texts, seeds)]
    images, batch = [], spec.stages.prior.micro_batch
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[start:start + batch]]
        embeddings = pipe.prior_pipe(prompt=chunk, negative_prompt=[gen.negative_prompt] * len(chunk),
                                     height=gen.height, width=gen.width, guidance_scale=gen.prior_guidance_scale,
                                     generator=generators, output_type="pt", return_dict=False, **steps)[0]
        for i, prompt in enumerate(chunk):  # (1, 16, h, w) each
            images.append(pipe.decoder_pipe(
                image_embeddings=embeddings[i:i + 1], prompt=prompt, negative_prompt=gen.negative_prompt,
                num_inference_steps=gen.decoder_steps, guidance_scale=gen.decoder_guidance_scale,
                generator=generators[i], output_type="np").images[0])
    return images


def diffusers_rates(spec: JobSpec, texts: list[str], compile_models: bool = False,
                    modes=tuple(MODES)) -> dict[str, tuple[float, float]]:
    """{mode: (images/s, warm-up s)} of the baselines on the rows (row k seeded k), one pipeline loaded for all;
    warm-up: a call of each batch shape the rows make, twice when compiled (the second records the CUDA graphs)."""
    release()  # a clean start: nothing compiled or held by the stages timed before
    pipe, device, rates = baseline(spec, compile_models), pick_device(), {}
    for mode in modes:
        batch = spec.stages.prior.micro_batch if mode == "batched" else 1
        shapes = [texts[:batch]] + ([texts[:len(texts) % batch]] if len(texts) % batch else [])  # the last call's
        start = time.perf_counter()
        for _ in range(2 if compile_models else 1):
            for rows in shapes:
                make_images(pipe, spec, rows, list(range(len(rows))), mode)
        sync(device)
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        make_images(pipe, spec, texts, list(range(len(texts))), mode)
        sync(device)
        rates[mode] = (len(texts) / (time.perf_counter() - start), warmup)
    return rates
