"""Rectified-flow (flow-matching) training maths shared by SD3 / SD3.5 and FLUX.1: small pure functions.

Conventions (SD3 paper, diffusers, sd-scripts):

* ``σ ∈ (0, 1)`` is the noise level; the noisy input is ``x_σ = (1 − σ)·x₀ + σ·ε`` and the model predicts
  the velocity ``v = ε − x₀`` (so ``x₀ = x_σ − σ·v``).
* Timestep sampling draws ``σ`` per sample: ``uniform``; ``sigmoid`` (``sigmoid(scale·N(0, 1))``);
  ``logit_normal`` (``sigmoid(N(mean, std))``); ``mode`` (SD3 paper's mode sampling with heavy tails,
  ``scale`` ≈ 1.29); ``shift`` (sigmoid sampling, then ``σ' = s·σ / (1 + (s − 1)·σ)``); ``flux_shift``
  (sigmoid sampling, then the same shift with ``s = exp(μ)``, μ linear in the image's token count, as
  FLUX.1 samples).
* Loss weighting per sample: ``none``; ``sigma_sqrt`` (``σ⁻²``); ``cosmap`` (``2 / (π·(1 − 2σ + 2σ²))``).

Nothing here knows about models: callers pass tensors and numbers.
"""
from __future__ import annotations

import math

import torch

from core.settings import LOSS_WEIGHTING, TIMESTEP_SAMPLING  # the choices are named once, in the schema

# keeps σ off the end points: σ = 0 makes sigma_sqrt infinite, σ = 1 leaves nothing of the image
SIGMA_EPS = 1e-5


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 − σ)·x₀ + σ·ε`` with one σ per sample (broadcast over the other dimensions)."""
    s = sigmas.reshape(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``ε − x₀``."""
    return noise - latents


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``σ' = s·σ / (1 + (s − 1)·σ)``: s > 1 moves samples towards noise (SD3 uses 3.0)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX.1's μ: linear in the number of packed image tokens, ``base_shift`` at ``base_seq_len`` and
    ``max_shift`` at ``max_seq_len`` (diffusers' ``calculate_shift``, BFL's ``get_lin_function``)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flux_time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """BFL's ``time_shift(μ, 1, σ) = e^μ / (e^μ + 1/σ − 1)``, which is :func:`shift_sigmas` with s = e^μ."""
    return shift_sigmas(sigmas, math.exp(mu))


def sample_sigmas(method: str, batch_size: int, *, sigmoid_scale: float = 1.0, logit_mean: float = 0.0,
                  logit_std: float = 1.0, mode_scale: float = 1.29, shift: float = 3.0,
                  image_seq_len: int | None = None, flux_shift_config: dict | None = None,
                  device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """One σ per sample, drawn as ``method`` says (see the module docstring); float32, in (0, 1)."""
    def randn() -> torch.Tensor:
        return torch.randn(batch_size, generator=generator, device=device)

    if method == "uniform":
        u = torch.rand(batch_size, generator=generator, device=device)
    elif method == "sigmoid":
        u = torch.sigmoid(sigmoid_scale * randn())
    elif method == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * randn())
    elif method == "mode":
        r = torch.rand(batch_size, generator=generator, device=device)
        u = 1.0 - r - mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1.0 + r)
    elif method == "shift":
        u = shift_sigmas(torch.sigmoid(sigmoid_scale * randn()), shift)
    elif method == "flux_shift":
        if image_seq_len is None:
            raise ValueError("flux_shift timestep sampling needs the image's token count")
        u = flux_time_shift(torch.sigmoid(sigmoid_scale * randn()), flux_mu(image_seq_len, **(flux_shift_config or {})))
    else:
        raise ValueError(f"unknown timestep sampling {method!r} (choose from {', '.join(TIMESTEP_SAMPLING)})")
    return u.float().clamp(SIGMA_EPS, 1.0 - SIGMA_EPS)


def loss_weights(method: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight for ``sigmas`` (diffusers' ``compute_loss_weighting_for_sd3``)."""
    if method == "none":
        return torch.ones_like(sigmas, dtype=torch.float32)
    if method == "sigma_sqrt":
        return sigmas.float().clamp(min=SIGMA_EPS) ** -2.0
    if method == "cosmap":
        s = sigmas.float()
        return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s ** 2))
    raise ValueError(f"unknown loss weighting {method!r} (choose from {', '.join(LOSS_WEIGHTING)})")


# ---------------------------------------------------------------------------------------------------------
# FLUX latent packing
# ---------------------------------------------------------------------------------------------------------

def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): 2×2 patches as tokens, FLUX's layout (diffusers ``_pack_latents``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches; latent size {h}x{w} is not even")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`; ``height``/``width`` are the latent (not pixel) sizes."""
    b, n, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_position_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H/2·W/2, 3) position ids of packed latents: (0, row, column) — diffusers ``_prepare_latent_image_ids``.
    Built on ``device`` (in fp32, then cast): no copy from the host."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(h * w, 3).to(dtype)


def text_position_ids(seq_len: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FLUX text tokens all sit at position (0, 0, 0)."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)


__all__ = ["TIMESTEP_SAMPLING", "LOSS_WEIGHTING", "noisy_latents", "velocity_target", "shift_sigmas", "flux_mu",
           "flux_time_shift", "sample_sigmas", "loss_weights", "pack_latents", "unpack_latents",
           "image_position_ids", "text_position_ids"]
