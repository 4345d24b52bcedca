"""How the tiny preset's random weights are made to draw: noise-aware heads, live blocks, strong conditioning.

A trained Würstchen model predicts eps = (x - a) / b with a ≈ sqrt(ᾱ(r))·x0 and b ≈ sqrt(1 - ᾱ(r)),
so sampling lands on its x0 estimate at any step count. Random weights don't: their a and b ignore
the noise level r, and the images blow up at few steps and fade to flat grey at many. Here the last
TimestepBlock before each head adds G(r)·v (G = sqrt((1 - ᾱ)/ᾱ), fitted from the timestep embedding,
v a fixed unit direction); after the head's LayerNorm the part along v is sqrt(1 - ᾱ) and the rest
is scaled by sqrt(ᾱ). The head reads b from v and a from the rest. Everything else stays random,
with the conditioning paths (text, Stage C embeddings) scaled so that they shape the output.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDPMWuerstchenScheduler

# Gains: text into Stage C's attention, Stage C's ResBlocks, Stage C embeddings into Stage B, Stage B's
# attention, latents into pixels; and the margin that keeps Stage C's divisor clear of 0.
TINY_GAINS = dict(prior_text=14.0, prior_res=6.0, effnet=0.03, decoder_attn=10.0, pixels=1.5, prior_margin=0.3)
C_R = 64  # timestep embedding width, as the official models (the fit needs its low frequencies)
SIGMOID_FIT = (5.0, -1.5)  # sigmoid(k·s + c): ≈ s at high noise, ≥ 0.18 at low (stable with guidance)


def wake(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give zero-initialised tensors (output heads, gammas, timestep mappers) small random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


def _frequencies(c_r: int) -> np.ndarray:
    """The frequencies f of diffusers' r embedding (sin, cos of r·f), as gen_r_embedding computes them."""
    half = c_r // 2
    return np.exp(-math.log(10000) / (half - 1) * np.arange(half)) * 10000


def _smooth_columns(c_r: int) -> np.ndarray:
    """Which entries of diffusers' r embedding vary slowly over r in [0, 1]."""
    return np.concatenate([_frequencies(c_r) < 12] * 2)


def smooth_in_time(model: torch.nn.Module) -> None:
    """Timestep mappers read only the slow components of r: a trained model responds smoothly to r."""
    for module in model.modules():
        if hasattr(module, "mapper"):
            module.mapper.weight[:, ~torch.from_numpy(_smooth_columns(module.mapper.in_features))] = 0


def noise_level_fit(c_r: int = C_R) -> tuple[np.ndarray, float]:
    """Weights over diffusers' r embedding (sin, cos of r·f) and a bias with w·emb(r) + bias ≈ G(r)."""
    r = np.linspace(0, 1, 401)
    acp = DDPMWuerstchenScheduler()._alpha_cumprod(torch.tensor(r, dtype=torch.float64), "cpu").numpy()
    target = np.sqrt((1 - acp) / acp)
    freqs, smooth = _frequencies(c_r), _smooth_columns(c_r)
    emb = np.concatenate([np.sin(r[:, None] * freqs), np.cos(r[:, None] * freqs)], axis=1)
    basis = np.concatenate([emb[:, smooth], np.ones((len(r), 1))], axis=1)
    weight = 1 / np.maximum(target, 0.3)  # relative error where G is large
    lhs = basis * weight[:, None]
    coef = np.linalg.solve(lhs.T @ lhs + 1e-4 * np.eye(lhs.shape[1]), lhs.T @ (target * weight))
    full = np.zeros(c_r)
    full[smooth] = coef[:-1]
    return full, float(coef[-1])


def _quiet_direction(model, block, run) -> tuple[torch.Tensor, float]:
    """The zero-mean unit direction the features entering `block` use least, and their mean per-pixel norm."""
    seen = []
    handle = block.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    with torch.no_grad():
        run()
    handle.remove()
    features = seen[-1].transpose(0, 1).flatten(1).T.double()  # (pixels, C)
    channels = features.shape[1]
    basis = torch.linalg.qr(torch.eye(channels, dtype=torch.float64) - 1 / channels)[0][:, : channels - 1]
    _, vectors = torch.linalg.eigh(torch.cov((features @ basis).T))  # ascending eigenvalues
    return (basis @ vectors[:, 0]).float(), float(features.norm(dim=1).mean())


def _noise_aware(timestep_block, head, half: int, v: torch.Tensor, scale: float) -> None:
    """Make `timestep_block` add G(r)·scale·v, and the `a` rows of `head` blind to v."""
    channels = timestep_block.mapper.out_features // 2
    coef, bias = noise_level_fit(timestep_block.mapper.in_features)
    mapper = timestep_block.mapper
    mapper.weight.zero_()
    mapper.bias.zero_()
    mapper.weight[channels:] = torch.outer(v, torch.tensor(coef, dtype=torch.float32)) * scale
    mapper.bias[channels:] = v * bias * scale
    a_rows = head.weight[:half, :, 0, 0]
    a_rows -= torch.outer(a_rows @ v, v)


def drawing_prior(prior, gen_seed: int = 3):
    """Stage C: eps = (x - a) / |1 - b| with |1 - b| ≈ sqrt(1 - ᾱ(r)), a text-led."""
    wake(prior, seed=gen_seed)
    gen = torch.Generator().manual_seed(gen_seed + 100)
    head, half, c = prior.out[1], prior.config.c_in, prior.config.c
    with torch.no_grad():
        smooth_in_time(prior)
        for block in prior.blocks:
            if hasattr(block, "channelwise"):
                block.channelwise[-1].weight.mul_(TINY_GAINS["prior_res"])
        prior.cond_mapper[2].weight.mul_(TINY_GAINS["prior_text"])
        for block in prior.blocks:
            if hasattr(block, "kv_mapper"):
                block.kv_mapper[1].weight.mul_(TINY_GAINS["prior_text"])
        last_t = [b for b in prior.blocks if hasattr(b, "mapper")][-1]
        x, text = torch.randn(4, half, 6, 6, generator=gen), torch.randn(4, 77, prior.config.c_cond, generator=gen)
        v, scale = _quiet_direction(prior, last_t, lambda: prior(x, torch.full((4,), 0.5), text))
        head.weight[:half].normal_(generator=gen).mul_(1.0 / c**0.5)
        head.bias.zero_()
        _noise_aware(last_t, head, half, v, scale)
        head.weight[half:, :, 0, 0] = -v / c**0.5  # b = 1 - s - margin: |1 - b| stays clear of 0
        head.bias[half:] = 1.0 - TINY_GAINS["prior_margin"]
    return prior.eval()


def drawing_decoder(decoder, gen_seed: int = 7):
    """Stage B: eps = (x - a) / sigmoid(b) with sigmoid(b) ≈ sqrt(1 - ᾱ(r)), a led by Stage C's embeddings."""
    wake(decoder, seed=gen_seed)
    gen = torch.Generator().manual_seed(gen_seed + 100)
    head = decoder.clf[1]
    half, c = head.out_channels // 2, head.in_channels  # PixelShuffle gives `a` the first half
    with torch.no_grad():
        for module in decoder.modules():  # diffusers' init rescales these once per module: ~1e-30
            if hasattr(module, "channelwise"):
                torch.nn.init.xavier_uniform_(module.channelwise[-1].weight, generator=gen)
        smooth_in_time(decoder)
        for module in decoder.modules():
            if hasattr(module, "kv_mapper"):
                module.attention.to_out[0].weight.mul_(TINY_GAINS["decoder_attn"])
        for mapper in decoder.effnet_mappers:
            if mapper is not None:
                mapper.weight.normal_(generator=gen).mul_(TINY_GAINS["effnet"])
        last_t = decoder.up_blocks[-1][-1]
        x = torch.randn(4, decoder.config.c_in, 32, 32, generator=gen)
        effnet = torch.randn(4, decoder.config.effnet_embd, 3, 3, generator=gen) * 30
        text = torch.randn(4, 77, decoder.config.clip_embd, generator=gen)
        v, scale = _quiet_direction(decoder, last_t, lambda: decoder(x, torch.full((4,), 0.5), effnet, text))
        head.weight[:half].normal_(generator=gen).mul_(1.0 / c**0.5)
        head.bias.zero_()
        _noise_aware(last_t, head, half, v, scale)
        k, bias = SIGMOID_FIT
        head.weight[half:, :, 0, 0] = v * k / c**0.5
        head.bias[half:] = bias
    return decoder.eval()


def drawing_vqgan(vqgan, gen_seed: int = 8):
    """Stage A: pixels proportional to the latents (no fixed bias pattern), centred on grey."""
    wake(vqgan, seed=gen_seed)
    head = vqgan.out_block[0]
    gen = torch.Generator().manual_seed(gen_seed + 100)
    with torch.no_grad():
        for name, param in vqgan.up_blocks.named_parameters():
            if name.endswith("bias"):
                param.zero_()
        head.weight.normal_(generator=gen).mul_(TINY_GAINS["pixels"] / head.in_channels**0.5)
        head.bias.fill_(0.5)
    return vqgan.eval()
