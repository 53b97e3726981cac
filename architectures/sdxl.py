"""SDXL: CLIP-L + OpenCLIP bigG text encoders, size/crop conditioning, kohya keys with LDM module names."""
from __future__ import annotations

import torch

from architectures.sd_unet import SDUNetFamily
from core.speed import host_values


def sdxl_time_ids(batch: dict, device) -> torch.Tensor:
    """(B, 6): original (h, w), crop (top, left), target (h, w) — SDXL's micro-conditioning: the training batch's
    ``size_conditioning`` tensor (built on the batch worker, so a captured step replays it as an input), else,
    for a batch built by hand, from its host lists; both copied without waiting."""
    if "size_conditioning" in batch:
        return batch["size_conditioning"].to(device, non_blocking=True)
    return host_values([list(o) + list(c) + list(t) for o, c, t in
                        zip(batch["original_sizes"], batch["crop_coords"], batch["target_sizes"])], device)


class SDXL(SDUNetFamily):
    id = "sdxl"
    label = "Stable Diffusion XL"
    short_label = "SDXL"
    checkpointing_below_gb = 16.0
    ss_base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    default_resolution = 1024
    te_prefixes = ("lora_te1", "lora_te2")
    # one tensor per text encoder: CLIP-L, then OpenCLIP bigG (the SDXL embedding format A1111 and ComfyUI load)
    embedding_keys = ("clip_l", "clip_g")
    embedding_bundle_names = embedding_keys
    modelspec_embedding_architecture = "stable-diffusion-xl-v1-base/textual-inversion"

    def unet_key(self, components, diffusers_path: str) -> str:
        # sd-scripts trains SDXL on the original UNet: keys carry LDM names (input_blocks_4_1_…)
        from architectures.ldm_keys import unet_module_to_ldm
        return "lora_unet_" + unet_module_to_ldm(diffusers_path, dict(components.denoiser.config)).replace(".", "_")

    def encode_text(self, components, tokens, clip_skip: int) -> dict:
        te1, te2 = components.text_encoders
        # SDXL conditions on the penultimate layer of both encoders; clip_skip N goes N-1 layers further
        layer = -1 - clip_skip
        h1 = te1(tokens[0].to(te1.device), output_hidden_states=True).hidden_states[layer]
        out2 = te2(tokens[1].to(te2.device), output_hidden_states=True)
        h2 = out2.hidden_states[layer]
        return {"encoder_hidden_states": torch.cat([h1, h2.to(h1.dtype)], dim=-1), "pooled": out2.text_embeds}

    def predict(self, components, noisy, timesteps, cond, batch) -> torch.Tensor:
        time_ids = sdxl_time_ids(batch, noisy.device)
        added = {"text_embeds": cond["pooled"], "time_ids": time_ids.to(cond["pooled"].dtype)}
        hidden = cond["encoder_hidden_states"]
        control = self.control_residuals(components, noisy, timesteps, hidden, added, batch)
        return components.denoiser(noisy, timesteps, hidden, added_cond_kwargs=added, **control).sample

    def probe_inputs(self, denoiser, resolution, batch_size, dtype, device="meta"):
        cfg, side = denoiser.config, resolution // self.vae_scale_factor
        noisy = torch.zeros(batch_size, cfg.in_channels, side, side, device=device, dtype=dtype)
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond = {"encoder_hidden_states": torch.zeros(batch_size, 77, cfg.cross_attention_dim, device=device,
                                                     dtype=dtype),
                "pooled": torch.zeros(batch_size, pooled, device=device, dtype=dtype)}
        batch = {"original_sizes": [(resolution, resolution)] * batch_size, "crop_coords": [(0, 0)] * batch_size,
                 "target_sizes": [(resolution, resolution)] * batch_size}
        return noisy, torch.full((batch_size,), 500, device=device, dtype=torch.long), cond, batch

    def build_pipeline(self, components):
        from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
        te1, te2 = components.text_encoders
        tok1, tok2 = components.tokenizers
        parts = dict(vae=components.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                     unet=components.denoiser, scheduler=components.noise_scheduler)
        if components.controlnet is not None:
            return StableDiffusionXLControlNetPipeline(**parts, controlnet=components.controlnet)
        return StableDiffusionXLPipeline(**parts)
