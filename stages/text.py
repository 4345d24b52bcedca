"""Text stage: both CLIP text encoders (the prior's and the decoder's), each distinct text encoded once."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from stages import columns as C
from stages.batching import MICRO_BATCH, current_node, micro_batches, transport_dtype
from stages.denoise import compiled, finish, new_step, to_device, to_host
from stages.models import DTYPES, load_component, pick_device, prior_refs, resolve

log = logging.getLogger(__name__)
TRUNCATION_WARNINGS = 5  # per actor: a table of long prompts must not flood the driver's log


class _Encoder:
    """One tokenizer + CLIPTextModel, encoding as diffusers' Würstchen pipelines do, in fixed micro-batches."""

    def __init__(self, root: str, dtype: torch.dtype, device: torch.device, micro_batch: int, compile: bool | str):
        self.tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
        self.model = load_component(CLIPTextModel, root, "text_encoder", dtype, device)
        self.forward = compiled(self.model, device, compile, fullgraph=False) if compile else self.model
        self.device, self.micro_batch, self.compiled = device, micro_batch, compile
        self.cache: dict[str, torch.Tensor] = {}  # the empty negative prompt, encoded once per actor

    @torch.no_grad()
    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Encode each distinct text once → {text: (77, d) last_hidden_state}."""
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        out = {t: self.cache[t] for t in texts if t in self.cache}
        for chunk, n in micro_batches(np.arange(len(todo)), self.micro_batch):
            texts = [todo[i] for i in chunk]
            tokens = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt")
            new_step()
            states = self.forward(
                to_device(tokens.input_ids, self.device), attention_mask=to_device(tokens.attention_mask, self.device)
            ).last_hidden_state  # (micro_batch, 77, d)
            if self.compiled:
                states = states.clone()  # a CUDA graph's output is overwritten by its next replay
            out.update(zip(texts[:n], states[:n]))
        if "" in out:
            self.cache[""] = out[""]
        return out


class TextEncoder:
    """Adds the prior's and the decoder's text states (and negatives where guidance > 1) to a batch; only the
    decoder's where `prior` is None (rows whose Stage C embeddings are stored)."""

    def __init__(self, prior, decoder: str, dtype: str = "float32", storage_options: dict | None = None,
                 device: str = "auto", micro_batch: int = MICRO_BATCH, compile: bool | str = False):
        torch_dtype = DTYPES[dtype]
        self.device = pick_device(device)
        self.node = current_node()
        self.out_dtype = transport_dtype(torch_dtype)
        self.prior = None
        if prior is not None:
            prior_root = resolve(prior_refs(prior)[0], "prior", storage_options)  # an interpolation: A's text tower
            self.prior = _Encoder(prior_root, torch_dtype, self.device, micro_batch, compile)
        self.decoder = _Encoder(resolve(decoder, "decoder", storage_options), torch_dtype, self.device,
                                micro_batch, compile)
        self.truncated = 0  # truncated texts this actor has warned of (one more: it stopped warning)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        prompts = [str(p) for p in batch[C.PROMPT]]
        negatives = [str(n) for n in batch[C.NEGATIVE_PROMPT]]
        columns = {}
        self._warn_truncated(prompts + negatives)
        for encoder, guidance, pos_col, neg_col in self._towers(batch):
            cfg = np.asarray(guidance, dtype=np.float64) > 1.0
            needed = prompts + [n for n, use in zip(negatives, cfg) if use]
            states = encoder.encode(needed)
            columns[pos_col] = self._stack([states[p] for p in prompts])
            zeros = torch.zeros_like(states[prompts[0]])
            columns[neg_col] = self._stack([states[n] if use else zeros for n, use in zip(negatives, cfg)])
        finish(self.device)
        batch.update({column: states.numpy() for column, states in columns.items()})
        batch[C.TEXT_NODE] = np.full(len(prompts), self.node, dtype=object)
        batch[C.TEXT_SECONDS] = np.full(len(prompts), (time.perf_counter() - start) / len(prompts))
        return batch

    def _towers(self, batch: dict[str, np.ndarray]) -> list[tuple]:
        """(encoder, guidance, column, negative column) of each text tower the batch needs."""
        towers = [(self.decoder, batch[C.DECODER_GUIDANCE], C.DECODER_TEXT, C.DECODER_TEXT_NEG)]
        if self.prior is not None:
            towers.insert(0, (self.prior, batch[C.PRIOR_GUIDANCE], C.PRIOR_TEXT, C.PRIOR_TEXT_NEG))
        return towers

    def _warn_truncated(self, texts: list[str]) -> None:
        """Log each distinct text longer than CLIP's positions once (both towers cut at the same length), up to
        TRUNCATION_WARNINGS per actor, then say that further ones go unlogged."""
        texts = list(dict.fromkeys(texts))
        if self.truncated > TRUNCATION_WARNINGS or not texts:
            return
        tokenizer = (self.prior or self.decoder).tokenizer
        limit = tokenizer.model_max_length
        for text, ids in zip(texts, tokenizer(texts).input_ids):
            if len(ids) <= limit:
                continue
            self.truncated += 1
            if self.truncated > TRUNCATION_WARNINGS:
                log.warning("more prompts truncated to %d CLIP tokens: not logged further", limit)
                return
            log.warning("prompt truncated to %d CLIP tokens (had %d): %.60r…", limit, len(ids), text)

    def blank(self) -> dict:
        """This stage's outputs for a row it did not run (see jobs.isolation)."""
        empty = torch.empty((0, 0), dtype=self.out_dtype).numpy()
        towers = (C.PRIOR_TEXT, C.PRIOR_TEXT_NEG) * (self.prior is not None) + (C.DECODER_TEXT, C.DECODER_TEXT_NEG)
        return {**dict.fromkeys(towers, empty), C.TEXT_NODE: self.node, C.TEXT_SECONDS: 0.0}

    def _stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """(B, 77, d) in the transport dtype, on its way to pinned host memory (read after `finish`)."""
        return to_host(torch.stack(tensors).to(self.out_dtype))
