"""The text's keys and values computed once per micro-batch: the split prior equals WuerstchenPrior's forward, the
split Stage B (its blocks narrower than the text) WuerstchenDiffNeXt's.

Every weight is random (diffusers' init would leave parts of the prior near zero and hide a difference)."""

import copy

import pytest
import torch
from conftest import random_decoder
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

from stages.denoise import prepare_model
from stages.text_terms import TextKeysValues, fill_text_terms, split_text_keys_values


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = WuerstchenPrior(c_in=16, c=32, c_cond=24, c_r=8, depth=2, nhead=4, dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        net.out[1].weight.mul_(0.1)  # keeps the output's divisor (1 - b) away from 0, where it amplifies rounding
    return prepare_model(net.eval(), torch.device("cpu"))  # SDPA, as the stage runs it before the split


def split_of(model):
    split = copy.deepcopy(model)
    assert split_text_keys_values(split)
    assert sum(isinstance(m, TextKeysValues) for m in split.modules()) == 2
    return split


def inputs(rows: int, hw: tuple[int, int], seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 16, *hw, generator=g), torch.rand(rows, generator=g), torch.randn(rows, 77, 24, generator=g)


@pytest.mark.parametrize("hw", [(6, 6), (4, 7)])
def test_split_prior_equals_the_models_own_forward(model, hw):
    split = split_of(model)
    x, r, text = inputs(3, hw)
    with torch.no_grad():
        expected = model(x, r, text)
        fill_text_terms(split, text)
        for step in range(2):  # the terms serve every step of the micro-batch
            assert torch.allclose(split(x, r * step, text), model(x, r * step, text), atol=1e-5, rtol=1e-5)
        # another micro-batch's text: its own terms (the buffers are reused in place), not the last ones
        other = inputs(3, hw, seed=2)[2]
        fill_text_terms(split, other)
        assert torch.allclose(split(x, r, other), model(x, r, other), atol=1e-5, rtol=1e-5)
        stale = split(x, r, text)  # the other text's terms: clearly wrong for this text
        assert (stale - expected).abs().max() > 100 * 1e-5


def test_a_step_maps_no_text_and_an_unsupported_block_is_refused(model):
    """The step's calls map zero text tokens (the work is in fill_text_terms, once per micro-batch); a block this
    split would not reproduce (no self-attention) is refused, not computed wrong."""
    split, tokens = split_of(model), []
    linears = [m for mapper in split.modules() if isinstance(mapper, TextKeysValues) for m in mapper
               if isinstance(m, torch.nn.Linear)]
    hooks = [m.register_forward_hook(lambda m, args, out: tokens.append(args[0].shape[1])) for m in linears]
    x, r, text = inputs(2, (6, 6))
    with torch.no_grad():
        fill_text_terms(split, text)
        filled, tokens[:] = list(tokens), []
        split(x, r, text)
    for hook in hooks:
        hook.remove()
    assert filled == [77, 77] and tokens == [0, 0]
    odd = copy.deepcopy(model)
    next(m for m in odd.modules() if hasattr(m, "self_attn")).self_attn = False
    with pytest.raises(ValueError, match="an AttnBlock this split does not reproduce"):
        split_text_keys_values(odd)


def test_split_prior_keeps_the_state_dict_keys(model):
    split = split_of(model)
    assert split.state_dict().keys() == model.state_dict().keys()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1)  # other weights
    split.load_state_dict(other.state_dict())  # another checkpoint's weights (PriorStage swaps them so)
    x, r, text = inputs(2, (6, 6))
    with torch.no_grad():
        fill_text_terms(split, text)
        assert torch.allclose(split(x, r, text), other(x, r, text), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(split(x, r, text), model(x, r, text), atol=1e-2)


def test_split_prior_compiles(model):
    split = split_of(model)
    x, r, text = inputs(2, (4, 4))
    with torch.no_grad():
        fill_text_terms(split, text)
        compiled = torch.compile(split, fullgraph=True, dynamic=False)
        assert torch.allclose(compiled(x, r, text), model(x, r, text), atol=1e-5, rtol=1e-5)


def test_split_decoder_equals_the_models_own_forward():
    model = prepare_model(random_decoder(clip_embd=20), torch.device("cpu"))  # text 20 wide, its blocks 16
    split = copy.deepcopy(model)
    assert split_text_keys_values(split)
    assert sum(isinstance(m, TextKeysValues) for m in split.modules()) == 6  # levels 2-3, down and up: 16 wide
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, generator=g)
    effnet = torch.randn(2, 16, 4, 4, generator=g)
    text, other = torch.randn(2, 77, 20, generator=g), torch.randn(2, 77, 20, generator=g)
    with torch.no_grad():
        fill_text_terms(split, text)
        for step in range(2):  # the terms serve every step
            expected = model(x, r * step, effnet, text)
            assert torch.allclose(split(x, r * step, effnet, text), expected, atol=1e-5, rtol=1e-5)
        stale = split(x, r, effnet, other)  # the last text's terms: clearly wrong for another text
        assert (stale - model(x, r, effnet, other)).abs().max() > 100 * 1e-5
