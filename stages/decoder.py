"""Stage B/A: image embeddings → VQ latents (WuerstchenDiffNeXt) → pixels (PaellaVQModel)."""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt

from stages import columns as C
from stages.batching import (
    MICRO_BATCH,
    batch_tensor,
    current_node,
    flag_rows,
    group_rows,
    micro_batches,
    nonfinite,
    restored_generators,
    scatter,
)
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
from stages.effnet_terms import fill_effnet_terms, split_effnet_linears
from stages.models import DTYPES, load_component, pick_device, pipeline_config, resolve
from stages.text_terms import fill_text_terms, split_text_keys_values


class DecoderStage:
    """Decodes every row to (H, W, 3) uint8, grouped by (size, steps, guidance on/off), in fixed micro-batches.
    Its `decoder` has split effnet Linears and text keys and values: call it only after `fill_effnet_terms` and
    `fill_text_terms` for the same embeddings and text."""

    def __init__(self, decoder: str, dtype: str = "float32", storage_options: dict | None = None,
                 device: str = "auto", micro_batch: int = MICRO_BATCH, compile: bool | str = False,
                 keep_float: bool = False):
        root = resolve(decoder, "decoder", storage_options)
        self.dtype = DTYPES[dtype]
        self.device = pick_device(device)
        self.node = current_node()
        self.micro_batch = micro_batch
        self.decoder = prepare_model(load_component(WuerstchenDiffNeXt, root, "decoder", self.dtype, self.device),
                                     self.device)
        split_effnet_linears(self.decoder)  # the effnet share of its Linears: once per micro-batch, not per step
        split_text_keys_values(self.decoder)  # the text's keys and values: once per micro-batch, not per step
        self.vqgan = prepare_model(load_component(PaellaVQModel, root, "vqgan", self.dtype, self.device),
                                   self.device)
        self.forward = compiled(self.decoder, self.device, compile) if compile else self.decoder
        self.pixels = compiled(self._pixels, self.device, compile) if compile else self._pixels
        self.scheduler = DDPMWuerstchenScheduler.from_pretrained(root, subfolder="scheduler")
        self.schedules: dict[int, Schedule] = {}
        self.latent_dim_scale = pipeline_config(root).get("latent_dim_scale", 10.67)
        self.keep_float = keep_float  # also return the pixels before rounding (parity checks)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch[C.ROW_ID])
        cfg = np.asarray(batch[C.DECODER_GUIDANCE], dtype=np.float64) > 1.0
        groups = group_rows(batch, (C.HEIGHT, C.WIDTH, C.DECODER_STEPS), extra=lambda i: bool(cfg[i]))
        pending = []  # every micro-batch is queued on the device before the first image is read
        for (_, _, steps, use_cfg), idx in groups.items():
            for chunk, real in micro_batches(idx, self.micro_batch):
                images, finite, floats = self._decode(batch, chunk, steps, use_cfg)
                pending.append((chunk[:real], to_host(images[:real]), to_host(finite[:real]),
                                None if floats is None else to_host(floats[:real])))
        finish(self.device)
        batch[C.IMAGE] = scatter(n, [(idx, images.numpy()) for idx, images, _, _ in pending])
        if self.keep_float:
            batch[C.IMAGE_FLOAT] = scatter(n, [(idx, floats.numpy()) for idx, _, _, floats in pending])
        batch[C.ERROR] = flag_rows(batch[C.ERROR], [(idx, finite.numpy()) for idx, _, finite, _ in pending],
                                   nonfinite("Stage B/A", self.dtype))
        batch[C.DECODER_NODE] = np.full(n, self.node, dtype=object)
        batch[C.DECODER_SECONDS] = np.full(n, (time.perf_counter() - start) / n)
        return batch

    def blank(self) -> dict:
        """This stage's outputs for a row it did not run (see jobs.isolation)."""
        out = {C.IMAGE: np.zeros((0, 0, 3), dtype=np.uint8), C.DECODER_NODE: self.node, C.DECODER_SECONDS: 0.0}
        if self.keep_float:
            out[C.IMAGE_FLOAT] = np.zeros((0, 0, 3), dtype=np.float32)
        return out

    def _schedule(self, steps: int) -> Schedule:
        """`steps` linear steps from 1 to 0, computed once per count."""
        if steps not in self.schedules:
            self.scheduler.set_timesteps(steps)
            self.schedules[steps] = schedule(self.scheduler, self.device)
        return self.schedules[steps]

    @torch.no_grad()
    def _decode(self, batch, idx, steps, use_cfg):
        """The denoising loop of WuerstchenDecoderPipeline for one micro-batch; nothing in it waits for the
        device. Returns (B, H, W, 3) uint8 images, (B,) all-finite flags and, when `keep_float`, the (B, H, W, 3)
        float32 pixels in [0, 1] (else None), on the device."""
        # 1. Conditioning: effnet (B, 16, h, w) and text (B, 77, d); guidance appends zeros / negatives → 2B
        effnet = batch_tensor(batch[C.IMAGE_EMBEDDINGS], idx, self.device, self.dtype)
        text = batch_tensor(batch[C.DECODER_TEXT], idx, self.device, self.dtype)
        if use_cfg:
            effnet = torch.cat([effnet, torch.zeros_like(effnet)])  # (2B, 16, h, w)
            text = torch.cat([text, batch_tensor(batch[C.DECODER_TEXT_NEG], idx, self.device, self.dtype)])
        guidance = batch_tensor(batch[C.DECODER_GUIDANCE], idx, self.device, torch.float32).view(-1, 1, 1, 1)

        # 2. Schedule: each step's ratio for every model row (S, 2B or B) and its DDPM values, float32
        sched = self._schedule(int(steps))
        ratios = sched.ratios[:, None].expand(-1, len(text)).contiguous()

        # 3. Noise continuing each row's generator from where Stage C left it, in diffusers' order:
        #    start latents (B, 4, 10.67h, 10.67w), then one per step
        gens = restored_generators(batch[C.GENERATOR_STATE][idx])
        h, w = effnet.shape[-2:]
        latent_hw = (int(h * self.latent_dim_scale), int(w * self.latent_dim_scale))
        noise = noise_stream(gens, (4, *latent_hw), self.device)
        latents = next(noise) * self.scheduler.init_noise_sigma

        # 4. The step-invariant work, once for all steps: the effnet share of the effnet-injecting blocks
        #    (stages/effnet_terms.py) and each AttnBlock's text keys and values (stages/text_terms.py)
        fill_effnet_terms(self.decoder, effnet, latent_hw)
        fill_text_terms(self.decoder, text)

        # 5. Denoise: latents, guidance and the step in float32, the model in its dtype; guidance doubles its batch
        for i in range(sched.steps):
            x = latents.to(self.dtype)  # (B, 4, 4h', 4w')
            new_step()
            pred = self.forward(torch.cat([x, x]) if use_cfg else x, r=ratios[i], effnet=effnet, clip=text).float()
            if use_cfg:
                pred_text, pred_uncond = pred.chunk(2)  # (B, 4, 4h', 4w') each
                pred = torch.lerp(pred_uncond, pred_text, guidance)
            latents = ddpm_step(latents, pred, sched.coefs[:, i], next(noise))  # (B, 4, 4h', 4w')

        # 6. VQGAN decode to uint8 pixels on the device: (B, H, W, 3), (B,) all-finite flags, float pixels or None
        new_step()
        return self.pixels(latents)

    def _pixels(self, latents: torch.Tensor):
        """(B, 4, 4h', 4w') float32 latents → (B, H, W, 3) uint8 pixels, (B,) flags: every pixel finite, and the
        float pixels in [0, 1] when `keep_float`."""
        decoded = self.vqgan.decode((latents * self.vqgan.config.scale_factor).to(self.dtype), return_dict=False)[0]
        finite = torch.isfinite(decoded).flatten(1).all(dim=1)  # before the clamp, which turns ±inf into 0 or 1
        pixels = decoded.clamp(0, 1)
        images = (pixels.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        floats = pixels.float().permute(0, 2, 3, 1).contiguous() if self.keep_float else None  # parity checks
        return images, finite, floats
