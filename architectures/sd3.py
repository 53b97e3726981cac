"""Stable Diffusion 3 Medium and 3.5 Medium / Large: MMDiT trained with rectified flow; CLIP-L + CLIP-G +
(optional) T5-XXL.

Conditioning (as diffusers' ``StableDiffusion3Pipeline``): the penultimate hidden states of both CLIPs
concatenated (768 + 1280), zero-padded to T5's width and followed by T5's tokens (zeros when T5 is left
out); pooled = both CLIP projections concatenated.  The transformer takes ``σ·1000`` as timestep.

Adapter files: the main file uses the original MMDiT names (``lora_unet_joint_blocks_0_x_block_attn_qkv``,
``…_context_block_attn_proj``, ``…_x_block_mlp_fc1``; q/k/v fused) and ``lora_te1_`` (CLIP-L), ``lora_te2_``
(CLIP-G), ``lora_te3_`` (T5) — what sd-scripts writes and ComfyUI loads.  diffusers 0.42.1 does not convert
those for SD3, so a second file ``<name>.diffusers.safetensors`` holds the same adapter in diffusers/PEFT
layout (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, alpha folded in; CLIP LoRAs as
``text_encoder.`` / ``text_encoder_2.``; T5 LoRAs, which diffusers cannot load for SD3, are left out of it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from architectures.base import AdapterTarget, Components
from architectures.dit_common import FlowMatchingFamily, clip_text_targets, t5_targets
from architectures.dit_keys import sd3_diffusers_to_original, sd3_lora_slots, sd3_original_to_diffusers

_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
         "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_MOD = ("norm1.linear", "norm1_context.linear")


@dataclass
class SD3Components(Components):
    use_t5: bool = True              # model.use_t5: without T5 its place in the conditioning is zeros
    joint_attention_dim: int = 4096  # the transformer's text width, which T5's place is padded to


class SD3Family(FlowMatchingFamily):
    traits = frozenset({"flow_matching", "clip_skip", "t5", "optional_t5"})
    modelspec_implementation = "diffusers"
    denoiser_subfolder = "transformer"
    supports_full_checkpoint = True
    to_original_layout = staticmethod(sd3_diffusers_to_original)
    from_original_layout = staticmethod(sd3_original_to_diffusers)
    original_prefix = "model.diffusion_model."   # as sd3_medium.safetensors
    vae_scale_factor = 8
    default_t5_max_length = 256
    compile_blocks = ("JointTransformerBlock",)
    block_patterns = ((r"^transformer_blocks\.(\d+)\.", "joint_{0}"),)
    block_lists = ("transformer_blocks",)
    slot_table = staticmethod(sd3_lora_slots)
    lora_network_module = "networks.lora_sd3"
    preset_modules = {"attn": {"transformer_blocks": _ATTN},
                      "attn_mlp": {"transformer_blocks": _ATTN + _MLP},
                      "full-lin": {"transformer_blocks": _ATTN + _MLP + _MOD}}
    te_prefixes = ("lora_te1", "lora_te2", "lora_te3")

    # -- loading ---------------------------------------------------------------------------------------
    def load_options(self, settings, resolve_path) -> dict:
        return {"use_t5": bool(settings.model.use_t5)}

    loads_without_text_encoders = True

    def load(self, model_path: Path, config_dir: Path | None, dtype: torch.dtype, use_t5: bool = True,
             text_encoders: bool = True, denoiser: bool = True) -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from architectures.dit_loading import load_sd3_components
        parts = load_sd3_components(self.id, Path(model_path), config_dir, dtype, use_t5=use_t5,
                                    text_encoders=text_encoders, denoiser=denoiser)
        if parts["transformer"] is not None:
            joint = parts["transformer"].config.joint_attention_dim
        else:  # text encoders only: the width T5's place is padded to comes from the transformer's config
            from architectures.load_util import read_json
            folder = Path(model_path) if Path(model_path).is_dir() else Path(config_dir or self.config_dir())
            joint = read_json(folder / "transformer" / "config.json")["joint_attention_dim"]
        return SD3Components(denoiser=parts["transformer"], vae=parts["vae"], text_encoders=parts["text_encoders"],
                             tokenizers=parts["tokenizers"],
                             noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(parts["scheduler_config"]),
                             scheduler_config=parts["scheduler_config"], use_t5=use_t5, joint_attention_dim=joint)

    # -- adapters --------------------------------------------------------------------------------------
    def text_encoder_targets(self, components: Components, network) -> list[AdapterTarget]:
        out = clip_text_targets(components.text_encoders[0], "lora_te1", "te1")
        out += clip_text_targets(components.text_encoders[1], "lora_te2", "te2")
        if self._uses_t5(components) and len(components.text_encoders) > 2 and getattr(network, "train_t5", False):
            out += t5_targets(components.text_encoders[2], "lora_te3", "te3")
        return out

    @staticmethod
    def _uses_t5(components: Components) -> bool:
        """Components built elsewhere (the memory estimate's) count as with T5."""
        return not isinstance(components, SD3Components) or components.use_t5

    def peft_parts(self, components: Components) -> dict[str, list[tuple[str, int, int | None]]]:
        """diffusers reads no kohya SD3 keys: a LoRA is also written in diffusers/PEFT layout."""
        parts = {name: [(f"transformer.{path}", start, rows) for path, start, rows in where]
                 for name, where in self.transformer_parts(components).items()}
        # text encoders are released after caching when they are not trained (nothing of theirs to name then)
        for i, prefix in ((0, "text_encoder"), (1, "text_encoder_2"))[:len(components.text_encoders)]:
            for t in clip_text_targets(components.text_encoders[i], self.te_prefixes[i], f"te{i + 1}"):
                parts[t.name] = [(f"{prefix}.{t.path}", 0, None)]
        return parts

    # -- text ------------------------------------------------------------------------------------------
    def tokenize(self, components: Components, captions: list[str]) -> list[torch.Tensor]:
        clip = [tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in components.tokenizers[:2]]
        if self._uses_t5(components):
            return clip + self.t5_tokens(components, captions)
        length = self._objective(components)["t5_max_length"]
        return clip + [torch.zeros(len(captions), length, dtype=torch.long)] * 2

    def encode_text(self, components: Components, tokens: list[torch.Tensor], clip_skip: int) -> dict:
        te_l, te_g = components.text_encoders[:2]
        layer = -1 - clip_skip  # penultimate for clip_skip 1, as the SD3 pipeline
        out_l = te_l(tokens[0].to(te_l.device), output_hidden_states=True)
        out_g = te_g(tokens[1].to(te_g.device), output_hidden_states=True)
        h = torch.cat([out_l.hidden_states[layer], out_g.hidden_states[layer].to(out_l.hidden_states[layer].dtype)], -1)
        pooled = torch.cat([out_l.text_embeds, out_g.text_embeds.to(out_l.text_embeds.dtype)], -1)
        joint = components.joint_attention_dim
        ids, mask = tokens[2], tokens[3]
        if self._uses_t5(components) and len(components.text_encoders) > 2:
            t5 = self.t5_encode(components, components.text_encoders[2], ids, mask).to(h.dtype)
        else:  # T5 left out: zeros in its place, as StableDiffusion3Pipeline does without text_encoder_3
            t5 = torch.zeros(h.shape[0], ids.shape[1], joint, dtype=h.dtype, device=h.device)
        h = torch.nn.functional.pad(h, (0, t5.shape[-1] - h.shape[-1]))
        return {"prompt_embeds": torch.cat([h, t5.to(h.device)], dim=1), "pooled": pooled,
                "t5_mask": mask.to(h.device)}

    # -- objective -------------------------------------------------------------------------------------
    def predict(self, components, noisy, timesteps, cond, batch) -> torch.Tensor:
        tr = components.denoiser
        return tr(hidden_states=noisy, encoder_hidden_states=cond["prompt_embeds"],
                  pooled_projections=cond["pooled"], timestep=timesteps * 1000.0, return_dict=False)[0]

    def probe_inputs(self, denoiser, resolution, batch_size, dtype, device="meta"):
        cfg, side = denoiser.config, resolution // self.vae_scale_factor
        noisy = torch.zeros(batch_size, cfg.in_channels, side, side, device=device, dtype=dtype)
        tokens = 77 + self.default_t5_max_length  # both CLIPs' 77 tokens, then T5's
        cond = {"prompt_embeds": torch.zeros(batch_size, tokens, cfg.joint_attention_dim, device=device, dtype=dtype),
                "pooled": torch.zeros(batch_size, cfg.pooled_projection_dim, device=device, dtype=dtype)}
        return noisy, torch.full((batch_size,), 0.5, device=device), cond, {}

    # -- previews --------------------------------------------------------------------------------------
    def build_pipeline(self, components: Components):
        from diffusers import StableDiffusion3Pipeline
        te = components.text_encoders
        tok = components.tokenizers
        t5 = len(te) > 2
        return StableDiffusion3Pipeline(
            transformer=components.denoiser, scheduler=self.scheduler_for_sampling(components), vae=components.vae,
            text_encoder=te[0], tokenizer=tok[0], text_encoder_2=te[1], tokenizer_2=tok[1],
            text_encoder_3=te[2] if t5 else None, tokenizer_3=tok[2] if t5 else None)

    def sample(self, components, prompts, settings, size, device, dtype) -> list:
        """Flow-matching Euler sampling with classifier-free guidance (``sampling.guidance_scale``), on our own
        prompt embeddings (the ones training uses, T5 mask option included)."""
        pipe = self.build_pipeline(components)
        clip_skip = settings.model.clip_skip
        negative = self.preview_embeddings(components, [settings.sampling.negative_prompt or ""], clip_skip)

        def conditioning(prompt: str) -> dict:
            cond = self.preview_embeddings(components, [prompt], clip_skip)
            return dict(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled"],
                        negative_prompt_embeds=negative["prompt_embeds"],
                        negative_pooled_prompt_embeds=negative["pooled"])
        return self.render_each(pipe, prompts, settings, size, device, dtype, conditioning)


class SD3(SD3Family):
    id = "sd3"
    label = "Stable Diffusion 3 Medium"
    short_label = "SD3 Medium"
    checkpointing_below_gb = 16.0  # estimate from size
    ss_base_model_version = "sd3_medium"
    modelspec_architecture = "stable-diffusion-3-medium/lora"


class SD35Medium(SD3Family):
    id = "sd35_medium"
    label = "Stable Diffusion 3.5 Medium"
    short_label = "SD3.5 Medium"
    checkpointing_below_gb = 16.0  # estimate from size
    ss_base_model_version = "sd3.5_medium"
    modelspec_architecture = "stable-diffusion-3-5-medium/lora"


class SD35Large(SD3Family):
    id = "sd35_large"
    label = "Stable Diffusion 3.5 Large"
    short_label = "SD3.5 Large"
    checkpointing_below_gb = 40.0  # estimate from size
    ss_base_model_version = "sd3.5_large"
    modelspec_architecture = "stable-diffusion-3-5-large/lora"
