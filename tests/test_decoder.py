"""Stage B/A: images equal WuerstchenCombinedPipeline's for each row alone, batching distinct prompts."""

import numpy as np
import pytest
from conftest import make_batch, reference_image

from stages import columns as C
from stages.decoder import DecoderStage
from stages.prior import PriorStage
from stages.text import TextEncoder

ROWS = [
    {C.PROMPT: "a red fox in the snow", C.SEED: 1},
    {C.PROMPT: "a sailboat", C.SEED: 2, C.HEIGHT: 256, C.WIDTH: 128, C.DECODER_GUIDANCE: 2.0,
     C.NEGATIVE_PROMPT: "low quality"},
    {C.PROMPT: "über den Wolken, 東京", C.SEED: 3, C.DECODER_GUIDANCE: 3.0, C.DECODER_STEPS: 3},
    {C.PROMPT: "a vintage car", C.SEED: 4, C.HEIGHT: 128, C.WIDTH: 256, C.PRIOR_GUIDANCE: 0.0},
]


@pytest.fixture(scope="module")
def pipeline():
    text, prior, decoder = TextEncoder("tiny", "tiny"), PriorStage("tiny"), DecoderStage("tiny", keep_float=True)
    return lambda rows: decoder(prior(text(make_batch(rows))))


def test_images_match_the_combined_pipeline(pipeline, reference_pipe):
    out = pipeline(ROWS)  # distinct prompts, sizes, negatives, decoder guidance > 1 in one batch
    for i, row in enumerate(ROWS):
        expected = reference_image(reference_pipe, row)
        got = out[C.IMAGE][i]
        assert got.dtype == np.uint8 and got.shape == expected.shape
        assert np.abs(got.astype(np.float64) / 255 - expected).max() <= 1 / 255 + 1e-6
        assert np.abs(out[C.IMAGE_FLOAT][i] - expected).max() <= 1e-4  # before rounding
        assert np.abs(out[C.IMAGE_FLOAT][i] - expected).mean() < 0.01 * expected.std()  # an image, not flat
        assert out[C.ERROR][i] == ""


def test_images_differ_by_prompt_and_seed(pipeline):
    out = pipeline([{C.PROMPT: "a cat", C.SEED: 1}, {C.PROMPT: "a dog", C.SEED: 1}, {C.PROMPT: "a cat", C.SEED: 2}])
    images = out[C.IMAGE]
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])


def test_independent_of_batch_composition(pipeline):
    together = pipeline(ROWS)
    for i in (0, 2):
        assert np.array_equal(pipeline([ROWS[i]])[C.IMAGE][0], together[C.IMAGE][i])
