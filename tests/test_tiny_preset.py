"""The tiny preset draws: informative images at the quick start's and the tests' step counts, every block counts."""

import itertools

import numpy as np
import pytest
import torch
from conftest import make_batch

from stages import columns as C
from stages.decoder import DecoderStage
from stages.effnet_terms import fill_effnet_terms
from stages.prior import PriorStage
from stages.text import TextEncoder
from stages.text_terms import fill_text_terms

PROMPTS = ["a red fox", "a lighthouse at dawn", "a bowl of ramen", "an astronaut"]
# (size, prior steps, decoder steps): the quick start (default 30-value Stage C schedule, 12 decoder
# steps) and the tests' short settings.
SETTINGS = [(256, 0, 12), (128, 2, 2), (128, 3, 3)]


@pytest.fixture(scope="module")
def stages():
    return TextEncoder("tiny", "tiny"), PriorStage("tiny"), DecoderStage("tiny")


def rows(size, prior_steps, decoder_steps, **extra):
    return [{C.PROMPT: p, C.SEED: s, C.HEIGHT: size, C.WIDTH: size, C.PRIOR_STEPS: prior_steps,
             C.DECODER_STEPS: decoder_steps, **extra} for p in PROMPTS for s in (0, 1)]


def embed(stages, batch_rows):
    text, prior, _ = stages
    return prior(text(make_batch(batch_rows)))


def decode(stages, batch) -> np.ndarray:
    return np.stack(list(stages[2](dict(batch))[C.IMAGE])).astype(np.float64) / 255  # (N, H, W, 3)


def apart(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute pixel difference per image."""
    return np.abs(a - b).reshape(len(a), -1).mean(axis=1)


@pytest.mark.parametrize("setting", SETTINGS)
def test_images_are_informative_and_read_stage_c(stages, setting):
    batch = embed(stages, rows(*setting))
    images = decode(stages, batch)
    assert images.reshape(len(images), -1).std(axis=1).min() >= 20 / 255
    pairs = [apart(images[i:i + 1], images[j:j + 1])[0] for i, j in itertools.combinations(range(len(images)), 2)]
    assert np.mean(pairs) >= 8 / 255 and min(pairs) >= 4 / 255  # measured: mean ≥ 15, closest pair ≥ 6

    # The README's figures (measured: ≥ 22.9 and ≥ 14.0 over the settings)
    zeroed = {**batch, C.IMAGE_EMBEDDINGS: np.zeros_like(batch[C.IMAGE_EMBEDDINGS])}
    assert apart(decode(stages, zeroed), images).min() >= 20 / 255
    swapped = {**batch, C.IMAGE_EMBEDDINGS: np.roll(batch[C.IMAGE_EMBEDDINGS], 2, axis=0)}  # another prompt's
    assert apart(decode(stages, swapped), images).min() >= 10 / 255

    unguided = decode(stages, embed(stages, rows(*setting, **{C.PRIOR_GUIDANCE: 1.0})))
    assert apart(unguided, images).mean() >= 8 / 255  # rows differing only in prior guidance


def _skip_block(module):
    """Make a block pass its input through unchanged (as if it were removed)."""
    return module.register_forward_hook(lambda _m, inputs, _out: inputs[0])


@pytest.mark.parametrize("where, kind", [
    ("prior", "ResBlock"), ("prior", "TimestepBlock"), ("prior", "AttnBlock"),
    ("decoder", "ResBlockStageB"), ("decoder", "TimestepBlock"), ("decoder", "AttnBlock"),
])
def test_every_block_shapes_the_image(stages, where, kind):
    batch_rows = rows(128, 2, 2)[:2]
    before = decode(stages, embed(stages, batch_rows))
    model = stages[1].prior if where == "prior" else stages[2].decoder
    blocks = [m for m in model.modules() if type(m).__name__ == kind]
    assert blocks
    for block in blocks:
        handle = _skip_block(block)
        try:
            after = decode(stages, embed(stages, batch_rows))
        finally:
            handle.remove()
        assert apart(after, before).min() >= 1 / 255, f"{where} {kind} {block} does not shape the image"


def test_text_conditioning_of_both_stages_shapes_the_image(stages):
    batch = embed(stages, rows(128, 2, 2)[:2])
    before = decode(stages, batch)
    no_text = {**batch, C.DECODER_TEXT: np.zeros_like(batch[C.DECODER_TEXT])}
    assert apart(decode(stages, no_text), before).min() >= 2 / 255
    text, prior, _ = stages
    encoded = text(make_batch(rows(128, 2, 2)[:2]))
    encoded[C.PRIOR_TEXT] = np.zeros_like(encoded[C.PRIOR_TEXT])
    assert apart(decode(stages, prior(encoded)), before).min() >= 8 / 255


def test_heads_follow_the_noise_level(stages):
    """The decoder's divisor tracks sqrt(1 - ᾱ(r)) from above (a margin keeps guided sampling stable)."""
    decoder, scheduler = stages[2].decoder, stages[2].scheduler
    gen = torch.Generator().manual_seed(0)
    x, effnet = torch.randn(2, 4, 32, 32, generator=gen), torch.randn(2, 16, 3, 3, generator=gen) * 30
    clip = torch.randn(2, 77, 32, generator=gen)
    fill_effnet_terms(decoder, effnet, x.shape[-2:])  # the stage's model reads these once per micro-batch
    fill_text_terms(decoder, clip)
    divisors = []
    with torch.no_grad():
        for r in (0.9, 0.5, 0.2, 0.05):
            ratio = torch.full((2,), r)
            _, b = decoder(x, ratio, effnet, clip, return_noise=False)
            s = (1 - scheduler._alpha_cumprod(ratio, "cpu")[0]).sqrt().item()
            assert s - 0.05 <= b.mean().item() <= s + 0.3, (r, b.mean().item(), s)
            divisors.append(b.mean().item())
    assert divisors == sorted(divisors, reverse=True)  # less noise, smaller divisor
