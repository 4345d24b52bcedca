"""Stage B's effnet terms computed once per micro-batch: the split model equals WuerstchenDiffNeXt's own forward.

The tiny preset's decoder has one injecting level; this model has the official decoder's structure (injection on
every level but the first, so an up level's first block reads the level's skip and the effnet embedding), with
every weight random (diffusers' init zeroes the output head, which would hide any difference).
"""

import copy

import pytest
import torch
from conftest import random_decoder

from stages.denoise import TERM_SHAPES
from stages.effnet_terms import EffnetSplitLinear, fill_effnet_terms, split_effnet_linears


@pytest.fixture(scope="module")
def model():
    return random_decoder()


def inputs(rows: int, latent_hw: tuple[int, int]):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 4, *latent_hw, generator=g)
    r = torch.rand(rows, generator=g)
    effnet = torch.randn(rows, 16, 6, 9, generator=g)
    clip = torch.randn(rows, 5, 24, generator=g)
    return x, r, effnet, clip


@pytest.mark.parametrize("latent_hw", [(32, 32), (32, 64), (48, 16)])
def test_split_model_equals_the_models_own_forward(model, latent_hw):
    split = copy.deepcopy(model)
    assert split_effnet_linears(split)
    linears = [m for m in split.modules() if isinstance(m, EffnetSplitLinear)]
    assert len(linears) == 6 and any(m.keep == 32 for m in linears)  # an up level's first block: c + skip c
    x, r, effnet, clip = inputs(3, latent_hw)
    with torch.no_grad():
        expected = model(x, r, effnet, clip)
        fill_effnet_terms(split, effnet, latent_hw)
        for _ in range(2):  # the terms serve every step of the micro-batch
            assert torch.allclose(split(x, r, effnet, clip), expected, atol=1e-5, rtol=1e-5)
        # another micro-batch's embeddings: its own terms (the buffer is reused in place), not the last ones
        fill_effnet_terms(split, effnet.flip(0), latent_hw)
        assert torch.allclose(split(x, r, effnet.flip(0), clip), model(x, r, effnet.flip(0), clip), atol=1e-5,
                              rtol=1e-5)
        stale = split(x, r, effnet, clip)  # terms of the flipped rows: clearly wrong for these
        assert (stale - expected).abs().max() > 100 * 1e-5


def test_the_steps_do_no_effnet_work_and_an_actor_keeps_terms_of_few_shapes(model):
    """After the split the forward never reads the embedding (no per-step mapping, resizing or concatenation), and
    each split Linear keeps the buffers of the TERM_SHAPES latest micro-batch shapes: a shape that comes back
    after its buffers were dropped gets its terms afresh."""
    split = copy.deepcopy(model)
    split_effnet_linears(split)
    assert all(mapper is None for mapper in split.effnet_mappers)
    linear = next(m for m in split.modules() if isinstance(m, EffnetSplitLinear))
    sizes = [(16 * (1 + i % 4), 16 * (1 + i // 4)) for i in range(TERM_SHAPES + 1)]
    with torch.no_grad():
        for latent_hw in sizes:
            x, r, effnet, clip = inputs(2, latent_hw)
            fill_effnet_terms(split, effnet, latent_hw)
            assert torch.allclose(split(x, r, None, clip), model(x, r, effnet, clip), atol=1e-5, rtol=1e-5)
        assert len(linear.terms) == TERM_SHAPES < len(sizes)
        x, r, effnet, clip = inputs(2, sizes[0])  # dropped: made again
        fill_effnet_terms(split, effnet, sizes[0])
        assert torch.allclose(split(x, r, None, clip), model(x, r, effnet, clip), atol=1e-5, rtol=1e-5)
