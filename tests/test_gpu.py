"""GPU-only checks (skipped without CUDA): the stages run on the GPU and agree with the CPU reference."""

import numpy as np
import pytest
import torch
from conftest import make_batch

from stages import columns as C
from stages.decoder import DecoderStage
from stages.prior import PriorStage
from stages.text import TextEncoder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROWS = [{C.PROMPT: "a lighthouse", C.SEED: 1}, {C.PROMPT: "a sailboat", C.SEED: 2, C.DECODER_GUIDANCE: 2.0}]


def images(dtype: str, device: str) -> dict:
    text = TextEncoder("tiny", "tiny", dtype, device=device)
    prior, decoder = PriorStage("tiny", dtype, device=device), DecoderStage("tiny", dtype, device=device)
    return decoder(prior(text(make_batch(ROWS))))


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1 / 255), ("bfloat16", 0.1)])
def test_gpu_images_agree_with_cpu_float32(dtype, tolerance):
    gpu, cpu = images(dtype, "cuda"), images("float32", "cpu")
    assert all(e == "" for e in gpu[C.ERROR])
    for got, want in zip(gpu[C.IMAGE], cpu[C.IMAGE]):
        assert np.abs(got.astype(float) - want.astype(float)).mean() / 255 < tolerance


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

    eager, fast = run(False), run(True)
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
