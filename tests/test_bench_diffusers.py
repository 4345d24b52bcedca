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


def test_the_timed_calls_exclude_the_warm_up_of_each_batch_shape(monkeypatch):
    """5 rows, micro-batch 2, compiled: warm-up calls of 2 and of the last call's 1 row, twice; then the 5 rows
    timed alone (0.5 s a row here: 2 images/s), for the ways asked for only."""
    import types

    from jobs import bench_diffusers

    clock, calls = types.SimpleNamespace(now=0.0), []

    def make(pipe, spec, texts, seeds, mode):
        calls.append(len(texts))
        clock.now += 0.5 * len(texts)

    monkeypatch.setattr(bench_diffusers, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    monkeypatch.setattr(bench_diffusers, "baseline", lambda spec, compiled: None)
    monkeypatch.setattr(bench_diffusers, "make_images", make)
    spec = spec_from_dict({"prompts": "p.parquet", "output": "out", "stages": {"prior": {"micro_batch": 2}}})
    rates = bench_diffusers.diffusers_rates(spec, list("abcde"), True, ("batched",))
    assert rates == {"batched": (pytest.approx(2.0), pytest.approx(3.0))} and calls == [2, 1, 2, 1, 5]


def test_the_baseline_prior_runs_on_sdpa():
    """WuerstchenPrior sets the classic attention processor: the baseline is not slowed by it."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe = baseline(spec_from_dict({"prompts": "p.parquet", "output": "out"}))
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.prior_pipe.prior.attn_processors.values())
