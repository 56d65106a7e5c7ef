"""Flow-matching schedule and Euler sampler of the GLM-Image decoder (no diffusers scheduler involved).

Convention: sigma = 1 is noise, sigma = 0 is data; x_sigma = (1 − sigma)·x0 + sigma·noise, and the DiT predicts
v = noise − x0, so one Euler step is x ← x + (sigma_next − sigma)·v.

The quirk kept from the reference pipeline (glm-image.md Part B §2.4): the DiT is fed the *unshifted* integer
timestep minus 1, t_i − 1 with t_i = int(linspace(1000, 1, n+1))[i], while the step sizes come from the
resolution-shifted sigma_i = time_shift(mu, t_i/1000), plus a terminal 0. All schedule arithmetic is fp32, as in
diffusers' FlowMatchEulerDiscreteScheduler fed the same values.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, int, "bool | None"], Tensor]  # (x [B, C, H, W] fp32, step index, cond) -> v


def shift_mu(image_seq_len: int, base_seq_len: int = 256, base_shift: float = 0.25, max_shift: float = 0.75) -> float:
    """Resolution-dependent shift; image_seq_len = number of DiT image tokens, (H/16)·(W/16)."""
    return (image_seq_len / base_seq_len) ** 0.5 * max_shift + base_shift


def time_shift(mu: float, s: Tensor, kind: str = "linear") -> Tensor:
    """Shifted sigmas for s in (0, 1]: linear mu/(mu + 1/s − 1); exponential e^mu/(e^mu + 1/s − 1). fp32."""
    if kind == "linear":
        m = torch.tensor(mu, dtype=torch.float32)
    elif kind == "exponential":
        m = torch.tensor(math.exp(mu), dtype=torch.float32)
    else:
        raise ValueError(f"unknown time shift {kind!r}; choose 'linear' or 'exponential'")
    return m / (m + (1 / s - 1))


def make_schedule(num_steps: int, image_seq_len: int, scheduler_config: dict) -> tuple[Tensor, Tensor]:
    """-> (timesteps [n] fp32 to feed the DiT, i.e. t_i − 1; sigmas [n+1] fp32 ending in 0).

    `scheduler_config` is the official scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)."""
    unsupported = [k for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                               "invert_sigmas", "stochastic_sampling") if scheduler_config.get(k)]
    if unsupported:
        raise ValueError(f"scheduler options not implemented: {unsupported}")
    T = scheduler_config["num_train_timesteps"]
    # int(np.linspace(T, 1, n+1))[:-1], reproduced with the same float64 arithmetic: k·step + start, truncated
    step = (1.0 - T) / num_steps
    t = torch.tensor([int(k * step + T) for k in range(num_steps)], dtype=torch.float32)  # [n] 1000, 980, ...
    s = t / T
    if scheduler_config["use_dynamic_shifting"]:
        mu = shift_mu(image_seq_len, scheduler_config["base_image_seq_len"], scheduler_config["base_shift"],
                      scheduler_config["max_shift"])
        sigmas = time_shift(mu, s, scheduler_config["time_shift_type"])
    else:
        shift = scheduler_config["shift"]
        sigmas = shift * s / (1 + (shift - 1) * s)
    return t - 1, torch.cat([sigmas, sigmas.new_zeros(1)])


def cfg(v_cond: Tensor, v_uncond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance in fp32: v_u + g·(v_c − v_u)."""
    v_cond, v_uncond = v_cond.float(), v_uncond.float()
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def euler_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x fp32 ← x + (sigma_next − sigma)·v."""
    return x.float() + (sigma_next - sigma) * v.float()


def check_guidance_interval(interval) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo < hi: classifier-free guidance runs at the steps whose sigma lies in (lo, hi]."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two numbers (lo, hi) with 0 <= lo < hi, got {interval!r}")
    if not 0 <= lo < hi:
        raise ValueError(f"guidance_interval must have 0 <= lo < hi (sigma runs from 1 = noise to 0 = data), got "
                         f"({lo}, {hi}); (0, 1) guides every step")
    return lo, hi


def denoise(model: ModelFn, x: Tensor, timesteps: Tensor, sigmas: Tensor, guidance_scale: float,
            callback: Callable[[int, Tensor], None] | None = None, batch_cfg: bool = False,
            guidance_interval: tuple[float, float] = (0.0, 1.0),
            keep: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Euler loop from noise x [B, C, H, W] to fp32 latents (timesteps, sigmas from `make_schedule`).

    `model(x, i, cond)` gets fp32 x and the step index i (its timestep is timesteps[i]; passing the index lets the
    model precompute per-step work for the whole schedule), cond=True for the conditional branch, False for the
    unconditional one (called only at guided steps); it casts x to its own dtype. With batch_cfg, both
    branches run as one batch: `model([x; x], i, None)` returns [v_cond; v_uncond]. `callback(i, x)` runs
    after each step.

    guidance_interval (lo, hi): guidance (scale > 1) only at the steps whose sigma lies in (lo, hi], the plain
    conditional velocity elsewhere, without the unconditional branch's forward (Kynkaenniemi et al. 2024, "Applying
    guidance in a limited interval improves sample and distribution quality in diffusion models"). (0, 1): every
    step, the reference's sampler.

    keep (x0 [B, C, H, W], mask bool [B, 1, H, W]): where the mask is set, x is replaced at the start and after
    every step by the noisy x0 at that step's sigma, (1 − sigma)·x0 + sigma·noise with the starting noise, so those
    latents end as x0 exactly while the rest is generated around them (inpainting by replacement, as RePaint and
    Blended Latent Diffusion do; without their resampling)."""
    lo, hi = check_guidance_interval(guidance_interval)
    guided = [guidance_scale > 1 and lo < s <= hi for s in sigmas[:-1].tolist()]    # host floats: no device sync
    x = x.float()
    sigmas = sigmas.to(x.device)
    if keep is not None:
        x0, mask = keep[0].float(), keep[1]
        assert x0.shape == x.shape and mask.dtype == torch.bool, (x0.shape, x.shape, mask.dtype)
        noise = x

        def pin(x: Tensor, sigma: Tensor) -> Tensor:                  # the kept latents on x0's noisy path
            return torch.where(mask, (1 - sigma) * x0 + sigma * noise, x)
        x = pin(x, sigmas[0])
    for i in range(len(timesteps)):
        if guided[i] and batch_cfg:
            v = cfg(*model(torch.cat([x, x]), i, None).chunk(2), guidance_scale)
        else:
            v = model(x, i, True)
            if guided[i]:
                v = cfg(v, model(x, i, False), guidance_scale)
        x = euler_step(x, v, sigmas[i], sigmas[i + 1])
        if keep is not None:
            x = pin(x, sigmas[i + 1])
        if callback is not None:
            callback(i, x)
    return x
