"""FLUX.3 klein (step-distilled) and klein base (undistilled): a rectified-flow transformer on the 2×2-patchified,
batch-norm-normalised latents of FLUX.2's 32-channel VAE, conditioned on eight stacked Qwen3-VL hidden states.

* **Variants** (the user's choice decides; a mismatching file is refused, see :mod:`architectures.flux3_loading`):
  klein is a *flow map* (``flow_map``: a second timestep embedder takes the timestep each step jumps to; sampled in
  16 steps without CFG), klein base is not (50 steps with CFG).  Training the flow map passes the sample's own
  timestep as the jump target: the flow map from t to t is the instantaneous velocity, which is what the
  flow-matching target ε − x₀ regresses.  klein base is the usual training target.
* **Transformer** (``Flux3Transformer2DModel``): per-mode blocks (text, image, reference image: each attends within
  its own tokens) then joint single blocks; every block is q / k / v / out + a fused SwiGLU MLP, modulation is
  shared per mode (``early_stream_modulations`` / ``single_stream_modulations``).  Image position ids are (0, row,
  column, 0) scaled by 0.5 on the row / column axes, text ids (0, 0, 0, index), as the modular pipeline's.
* **Text** (as ``Flux3TextEncoderStep``): the Qwen chat template (user turn + generation prompt), right-padded to a
  multiple of 80 tokens, position ids with the padding at 1, hidden states (4, 8, …, 32) stacked per token; the
  transformer attends to the padding, so the window is part of the recipe.  The trainer caches one fixed-length
  tensor per caption (:attr:`Flux3Family.max_sequence_length`) plus the caption's window; ``predict`` cuts a batch
  to its widest window.  Qwen3-VL is causal, so the cut rows equal what the pipeline computes for that window.
* **Adapters**: presets over the text and image mode blocks and the single blocks (reference-image blocks never run
  in text-to-image training, so none gets an adapter): ``attn`` (q, k, v, out), ``attn_mlp`` and ``full-lin`` (+ the
  MLP; the blocks hold nothing else).  ``network.flux_blocks`` "double" selects the per-mode blocks, "single" the
  joint ones.  Shared modulations, embedders and the final layer can be added with ``network.include``.
* **Files**: BFL names with ``lora_unet_`` (``lora_unet_content_mode_blocks_image_0_q_proj``,
  ``lora_unet_txt_mode_blocks_0_mlp_in``, ``lora_unet_single_blocks_0_attn_out`` …: BFL keeps q, k, v separate, so
  every algorithm's tensors are written unchanged) and a ``.diffusers`` file in PEFT layout
  (``transformer.mode_blocks.image.0.attn.to_q.lora_A.weight`` / ``….lokr_w1``, alpha folded in): diffusers 0.42.1's
  ``Flux3LoraLoaderMixin`` converts only ``diffusion_model.`` keys and rejects ``.alpha``.  Its
  ``load_lora_weights`` takes the LoRA file; it rejects keys without "lora", so the LoKr file loads through the
  transformer's ``load_lora_adapter(…, prefix="transformer")`` (PEFT ``LoKrConfig``).  Metadata:
  ``modelspec.architecture`` ``Flux.3-klein/lora`` (following FLUX.2's naming; no tool defines a FLUX.3 value yet),
  ``ss_base_model_version`` ``flux3_klein`` / ``flux3_klein_base`` (this program's naming).
* **Previews**: diffusers' FLUX.3 modular pipeline (``Flux3AutoBlocks`` / ``Flux3DistilledAutoBlocks`` without their
  prompt-upsampler, text-encoder and reference-image steps) given :meth:`Flux3Family.encode_text`'s embeddings.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import torch

from architectures.base import AdapterTarget, Architecture, Components
from architectures.dit_common import FlowMatchingFamily, flux_block_filter
from architectures.flux2 import Flux2Family, latent_ids, text_ids
from architectures.flux3_keys import export_peft_lokr, flux3_bfl_to_diffusers, flux3_diffusers_to_bfl, flux3_lora_slots

log = logging.getLogger(__name__)

_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
_MLP = ("ff.linear_in", "ff.linear_out")
#: the blocks text-to-image training runs (``mode_blocks.image_cond`` only sees reference images)
_TRAINED_LISTS = ("txt_mode_blocks", "mode_blocks.image", "single_transformer_blocks")
#: what diffusers' Flux3 loader (through PEFT) and the BFL file both take exactly
ALGORITHMS = ("lora", "locon", "lokr")


def image_ids(height: int, width: int, rope_scale: float, device=None) -> torch.Tensor:
    """(H·W, 4) position ids of the image tokens: (0, row, column, 0) with the row / column axes scaled by the
    model's image RoPE scale (``_prepare_image_ids`` of the modular pipeline)."""
    ids = latent_ids(height, width, device).float()
    ids[:, 1:3] *= rope_scale
    return ids


def _no_progress_bars(block) -> None:
    """Silence every bar in a modular block tree (the denoising loop sits a few levels down)."""
    if hasattr(block, "set_progress_bar_config"):
        block.set_progress_bar_config(disable=True)
    for sub in getattr(block, "sub_blocks", {}).values():
        _no_progress_bars(sub)


class _ModularCall:
    """A FLUX.3 modular pipeline behind the call ``Architecture.render_each`` makes of a diffusers pipeline.  With a
    guider (klein base), CFG runs exactly when negative embeddings are passed (``Flux2Family.sample`` passes them
    when :meth:`Flux3Family.uses_cfg`)."""

    def __init__(self, pipe, guider=None) -> None:
        self.pipe, self.guider = pipe, guider

    def set_progress_bar_config(self, **kwargs) -> None:
        """The bars are off from :meth:`Flux3Family.build_pipeline` on (the pipeline keeps a private copy of its
        blocks, where the denoising loop's bar lives)."""

    def __call__(self, guidance_scale: float = 1.0, **kwargs):
        if self.guider is not None:
            self.guider.guidance_scale = guidance_scale
            if "negative_prompt_embeds" in kwargs:
                self.guider.enable()
            else:
                self.guider.disable()
        return SimpleNamespace(images=self.pipe(**kwargs, output="images"))


class Flux3Family(Flux2Family):
    """FLUX.2's latents, loading options, objective and memory probe; FLUX.3's transformer, text and files."""

    traits = frozenset({"flow_matching", "components_folder", "double_single_blocks"})
    quantize_keep = ("timestep_embedder.*", "target_timestep_embedder.*", "x_embedders.*", "context_embedder",
                     "norm_out.*", "proj_out")
    modelspec_architecture = "Flux.3-klein/lora"
    modelspec_implementation = "https://github.com/black-forest-labs"
    compile_blocks = ("Flux3ModeTransformerBlock", "Flux3SingleTransformerBlock")
    block_patterns = ((r"^txt_mode_blocks\.(\d+)\.", "txt_{0}"), (r"^mode_blocks\.image\.(\d+)\.", "img_{0}"),
                      (r"^single_transformer_blocks\.(\d+)\.", "single_{0}"))
    # what block swapping and the memory estimate see (top-level lists only: the image mode blocks stay resident)
    block_lists = ("txt_mode_blocks", "single_transformer_blocks")
    preset_modules = {
        "attn": dict.fromkeys(_TRAINED_LISTS, _ATTN),
        "attn_mlp": dict.fromkeys(_TRAINED_LISTS, _ATTN + _MLP),
        "full-lin": dict.fromkeys(_TRAINED_LISTS, _ATTN + _MLP),  # the blocks hold no other linear
    }
    slot_table = staticmethod(flux3_lora_slots)
    to_original_layout = staticmethod(flux3_diffusers_to_bfl)
    from_original_layout = staticmethod(flux3_bfl_to_diffusers)
    hidden_layers = (4, 8, 12, 16, 20, 24, 28, 32)  # the modular pipeline's text_encoder_out_layers
    #: the text window is rounded up to this many tokens (``Flux3TextEncoderStep.pad_multiple``)
    pad_multiple = 80
    #: cached text length per caption (the pipeline allows 8192; longer captions are cut here)
    max_sequence_length = 640
    image_rope_scale = 0.5  # Flux3PrepareLatentsStep's
    checkpointing_below_gb = 32.0  # rough (not measured): 11 GB of bf16 weights

    # -- loading ---------------------------------------------------------------------------------------
    def load_parts(self, model_path: Path, config_dir: Path | None, dtype: torch.dtype, components_path: Path | None,
                   text_encoders: bool, denoiser: bool) -> dict:
        from architectures.flux3_loading import load_flux3_components
        return load_flux3_components(self.id, model_path, config_dir, dtype, components_path, self.hidden_layers,
                                     text_encoders, denoiser)

    def check_settings(self, settings) -> list[str]:
        # FLUX.2's checks name its own loader and its fused q/k/v; FLUX.3 keeps them apart
        problems = Architecture.check_settings(self, settings)
        n = settings.network
        if n.train_text_encoder:
            problems.append(f"network.train_text_encoder: {self.label} trains the transformer only (diffusers' Flux3 "
                            "loader takes transformer adapters only; a full fine-tune saves the transformer alone). "
                            "Turn off 'Train text encoder(s)'.")
        if n.algorithm == "full_finetune":
            return problems
        if n.algorithm not in ALGORITHMS:
            problems.append(f"network.algorithm: {self.label} adapters are saved for ComfyUI (BFL names) and for "
                            f"diffusers' Flux3 loader, which loads LoRA and LoKr only (through PEFT); {n.algorithm} "
                            "would not load there. Choose LoRA, LoCon or LoKr.")
        if n.dora:
            problems.append(f"network.dora: diffusers' Flux3 loader drops dora_scale, so a DoRA file would act "
                            f"differently there than it trained. Turn DoRA off for {self.label}.")
        return problems

    # -- adapters --------------------------------------------------------------------------------------
    def block_filter(self, components: Components, path: str) -> bool:
        return flux_block_filter(components, path, double=("txt_mode_blocks.", "mode_blocks."))

    def adapter_targets(self, components: Components, target: str, text_encoder: bool) -> list[AdapterTarget]:
        if target == "full-lin":
            log.info("%s: FLUX.3 blocks hold no modulation of their own, so 'full-lin' adapts the same layers as "
                     "'attn_mlp'. Add the shared modulations with network.include '*stream_modulations*'.", self.label)
        return FlowMatchingFamily.adapter_targets(self, components, target, text_encoder)

    def peft_parts(self, components: Components) -> dict[str, list[tuple[str, int, int | None]]]:
        """diffusers' Flux3 loader takes only ``diffusion_model.`` keys without alpha: a side file in PEFT layout
        (FLUX.3 keeps q, k, v apart, so every layer is 1:1)."""
        return {name: [(f"transformer.{path}", 0, None) for path, _, _ in where]
                for name, where in self.transformer_parts(components).items()}

    def export_adapter(self, components: Components, state_dict: dict[str, torch.Tensor]
                       ) -> dict[str, dict[str, torch.Tensor]]:
        files = FlowMatchingFamily.export_adapter(self, components, state_dict)
        if any(".lokr_" in k for k in state_dict):
            paths = {name: where[0][0] for name, where in self.peft_parts(components).items()}
            files[".diffusers"] = export_peft_lokr(state_dict, paths)
        return files

    # -- text ------------------------------------------------------------------------------------------
    def tokenize(self, components: Components, captions: list[str]) -> list[torch.Tensor]:
        """[ids, mask, window]: the chat template as ``Flux3TextEncoderStep`` applies it, padded to the cached
        length; ``window`` is the length the pipeline would pad this caption to."""
        proc = components.tokenizers[0]
        tok = getattr(proc, "tokenizer", proc)
        length = self._length(components)
        ids, masks, windows = [], [], []
        for caption in captions:
            text = proc.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                            add_generation_prompt=True)
            enc = tok(text, return_tensors="pt", padding="max_length", padding_side="right", truncation=True,
                      max_length=length)
            ids.append(enc["input_ids"])
            masks.append(enc["attention_mask"])
            windows.append(min(math.ceil(int(enc["attention_mask"].sum()) / self.pad_multiple) * self.pad_multiple,
                               length))
        return [torch.cat(ids), torch.cat(masks), torch.tensor(windows)]

    def text_encoder_inputs(self, tokens: list[torch.Tensor], device) -> dict[str, torch.Tensor]:
        # FLUX.3 was trained with the padding's position ids at 1 (transformers 4.57); later versions give 0
        inputs = super().text_encoder_inputs(tokens, device)
        mask = inputs["attention_mask"]
        inputs["position_ids"] = torch.arange(mask.shape[1], device=device)[None].masked_fill(mask == 0, 1)
        return inputs

    host_conditioning = ("text_window",)  # the slice length of :meth:`windowed`, an int on the host

    def encode_text(self, components: Components, tokens: list[torch.Tensor], clip_skip: int) -> dict:
        """``{"prompt_embeds": (B, L, 8·hidden), "text_window": (B,) in host memory}`` (see the module
        docstring)."""
        out = super().encode_text(components, tokens, clip_skip)
        out["text_window"] = tokens[2]
        return out

    @staticmethod
    def windowed(cond: dict) -> torch.Tensor:
        """The batch's prompt embeddings cut to its widest caption window."""
        text = cond["prompt_embeds"]
        return text[:, :int(cond["text_window"].max())] if "text_window" in cond else text

    def conditioning_rows(self, components, cond, start, stop) -> dict:
        # cut to the whole batch's window first: a share's own widest caption may be narrower
        return {"prompt_embeds": self.windowed(cond)[start:stop]}

    # -- objective -------------------------------------------------------------------------------------
    def predict(self, components, noisy, timesteps, cond, batch) -> torch.Tensor:
        tr = components.denoiser
        b, c, h, w = noisy.shape
        text = self.windowed(cond)
        tokens = noisy.reshape(b, c, h * w).permute(0, 2, 1)
        dev, length = noisy.device, text.shape[1]
        out = tr(hidden_states=tokens, encoder_hidden_states=text, timestep=timesteps,
                 img_ids=self.on_device("img_ids", (h, w), dev, None,
                                        lambda: image_ids(h, w, self.image_rope_scale, dev)),
                 txt_ids=self.on_device("txt_ids", (length,), dev, None, lambda: text_ids(length, dev)),
                 target_timestep=timesteps if tr.config.flow_map else None, return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)

    # -- previews --------------------------------------------------------------------------------------
    def preview_embeddings(self, components: Components, prompts: list[str], clip_skip: int) -> dict:
        return {"prompt_embeds": self.windowed(super().preview_embeddings(components, prompts, clip_skip))}

    def build_pipeline(self, components: Components) -> _ModularCall:
        from diffusers.modular_pipelines.flux3 import Flux3AutoBlocks, Flux3DistilledAutoBlocks
        from diffusers.utils import logging as dlogging
        blocks = (Flux3DistilledAutoBlocks if self.distilled else Flux3AutoBlocks)()
        for step in ("prompt_upsampler", "text_encoder", "vae_encoder"):  # the embeddings come from encode_text
            blocks.sub_blocks.pop(step)
        _no_progress_bars(blocks)
        parts = {"transformer": components.denoiser, "vae": components.vae,
                 "scheduler": self.scheduler_for_sampling(components)}
        if not self.distilled:
            from diffusers.guiders import ClassifierFreeGuidance
            parts["guider"] = ClassifierFreeGuidance()
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # "guiders are experimental", "not created using ComponentSpec"
        try:
            pipe = blocks.init_pipeline()
            pipe.update_components(**parts)
        finally:
            dlogging.set_verbosity(level)
        return _ModularCall(pipe, parts.get("guider"))

    def uses_cfg(self, settings) -> bool:
        return not self.distilled and settings.sampling.guidance_scale > 1.0


class Flux3Klein(Flux3Family):
    id = "flux3_klein"
    label = "FLUX.3 klein"
    short_label = "FLUX.3 klein"
    ss_base_model_version = "flux3_klein"
    distilled = True


class Flux3KleinBase(Flux3Family):
    id = "flux3_klein_base"
    label = "FLUX.3 klein base (undistilled)"
    short_label = "FLUX.3 klein base"
    ss_base_model_version = "flux3_klein_base"
    distilled = False


FLUX3_CLASSES = (Flux3Klein, Flux3KleinBase)

__all__ = ["Flux3Family", "Flux3Klein", "Flux3KleinBase", "FLUX3_CLASSES", "image_ids", "ALGORITHMS"]
