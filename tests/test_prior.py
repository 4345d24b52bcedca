"""Stage C: embeddings equal WuerstchenPriorPipeline's, per row, whatever the batch around the row."""

import numpy as np
import pytest
import torch
from conftest import make_batch
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPriorPipeline
from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS

from stages import columns as C
from stages.prior import PriorStage, embedding_size
from stages.text import TextEncoder

ROWS = [
    {C.PROMPT: "a lighthouse at dawn", C.SEED: 3},
    {C.PROMPT: "a bowl of ramen", C.SEED: 5, C.HEIGHT: 256, C.WIDTH: 128, C.NEGATIVE_PROMPT: "blurry"},
    {C.PROMPT: "an astronaut", C.SEED: 7, C.PRIOR_GUIDANCE: 1.0, C.PRIOR_STEPS: 3},
    {C.PROMPT: "a lighthouse at dawn", C.SEED: 11, C.PRIOR_GUIDANCE: 6.5, C.PRIOR_STEPS: 0},  # default schedule
]


# Eleven rows of one shape group (same size, steps, guidance on): each with its own guidance and
# negative prompt, so they share micro-batches and a stage that batched them wrongly would show it.
NEGATIVES = ["", "blurry", "dark, grainy"]
GROUP = [{C.PROMPT: f"a lantern number {i} on a hill", C.SEED: 20 + i, C.PRIOR_GUIDANCE: 1.5 + 0.75 * i,
          C.NEGATIVE_PROMPT: NEGATIVES[i % 3]} for i in range(11)]


@pytest.fixture(scope="module")
def stages():
    return TextEncoder("tiny", "tiny"), PriorStage("tiny")


@pytest.fixture(scope="module")
def prior_pipe(reference_pipe):
    pipe = WuerstchenPriorPipeline(**{k: getattr(reference_pipe.prior_pipe, k)
                                      for k in ("tokenizer", "text_encoder", "prior", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_embedding(prior_pipe, row: dict) -> np.ndarray:
    """WuerstchenPriorPipeline's embeddings for this row alone, settings from the row (defaults filled)."""
    full = make_batch([row])
    steps = int(full[C.PRIOR_STEPS][0])
    return prior_pipe(
        prompt=row[C.PROMPT], negative_prompt=str(full[C.NEGATIVE_PROMPT][0]),
        height=int(full[C.HEIGHT][0]), width=int(full[C.WIDTH][0]),
        num_inference_steps=steps or 60, timesteps=None if steps else DEFAULT_STAGE_C_TIMESTEPS,
        guidance_scale=float(full[C.PRIOR_GUIDANCE][0]),
        generator=torch.Generator().manual_seed(row[C.SEED]),
    ).image_embeddings[0].numpy()


def assert_parity(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    # Equal up to float32 rounding at the tensor's scale (the pipeline multiplies latents by 42;
    # 30–60 guided steps grow the batch-shape rounding of ~1e-7 to ~1e-5 of the scale).
    assert np.abs(got - expected).max() <= 5e-5 * np.abs(expected).max()
    assert np.abs(got - expected).max() < 0.01 * np.abs(expected).std()  # far below any other row's


def run(stages, rows):
    text, prior = stages
    return prior(text(make_batch(rows)))


def test_embedding_size_matches_the_pipeline():
    assert embedding_size(1024, 1024) == (24, 24)
    assert embedding_size(1024, 1536) == (24, 36)
    assert embedding_size(128, 128) == (3, 3)


def test_matches_wuerstchen_prior_pipeline(stages, prior_pipe):
    out = run(stages, ROWS)  # sizes, steps, schedules and guidance on/off in one batch
    for i, row in enumerate(ROWS):
        assert_parity(out[C.IMAGE_EMBEDDINGS][i], diffusers_embedding(prior_pipe, row))


def test_rows_of_one_group_keep_their_own_guidance_and_negative(stages, prior_pipe):
    out = run(stages, GROUP)
    for i, row in enumerate(GROUP):
        assert_parity(out[C.IMAGE_EMBEDDINGS][i], diffusers_embedding(prior_pipe, row))


def test_generator_state_continues_the_row_generator(stages):
    out = run(stages, ROWS[:1])
    gen = torch.Generator()
    gen.set_state(torch.from_numpy(out[C.GENERATOR_STATE][0]))
    fresh = torch.Generator().manual_seed(ROWS[0][C.SEED])
    assert not torch.equal(torch.randn(4, generator=gen), torch.randn(4, generator=fresh))


def test_independent_of_batch_size_and_order(stages):
    """Bitwise: a row of a shared group equals itself alone, reversed, and in batches of 3."""
    rows = GROUP + ROWS
    together = run(stages, rows)
    reversed_ = run(stages, rows[::-1])
    chunks = [run(stages, rows[i:i + 3]) for i in range(0, len(rows), 3)]
    for i, row in enumerate(rows):
        alone = run(stages, [row])
        for other in (alone, reversed_, chunks[i // 3]):
            j = {id(alone): 0, id(reversed_): len(rows) - 1 - i, id(chunks[i // 3]): i % 3}[id(other)]
            assert np.array_equal(other[C.IMAGE_EMBEDDINGS][j], together[C.IMAGE_EMBEDDINGS][i]), (i, row)
            assert np.array_equal(other[C.GENERATOR_STATE][j], together[C.GENERATOR_STATE][i])


def test_non_finite_output_marks_the_row(stages):
    text, prior = stages
    batch = text(make_batch(ROWS[:2]))
    batch[C.PRIOR_TEXT][1, 0, 0] = np.nan  # a NaN in the conditioning reaches the output
    out = prior(batch)
    assert out[C.ERROR][0] == "" and "NaN" in out[C.ERROR][1]


def test_a_row_with_one_non_finite_value_is_flagged_alone():
    """A bf16 value outside float16's range travels as inf: one element of a row, not all of them (the NaN above
    spreads through the whole embedding); an earlier stage's error is kept."""
    from stages.batching import flag_nonfinite

    out = np.zeros((4, 16, 3, 3), np.float16)
    out[1, 0, 0, 0], out[2, 15, 2, 2], out[3, 0, 1, 1] = np.inf, np.nan, np.inf  # row 3's first error is named
    errors = flag_nonfinite(np.asarray(["", "", "", "text: earlier"], dtype=object), [(np.arange(4), out)], "bad")
    assert list(errors) == ["", "bad", "bad", "text: earlier"]


def test_guidance_one_runs_the_conditional_branch_alone(stages, monkeypatch):
    """Guidance 1.0 is the conditional prediction alone (diffusers guides above 1): Stage C runs one branch for it,
    as for 0, not two (twice the work for the same bits)."""
    text, prior = stages
    branches = []
    generate = prior._generate
    monkeypatch.setattr(prior, "_generate", lambda *args: branches.append(args[-1]) or generate(*args))
    prior(text(make_batch([{**ROWS[0], C.PRIOR_GUIDANCE: g} for g in (1.0, 4.0)])))
    assert sorted(branches) == [False, True]
