"""Stable Diffusion 1.x: one CLIP-L text encoder, 512 px, kohya keys with diffusers module names."""
from __future__ import annotations

import torch

from architectures.sd_unet import SDUNetFamily


class SD15(SDUNetFamily):
    id = "sd15"
    label = "Stable Diffusion 1.5"
    short_label = "SD 1.5"
    checkpointing_below_gb = 8.0
    ss_base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    modelspec_implementation = "diffusers"
    default_resolution = 512
    te_prefixes = ("lora_te",)
    # A1111 / ComfyUI / diffusers read an SD1.x embedding from "emb_params" (sd-scripts' key)
    embedding_keys = ("emb_params",)
    # a bundled SD1.x embedding is stored as A1111's .pt embeddings hold it
    embedding_bundle_names = ("string_to_param.*",)
    modelspec_embedding_architecture = "stable-diffusion-v1/textual-inversion"

    def unet_key(self, components, diffusers_path: str) -> str:
        # sd-scripts trains SD1.x on a UNet with diffusers' module names; every loader maps these
        return "lora_unet_" + diffusers_path.replace(".", "_")

    def encode_text(self, components, tokens, clip_skip: int) -> dict:
        te = components.text_encoders[0]
        ids = tokens[0].to(te.device)
        if clip_skip <= 1:
            hidden = te(ids).last_hidden_state
        else:
            # an earlier layer, then the final layer norm, as sd-scripts and A1111 do for SD1.x
            out = te(ids, output_hidden_states=True)
            hidden = te.text_model.final_layer_norm(out.hidden_states[-clip_skip]) if hasattr(te, "text_model") \
                else te.final_layer_norm(out.hidden_states[-clip_skip])
        return {"encoder_hidden_states": hidden}

    def predict(self, components, noisy, timesteps, cond, batch) -> torch.Tensor:
        hidden = cond["encoder_hidden_states"]
        control = self.control_residuals(components, noisy, timesteps, hidden, None, batch)
        return components.denoiser(noisy, timesteps, hidden, **control).sample

    def probe_inputs(self, denoiser, resolution, batch_size, dtype, device="meta"):
        cfg, side = denoiser.config, resolution // self.vae_scale_factor
        noisy = torch.zeros(batch_size, cfg.in_channels, side, side, device=device, dtype=dtype)
        cond = {"encoder_hidden_states": torch.zeros(batch_size, 77, cfg.cross_attention_dim, device=device,
                                                     dtype=dtype)}
        return noisy, torch.full((batch_size,), 500, device=device, dtype=torch.long), cond, {}

    def build_pipeline(self, components):
        from diffusers import StableDiffusionControlNetPipeline, StableDiffusionPipeline
        parts = dict(vae=components.vae, text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
                     unet=components.denoiser, scheduler=components.noise_scheduler, safety_checker=None,
                     feature_extractor=None, requires_safety_checker=False)
        if components.controlnet is not None:
            return StableDiffusionControlNetPipeline(**parts, controlnet=components.controlnet)
        return StableDiffusionPipeline(**parts)
