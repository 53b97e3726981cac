"""FLUX.1 dev and schnell: a rectified-flow transformer on packed 2×2 latent patches, CLIP-L (pooled vector
only) + T5-XXL (token sequence), a 16-channel VAE with shift/scale.

The transformer takes σ (0…1) as timestep, packed latents with their (0, row, column) position ids, text
position ids of zeros and — dev only — the guidance value (``model.guidance``; diffusers' training example
uses 3.5, sd-scripts users often 1.0).

Adapter files use BFL names with the ``lora_unet_`` prefix (``lora_unet_double_blocks_0_img_attn_qkv``,
``…_txt_attn_proj``, ``…_img_mlp_0``, ``lora_unet_single_blocks_0_linear1``, ``…_linear2``,
``…_modulation_lin``): q/k/v (and, in single blocks, the MLP input) are trained as separate modules and saved
fused.  Text encoders: ``lora_te1_`` (CLIP-L), ``lora_te3_`` (T5) as sd-scripts does.
"""
from __future__ import annotations

from pathlib import Path

import torch

from architectures import flow_matching as fm
from architectures.base import AdapterTarget, Components
from architectures.dit_common import (DoubleSingleStreamBlocks, FlowMatchingFamily, clip_text_targets,
                                       resolve_optional, t5_targets)
from architectures.dit_keys import flux_bfl_to_diffusers, flux_diffusers_to_bfl, flux_lora_slots

_DOUBLE_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out")
_DOUBLE_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_DOUBLE_MOD = ("norm1.linear", "norm1_context.linear")
# single blocks: q/k/v and the MLP input share BFL's linear1; linear2 (proj_out) projects attention and MLP
_SINGLE_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out")
_SINGLE_MLP = ("proj_mlp",)
_SINGLE_MOD = ("norm.linear",)


class FluxFamily(DoubleSingleStreamBlocks, FlowMatchingFamily):
    traits = frozenset({"flow_matching", "t5", "bfl_text_encoder_files", "double_single_blocks"})
    # FLUX.1 dev without checkpointing measured 47.2 GB at 1024 px (FIELD_NOTES)
    checkpointing_below_gb = 56.0
    denoiser_subfolder = "transformer"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    supports_full_checkpoint = True
    to_original_layout = staticmethod(flux_diffusers_to_bfl)
    from_original_layout = staticmethod(flux_bfl_to_diffusers)
    ss_base_model_version = "flux1"
    vae_scale_factor = 8
    compile_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    slot_table = staticmethod(flux_lora_slots)
    lora_network_module = "networks.lora_flux"
    preset_modules = {
        "attn": {"transformer_blocks": _DOUBLE_ATTN, "single_transformer_blocks": _SINGLE_ATTN},
        "attn_mlp": {"transformer_blocks": _DOUBLE_ATTN + _DOUBLE_MLP,
                     "single_transformer_blocks": _SINGLE_ATTN + _SINGLE_MLP},
        "full-lin": {"transformer_blocks": _DOUBLE_ATTN + _DOUBLE_MLP + _DOUBLE_MOD,
                     "single_transformer_blocks": _SINGLE_ATTN + _SINGLE_MLP + _SINGLE_MOD},
    }

    # -- loading ---------------------------------------------------------------------------------------
    def load_options(self, settings, resolve_path) -> dict:
        m = settings.model
        return {"clip_l_path": resolve_optional(resolve_path, m.clip_l_path, "model.clip_l_path"),
                "t5xxl_path": resolve_optional(resolve_path, m.t5xxl_path, "model.t5xxl_path"),
                "ae_path": resolve_optional(resolve_path, m.ae_path, "model.ae_path")}

    loads_without_text_encoders = True

    def load(self, model_path: Path, config_dir: Path | None, dtype: torch.dtype, clip_l_path: Path | None = None,
             t5xxl_path: Path | None = None, ae_path: Path | None = None, text_encoders: bool = True,
             denoiser: bool = True) -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from architectures.dit_loading import load_flux_components
        parts = load_flux_components(self.id, Path(model_path), config_dir, dtype, clip_l_path, t5xxl_path, ae_path,
                                     text_encoders=text_encoders, denoiser=denoiser)
        return Components(denoiser=parts["transformer"], vae=parts["vae"], text_encoders=parts["text_encoders"],
                          tokenizers=parts["tokenizers"],
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(parts["scheduler_config"]),
                          scheduler_config=parts["scheduler_config"])

    # -- adapters --------------------------------------------------------------------------------------
    def text_encoder_targets(self, components: Components, network) -> list[AdapterTarget]:
        out = clip_text_targets(components.text_encoders[0], "lora_te1", "te1")
        if getattr(network, "train_t5", False):
            out += t5_targets(components.text_encoders[1], "lora_te3", "te3")
        return out

    # -- text ------------------------------------------------------------------------------------------
    def tokenize(self, components: Components, captions: list[str]) -> list[torch.Tensor]:
        tok = components.tokenizers[0]
        clip = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
        return [clip] + self.t5_tokens(components, captions)

    def encode_text(self, components: Components, tokens: list[torch.Tensor], clip_skip: int) -> dict:
        clip, t5 = components.text_encoders
        pooled = clip(tokens[0].to(clip.device), output_hidden_states=False).pooler_output
        hidden = self.t5_encode(components, t5, tokens[1], tokens[2])
        return {"prompt_embeds": hidden, "pooled": pooled.to(hidden.dtype), "t5_mask": tokens[2].to(hidden.device)}

    # -- objective -------------------------------------------------------------------------------------
    def predict(self, components, noisy, timesteps, cond, batch) -> torch.Tensor:
        tr = components.denoiser
        b, _, h, w = noisy.shape
        text = cond["prompt_embeds"]
        guidance = self.guidance_input(components, b, noisy.device)
        dev, dt = noisy.device, noisy.dtype
        img_ids = self.on_device("img_ids", (h, w), dev, dt, lambda: fm.image_position_ids(h, w, dev, dt))
        txt_ids = self.on_device("txt_ids", (text.shape[1],), dev, dt,
                                 lambda: fm.text_position_ids(text.shape[1], dev, dt))
        out = tr(hidden_states=fm.pack_latents(noisy), encoder_hidden_states=text, pooled_projections=cond["pooled"],
                 timestep=timesteps, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return fm.unpack_latents(out, h, w)

    def probe_inputs(self, denoiser, resolution, batch_size, dtype, device="meta"):
        cfg, side = denoiser.config, resolution // self.vae_scale_factor
        noisy = torch.zeros(batch_size, cfg.in_channels // 4, side, side, device=device, dtype=dtype)
        cond = {"prompt_embeds": torch.zeros(batch_size, self.default_t5_max_length, cfg.joint_attention_dim,
                                             device=device, dtype=dtype),
                "pooled": torch.zeros(batch_size, cfg.pooled_projection_dim, device=device, dtype=dtype)}
        return noisy, torch.full((batch_size,), 0.5, device=device), cond, {}

    # -- previews --------------------------------------------------------------------------------------
    def build_pipeline(self, components: Components):
        from diffusers import FluxPipeline
        (clip, t5), (tok, tok_t5) = components.text_encoders, components.tokenizers
        return FluxPipeline(scheduler=self.scheduler_for_sampling(components), vae=components.vae, text_encoder=clip,
                            tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok_t5, transformer=components.denoiser)

    def sample(self, components, prompts, settings, size, device, dtype) -> list:
        """Flow-matching Euler sampling (resolution-dependent shift from the scheduler config); dev embeds
        ``sampling.guidance_scale`` as its guidance value, schnell has none."""
        pipe = self.build_pipeline(components)

        def conditioning(prompt: str) -> dict:
            cond = self.preview_embeddings(components, [prompt], settings.model.clip_skip)
            return dict(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled"])
        return self.render_each(pipe, prompts, settings, size, device, dtype, conditioning)


class Flux1Dev(FluxFamily):
    id = "flux1_dev"
    label = "FLUX.1 dev"
    traits = FluxFamily.traits | {"guidance_input"}
    modelspec_architecture = "flux-1-dev/lora"
    default_t5_max_length = 512


class Flux1Schnell(FluxFamily):
    id = "flux1_schnell"
    label = "FLUX.1 schnell"
    modelspec_architecture = "flux-1-schnell/lora"
    default_t5_max_length = 256
