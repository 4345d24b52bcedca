"""Stage C: text states → image embeddings with WuerstchenPrior and DDPMWuerstchenScheduler."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
from diffusers.pipelines.deprecated.wuerstchen.pipeline_wuerstchen_prior import DEFAULT_STAGE_C_TIMESTEPS
from diffusers.utils.torch_utils import randn_tensor

from stages import columns as C
from stages.batching import (
    batch_tensor,
    current_node,
    flag_nonfinite,
    generator_states,
    group_rows,
    micro_batches,
    scatter,
    seeded_generators,
)
from stages.models import (
    DTYPES,
    load_component,
    pick_device,
    pipeline_config,
    prior_id,
    prior_refs,
    prior_weights,
    resolve,
)
from stages.text import transport_dtype


def embedding_size(height: int, width: int, resolution_multiple: float = 42.67) -> tuple[int, int]:
    """Stage C latent size for an image size, as the prior pipeline computes it (24×24 at 1024²)."""
    return math.ceil(height / resolution_multiple), math.ceil(width / resolution_multiple)


class PriorStage:
    """Runs Stage C for every row, grouped by (size, steps, guidance on/off), in fixed-size micro-batches."""

    def __init__(self, prior="tiny", dtype: str = "float32", storage_options: dict | None = None,
                 device: str = "auto"):
        first = prior_refs(prior)[0]  # an interpolation takes scheduler and settings from A
        root = resolve(first, "prior", storage_options)
        self.storage_options = storage_options
        self.default_checkpoint = prior_id(prior)
        self.dtype = DTYPES[dtype]
        self.out_dtype = transport_dtype(self.dtype)
        self.device = pick_device(device)
        self.node = current_node()
        self.prior = load_component(WuerstchenPrior, root, "prior", self.dtype, self.device)
        self.loaded, self.weights = prior_id(first), {}
        self._use(self.default_checkpoint)
        self.scheduler = DDPMWuerstchenScheduler.from_pretrained(root, subfolder="scheduler")
        config = pipeline_config(root)
        self.latent_mean = config.get("latent_mean", 42.0)
        self.latent_std = config.get("latent_std", 1.0)
        self.resolution_multiple = config.get("resolution_multiple", 42.67)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch[C.ROW_ID])
        cfg = np.asarray(batch[C.PRIOR_GUIDANCE], dtype=np.float64) > 1.0
        batch.setdefault(C.PRIOR_CHECKPOINT, np.full(n, self.default_checkpoint, dtype=object))
        keys = (C.PRIOR_CHECKPOINT, C.HEIGHT, C.WIDTH, C.PRIOR_STEPS)
        embeddings, states = [], []
        for (checkpoint, height, width, steps, use_cfg), idx in group_rows(batch, keys, lambda i: bool(cfg[i])).items():
            self._use(checkpoint)
            for chunk, real in micro_batches(idx):
                emb, gens = self._generate(batch, chunk, height, width, steps, use_cfg)
                embeddings.append((chunk[:real], emb[:real]))
                states.append((chunk[:real], generator_states(gens[:real])))
        batch[C.IMAGE_EMBEDDINGS] = scatter(n, embeddings)
        batch[C.GENERATOR_STATE] = scatter(n, states)
        batch[C.ERROR] = flag_nonfinite(batch[C.ERROR], embeddings, "Stage C produced NaN (try dtype float32)")
        batch[C.PRIOR_NODE] = np.full(n, self.node, dtype=object)
        batch[C.PRIOR_SECONDS] = np.full(n, (time.perf_counter() - start) / n)
        return batch

    def _use(self, checkpoint: str) -> None:
        """Put the checkpoint's Stage C weights in the model (loaded, or interpolated, once per actor)."""
        if checkpoint != self.loaded:
            if checkpoint not in self.weights:
                self.weights[checkpoint] = prior_weights(json.loads(checkpoint), self.storage_options)
            self.prior.load_state_dict(self.weights[checkpoint])
            self.loaded = checkpoint

    @torch.no_grad()
    def _generate(self, batch, idx, height, width, steps, use_cfg):
        """The denoising loop of WuerstchenPriorPipeline for one group of same-shaped rows."""
        # 1. Text conditioning: (B, 77, d), with the negatives appended for guidance → (2B, 77, d)
        text = batch_tensor(batch[C.PRIOR_TEXT], idx, self.device, self.dtype)
        if use_cfg:
            text = torch.cat([text, batch_tensor(batch[C.PRIOR_TEXT_NEG], idx, self.device, self.dtype)])
        guidance = torch.tensor(batch[C.PRIOR_GUIDANCE][idx], device=self.device, dtype=self.dtype)
        guidance = guidance.view(-1, 1, 1, 1)  # (B, 1, 1, 1)

        # 2. Timesteps: diffusers' 30-value default schedule, or `steps` linear steps
        if steps == 0:
            self.scheduler.set_timesteps(timesteps=DEFAULT_STAGE_C_TIMESTEPS, device=self.device)
        else:
            self.scheduler.set_timesteps(int(steps), device=self.device)
        timesteps = self.scheduler.timesteps

        # 3. Initial noise from each row's own CPU generator: (B, 16, h, w)
        gens = seeded_generators(batch[C.SEED][idx])
        h, w = embedding_size(height, width, self.resolution_multiple)
        shape = (len(idx), self.prior.config.c_in, h, w)
        latents = randn_tensor(shape, generator=gens, device=self.device, dtype=self.dtype)
        latents = latents * self.scheduler.init_noise_sigma

        # 4. Denoise; classifier-free guidance doubles the batch
        for t in timesteps[:-1]:
            ratio = t.expand(len(idx)).to(self.dtype)  # (B,)
            model_in = torch.cat([latents] * 2) if use_cfg else latents
            pred = self.prior(model_in, r=torch.cat([ratio] * 2) if use_cfg else ratio, c=text)
            if use_cfg:
                pred_text, pred_uncond = pred.chunk(2)
                pred = torch.lerp(pred_uncond, pred_text, guidance)
            latents = self.scheduler.step(model_output=pred, timestep=ratio, sample=latents, generator=gens).prev_sample

        # 5. Image embeddings as the prior pipeline returns them: (B, 16, h, w)
        embeddings = latents * self.latent_mean - self.latent_std
        return embeddings.float().cpu().numpy().astype(self.out_dtype), gens

