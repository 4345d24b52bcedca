"""The text's step-invariant work in Stage C and Stage B, done once per micro-batch instead of at every step.

Each AttnBlock of WuerstchenPrior (32 in the official prior) and of WuerstchenDiffNeXt (Stage B's levels 2-3)
attends from the image tokens to themselves and to the 77 text tokens: it maps the text (`kv_mapper`: SiLU,
Linear) and projects the mapped tokens to keys and values, at every step, although the text does not change
across the steps: ~3% of Stage C's FLOPs per step, ~2% of Stage B's at 1024².
`split_text_keys_values` makes each block take those keys and values from buffers that `fill_text_terms` computes
once per micro-batch; each step projects only the image tokens. Diffusers' modules and weights are unchanged
(the state dict keeps its keys, so another checkpoint's weights still load).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from stages.denoise import shape_buffers


class TextKeysValues(nn.Sequential):
    """An AttnBlock's kv_mapper (same children, same state-dict keys) holding the projected keys and values of the
    micro-batch's text tokens; its forward gives the block no text tokens to concatenate (the processor adds the
    filled keys and values)."""

    def __init__(self, mapper: nn.Sequential):
        super().__init__(*mapper)
        self.shapes: OrderedDict = OrderedDict()  # (keys, values) buffers per shape, filled in place
        self.register_buffer("keys", None, persistent=False)
        self.register_buffer("values", None, persistent=False)

    def forward(self, kv: torch.Tensor) -> torch.Tensor:  # (B, 77, c_cond) → (B, 0, c): no text tokens to concat
        return super().forward(kv[:, :0])  # mapped as zero tokens: the block's width, no work

    def fill(self, c_embed: torch.Tensor, attention: nn.Module) -> None:
        """Map the text (B, 77, c) as the block does, project it to keys and values (B, 77, c), into buffers that
        keep their address for every micro-batch of the shape (a CUDA graph reads them there)."""
        mapped = super().forward(c_embed)  # SiLU, Linear
        self.keys, self.values = shape_buffers(self.shapes, tuple(mapped.shape), lambda: tuple(
            torch.empty_like(mapped, memory_format=torch.contiguous_format) for _ in range(2)))
        self.keys.copy_(attention.to_k(mapped))
        self.values.copy_(attention.to_v(mapped))


class TextTermsProcessor:
    """SDPA attention from the image tokens to themselves and to the text keys and values filled ahead: what
    AttnProcessor2_0 computes for an AttnBlock, without projecting the text at every step."""

    def __init__(self, terms: TextKeysValues):
        self.terms = terms

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None) -> torch.Tensor:
        b, c, h, w = hidden_states.shape  # the block's normed x; encoder_hidden_states: those tokens alone
        tokens = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, hw, c)
        query = attn.to_q(tokens)
        key = torch.cat([attn.to_k(tokens), self.terms.keys], dim=1)  # (B, hw + 77, c)
        value = torch.cat([attn.to_v(tokens), self.terms.values], dim=1)
        query, key, value = (t.view(b, -1, attn.heads, c // attn.heads).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value)  # (B, heads, hw, c / heads)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, h * w, c)))  # Linear, Dropout
        return out.transpose(1, 2).reshape(b, c, h, w)


def split_text_keys_values(model: nn.Module) -> bool:
    """Make every AttnBlock of a WuerstchenPrior or WuerstchenDiffNeXt take its text keys and values from
    `fill_text_terms` (in place, after any other processor was set); returns whether the model has any."""
    found = False
    for block in _attn_blocks(model):
        attention = block.attention
        if not block.self_attn or attention.spatial_norm or attention.group_norm or attention.norm_q or attention.norm_cross or (
                attention.residual_connection or attention.rescale_output_factor != 1.0):
            raise ValueError(f"an AttnBlock this split does not reproduce: {attention}")
        block.kv_mapper = TextKeysValues(block.kv_mapper)
        attention.set_processor(TextTermsProcessor(block.kv_mapper))
        found = True
    return found


@torch.no_grad()
def fill_text_terms(model: nn.Module, text: torch.Tensor) -> None:
    """Set every AttnBlock's text keys and values for a micro-batch: `text` (B, 77, d) is what the model is
    called with, mapped as its forward maps it (WuerstchenDiffNeXt: clip_mapper, seq_norm; the prior: cond_mapper)."""
    c_embed = model.gen_c_embeddings(text) if hasattr(model, "gen_c_embeddings") else model.cond_mapper(text)
    for block in _attn_blocks(model):
        block.kv_mapper.fill(c_embed, block.attention)


def _attn_blocks(model: nn.Module):
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import AttnBlock

    return [block for block in model.modules() if isinstance(block, AttnBlock)]
