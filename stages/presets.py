"""Offline random-weight presets in the official layout: `tiny` (tests, quick start) and `full` (official shapes)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMWuerstchenScheduler
from tokenizers.pre_tokenizers import ByteLevel
from diffusers.pipelines.deprecated.wuerstchen import (
    PaellaVQModel,
    WuerstchenDecoderPipeline,
    WuerstchenDiffNeXt,
    WuerstchenPrior,
    WuerstchenPriorPipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stages.tiny_weights import C_R, drawing_decoder, drawing_prior, drawing_vqgan, wake

TINY_VERSION = 2  # bump whenever the tiny weights change (v2: noise-aware heads, live blocks)
TEXT_HIDDEN = 32
EFFNET_CHANNELS = 16  # as the official Stage C output (16 × 24 × 24 at 1024²)
# A few common English merges so tokens are not all single characters.
_MERGES = ["t h", "h e</w>", "a n", "i n", "e r", "o n", "r e", "a t", "e n", "o r"]


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer made here: every byte, with and without `</w>`, and a few merges."""
    chars = sorted(ByteLevel.alphabet())
    merges = [tuple(m.split()) for m in _MERGES]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77
    return tokenizer


# CLIP text towers: (hidden, intermediate, heads, layers). Multiples of 16 throughout, so CPU vector
# lanes line up in every row and results do not depend on a row's position in the batch.
TINY_TEXT = (TEXT_HIDDEN, 64, 4, 2)
BIGG_TEXT = (1280, 5120, 20, 32)  # the prior's: CLIP ViT-bigG/14
VIT_H_TEXT = (1024, 4096, 16, 24)  # the decoder's: CLIP ViT-H/14


def _text_encoder(tokenizer: CLIPTokenizer, seed: int, shape=TINY_TEXT) -> CLIPTextModel:
    torch.manual_seed(seed)
    hidden, intermediate, heads, layers = shape
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def build_prior(full: bool = False) -> WuerstchenPriorPipeline:
    """Stage C: tiny (2 deep, every block type) or the official shape (c=1536, depth 32, ~1B parameters)."""
    tokenizer = build_tokenizer()
    torch.manual_seed(1)
    if full:
        prior = WuerstchenPrior(c_in=EFFNET_CHANNELS, c=1536, c_cond=BIGG_TEXT[0], c_r=64, depth=32, nhead=24)
        with torch.no_grad():  # keep the output's divisor |1 - b| near 1, as in a trained prior
            prior.out[1].weight.mul_(0.05)
        prior = wake(prior, seed=3)
    else:
        prior = drawing_prior(WuerstchenPrior(c_in=EFFNET_CHANNELS, c=32, c_cond=TEXT_HIDDEN, c_r=C_R, depth=2, nhead=2))
    return WuerstchenPriorPipeline(
        tokenizer=tokenizer,
        text_encoder=_text_encoder(tokenizer, seed=2, shape=BIGG_TEXT if full else TINY_TEXT),
        prior=prior,
        scheduler=DDPMWuerstchenScheduler(),
    )


def build_decoder(full: bool = False) -> WuerstchenDecoderPipeline:
    """Stage B/A: tiny (two levels, one with attention `CTA` and effnet injection) or the official shape."""
    tokenizer = build_tokenizer()
    torch.manual_seed(4)
    decoder = WuerstchenDiffNeXt(c_cond=VIT_H_TEXT[0], clip_embd=VIT_H_TEXT[0]) if full else WuerstchenDiffNeXt(
        c_cond=TEXT_HIDDEN,
        clip_embd=TEXT_HIDDEN,
        c_hidden=[16, 32],
        nhead=[-1, 2],
        blocks=[1, 1],
        level_config=["CT", "CTA"],
        inject_effnet=[False, True],
        effnet_embd=EFFNET_CHANNELS,
        c_r=C_R,
    )
    torch.manual_seed(5)
    vqgan = PaellaVQModel() if full else PaellaVQModel(bottleneck_blocks=1, embed_dim=32, num_vq_embeddings=16)
    if full:
        decoder, vqgan = wake(decoder, seed=7), _full_size_vqgan(vqgan)
    else:
        decoder, vqgan = drawing_decoder(decoder), drawing_vqgan(vqgan)
    return WuerstchenDecoderPipeline(
        tokenizer=tokenizer,
        text_encoder=_text_encoder(tokenizer, seed=6, shape=VIT_H_TEXT if full else TINY_TEXT),
        decoder=decoder,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan,
    )


def _full_size_vqgan(vqgan: PaellaVQModel) -> PaellaVQModel:
    """Random official-shape Stage A whose pixel head keeps random latents mostly unclipped (benchmarks only)."""
    vqgan = wake(vqgan, seed=8)
    with torch.no_grad():
        vqgan.out_block[0].weight.mul_(0.025)
        vqgan.out_block[0].bias.fill_(0.5)
    return vqgan


def write_tiny_model(directory: str | os.PathLike, full: bool = False) -> Path:
    """Write `DIR/prior` and `DIR/decoder` in the official layouts (safetensors; bfloat16 for `full`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for role, pipe in (("prior", build_prior(full)), ("decoder", build_decoder(full))):
        if full:
            pipe.to(torch.bfloat16)
        pipe.save_pretrained(directory / role, safe_serialization=True)
    return directory


def ensure_tiny_model(cache_dir: Path) -> Path:
    """Build the tiny preset into `cache_dir/tiny-vN` once; concurrent callers see it whole or not at all."""
    target = cache_dir / f"tiny-v{TINY_VERSION}"  # a new version of the weights never reuses an old cache
    if (target / "decoder" / "model_index.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=cache_dir))
    write_tiny_model(staging)
    try:
        os.rename(staging, target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target
