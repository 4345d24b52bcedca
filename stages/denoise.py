"""What the denoising loops share: a float32 DDPM step without host syncs, noise streamed from the rows' CPU
generators, model set-up (SDPA, float32 timestep ratio, channels-last), torch.compile, pinned transfers."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# Micro-batch shapes whose once-per-micro-batch terms an actor keeps (at 1024², B=8: 3.6 GiB each): as many as
# Dynamo compiles a model for (its recompile_limit), since a dropped buffer comes back at another address and the
# CUDA graph of its shape is recorded again (an actor whose blocks cycle through more shapes than it keeps would
# re-record at every switch).
TERM_SHAPES = 8


@dataclass(frozen=True)
class Schedule:
    """DDPMWuerstchenScheduler.step's per-step values, computed once on the CPU in float32, on the device."""

    ratios: torch.Tensor  # (S,): the timestep ratio t of each step, as the model takes it
    coefs: torch.Tensor  # (5, S): sqrt(1/alpha), 1 - alpha, sqrt(1 - alpha_cumprod), noise scale, prev_t != 0

    @property
    def steps(self) -> int:
        return len(self.ratios)


def schedule(scheduler, device: torch.device) -> Schedule:
    """The step values of `scheduler.timesteps` (S + 1 values from 1 to 0, set by `set_timesteps`), from the
    scheduler's own alpha_cumprod and the formulas of its `step`, so the loop needs no `.item()` per step."""
    t = scheduler.timesteps.float().cpu()
    t_now, t_prev = t[:-1], t[1:]  # each step's t and the one after it (what `previous_timestep` looks up)
    cumprod, cumprod_prev = scheduler._alpha_cumprod(t_now, "cpu"), scheduler._alpha_cumprod(t_prev, "cpu")
    alpha = cumprod / cumprod_prev
    coefs = torch.stack([(1.0 / alpha).sqrt(), 1 - alpha, (1 - cumprod).sqrt(),
                         ((1 - alpha) * (1.0 - cumprod_prev) / (1.0 - cumprod)).sqrt(), (t_prev != 0).float()])
    return Schedule(to_device(t_now, device), to_device(coefs, device))  # pinned copies: no sync here either


def ddpm_step(sample: torch.Tensor, pred: torch.Tensor, coefs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DDPMWuerstchenScheduler.step for one step's `coefs` (5,), in its operation order; all float32."""
    mu = coefs[0] * (sample - coefs[1] * pred / coefs[2])
    return mu + coefs[3] * noise * coefs[4]


def noise_stream(gens: list[torch.Generator], shape: tuple, device: torch.device):
    """The start latents, then each step's noise: (B, *shape) float32 on the device, drawn when asked for from
    each row's CPU generator in diffusers' order (per row: the start, then one draw per step), through pinned
    memory, so the CPU draws the next step's noise while the device computes this step."""
    while True:
        buffer = torch.empty((len(gens), *shape), pin_memory=device.type == "cuda")
        for row, gen in enumerate(gens):
            torch.randn(shape, generator=gen, out=buffer[row])
        yield buffer.to(device, non_blocking=True)


def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool | None = None) -> torch.nn.Module:
    """SDPA attention (WuerstchenPrior sets the classic processor), the timestep ratio embedded in float32,
    and channels-last weights on a GPU (None) or where asked."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if getattr(model, "attn_processors", None):
        model.set_attn_processor(AttnProcessor2_0())
    if hasattr(model, "gen_r_embedding"):  # bf16 would quantise r to ~0.004: embed it in float32, cast the result
        embed, dtype = model.gen_r_embedding, model.dtype
        model.gen_r_embedding = lambda r, max_positions=10000: embed(r.float(), max_positions).to(dtype)
    if channels_last is None:
        channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def shape_buffers(cache: OrderedDict, key: tuple, make) -> tuple[torch.Tensor, ...]:
    """The buffers of shape `key` in `cache`, made by `make()` at first use with static addresses on a GPU (the
    CUDA graph of that shape reads them there); only the TERM_SHAPES most recently used shapes keep theirs."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    buffers = cache[key] = make()
    for buffer in buffers:
        if buffer.device.type == "cuda":
            torch._dynamo.mark_static_address(buffer)
    while len(cache) > TERM_SHAPES:
        cache.popitem(last=False)
    return buffers


def compiled(fn, device: torch.device, mode: bool | str = True, fullgraph: bool = True):
    """torch.compile for the fixed micro-batch shapes: CUDA graphs on a GPU (reduce-overhead), Inductor on a CPU;
    mode "max-autotune" also lets Inductor time Triton GEMM/conv templates (CUDA graphs too) at warm-up."""
    if mode != "max-autotune":
        mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(fn, mode=mode, fullgraph=fullgraph, dynamic=False)


def new_step() -> None:
    """Before each call of a compiled model: its previous CUDA-graph outputs may be overwritten (all consumed)."""
    torch.compiler.cudagraph_mark_step_begin()


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on the device through pinned memory (asynchronous), then cast there."""
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(dtype) if dtype is not None else tensor


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A device tensor copied into pinned host memory without waiting; read it after `finish`."""
    return tensor.to("cpu", non_blocking=True)


def finish(device: torch.device) -> None:
    """Wait for the device: the copies `to_host` started are complete after this."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
