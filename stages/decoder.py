"""Stage B/A: image embeddings → VQ latents (WuerstchenDiffNeXt) → pixels (PaellaVQModel)."""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import DDPMWuerstchenScheduler
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt
from diffusers.utils.torch_utils import randn_tensor

from stages import columns as C
from stages.batching import (
    batch_tensor,
    current_node,
    flag_nonfinite,
    group_rows,
    micro_batches,
    restored_generators,
    scatter,
)
from stages.models import DTYPES, load_component, pick_device, pipeline_config, resolve


class DecoderStage:
    """Decodes every row to (H, W, 3) uint8, grouped by (size, steps, guidance on/off), in fixed micro-batches."""

    def __init__(self, decoder: str, dtype: str = "float32", storage_options: dict | None = None,
                 device: str = "auto", keep_float: bool = False):
        root = resolve(decoder, "decoder", storage_options)
        self.dtype = DTYPES[dtype]
        self.device = pick_device(device)
        self.node = current_node()
        self.decoder = load_component(WuerstchenDiffNeXt, root, "decoder", self.dtype, self.device)
        self.vqgan = load_component(PaellaVQModel, root, "vqgan", self.dtype, self.device)
        self.scheduler = DDPMWuerstchenScheduler.from_pretrained(root, subfolder="scheduler")
        self.latent_dim_scale = pipeline_config(root).get("latent_dim_scale", 10.67)
        self.keep_float = keep_float  # also return the pixels before rounding (parity checks)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch[C.ROW_ID])
        cfg = np.asarray(batch[C.DECODER_GUIDANCE], dtype=np.float64) > 1.0
        groups = group_rows(batch, (C.HEIGHT, C.WIDTH, C.DECODER_STEPS), extra=lambda i: bool(cfg[i]))
        images = []
        for (_, _, steps, use_cfg), idx in groups.items():
            for chunk, real in micro_batches(idx):
                images.append((chunk[:real], self._decode(batch, chunk, steps, use_cfg)[:real]))
        batch[C.IMAGE] = scatter(n, [(idx, (img * 255).round().astype(np.uint8)) for idx, img in images])
        if self.keep_float:
            batch[C.IMAGE_FLOAT] = scatter(n, images)  # (H, W, 3) float32 in [0, 1]
        batch[C.ERROR] = flag_nonfinite(batch[C.ERROR], images, "Stage B/A produced NaN (try dtype float32)")
        batch[C.DECODER_NODE] = np.full(n, self.node, dtype=object)
        batch[C.DECODER_SECONDS] = np.full(n, (time.perf_counter() - start) / n)
        return batch

    @torch.no_grad()
    def _decode(self, batch, idx, steps, use_cfg) -> np.ndarray:
        """The denoising loop of WuerstchenDecoderPipeline for one group; returns (B, H, W, 3) in [0, 1]."""
        # 1. Conditioning: effnet (B, 16, h, w) and text (B, 77, d); guidance appends zeros / negatives
        effnet = batch_tensor(batch[C.IMAGE_EMBEDDINGS], idx, self.device, self.dtype)
        text = batch_tensor(batch[C.DECODER_TEXT], idx, self.device, self.dtype)
        if use_cfg:
            effnet = torch.cat([effnet, torch.zeros_like(effnet)])  # (2B, 16, h, w)
            text = torch.cat([text, batch_tensor(batch[C.DECODER_TEXT_NEG], idx, self.device, self.dtype)])
        guidance = torch.tensor(batch[C.DECODER_GUIDANCE][idx], device=self.device, dtype=self.dtype)
        guidance = guidance.view(-1, 1, 1, 1)  # (B, 1, 1, 1)

        # 2. Timesteps: `steps` linear steps from 1 to 0
        self.scheduler.set_timesteps(int(steps), device=self.device)
        timesteps = self.scheduler.timesteps

        # 3. Initial noise, continuing each row's generator from where Stage C left it: (B, 4, 10.67h, 10.67w)
        gens = restored_generators(batch[C.GENERATOR_STATE][idx])
        h, w = effnet.shape[-2:]
        shape = (len(idx), 4, int(h * self.latent_dim_scale), int(w * self.latent_dim_scale))
        latents = randn_tensor(shape, generator=gens, device=self.device, dtype=self.dtype)
        latents = latents * self.scheduler.init_noise_sigma

        # 4. Denoise; classifier-free guidance doubles the batch
        for t in timesteps[:-1]:
            ratio = t.expand(len(idx)).to(self.dtype)  # (B,)
            model_in = torch.cat([latents] * 2) if use_cfg else latents
            pred = self.decoder(
                model_in, r=torch.cat([ratio] * 2) if use_cfg else ratio, effnet=effnet, clip=text
            )
            if use_cfg:
                pred_text, pred_uncond = pred.chunk(2)
                pred = torch.lerp(pred_uncond, pred_text, guidance)
            latents = self.scheduler.step(model_output=pred, timestep=ratio, sample=latents, generator=gens).prev_sample

        # 5. VQGAN decode: (B, 4, 4h', 4w') latents → (B, 3, H, W) pixels in [0, 1]
        pixels = self.vqgan.decode(latents * self.vqgan.config.scale_factor).sample.clamp(0, 1)
        return pixels.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, H, W, 3)
