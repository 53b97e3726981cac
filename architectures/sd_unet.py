"""What SD1.5 and SDXL share: a UNet trained with the DDPM noise schedule (epsilon or v-prediction),
CLIP text encoders, a 4-channel VAE.  The two plug-ins differ in text conditioning, naming and metadata."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from architectures.base import AdapterTarget, Architecture, Components, Noised
from core.loss import timestep_range


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023): min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR+1) for v."""
    clipped = torch.clamp(snr, max=gamma)
    # zero-terminal-SNR schedules reach SNR 0; keep ε weights finite there
    return clipped / (snr + 1) if v_prediction else clipped / snr.clamp(min=1e-8)


def ddpm_loss_weight(snr: torch.Tensor, schedule, v_prediction: bool) -> torch.Tensor:
    """The per-sample weight of sd-scripts' DDPM loss options, multiplied: Min-SNR-γ, ``scale_v_pred_loss_like_
    noise_pred`` (SNR/(SNR+1): a v-prediction loss weighted like an ε one) and ``debiased_estimation_loss``
    (1/√SNR, or 1/(SNR+1) for v-prediction; SNR capped at 1000)."""
    weight = torch.ones_like(snr)
    if schedule.min_snr_gamma > 0:
        weight = weight * min_snr_weight(snr, schedule.min_snr_gamma, v_prediction)
    if schedule.scale_v_pred_loss_like_noise_pred and v_prediction:
        weight = weight * snr / (snr + 1)
    if schedule.debiased_estimation_loss:
        capped = snr.clamp(max=1000)
        weight = weight * (1 / (capped + 1) if v_prediction else capped.clamp(min=1e-8).rsqrt())
    return weight


def snr_of(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[timesteps]
    return a / (1 - a)


def _is_target_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))


#: UNet target presets (``settings.network.target``), as sd-scripts / LyCORIS name them:
#: attn: attention projections · attn_mlp: everything linear in the transformer blocks · full: attn_mlp plus
#: the ResNet blocks, down/upsamplers, conv_in/conv_out and the time embedding, k×k convolutions included
#: (LoCon-style, LyCORIS "full") · full-lin: the same without k×k convolutions (LyCORIS "full-lin").
UNET_PRESETS = ("attn", "attn_mlp", "full", "full-lin")
_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TOP_LEVEL = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


def unet_targets(unet: nn.Module, target: str) -> list[tuple[str, nn.Module]]:
    """(diffusers module path, module) for the UNet layers that get an adapter under a preset.

    Like sd-scripts: everything linear inside the transformer blocks ("attn_mlp": attention projections,
    proj_in/proj_out, feed-forward), or only the attention projections ("attn"); "full" and "full-lin" add the
    convolutional part (see ``UNET_PRESETS``)."""
    if target not in UNET_PRESETS:
        raise ValueError(f"unknown adapter target {target!r} (known: {', '.join(UNET_PRESETS)})")
    wide = target in ("full", "full-lin")

    def wanted(module: nn.Module) -> bool:
        if _is_target_linear(module):
            return True
        return target == "full" and isinstance(module, nn.Conv2d)

    found, seen = [], set()
    for block_name, block in unet.named_modules():
        kind = type(block).__name__
        if wide and block_name in _TOP_LEVEL:
            if wanted(block):
                found.append((block_name, block))
            continue
        if kind != "Transformer2DModel" and not (wide and kind in _CONV_BLOCKS):
            continue
        for name, module in block.named_modules():
            path = f"{block_name}.{name}"
            if not name or path in seen or not wanted(module):
                continue
            if target == "attn" and not (".attn1." in f".{name}" or ".attn2." in f".{name}"):
                continue
            seen.add(path)
            found.append((path, module))
    return found


def unet_candidates(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear / Conv2d of the UNet: what include patterns may add."""
    return [(name, m) for name, m in unet.named_modules() if name and isinstance(m, (nn.Linear, nn.Conv2d))]


def clip_targets(text_encoder: nn.Module, prefix: str, part: str) -> list[AdapterTarget]:
    """Attention and MLP linears of a CLIP text encoder, named ``{prefix}_text_model_encoder_layers_…``.

    The ``text_model`` level is written whatever the installed transformers calls the module: ComfyUI
    drops keys without it (FIELD_NOTES)."""
    out = []
    for name, module in text_encoder.named_modules():
        if not isinstance(module, nn.Linear) or ".layers." not in f".{name}":
            continue
        if not (".self_attn." in name or ".mlp." in name):
            continue
        rel = name[len("text_model."):] if name.startswith("text_model.") else name
        out.append(AdapterTarget(f"{prefix}_text_model_{rel.replace('.', '_')}", module, part, f"text_model.{rel}"))
    return out


@functools.lru_cache(maxsize=None)
def _shipped_vocabulary(arch_id: str) -> frozenset[str]:
    """Every token of the family's shipped CLIP tokenizers, lowercased (the models bring the same vocabulary)."""
    from architectures.load_util import default_config_dir
    from architectures.sd_loading import _load_tokenizers
    return frozenset(t.lower() for tok in _load_tokenizers(arch_id, default_config_dir(arch_id))
                     for t in tok.get_vocab())


class SDUNetFamily(Architecture):
    """Shared behaviour of the DDPM UNet families; subclasses define naming and text conditioning."""

    te_prefixes: tuple[str, ...] = ()
    traits = frozenset({"ddpm", "clip_skip", "embeddings"})
    convolutional = True
    # the embedders of timestep and size conditioning: tiny, and their output conditions every block
    quantize_keep = ("time_embedding", "time_embedding.*", "add_embedding", "add_embedding.*", "*.time_emb_proj")
    # the UNet's repeated blocks: what regional compilation compiles
    # (the ResNet blocks come in many shapes: compiling them recompiles often for little gain)
    compile_blocks = ("BasicTransformerBlock",)

    # -- loading ---------------------------------------------------------------------------------------
    def load(self, model_path: Path, config_dir: Path | None, dtype: torch.dtype) -> Components:
        from diffusers import DDPMScheduler

        from architectures.sd_loading import load_sd_components
        parts = load_sd_components(self.id, Path(model_path), config_dir, dtype)
        for te, tokenizer in zip(parts["text_encoders"], parts["tokenizers"]):
            # the SD configs say eos_token_id 2, which makes transformers pool CLIP at the highest token id; a token
            # added for textual inversion outranks the end token, so pool at the end token (as sd-scripts and
            # ComfyUI do; the same position as before for every prompt of the base vocabulary)
            getattr(te, "text_model", te).eos_token_id = tokenizer.eos_token_id
        return Components(denoiser=parts["unet"], vae=parts["vae"], text_encoders=parts["text_encoders"],
                          tokenizers=parts["tokenizers"],
                          noise_scheduler=DDPMScheduler.from_config(parts["scheduler_config"]),
                          scheduler_config=parts["scheduler_config"])

    # -- full fine-tuning -------------------------------------------------------------------------------
    supports_full_checkpoint = True

    @staticmethod
    def _parts(components: Components, dtype: torch.dtype, state_dicts) -> dict:
        state_dicts = state_dicts or {}

        def sd(part: str, module: nn.Module) -> dict[str, torch.Tensor]:
            tensors = state_dicts.get(part) or module.state_dict()
            return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}

        return {"unet": sd("denoiser", components.denoiser), "vae": sd("vae", components.vae),
                "text_encoders": [sd(f"te{i}", te) for i, te in enumerate(components.text_encoders)]}

    def save_full_checkpoint(self, components: Components, path: Path, dtype: torch.dtype,
                             state_dicts=None, metadata=None) -> Path:
        from architectures.ldm_keys import save_single_file
        from core.io import _atomic
        parts = self._parts(components, dtype, state_dicts)
        unet_config = dict(components.denoiser.config)
        return _atomic(Path(path), lambda tmp: save_single_file(parts, tmp, self.id, metadata=metadata,
                                                                 unet_config=unet_config))

    def save_diffusers_folder(self, components: Components, folder: Path, dtype: torch.dtype,
                              state_dicts=None) -> Path:
        """A diffusers folder written beside ``folder`` and moved into place complete (``folder`` must not
        exist: the trainer picks an unused name)."""
        import os
        import shutil

        from core.io import atomic_save_safetensors
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            parts = self._parts(components, dtype, state_dicts)
            shutil.copy(self.config_dir() / "model_index.json", tmp / "model_index.json")
            components.noise_scheduler.save_config(tmp / "scheduler")
            components.denoiser.save_config(tmp / "unet")
            atomic_save_safetensors(tmp / "unet" / "diffusion_pytorch_model.safetensors",
                                    {k: v.contiguous() for k, v in parts["unet"].items()})
            components.vae.save_config(tmp / "vae")
            atomic_save_safetensors(tmp / "vae" / "diffusion_pytorch_model.safetensors",
                                    {k: v.contiguous() for k, v in parts["vae"].items()})
            te_dirs = ["text_encoder", "text_encoder_2"]
            for name, te, sd in zip(te_dirs, components.text_encoders, parts["text_encoders"]):
                te.config.save_pretrained(tmp / name)
                atomic_save_safetensors(tmp / name / "model.safetensors",
                                        {k: v.contiguous() for k, v in sd.items()}, {"format": "pt"})
            for name, tok in zip(["tokenizer", "tokenizer_2"], components.tokenizers):
                tok.save_pretrained(tmp / name)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    supports_controlnet = True

    def build_controlnet(self, components: Components, init_path: Path | None) -> nn.Module:
        """diffusers' ``ControlNetModel`` shaped like the loaded UNet (SDXL's carries the UNet's
        ``addition_embed_type``, so it takes the same ``added_cond_kwargs``).  Without ``init_path`` it starts
        as a copy of the UNet's encoder with zeroed output convs (``ControlNetModel.from_unet``); a file is read
        in either key layout, the original one through :mod:`architectures.controlnet_keys`; a diffusers folder
        keeps its own layout (e.g. a smaller SDXL ControlNet).  One made for another model is refused, naming
        the setting."""
        from diffusers import ControlNetModel

        def from_unet() -> nn.Module:
            # nn.Module.to: diffusers' override warns about fp32 modules even when its list of them is empty
            return nn.Module.to(ControlNetModel.from_unet(components.denoiser), torch.float32)

        if init_path is None:
            return from_unet()
        unet = components.denoiser.config
        try:
            if Path(init_path).is_dir():
                controlnet = ControlNetModel.from_pretrained(init_path, local_files_only=True,
                                                             torch_dtype=torch.float32)
                differ = [f"{k} {controlnet.config.get(k)} (the UNet's {unet.get(k)})"
                          for k in ("cross_attention_dim", "addition_embed_type", "in_channels")
                          if controlnet.config.get(k) != unet.get(k)]
                if differ:
                    raise ValueError("its " + ", ".join(differ))
                return controlnet
            from safetensors.torch import load_file

            from architectures.controlnet_keys import controlnet_state_dict_from_original
            controlnet = from_unet()
            state = load_file(str(init_path))
            if "controlnet_cond_embedding.conv_in.weight" not in state:
                state = controlnet_state_dict_from_original(state, controlnet.config)
            # strict, with shapes: a ControlNet of another family (or model size) does not fit this UNet's copy
            controlnet.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
            return controlnet
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(f"network.controlnet_init: {init_path} is not a ControlNet for this {self.label} "
                             f"model ({str(exc).splitlines()[0][:300]}); pick one made for it, or clear the "
                             f"setting to start from the UNet") from exc

    def export_controlnet(self, controlnet: nn.Module) -> dict[str, torch.Tensor]:
        from architectures.controlnet_keys import controlnet_state_dict_to_original
        return controlnet_state_dict_to_original(controlnet.state_dict(), controlnet.config)

    @staticmethod
    def control_residuals(components: Components, noisy: torch.Tensor, timesteps: torch.Tensor,
                          hidden: torch.Tensor, added: dict | None, batch: dict) -> dict:
        """The UNet's extra arguments: the ControlNet's residuals for the batch's conditioning images (none
        without a ControlNet).  The ControlNet sees what the UNet sees, as diffusers' pipelines feed it."""
        if components.controlnet is None:
            return {}
        image = batch["conditioning"].to(noisy.device, noisy.dtype, non_blocking=True)
        down, mid = components.controlnet(noisy, timesteps, hidden, controlnet_cond=image, added_cond_kwargs=added,
                                          return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def configure_objective(self, components: Components, settings) -> None:
        """The training schedule the user chose; 'auto' keeps what the model's scheduler config says."""
        from diffusers import DDPMScheduler
        config = dict(components.scheduler_config)
        if settings.model.prediction_type != "auto":
            config["prediction_type"] = settings.model.prediction_type
        config["rescale_betas_zero_snr"] = settings.model.zero_terminal_snr
        components.noise_scheduler = DDPMScheduler.from_config(config)

    def prediction_type(self, components: Components) -> str:
        return components.noise_scheduler.config.prediction_type

    # -- adapters --------------------------------------------------------------------------------------
    def unet_key(self, components: Components, diffusers_path: str) -> str:
        raise NotImplementedError

    adapter_presets = UNET_PRESETS

    def adapter_targets(self, components: Components, target: str, text_encoder: bool) -> list[AdapterTarget]:
        targets = [AdapterTarget(self.unet_key(components, path), module, "unet", path)
                   for path, module in unet_targets(components.denoiser, target)]
        if text_encoder:
            targets += self._text_encoder_targets(components)
        return targets

    def _text_encoder_targets(self, components: Components) -> list[AdapterTarget]:
        out = []
        for i, (te, prefix) in enumerate(zip(components.text_encoders, self.te_prefixes)):
            out += clip_targets(te, prefix, f"te{i + 1}")
        return out

    def adapter_candidates(self, components: Components, text_encoder: bool) -> list[AdapterTarget]:
        out = []
        for path, module in unet_candidates(components.denoiser):
            try:
                out.append(AdapterTarget(self.unet_key(components, path), module, "unet", path))
            except ValueError:  # no community name (no counterpart in the original layout)
                continue
        return out + (self._text_encoder_targets(components) if text_encoder else [])

    # -- textual inversion -------------------------------------------------------------------------------
    def token_known(self, text: str) -> bool:
        # CLIP lowercases prompts: a token that differs from a known one only in case would stand for that one
        return text.lower() in _shipped_vocabulary(self.id)

    # -- data ------------------------------------------------------------------------------------------
    def tokenize(self, components: Components, captions: list[str]) -> list[torch.Tensor]:
        return [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in components.tokenizers]

    def encode_latents(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
        return latents * vae.config.scaling_factor

    # -- training objective ----------------------------------------------------------------------------
    def noisy_input_and_target(self, components, latents, noise, settings, input_noise=None, level=None) -> Noised:
        s = settings.schedule
        sched = components.noise_scheduler
        b = latents.shape[0]
        total = sched.config.num_train_timesteps
        lo, hi = timestep_range(s.min_timestep, s.max_timestep)
        timesteps = (torch.randint(round(lo * total), round(hi * total), (b,), device=latents.device) if level is None
                     else (level.to(latents.device) * total).long().clamp(0, total - 1))
        noisy = sched.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
        v_pred = sched.config.prediction_type == "v_prediction"
        target = sched.get_velocity(latents, noise, timesteps) if v_pred else noise
        snr = snr_of(sched.alphas_cumprod.to(latents.device), timesteps)
        return Noised(noisy, timesteps, target, ddpm_loss_weight(snr, s, v_pred), timesteps.float() / total,
                      snr.clamp(min=1e-8).rsqrt())

    # -- previews --------------------------------------------------------------------------------------
    def build_pipeline(self, components: Components):
        raise NotImplementedError

    def sample(self, components, prompts, settings, size, device, dtype, conditioning=None) -> list:
        """``conditioning``: the ControlNet's image (PIL) for every prompt, when ``components.controlnet`` is set."""
        from diffusers import EulerDiscreteScheduler
        pipe = self.build_pipeline(components)
        pipe.scheduler = EulerDiscreteScheduler.from_config(components.noise_scheduler.config)
        negative = settings.sampling.negative_prompt or None
        clip_skip = settings.model.clip_skip - 1 or None  # diffusers counts the layers skipped
        control = {} if components.controlnet is None else {"image": conditioning}
        return self.render_each(pipe, prompts, settings, size, device, dtype, lambda prompt: dict(
            prompt=prompt, negative_prompt=negative, clip_skip=clip_skip, **control))
