"""The interface every model family implements.  The trainer talks only to this; it never names a family."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelLoadError(ValueError):
    """The chosen file/folder cannot be loaded as the chosen architecture; the message says why."""


@dataclass
class Components:
    """What a family's ``load`` returns.  ``denoiser`` is the UNet or transformer that is trained."""
    denoiser: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    extra: dict = field(default_factory=dict)


@dataclass
class AdapterTarget:
    """A layer that gets an adapter.  ``name`` is the community (kohya) key stem, e.g.
    ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``; ``part`` is "unet" or "te<N>"."""
    name: str
    module: nn.Module
    part: str


class Architecture:
    id: str = ""
    label: str = ""
    ss_base_model_version: str = ""
    modelspec_architecture: str = ""
    default_resolution: int = 512
    vae_scale_factor: int = 8

    # -- loading ---------------------------------------------------------------------------------------
    def load(self, model_path: Path, config_dir: Path | None, dtype: torch.dtype) -> Components:
        raise NotImplementedError

    def configure_objective(self, components: Components, settings) -> None:
        """Apply the user's objective settings (prediction type, schedule shift, …) after loading."""

    # -- adapters --------------------------------------------------------------------------------------
    def adapter_targets(self, components: Components, target: str, text_encoder: bool) -> list[AdapterTarget]:
        raise NotImplementedError

    # -- data ------------------------------------------------------------------------------------------
    def tokenize(self, components: Components, captions: list[str]) -> list[torch.Tensor]:
        raise NotImplementedError

    def encode_text(self, components: Components, tokens: list[torch.Tensor], clip_skip: int) -> dict:
        raise NotImplementedError

    def encode_latents(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- training objective ----------------------------------------------------------------------------
    def noisy_input_and_target(self, components: Components, latents: torch.Tensor, noise: torch.Tensor,
                               settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (noisy latents, timesteps, target, per-sample loss weight)."""
        raise NotImplementedError

    def predict(self, components: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                batch: dict) -> torch.Tensor:
        raise NotImplementedError

    # -- previews --------------------------------------------------------------------------------------
    def sample(self, components: Components, prompts: list[str], settings, size: tuple[int, int],
               device: torch.device, dtype: torch.dtype) -> list:
        raise NotImplementedError
