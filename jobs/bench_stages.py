"""In-process benchmark of the stage classes (no Ray): per-stage images/s, warm-up, MFU, peak memory, PSNR."""

from __future__ import annotations

import contextlib
import gc
import time

import numpy as np
import torch

from jobs import prompts
from jobs.spec import JobSpec, stage_kwargs
from stages import columns as C
from stages.denoise import finish as sync  # wait for the device (before and after a timed call)
from stages.models import DTYPES, pick_device

STAGES = ("text", "prior", "decoder")
GIB = 2.0 ** 30



def take(batch: dict[str, np.ndarray], idx) -> dict[str, np.ndarray]:
    """Rows `idx` of a batch, as a new batch."""
    return {key: values[idx] for key, values in batch.items()}


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batches with the same columns, one after another."""
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def build_stages(spec: JobSpec, **overrides) -> tuple[dict, dict]:
    """The three stages as the pipeline's actors build them; returns (stages, {stage: (load s, weight bytes)})."""
    from stages.decoder import DecoderStage
    from stages.prior import PriorStage
    from stages.text import TextEncoder

    device = pick_device()
    stages, loads = {}, {}
    for name, cls in zip(STAGES, (TextEncoder, PriorStage, DecoderStage)):
        before, start = allocated(device), time.perf_counter()
        stages[name] = cls(**{**stage_kwargs(spec, name), **overrides})
        sync(device)
        loads[name] = (time.perf_counter() - start, allocated(device) - before)
    return stages, loads


def run_stages(stages: dict, spec: JobSpec, rows: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Warm up on two micro-batches, and on a whole batch of each stage (compilation, CUDA-graph recording and the
    pinned host buffers of a batch's size happen there), then time each stage over every row in blocks of its
    batch size, one stage after another; returns (final batch, {stage: figures})."""
    device = pick_device()
    figures, n = {name: {} for name in STAGES}, len(rows[C.ROW_ID])
    specs = [getattr(spec.stages, name) for name in STAGES]
    warm_rows = max(max(2 * stage.micro_batch, stage.batch_size) for stage in specs)
    warm = take(rows, np.arange(min(warm_rows, n)))
    memory = {}  # stage: (peak during warm-up, memory it kept: CUDA-graph pools, caches), above what was there
    for name in STAGES:
        reset_peak(device)
        base, start = allocated(device), time.perf_counter()
        warm = stages[name](warm)
        sync(device)
        figures[name]["warmup_s"] = time.perf_counter() - start
        memory[name] = (peak(device) - base, allocated(device) - base)
    batch = rows
    for name in STAGES:
        size = getattr(spec.stages, name).batch_size
        reset_peak(device)
        base, start = allocated(device), time.perf_counter()
        parts = [stages[name](take(batch, np.arange(i, min(i + size, n)))) for i in range(0, n, size)]
        sync(device)
        seconds = time.perf_counter() - start
        batch = concat(parts)  # the next stage's input: the benchmark's own work, not timed
        warm_peak, kept = memory[name]
        figures[name].update(seconds=seconds, images_per_s=n / seconds,
                             work_bytes=max(warm_peak, kept + peak(device) - base))
    return batch, figures


def stage_flops(spec: JobSpec) -> dict[str, float]:
    """FLOPs per image of each stage for the spec's generation settings, as `plan` counts them."""
    from jobs.plan import Bucket, bucket_flops, meta_models

    gen = spec.generation
    bucket = Bucket(gen.height, gen.width, gen.prior_steps or 0, gen.prior_guidance_scale > 1, gen.decoder_steps,
                    gen.decoder_guidance_scale > 1, images=1)
    return bucket_flops(meta_models(spec), bucket)


def matmul_peak(dtype: torch.dtype) -> float:
    """FLOP/s of a large matrix product in `dtype` on this device: the MFU denominator."""
    device = pick_device()
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 3)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


@contextlib.contextmanager
def strict_float32():
    """Float32 that is float32: no TF32 in matrix products or convolutions while the reference runs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSNR in dB of each uint8 image against its reference (inf where equal)."""
    diff = images.astype(np.float64) - reference.astype(np.float64)
    mse = (diff ** 2).reshape(len(diff), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0 ** 2 / mse)


def float32_images(spec: JobSpec, rows: dict[str, np.ndarray]) -> np.ndarray:
    """The same rows made by float32 stages (eager, no TF32): the reference of the PSNR."""
    stages, _ = build_stages(spec, dtype="float32", compile=False)
    with strict_float32():
        batch = rows
        for name in STAGES:
            batch = stages[name](batch)
    del stages
    release()
    return np.stack(list(batch[C.IMAGE]))


def compile_counts() -> dict[str, int]:
    """What Dynamo and Inductor did so far: graphs compiled (one per shape, more means recompiles), graph breaks,
    and CUDA graphs skipped (a silent fallback to launching every kernel)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def release() -> None:
    """Free deleted stages' models and compiled graphs: their models sit in reference cycles (the float32 timestep
    embedding wraps a bound method), and Dynamo's caches are per code object, so diffusers' forward compiled after
    ours would start from our shapes (batch marked dynamic) and our CUDA-graph step marks."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def in_process(spec: JobSpec, texts: list[str]) -> tuple[dict, np.ndarray]:
    """Load, warm up and time the stages in this process; MFU against this device's matmul rate. Returns the
    figures and the images (for psnr_vs_float32)."""
    device = pick_device()
    rows = prompts.stage_rows(spec, texts)
    stages, loads = build_stages(spec)
    batch, figures = run_stages(stages, spec, rows)
    compiled = compile_counts() if spec.stages.prior.compile or spec.stages.decoder.compile else None
    del stages
    release()
    flops, peak = stage_flops(spec), matmul_peak(DTYPES[spec.model.dtype])
    for name in STAGES:
        load_s, weights = loads[name]
        figures[name].update(load_s=load_s, tflop_per_image=flops[name] / 1e12,
                             mfu=flops[name] * figures[name]["images_per_s"] / peak)
        work = figures[name].pop("work_bytes")
        if device.type == "cuda":
            figures[name]["peak_memory_gib"] = (weights + work) / GIB
    steady = sum(figures[name]["seconds"] for name in STAGES)
    warmup = sum(figures[name]["warmup_s"] + figures[name]["load_s"] for name in STAGES)
    result = {"stages": figures, "matmul_peak_tflops": peak / 1e12,
              "in_process_images_per_s": len(texts) / steady,
              "in_process_mfu": sum(flops.values()) * len(texts) / steady / peak,
              "in_process_warmup_s": warmup,
              "failed_rows": int(sum(bool(e) for e in batch[C.ERROR]))}
    if compiled:
        result["compile"] = compiled
    return result, batch[C.IMAGE]


def psnr_vs_float32(spec: JobSpec, texts: list[str], images: np.ndarray, rows: int) -> dict:
    """PSNR of the first `rows` of `images` (made by in_process in the run's half precision) against the same
    rows made in float32."""
    keep = np.arange(min(rows, len(texts)))
    values = psnr(np.stack(list(images[keep])), float32_images(spec, take(prompts.stage_rows(spec, texts), keep)))
    return {"rows": len(keep), "mean": float(np.mean(values)), "min": float(np.min(values))}
