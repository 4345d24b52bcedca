"""Stage B's step-invariant work, done once per micro-batch instead of at every denoising step.

Every ResBlockStageB of an effnet-injecting level (the official decoder's levels 1-3) starts its MLP with
Linear(c [+ c skip] + c_cond, 4c) on its input concatenated with the Stage C embedding mapped to that level.
The embedding does not change across the steps, so its columns' product (plus the bias) is the same at every
step: ~17% of Stage B's FLOPs per step at 1024², and the mapping, bicubic resizing and concatenation of the
embedding at each level (memory traffic the FLOP count misses). `split_effnet_linears` splits those Linears and
takes the mappers out of the forward; before each micro-batch's loop `fill_effnet_terms` maps the embedding and
computes the effnet share once, and each step multiplies only the rest.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from stages.denoise import shape_buffers


class EffnetSplitLinear(nn.Module):
    """A ResBlockStageB's first Linear whose last `c_cond` input columns (the effnet conditioning) were multiplied
    ahead: forward(x) = x[..., :k] · W_kᵀ + effnet_term, with effnet_term = effnet_c · W_effnetᵀ + bias."""

    def __init__(self, linear: nn.Linear, c_cond: int):
        super().__init__()
        self.keep = linear.in_features - c_cond
        weight = linear.weight.detach()
        self.weight = nn.Parameter(weight[:, :self.keep].contiguous(), requires_grad=False)
        self.effnet_weight = nn.Parameter(weight[:, self.keep:].contiguous(), requires_grad=False)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.terms: OrderedDict = OrderedDict()  # a buffer per micro-batch shape, filled in place
        self.register_buffer("effnet_term", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, k) → (B, H, W, 4c)
        rows = x.reshape(-1, self.keep)  # a view where x is channels-last (on GPUs)
        term = self.effnet_term.view(-1, self.effnet_term.shape[-1])
        return torch.addmm(term, rows, self.weight.t()).view(self.effnet_term.shape)  # one GEMM, term as its C

    def fill(self, effnet_c: torch.Tensor) -> None:
        """Compute this micro-batch's effnet term from the mapped embedding (B, c_cond, H, W), into a buffer that
        keeps its address for every micro-batch of the shape (a CUDA graph reads it there)."""
        rows = effnet_c.permute(0, 2, 3, 1)  # (B, H, W, c_cond)
        shape = (*rows.shape[:-1], self.weight.shape[0])
        self.effnet_term, = shape_buffers(self.terms, shape, lambda: (
            torch.empty(shape, dtype=self.weight.dtype, device=self.weight.device),))
        torch.addmm(self.bias, rows.reshape(-1, rows.shape[-1]), self.effnet_weight.t(),
                    out=self.effnet_term.view(-1, shape[-1]))


def split_effnet_linears(model: nn.Module) -> bool:
    """Split the first Linear of every effnet-injecting ResBlockStageB of a WuerstchenDiffNeXt (in place), and
    move the effnet mappers to `split_effnet_mappers`: diffusers' forward then neither maps, resizes nor
    concatenates the embedding at every step (its blocks get no effnet input); returns whether the model has any."""
    levels = list(_injecting_levels(model))
    if not levels:
        return False
    model.split_effnet_mappers = nn.ModuleList(list(model.effnet_mappers))
    for index, mapper, blocks in levels:
        for block in blocks:
            block.channelwise[0] = EffnetSplitLinear(block.channelwise[0], mapper.out_channels)
        model.effnet_mappers[index] = None
    return True


@torch.no_grad()
def fill_effnet_terms(model: nn.Module, effnet: torch.Tensor, latent_hw: tuple[int, int]) -> None:
    """Set every split Linear's effnet term for a micro-batch: effnet (B, 16, h, w) is the Stage C embedding the
    model is called with, latent_hw the size of its latents (B, 4, H, W). Each level maps the embedding as
    WuerstchenDiffNeXt's forward does (the level's effnet mapper on the embedding resized to the level's size)."""
    levels = len(model.down_blocks)
    sizes = [(latent_hw[0] // model.config.patch_size, latent_hw[1] // model.config.patch_size)]
    while len(sizes) < levels:  # each down level after the first halves the size (Conv2d, kernel 2, stride 2)
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    for index, mapper, blocks in _injecting_levels(model):
        size = sizes[index] if index < levels else sizes[2 * levels - 1 - index]  # up levels run in reverse
        resized = F.interpolate(effnet.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
        effnet_c = mapper(resized.to(effnet.dtype))  # (B, c_cond, H_level, W_level)
        for block in blocks:
            block.channelwise[0].fill(effnet_c)


def _injecting_levels(model: nn.Module):
    """(level index, effnet mapper, its ResBlockStageBs) for each level of the down then up blocks that injects
    the effnet conditioning: the mapper index is the level's, as in WuerstchenDiffNeXt."""
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import ResBlockStageB

    mappers = getattr(model, "split_effnet_mappers", model.effnet_mappers)
    for index, level in enumerate((*model.down_blocks, *model.up_blocks)):
        mapper = mappers[index]
        if mapper is not None:
            yield index, mapper, [block for block in level if isinstance(block, ResBlockStageB)]
