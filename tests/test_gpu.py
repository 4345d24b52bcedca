"""GPU-only checks (skipped without CUDA): the stages run on the GPU and agree with the CPU reference."""

import numpy as np
import pytest
import torch
from conftest import make_batch

from jobs.bench_stages import strict_float32

from stages import columns as C
from stages.decoder import DecoderStage
from stages.prior import PriorStage
from stages.text import TextEncoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICE = "cuda"
# 4 steps per stage: at 2, bf16's error (up to 12/255 on CPU) reaches the distance between two prompts' images.
STEPS = {C.PRIOR_STEPS: 4, C.DECODER_STEPS: 4}
# Rows 1-2 differ only in the prompt, rows 0-1 only in the seed, rows 3-4 (decoder-guided) only in the prompt.
ROWS = [{C.PROMPT: "a lighthouse", C.SEED: 1}, {C.PROMPT: "a lighthouse", C.SEED: 2},
        {C.PROMPT: "a sailboat", C.SEED: 2}, {C.PROMPT: "a sailboat", C.SEED: 1, C.DECODER_GUIDANCE: 2.0},
        {C.PROMPT: "a lighthouse", C.SEED: 1, C.DECODER_GUIDANCE: 2.0}]
# Mean |difference| per pixel, (unguided rows, decoder-guided rows). Measured on the CPU, 4 steps, bf16 emulated
# with dtype bfloat16 on device cpu: bf16 vs fp32 of the same row 3.7-4.3/255 unguided, 5.3-6.7/255 guided; fp32
# images of other prompts or seeds 10-38/255 apart (closest: lighthouse vs sailboat at seed 2, 10.2/255; the two
# guided rows 27.8/255). Each bound sits between with a margin of ~1.5x or more on each side.
TOLERANCE = {"float32": (1 / 255, 1 / 255), "bfloat16": (7 / 255, 12 / 255)}


def images(dtype: str, device: str) -> list[np.ndarray]:
    text = TextEncoder("tiny", "tiny", dtype, device=device)
    prior, decoder = PriorStage("tiny", dtype, device=device), DecoderStage("tiny", dtype, device=device)
    out = decoder(prior(text(make_batch([{**STEPS, **row} for row in ROWS]))))
    assert all(e == "" for e in out[C.ERROR])
    return [image.astype(np.float64) / 255 for image in out[C.IMAGE]]


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_images_agree_with_cpu_float32(dtype):
    """Each GPU image is within the tolerance of its own row's CPU image and outside it for every other row's."""
    with strict_float32():  # cuDNN's convolutions default to TF32 on the GPU: float32 here means float32
        gpu = images(dtype, DEVICE)
    cpu = images("float32", "cpu")
    for i, got in enumerate(gpu):
        tolerance = TOLERANCE[dtype][ROWS[i].get(C.DECODER_GUIDANCE, 0.0) > 1]
        others = [j for j in range(len(ROWS)) if j != i]
        assert min(distance(cpu[i], cpu[j]) for j in others) > 1.3 * tolerance  # the tolerance can tell rows apart
        assert distance(got, cpu[i]) < tolerance, f"row {i} ({ROWS[i]})"
        assert all(distance(got, cpu[j]) > tolerance for j in others)


def test_denoising_loops_never_wait_for_the_gpu():
    text = TextEncoder("tiny", "tiny", "bfloat16", device="cuda")
    prior, decoder = PriorStage("tiny", "bfloat16", device="cuda"), DecoderStage("tiny", "bfloat16", device="cuda")
    texts = text(make_batch(ROWS))
    batch = prior(dict(texts))
    decoder(dict(batch))  # first calls: schedules computed, kernels chosen
    idx = np.arange(len(ROWS))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        prior._generate(texts, idx, 128, 128, 2, True)
        decoder._decode(batch, idx, 2, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_stages_on_the_gpu_agree_with_eager():
    rows = [{C.PROMPT: "a lighthouse", C.SEED: 1}, {C.PROMPT: "a sailboat", C.SEED: 2}]

    def run(compile):
        stages = [TextEncoder("tiny", "tiny", "bfloat16", device="cuda", compile=compile),
                  PriorStage("tiny", "bfloat16", device="cuda", compile=compile),
                  DecoderStage("tiny", "bfloat16", device="cuda", compile=compile)]
        outs = []
        for _ in range(3):  # compile, record the CUDA graphs, replay them
            batch = make_batch(rows)
            for stage in stages:
                batch = stage(batch)
            outs.append(batch[C.IMAGE])
        return outs

    from torch._dynamo.utils import counters

    eager, fast = run(False), run(True)
    assert counters["inductor"]["cudagraph_skips"] == 0  # no silent fallback to launching every kernel
    assert np.array_equal(fast[1], fast[2])  # replays are deterministic
    assert np.abs(fast[2].astype(float) - eager[0].astype(float)).mean() / 255 < 0.02


def test_a_smaller_micro_batch_lowers_peak_memory():
    rows = [{C.PROMPT: f"prompt {i}", C.SEED: i, C.HEIGHT: 512, C.WIDTH: 512} for i in range(8)]
    batch = PriorStage("tiny", device="cuda")(TextEncoder("tiny", "tiny", device="cuda")(make_batch(rows)))
    peaks = {}
    for micro_batch in (8, 2):
        decoder = DecoderStage("tiny", device="cuda", micro_batch=micro_batch)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        decoder(dict(batch))
        peaks[micro_batch] = torch.cuda.max_memory_allocated() - base
        del decoder
    assert peaks[2] < 0.6 * peaks[8]
