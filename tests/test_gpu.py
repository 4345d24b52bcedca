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
