"""Text stage: both encoders, negatives only where guidance > 1, each distinct text encoded once."""

import logging

import numpy as np
import pytest
import torch
from conftest import make_batch

from stages import columns as C
from stages.text import TRUNCATION_WARNINGS, TextEncoder


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder("tiny", "tiny")


def test_matches_diffusers_encode_prompt(encoder, reference_pipe):
    rows = [{C.PROMPT: "a red fox", C.NEGATIVE_PROMPT: "blurry", C.PRIOR_GUIDANCE: 4.0, C.DECODER_GUIDANCE: 2.0}]
    out = encoder(make_batch(rows))
    pos, neg = reference_pipe.prior_pipe.encode_prompt("cpu", 1, True, prompt=["a red fox"], negative_prompt=["blurry"])
    assert torch.equal(torch.from_numpy(out[C.PRIOR_TEXT]), pos)
    assert torch.equal(torch.from_numpy(out[C.PRIOR_TEXT_NEG]), neg)
    dpos, dneg = reference_pipe.decoder_pipe.encode_prompt(["a red fox"], "cpu", 1, True, ["blurry"])
    assert torch.equal(torch.from_numpy(out[C.DECODER_TEXT]), dpos)
    assert torch.equal(torch.from_numpy(out[C.DECODER_TEXT_NEG]), dneg)


def test_rows_with_stored_stage_c_get_the_decoders_tower_only(encoder):
    """A re-decode (or rows in flight at a kill) needs no Stage C model: prior None encodes with the decoder's
    tower alone, the same states as the full stage's."""
    rows = [{C.PROMPT: "a red fox", C.NEGATIVE_PROMPT: "blurry", C.PRIOR_GUIDANCE: 4.0, C.DECODER_GUIDANCE: 2.0}]
    full, decoder_only = encoder(make_batch(rows)), TextEncoder(None, "tiny")(make_batch(rows))
    assert C.PRIOR_TEXT not in decoder_only and C.PRIOR_TEXT_NEG not in decoder_only
    for column in (C.DECODER_TEXT, C.DECODER_TEXT_NEG):
        assert np.array_equal(decoder_only[column], full[column])


def test_negatives_only_where_guidance_is_on(encoder):
    rows = [{C.PROMPT: "a", C.PRIOR_GUIDANCE: 1.0, C.DECODER_GUIDANCE: 0.0},
            {C.PROMPT: "b", C.NEGATIVE_PROMPT: "dark", C.PRIOR_GUIDANCE: 4.0, C.DECODER_GUIDANCE: 0.0}]
    out = encoder(make_batch(rows))
    assert out[C.PRIOR_TEXT].shape == (2, 77, 32)
    assert not out[C.PRIOR_TEXT_NEG][0].any() and out[C.PRIOR_TEXT_NEG][1].any()
    assert not out[C.DECODER_TEXT_NEG].any()


def test_identical_texts_are_encoded_once(encoder):
    seen = {"prior": [], "decoder": []}
    hooks = [getattr(encoder, tower).model.register_forward_hook(
        lambda m, args, out, tower=tower: seen[tower].append(args[0].shape[0])) for tower in seen]
    try:
        rows = [{C.PROMPT: "same prompt", C.SEED: s, C.PRIOR_GUIDANCE: 4.0, C.DECODER_GUIDANCE: 2.0}
                for s in range(12)]
        out = encoder(make_batch(rows))
    finally:
        for hook in hooks:
            hook.remove()
    # 12 rows, 2 distinct texts ("same prompt" and the cached-or-not ""): one micro-batch (8) of each tower, where
    # encoding every row would take two
    assert [len(calls) for calls in seen.values()] == [1, 1], seen
    assert (out[C.PRIOR_TEXT] == out[C.PRIOR_TEXT][0]).all() and (out[C.DECODER_TEXT] == out[C.DECODER_TEXT][0]).all()


def test_an_actor_keeps_only_the_empty_text_encoded():
    """Across batches an actor holds the empty negative's states alone: a run of 10M distinct prompts does not
    grow its memory with them."""
    encoder = TextEncoder("tiny", "tiny")
    encoder(make_batch([{C.PROMPT: f"prompt {i}", C.PRIOR_GUIDANCE: 4.0, C.DECODER_GUIDANCE: 2.0} for i in range(20)]))
    assert set(encoder.prior.cache) == set(encoder.decoder.cache) == {""}


def test_long_prompts_are_truncated_with_one_warning_each_up_to_a_bound(caplog):
    encoder = TextEncoder("tiny", "tiny")  # its own: the bound counts per actor
    long_prompt = "a very long prompt " * 40
    with caplog.at_level(logging.WARNING):
        out = encoder(make_batch([{C.PROMPT: long_prompt}, {C.PROMPT: long_prompt, C.SEED: 1},
                                  {C.PROMPT: "猫と東京タワー 🌭"}]))
    assert caplog.text.count("truncated to 77 CLIP tokens") == 1  # once, not per row or per text tower
    assert np.isfinite(out[C.PRIOR_TEXT]).all() and out[C.PRIOR_TEXT].shape[0] == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        encoder(make_batch([{C.PROMPT: f"{i} {long_prompt}"} for i in range(3 * TRUNCATION_WARNINGS)]))
    assert caplog.text.count("prompt truncated") == TRUNCATION_WARNINGS - 1
    assert caplog.text.count("not logged further") == 1
