"""FLUX.2 dev, klein 4B / 9B and klein base 4B / 9B (undistilled): a rectified-flow transformer on 2×2-patchified
latents of a 32-channel VAE, conditioned on stacked hidden states of a chat LLM.

* **Variants** (the user's choice decides; nothing is inferred from the weights, a mismatching file is refused,
  see :mod:`architectures.flux2_loading`): dev — ``Mistral3ForConditionalGeneration`` text encoder, hidden
  layers (10, 20, 30) stacked, the prompt wrapped in diffusers' system message (``Flux2Pipeline``), guidance
  embedding (the training value is ``model.guidance``); klein / klein base — ``Qwen3ForCausalLM`` with the Qwen
  chat template (``enable_thinking=False``, generation prompt), layers (9, 18, 27), no guidance embedding.
  klein (step-distilled) and klein base share the transformer shape; base is sampled with real CFG.
* **Latents** (as ``Flux2Pipeline``): VAE latents (32 channels) patchified 2×2 to 128 channels and normalised
  with the VAE's batch-norm running mean / variance; the trainer's latents *are* these (B, 128, H/16, W/16)
  tensors. The transformer sees them as tokens (row-major) with 4-axis position ids (t=0, row, column, l=0);
  text tokens get (0, 0, 0, index).  Text is padded / cut to 512 tokens (diffusers' default,
  :attr:`Flux2Family.max_sequence_length`), no attention mask is passed to the transformer (as the pipelines).
* **Adapters**: presets ``attn`` (double blocks: q, k, v, out of both streams; single blocks: ``linear1`` =
  ``attn.to_qkv_mlp_proj`` and ``linear2`` = ``attn.to_out`` — in FLUX.2 the single block's attention and MLP
  projections are one module each), ``attn_mlp`` (+ the double blocks' SwiGLU MLPs), ``full-lin`` (every linear
  of the transformer blocks).  **Modulation**: FLUX.2 has no per-block adaLN modulation; three *shared*
  modulation layers (``double_stream_modulation_img/txt``, ``single_stream_modulation``) modulate every block.
  diffusers' kohya FLUX.2 LoRA loader drops modulation keys (with a warning), so a file with them would act
  differently in diffusers and ComfyUI: no preset trains them, and ``full-lin`` therefore equals ``attn_mlp``
  (logged).  They (and the embedders / final layer) can be added with ``network.include`` patterns, e.g.
  ``*modulation*`` (keys ``lora_unet_double_stream_modulation_img_lin`` …) — diffusers will then drop them.
  The text encoder is not trained (diffusers' FLUX.2 loader takes transformer adapters only).
* **Files**: BFL names with ``lora_unet_`` (``lora_unet_double_blocks_0_img_attn_qkv``, ``…_img_attn_proj``,
  ``…_img_mlp_0`` / ``_2``, ``…_txt_*``, ``lora_unet_single_blocks_0_linear1`` / ``_linear2``), the double blocks'
  separately trained q/k/v saved fused exactly as for FLUX.1 (so LoRA / LoCon without DoRA only), ``.alpha``
  kept.  Metadata: ``modelspec.architecture`` ``Flux.2-dev/lora``, ``Flux.2-klein-4b/lora``,
  ``Flux.2-klein-9b/lora`` (base models: their size's klein value); ``ss_base_model_version`` is this program's
  own naming (``flux2_dev``, ``flux2_klein_4b``, ``flux2_klein_9b``, ``flux2_klein_base_4b``,
  ``flux2_klein_base_9b``: no other tool defines FLUX.2 values); ``ss_network_module`` ``networks.lora_flux``.
* **Previews**: diffusers' ``Flux2Pipeline`` (dev; ``sampling.guidance_scale`` is the embedded guidance) or
  ``Flux2KleinPipeline`` (klein: distilled, no CFG; base: CFG with ``sampling.guidance_scale`` and the negative
  prompt), given prompt embeddings from :meth:`Flux2Family.encode_text`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from architectures.base import AdapterTarget, Components
from architectures.dit_common import DoubleSingleStreamBlocks, FlowMatchingFamily, resolve_optional
from architectures.flux2_keys import flux2_bfl_to_diffusers, flux2_diffusers_to_bfl, flux2_lora_slots

log = logging.getLogger(__name__)

_DOUBLE_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out")
_DOUBLE_MLP = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
_SINGLE = ("attn.to_qkv_mlp_proj", "attn.to_out")


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 4C, H/2, W/2), channel order (c, dy, dx) as diffusers' ``_patchify_latents``."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX.2 patchifies 2x2 latent patches; latent size {h}x{w} is not even")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def _grid(sizes: tuple[int, ...], device) -> torch.Tensor:
    return torch.cartesian_prod(*(torch.arange(n, device=device) for n in sizes))


def latent_ids(height: int, width: int, device=None) -> torch.Tensor:
    """(H·W, 4) position ids (t=0, row, column, l=0) of packed patchified latents (``_prepare_latent_ids``), built
    on ``device``."""
    return _grid((1, height, width, 1), device)


def text_ids(length: int, device=None) -> torch.Tensor:
    """(L, 4) position ids (0, 0, 0, index) of text tokens (``_prepare_text_ids``), built on ``device``."""
    return _grid((1, 1, 1, length), device)


class Flux2Family(DoubleSingleStreamBlocks, FlowMatchingFamily):
    traits = frozenset({"flow_matching", "components_folder", "double_single_blocks"})
    quantize_keep = FlowMatchingFamily.quantize_keep + ("time_guidance_embed.*",)
    modelspec_implementation = "https://github.com/black-forest-labs/flux2"
    supports_full_checkpoint = True
    to_original_layout = staticmethod(flux2_diffusers_to_bfl)
    from_original_layout = staticmethod(flux2_bfl_to_diffusers)
    default_resolution = 1024
    vae_scale_factor = 8  # pixels per latent; a transformer token covers 16x16 pixels
    compile_blocks = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")
    slot_table = staticmethod(flux2_lora_slots)
    lora_network_module = "networks.lora_flux"
    preset_modules = {
        "attn": {"transformer_blocks": _DOUBLE_ATTN, "single_transformer_blocks": _SINGLE},
        "attn_mlp": {"transformer_blocks": _DOUBLE_ATTN + _DOUBLE_MLP, "single_transformer_blocks": _SINGLE},
        # FLUX.2 blocks hold no modulation: every linear of a block is already in attn_mlp
        "full-lin": {"transformer_blocks": _DOUBLE_ATTN + _DOUBLE_MLP, "single_transformer_blocks": _SINGLE},
    }
    #: text tokens (diffusers' Flux2Pipeline / Flux2KleinPipeline default)
    max_sequence_length = 512
    #: text-encoder hidden states stacked into the prompt embedding
    hidden_layers: tuple[int, ...] = ()
    distilled = False  # klein (step-distilled): previews without CFG
    denoiser_subfolder = "transformer"

    # -- loading ---------------------------------------------------------------------------------------
    def load_options(self, settings, resolve_path) -> dict:
        return {"components_path": resolve_optional(resolve_path, settings.model.components_path,
                                                     "model.components_path")}

    #: ``load(..., text_encoders=False)`` skips the text encoder (the trainer asks when every caption's outputs
    #: are cached on disk: FLUX.2 dev's is 24B parameters)
    loads_without_text_encoders = True

    def load(self, model_path: Path, config_dir: Path | None, dtype: torch.dtype,
             components_path: Path | None = None, text_encoders: bool = True,
             denoiser: bool = True) -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler
        parts = self.load_parts(Path(model_path), config_dir, dtype, components_path, text_encoders, denoiser)
        return Components(denoiser=parts["transformer"], vae=parts["vae"], text_encoders=parts["text_encoders"],
                          tokenizers=parts["tokenizers"],
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(parts["scheduler_config"]),
                          scheduler_config=parts["scheduler_config"])

    def load_parts(self, model_path: Path, config_dir: Path | None, dtype: torch.dtype, components_path: Path | None,
                   text_encoders: bool, denoiser: bool) -> dict:
        """The loader's ``{"transformer", "vae", "text_encoders", "tokenizers", "scheduler_config"}`` (FLUX.3 has
        its own loader)."""
        from architectures.flux2_loading import load_flux2_components
        return load_flux2_components(self.id, model_path, config_dir, dtype, components_path, text_encoders, denoiser)

    def configure_objective(self, components: Components, settings) -> None:
        super().configure_objective(components, settings)
        components.objective["text_max_length"] = self.max_sequence_length

    def _objective(self, components: Components) -> dict:
        return components.objective or {"guidance": 1.0, "text_max_length": self.max_sequence_length}

    def probe_inputs(self, denoiser, resolution, batch_size, dtype, device="meta"):
        """Training-shaped dummies for the memory estimate: patchified latents (B, 128, res/16, res/16), 512 text
        tokens of the joint width."""
        cfg, side = denoiser.config, resolution // (2 * self.vae_scale_factor)
        noisy = torch.zeros(batch_size, cfg.in_channels, side, side, device=device, dtype=dtype)
        cond = {"prompt_embeds": torch.zeros(batch_size, self.max_sequence_length, cfg.joint_attention_dim,
                                             device=device, dtype=dtype)}
        return noisy, torch.full((batch_size,), 0.5, device=device), cond, {}

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1]  # already patchified: one token per latent position

    # -- adapters --------------------------------------------------------------------------------------
    def adapter_targets(self, components: Components, target: str, text_encoder: bool) -> list[AdapterTarget]:
        if target == "full-lin":
            log.info("%s: FLUX.2 blocks have no per-block modulation, so 'full-lin' adapts the same layers as "
                     "'attn_mlp'. The shared modulation layers are not trained: diffusers' FLUX.2 LoRA loader drops "
                     "modulation keys. Add them with network.include '*modulation*' if ComfyUI is the target.",
                     self.label)
        return super().adapter_targets(components, target, text_encoder)

    def check_settings(self, settings) -> list[str]:
        problems = super().check_settings(settings)
        if settings.network.train_text_encoder:
            problems.append(f"network.train_text_encoder: {self.label} adapters cover the transformer only "
                            "(diffusers' FLUX.2 LoRA loader and the BFL layout have no text-encoder keys). Turn off "
                            "'Train text encoder(s)'.")
        return problems

    def text_encoder_targets(self, components: Components, network) -> list[AdapterTarget]:
        return []  # check_settings refuses network.train_text_encoder

    def export_adapter(self, components: Components, state_dict: dict[str, torch.Tensor]
                       ) -> dict[str, dict[str, torch.Tensor]]:
        """diffusers reads the main file's LoRA; its FLUX.2 LoKr loader wants BFL dotted keys under
        ``diffusion_model.`` (it fuses the model's q, k, v to take the fused ``qkv`` LoKr): a side file in that form."""
        files = super().export_adapter(components, state_dict)
        if any(".lokr_" in k for k in state_dict):
            original = self.original_names(components)
            files[".diffusers"] = {f"diffusion_model.{original[name]}.{suffix}": t
                                   for name, suffix, t in ((*k.split(".", 1), v) for k, v in state_dict.items())}
        return files

    # -- latents ---------------------------------------------------------------------------------------
    @staticmethod
    def _bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def encode_latents(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        latents = patchify(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample())
        mean, std = self._bn_stats(vae, latents)
        return (latents - mean) / std

    # -- text ------------------------------------------------------------------------------------------
    def _length(self, components: Components) -> int:
        return int(self._objective(components).get("text_max_length", self.max_sequence_length))

    def encode_text(self, components: Components, tokens: list[torch.Tensor], clip_skip: int) -> dict:
        """``{"prompt_embeds": (B, L, 3·hidden)}``: the chosen hidden layers stacked per token, as the pipelines do."""
        te = components.text_encoders[0]
        device = next(te.parameters()).device
        # the base model (Qwen3Model / Mistral3Model) gives the same hidden states without the LM head, whose
        # logits (512 tokens × a 131k-152k vocabulary per caption) the pipelines compute and throw away
        body = getattr(te, "model", te)
        out = body(**self.text_encoder_inputs(tokens, device), output_hidden_states=True, use_cache=False)
        hidden = torch.stack([out.hidden_states[k] for k in self.hidden_layers], dim=1)
        b, n, length, d = hidden.shape
        return {"prompt_embeds": hidden.permute(0, 2, 1, 3).reshape(b, length, n * d)}

    def text_encoder_inputs(self, tokens: list[torch.Tensor], device) -> dict[str, torch.Tensor]:
        """The text encoder's keyword arguments for :meth:`tokenize`'s output (FLUX.3 adds position ids)."""
        return {"input_ids": tokens[0].to(device), "attention_mask": tokens[1].to(device)}

    # -- objective -------------------------------------------------------------------------------------
    def predict(self, components, noisy, timesteps, cond, batch) -> torch.Tensor:
        tr = components.denoiser
        b, c, h, w = noisy.shape
        text = cond["prompt_embeds"]
        guidance = self.guidance_input(components, b, noisy.device)
        tokens = noisy.reshape(b, c, h * w).permute(0, 2, 1)
        dev, length = noisy.device, text.shape[1]
        out = tr(hidden_states=tokens, encoder_hidden_states=text, timestep=timesteps,
                 img_ids=self.on_device("img_ids", (h, w), dev, None, lambda: latent_ids(h, w, dev)),
                 txt_ids=self.on_device("txt_ids", (length,), dev, None, lambda: text_ids(length, dev)),
                 guidance=guidance, return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)

    # -- previews --------------------------------------------------------------------------------------
    def build_pipeline(self, components: Components):
        raise NotImplementedError

    def sample(self, components, prompts, settings, size, device, dtype) -> list:
        pipe = self.build_pipeline(components)
        clip_skip = settings.model.clip_skip
        negative = None
        if self.uses_cfg(settings):
            negative = self.preview_embeddings(components, [settings.sampling.negative_prompt or ""],
                                               clip_skip)["prompt_embeds"]

        def conditioning(prompt: str) -> dict:
            kw = {"prompt_embeds": self.preview_embeddings(components, [prompt], clip_skip)["prompt_embeds"]}
            if negative is not None:
                kw["negative_prompt_embeds"] = negative
            return kw
        return self.render_each(pipe, prompts, settings, size, device, dtype, conditioning)

    def uses_cfg(self, settings) -> bool:
        return False


class Flux2Dev(Flux2Family):
    id = "flux2_dev"
    label = "FLUX.2 dev"
    traits = Flux2Family.traits | {"guidance_input"}
    modelspec_architecture = "Flux.2-dev/lora"
    ss_base_model_version = "flux2_dev"
    hidden_layers = (10, 20, 30)
    checkpointing_below_gb = 200.0  # 32 B parameters: 64 GB of bf16 weights alone (not measured)

    def tokenize(self, components: Components, captions: list[str]) -> list[torch.Tensor]:
        """Mistral chat template with diffusers' FLUX.2 system message (``Flux2Pipeline``); [ids, mask]."""
        from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input
        tok = components.tokenizers[0]
        enc = tok.apply_chat_template(format_input(prompts=list(captions), system_message=SYSTEM_MESSAGE),
                                      add_generation_prompt=False, tokenize=True, return_dict=True,
                                      return_tensors="pt", padding="max_length", truncation=True,
                                      max_length=self._length(components))
        return [enc["input_ids"], enc["attention_mask"]]

    def build_pipeline(self, components: Components):
        from diffusers import Flux2Pipeline
        return Flux2Pipeline(scheduler=self.scheduler_for_sampling(components), vae=components.vae,
                             text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
                             transformer=components.denoiser)


class Flux2Klein(Flux2Family):
    hidden_layers = (9, 18, 27)
    distilled = True

    def tokenize(self, components: Components, captions: list[str]) -> list[torch.Tensor]:
        """Qwen chat template (user turn, generation prompt, thinking off) as ``Flux2KleinPipeline``; [ids, mask]."""
        tok = components.tokenizers[0]
        ids, masks = [], []
        for caption in captions:
            text = tok.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
            enc = tok(text, return_tensors="pt", padding="max_length", truncation=True,
                      max_length=self._length(components))
            ids.append(enc["input_ids"])
            masks.append(enc["attention_mask"])
        return [torch.cat(ids), torch.cat(masks)]

    def build_pipeline(self, components: Components):
        from diffusers import Flux2KleinPipeline
        return Flux2KleinPipeline(scheduler=self.scheduler_for_sampling(components), vae=components.vae,
                                  text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
                                  transformer=components.denoiser, is_distilled=self.distilled)

    def uses_cfg(self, settings) -> bool:
        return not self.distilled and settings.sampling.guidance_scale > 1.0


class Flux2Klein4B(Flux2Klein):
    id = "flux2_klein_4b"
    label = "FLUX.2 klein 4B"
    modelspec_architecture = "Flux.2-klein-4b/lora"
    ss_base_model_version = "flux2_klein_4b"
    checkpointing_below_gb = 24.0  # rough (not measured): 8 GB of bf16 weights


class Flux2Klein9B(Flux2Klein):
    id = "flux2_klein_9b"
    label = "FLUX.2 klein 9B"
    modelspec_architecture = "Flux.2-klein-9b/lora"
    ss_base_model_version = "flux2_klein_9b"
    checkpointing_below_gb = 40.0  # rough (not measured): 18 GB of bf16 weights


class Flux2KleinBase4B(Flux2Klein4B):
    id = "flux2_klein_base_4b"
    label = "FLUX.2 klein base 4B (undistilled)"
    short_label = "FLUX.2 klein base 4B"
    ss_base_model_version = "flux2_klein_base_4b"
    distilled = False


class Flux2KleinBase9B(Flux2Klein9B):
    id = "flux2_klein_base_9b"
    label = "FLUX.2 klein base 9B (undistilled)"
    short_label = "FLUX.2 klein base 9B"
    ss_base_model_version = "flux2_klein_base_9b"
    distilled = False


FLUX2_CLASSES = (Flux2Dev, Flux2Klein4B, Flux2Klein9B, Flux2KleinBase4B, Flux2KleinBase9B)

__all__ = ["Flux2Family", "Flux2Dev", "Flux2Klein4B", "Flux2Klein9B", "Flux2KleinBase4B", "Flux2KleinBase9B",
           "FLUX2_CLASSES", "patchify", "latent_ids", "text_ids"]
