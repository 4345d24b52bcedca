"""Text stage: both CLIP text encoders (the prior's and the decoder's), each distinct text encoded once."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from stages import columns as C
from stages.batching import current_node, micro_batches
from stages.models import DTYPES, load_component, pick_device, prior_refs, resolve

log = logging.getLogger(__name__)


def transport_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype tensors travel in between stages: float32 for fp32 runs, float16 otherwise."""
    return np.dtype(np.float32) if dtype == torch.float32 else np.dtype(np.float16)


class _Encoder:
    """One tokenizer + CLIPTextModel, encoding as diffusers' Würstchen pipelines do, in fixed micro-batches."""

    def __init__(self, root: str, dtype: torch.dtype, device: torch.device):
        self.tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
        self.model = load_component(CLIPTextModel, root, "text_encoder", dtype, device)
        self.device = device
        self.cache: dict[str, torch.Tensor] = {}  # the empty negative prompt, encoded once per actor

    @torch.no_grad()
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Encode each distinct text once → {text: (77, d) last_hidden_state}."""
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        out = {t: self.cache[t] for t in texts if t in self.cache}
        self._warn_truncated(todo)
        for chunk, n in micro_batches(np.arange(len(todo))):
            texts = [todo[i] for i in chunk]
            tokens = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt")
            states = self.model(
                tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
            ).last_hidden_state  # (MICRO_BATCH, 77, d)
            out.update(zip(texts[:n], states[:n]))
        if "" in out:
            self.cache[""] = out[""]
        return out

    def _warn_truncated(self, texts: list[str]) -> None:
        max_len = self.tokenizer.model_max_length
        lengths = [len(ids) for ids in self.tokenizer(texts).input_ids] if texts else []
        for text, n in zip(texts, lengths):
            if n > max_len:
                log.warning("prompt truncated to %d CLIP tokens (had %d): %.60r…", max_len, n, text)


class TextEncoder:
    """Adds the prior's and the decoder's text states (and negatives where guidance > 1) to a batch."""

    def __init__(self, prior, decoder: str, dtype: str = "float32", storage_options: dict | None = None,
                 device: str = "auto"):
        torch_dtype = DTYPES[dtype]
        self.device = pick_device(device)
        self.node = current_node()
        self.out_dtype = transport_dtype(torch_dtype)
        prior_root = resolve(prior_refs(prior)[0], "prior", storage_options)  # an interpolation: A's text tower
        self.prior = _Encoder(prior_root, torch_dtype, self.device)
        self.decoder = _Encoder(resolve(decoder, "decoder", storage_options), torch_dtype, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        prompts = [str(p) for p in batch[C.PROMPT]]
        negatives = [str(n) for n in batch[C.NEGATIVE_PROMPT]]
        for encoder, guidance, pos_col, neg_col in (
            (self.prior, batch[C.PRIOR_GUIDANCE], C.PRIOR_TEXT, C.PRIOR_TEXT_NEG),
            (self.decoder, batch[C.DECODER_GUIDANCE], C.DECODER_TEXT, C.DECODER_TEXT_NEG),
        ):
            cfg = np.asarray(guidance, dtype=np.float64) > 1.0
            needed = prompts + [n for n, use in zip(negatives, cfg) if use]
            states = encoder.encode(needed)
            batch[pos_col] = self._stack([states[p] for p in prompts])
            zeros = torch.zeros_like(states[prompts[0]])
            batch[neg_col] = self._stack([states[n] if use else zeros for n, use in zip(negatives, cfg)])
        batch[C.TEXT_NODE] = np.full(len(prompts), self.node, dtype=object)
        batch[C.TEXT_SECONDS] = np.full(len(prompts), (time.perf_counter() - start) / len(prompts))
        return batch

    def _stack(self, tensors: list[torch.Tensor]) -> np.ndarray:
        return torch.stack(tensors).float().cpu().numpy().astype(self.out_dtype)  # (B, 77, d)
