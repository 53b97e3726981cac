"""The loss and noise options of sd-scripts, as small functions on tensors (every family uses them the same way).

* ``loss_type`` ``l2`` / ``huber`` / ``smooth_l1``: sd-scripts' pseudo-Huber losses (``conditional_loss``), with the
  threshold ``huber_c`` per sample from ``huber_schedule`` (``huber_threshold``);
* ``multires_noise_iterations`` / ``_discount``: pyramid noise (``multires_noise``);
* ``min_timestep`` / ``max_timestep``: the noise levels trained (``timestep_range``, ``remap_level``);
* ``ip_noise_gamma``: input perturbation (noise added to the model input only; applied by the trainer).

A noise level is described per sample by ``level`` (t/T for DDPM, σ for flow matching, in [0, 1]) and
``noise_to_signal`` (the ratio of noise to signal std: √((1−ᾱ)/ᾱ) for DDPM, σ/(1−σ) for flow matching).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from core.settings import HUBER_SCHEDULES, LOSS_TYPES  # the choices are named once, in the schema

TIMESTEPS = 1000   # sd-scripts' scale of min_timestep / max_timestep for every family


def huber_threshold(schedule: str, c: float, scale: float, level: torch.Tensor,
                    noise_to_signal: torch.Tensor) -> torch.Tensor:
    """sd-scripts' ``huber_c`` per sample: ``constant`` c·scale; ``exponential`` c^level·scale (scale on clean
    inputs down to c·scale on pure noise); ``snr`` (1−c)/(1+noise_to_signal)² + c (1 on clean inputs, c on noise)."""
    if schedule == "constant":
        return torch.full_like(level, c * scale)
    if schedule == "exponential":
        return torch.exp(math.log(c) * level) * scale
    if schedule == "snr":
        return (1 - c) / (1 + noise_to_signal) ** 2 + c
    raise ValueError(f"huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, not {schedule!r}")


def conditional_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise loss (no reduction).  ``huber``: 2c(√(d²+c²)−c), ≈ d² for small d and 2c|d| for large;
    ``smooth_l1``: 2(√(d²+c²)−c), ≈ d²/c then 2|d|.  ``huber_c``: one threshold per sample."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {loss_type!r}")
    c = huber_c.reshape(-1, *([1] * (pred.ndim - 1)))
    root = torch.sqrt((pred - target) ** 2 + c ** 2) - c
    return 2 * c * root if loss_type == "huber" else 2 * root


def multires_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Pyramid (multi-resolution) noise: ``noise`` plus upsampled coarser noise, each level weaker by
    ``discount``, renormalised to unit std (sd-scripts' ``pyramid_noise_like``).  Works on 4-D latents
    (B, C, H, W).  The level sizes come from torch's CPU generator (seeded and resumed with the run; no device
    sync)."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i, u in enumerate(torch.rand(iterations).tolist()):
        r = u * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = torch.randn(b, c, hn, wn, device=noise.device, dtype=noise.dtype)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def timestep_range(min_timestep: int, max_timestep: int) -> tuple[float, float]:
    """The trained noise levels as fractions (lo, hi) of the whole range."""
    return min_timestep / TIMESTEPS, max_timestep / TIMESTEPS


def remap_level(level: torch.Tensor, min_timestep: int, max_timestep: int) -> torch.Tensor:
    """A level drawn on [0, 1] mapped linearly onto [min, max] / 1000 (sd-scripts' FLUX / SD3 t_min, t_max)."""
    lo, hi = timestep_range(min_timestep, max_timestep)
    return level if (lo, hi) == (0.0, 1.0) else level * (hi - lo) + lo


__all__ = ["huber_threshold", "conditional_loss", "multires_noise",
           "timestep_range", "remap_level"]
