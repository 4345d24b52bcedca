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

from stages import columns as C
from stages.batching import (
    MICRO_BATCH,
    batch_tensor,
    current_node,
    flag_nonfinite,
    generator_states,
    group_rows,
    micro_batches,
    nonfinite,
    scatter,
    seeded_generators,
    transport_dtype,
)
from stages.conditioning import LATENT_DEFAULTS
from stages.denoise import (
    Schedule,
    compiled,
    ddpm_step,
    finish,
    new_step,
    noise_stream,
    prepare_model,
    schedule,
    to_host,
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
from stages.text_terms import fill_text_terms, split_text_keys_values

# Steps of diffusers' default schedule (prior_steps null or 0): its 30 values, the last of which ends the loop.
# `plan` and the GPU split (jobs.placement) count these too.
DEFAULT_PRIOR_STEPS = len(DEFAULT_STAGE_C_TIMESTEPS) - 1


def embedding_size(height: int, width: int, resolution_multiple: float = 42.67) -> tuple[int, int]:
    """Stage C latent size for an image size, as the prior pipeline computes it (24×24 at 1024²)."""
    return math.ceil(height / resolution_multiple), math.ceil(width / resolution_multiple)


class PriorStage:
    """Runs Stage C for every row, grouped by (size, steps, guidance on/off), in fixed-size micro-batches.
    Its `prior` takes the text's keys and values from buffers: call it only after `fill_text_terms` for that text."""

    def __init__(self, prior="tiny", dtype: str = "float32", storage_options: dict | None = None,
                 device: str = "auto", micro_batch: int = MICRO_BATCH, compile: bool | str = False):
        first = prior_refs(prior)[0]  # an interpolation takes scheduler and settings from A
        root = resolve(first, "prior", storage_options)
        self.storage_options = storage_options
        self.default_checkpoint = prior_id(prior)
        self.dtype = DTYPES[dtype]
        self.out_dtype = transport_dtype(self.dtype)
        self.device = pick_device(device)
        self.node = current_node()
        self.micro_batch = micro_batch
        self.prior = load_component(WuerstchenPrior, root, "prior", self.dtype, self.device)
        self.loaded, self.weights = prior_id(first), {}
        self._use(self.default_checkpoint)
        prepare_model(self.prior, self.device)
        split_text_keys_values(self.prior)  # the text's keys and values: once per micro-batch, not per step
        self.forward = compiled(self.prior, self.device, compile) if compile else self.prior
        self.scheduler = DDPMWuerstchenScheduler.from_pretrained(root, subfolder="scheduler")
        self.schedules: dict[int, Schedule] = {}
        config = pipeline_config(root)
        settings = {key: config.get(key, default) for key, default in LATENT_DEFAULTS.items()}
        self.latent_mean, self.latent_std = settings["latent_mean"], settings["latent_std"]
        self.resolution_multiple = settings["resolution_multiple"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch[C.ROW_ID])
        cfg = np.asarray(batch[C.PRIOR_GUIDANCE], dtype=np.float64) > 1.0
        batch.setdefault(C.PRIOR_CHECKPOINT, np.full(n, self.default_checkpoint, dtype=object))
        keys = (C.PRIOR_CHECKPOINT, C.HEIGHT, C.WIDTH, C.PRIOR_STEPS)
        pending = []  # every micro-batch is queued on the device before the first result is read
        for (checkpoint, height, width, steps, use_cfg), idx in group_rows(batch, keys, lambda i: bool(cfg[i])).items():
            self._use(checkpoint)
            for chunk, real in micro_batches(idx, self.micro_batch):
                emb, gens = self._generate(batch, chunk, height, width, steps, use_cfg)
                pending.append((chunk[:real], to_host(emb[:real]), generator_states(gens[:real])))
        finish(self.device)
        embeddings = [(idx, emb.numpy()) for idx, emb, _ in pending]
        batch[C.IMAGE_EMBEDDINGS] = scatter(n, embeddings)
        batch[C.GENERATOR_STATE] = scatter(n, [(idx, states) for idx, _, states in pending])
        batch[C.ERROR] = flag_nonfinite(batch[C.ERROR], embeddings, nonfinite("Stage C", self.dtype))
        batch[C.PRIOR_NODE] = np.full(n, self.node, dtype=object)
        batch[C.PRIOR_SECONDS] = np.full(n, (time.perf_counter() - start) / n)
        for column in (C.PRIOR_TEXT, C.PRIOR_TEXT_NEG):  # the prior's text states stop here
            batch.pop(column, None)
        return batch

    def blank(self) -> dict:
        """This stage's outputs for a row it did not run (None: a column it drops; see jobs.isolation)."""
        return {C.IMAGE_EMBEDDINGS: torch.empty((0, 0, 0), dtype=self.out_dtype).numpy(),
                C.GENERATOR_STATE: np.zeros(0, dtype=np.uint8), C.PRIOR_CHECKPOINT: self.default_checkpoint,
                C.PRIOR_NODE: self.node, C.PRIOR_SECONDS: 0.0, C.PRIOR_TEXT: None, C.PRIOR_TEXT_NEG: None}

    def _use(self, checkpoint: str) -> None:
        """Put the checkpoint's Stage C weights in the model (loaded, or interpolated, once per actor)."""
        if checkpoint != self.loaded:
            if checkpoint not in self.weights:  # kept in the model's dtypes (what loading casts to): bf16, half
                model = self.prior.state_dict()
                weights = prior_weights(json.loads(checkpoint), self.storage_options, self.dtype)
                self.weights[checkpoint] = {name: value.to(model[name].dtype) for name, value in weights.items()}
            self.loaded = None  # a load that fails half-way (preflight compares architectures) is not `loaded`
            self.prior.load_state_dict(self.weights[checkpoint])
            self.loaded = checkpoint

    def _schedule(self, steps: int) -> Schedule:
        """diffusers' 30-value default schedule (steps 0), or `steps` linear steps; computed once per count."""
        if steps not in self.schedules:
            if steps == 0:
                self.scheduler.set_timesteps(timesteps=DEFAULT_STAGE_C_TIMESTEPS)
            else:
                self.scheduler.set_timesteps(int(steps))
            self.schedules[steps] = schedule(self.scheduler, self.device)
        return self.schedules[steps]

    @torch.no_grad()
    def _generate(self, batch, idx, height, width, steps, use_cfg):
        """The denoising loop of WuerstchenPriorPipeline for one micro-batch of same-shaped rows; nothing in it
        waits for the device. Returns the embeddings on the device (transport dtype) and the rows' generators."""
        # 1. Text conditioning: (B, 77, d), with the negatives appended for guidance → (2B, 77, d);
        #    guidance (B, 1, 1, 1) float32
        text = batch_tensor(batch[C.PRIOR_TEXT], idx, self.device, self.dtype)
        if use_cfg:
            text = torch.cat([text, batch_tensor(batch[C.PRIOR_TEXT_NEG], idx, self.device, self.dtype)])
        guidance = batch_tensor(batch[C.PRIOR_GUIDANCE], idx, self.device, torch.float32).view(-1, 1, 1, 1)
        fill_text_terms(self.prior, text)  # each AttnBlock's text keys and values, once for every step

        # 2. Schedule: each step's ratio for every model row (S, 2B or B) and its DDPM values, float32
        sched = self._schedule(int(steps))
        ratios = sched.ratios[:, None].expand(-1, len(text)).contiguous()

        # 3. Noise from each row's CPU generator, in diffusers' order: start latents (B, 16, h, w), then one per step
        gens = seeded_generators(batch[C.SEED][idx])
        h, w = embedding_size(height, width, self.resolution_multiple)
        noise = noise_stream(gens, (self.prior.config.c_in, h, w), self.device)
        latents = next(noise) * self.scheduler.init_noise_sigma

        # 4. Denoise: latents, guidance and the step in float32, the model in its dtype; guidance doubles its batch
        for i in range(sched.steps):
            x = latents.to(self.dtype)  # (B, 16, h, w)
            new_step()
            pred = self.forward(torch.cat([x, x]) if use_cfg else x, r=ratios[i], c=text).float()
            if use_cfg:
                pred_text, pred_uncond = pred.chunk(2)  # (B, 16, h, w) each
                pred = torch.lerp(pred_uncond, pred_text, guidance)
            latents = ddpm_step(latents, pred, sched.coefs[:, i], next(noise))  # (B, 16, h, w)

        # 5. Image embeddings as the prior pipeline returns them: (B, 16, h, w), in the transport dtype
        return (latents * self.latent_mean - self.latent_std).to(self.out_dtype), gens
