"""The benchmark's diffusers baseline does the same work as the combined pipeline: the same image for each row."""

import numpy as np
import pytest
from conftest import reference_image

from jobs.bench_diffusers import baseline, make_images
from jobs.spec import spec_from_dict
from stages import columns as C

GENERATION = {"height": 128, "width": 128, "prior_steps": 2, "decoder_steps": 2, "decoder_guidance_scale": 2.0,
              "negative_prompt": "blurry"}


@pytest.mark.parametrize("mode", ["batched", "combined"])
def test_each_baseline_gives_each_row_the_combined_pipelines_image(reference_pipe, mode):
    """Stage C batched (micro_batch 2: a call of 2 rows, then one of 1), each row its own generator carried on to
    its Stage B call: each image equals the combined pipeline's for that row alone, so the rate is of that work."""
    spec = spec_from_dict({"prompts": "p.parquet", "output": "out", "generation": GENERATION,
                           "stages": {"prior": {"micro_batch": 2}}})
    texts, seeds = ["a red fox in the snow", "a sailboat", "a vintage car"], [4, 5, 6]
    got = make_images(baseline(spec), spec, texts, seeds, mode)
    for text, seed, image in zip(texts, seeds, got):
        row = {C.PROMPT: text, C.SEED: seed, C.DECODER_GUIDANCE: 2.0, C.NEGATIVE_PROMPT: "blurry"}
        assert np.abs(image - reference_image(reference_pipe, row)).max() <= 1e-4, text
    other = reference_image(reference_pipe, {C.PROMPT: texts[0], C.SEED: seeds[1], C.DECODER_GUIDANCE: 2.0,
                                             C.NEGATIVE_PROMPT: "blurry"})
    assert np.abs(got[0] - other).max() > 0.1  # another seed's image differs clearly: the check can fail
