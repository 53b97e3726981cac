"""FLUX.2 key layouts: BFL (``flux2-dev.safetensors``, ``flux-2-klein-4b.safetensors``; what ComfyUI uses) ↔
diffusers ``Flux2Transformer2DModel``, and the adapter export names.

Driven by the model's config (block counts, width), so it serves full-size models and tiny test models alike.
diffusers 0.42.1's own FLUX.2 single-file converter (``convert_flux2_transformer_checkpoint_to_diffusers``) is
size-agnostic too (it splits ``qkv`` with ``torch.chunk``); the loader uses it, this module is for writing BFL
files, validating a file against a config before loading it, and naming adapters.

Correspondence (diffusers → BFL):

* ``x_embedder`` → ``img_in``, ``context_embedder`` → ``txt_in``, ``time_guidance_embed.timestep_embedder.linear_1/2``
  → ``time_in.in_layer/out_layer``, ``…guidance_embedder…`` → ``guidance_in.…`` (dev only);
* the *shared* modulation layers ``double_stream_modulation_img.linear`` / ``…_txt.linear`` /
  ``single_stream_modulation.linear`` → ``….lin`` (FLUX.2 blocks have no per-block modulation);
* ``proj_out`` → ``final_layer.linear``, ``norm_out.linear`` → ``final_layer.adaLN_modulation.1`` (halves swapped);
* double block ``i``: ``attn.to_q/k/v`` → ``double_blocks.i.img_attn.qkv`` (fused), ``attn.add_q/k/v_proj`` →
  ``txt_attn.qkv``, ``attn.to_out.0`` → ``img_attn.proj``, ``attn.to_add_out`` → ``txt_attn.proj``,
  ``ff.linear_in/out`` → ``img_mlp.0/2``, ``ff_context.linear_in/out`` → ``txt_mlp.0/2``, q/k norms →
  ``img_attn.norm.query_norm.scale`` …;
* single block ``i``: ``attn.to_qkv_mlp_proj`` → ``single_blocks.i.linear1`` and ``attn.to_out`` → ``linear2``
  (already fused in diffusers: 1:1), q/k norms → ``norm.query_norm.scale`` / ``norm.key_norm.scale``.

FLUX.2 has no biases in these layers; the layout maps ``.bias`` too where present.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from architectures.dit_keys import ExportSlot, _Layout, _slots_from_layout, _to_diffusers, _to_original, \
    double_block_attention, strip_bfl_prefix

#: the shared modulation layers (diffusers module → BFL module); diffusers' kohya FLUX.2 LoRA converter drops them
FLUX2_MODULATION = {"double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
                    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
                    "single_stream_modulation.linear": "single_stream_modulation.lin"}


def flux2_inner_dim(config: Mapping[str, Any]) -> int:
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


def flux2_layout(config: Mapping[str, Any]) -> _Layout:
    inner = flux2_inner_dim(config)
    modules = {
        "x_embedder": "img_in", "context_embedder": "txt_in",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
        **FLUX2_MODULATION,
    }
    if config.get("guidance_embeds", True):
        modules["time_guidance_embed.guidance_embedder.linear_1"] = "guidance_in.in_layer"
        modules["time_guidance_embed.guidance_embedder.linear_2"] = "guidance_in.out_layer"
    fused: dict[str, list[tuple[str, int]]] = {}
    params: dict[str, str] = {}
    for i in range(int(config["num_layers"])):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        modules.update({d + "attn.to_out.0": b + "img_attn.proj", d + "attn.to_add_out": b + "txt_attn.proj",
                        d + "ff.linear_in": b + "img_mlp.0", d + "ff.linear_out": b + "img_mlp.2",
                        d + "ff_context.linear_in": b + "txt_mlp.0", d + "ff_context.linear_out": b + "txt_mlp.2"})
        block_fused, block_params = double_block_attention(d, b, inner)
        fused.update(block_fused)
        params.update(block_params)
    for i in range(int(config["num_single_layers"])):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        modules.update({d + "attn.to_qkv_mlp_proj": b + "linear1", d + "attn.to_out": b + "linear2"})
        params.update({d + "attn.norm_q.weight": b + "norm.query_norm.scale",
                       d + "attn.norm_k.weight": b + "norm.key_norm.scale"})
    return _Layout(modules, fused, params, frozenset({"final_layer.adaLN_modulation.1"}))


def flux2_bfl_to_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """BFL-layout FLUX.2 transformer state dict (optionally ``model.diffusion_model.``-prefixed) → diffusers keys."""
    return _to_diffusers(strip_bfl_prefix(sd), flux2_layout(config), "FLUX.2 transformer")


def flux2_diffusers_to_bfl(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``Flux2Transformer2DModel`` state dict → BFL layout (no prefix)."""
    return _to_original(sd, flux2_layout(config), "FLUX.2 transformer")


def flux2_bfl_keys(config: Mapping[str, Any]) -> set[str]:
    """The tensor names a bias-free BFL FLUX.2 file of this config holds."""
    layout = flux2_layout(config)
    return ({f"{m}.weight" for m in layout.modules.values()} | {f"{m}.weight" for m in layout.fused}
            | set(layout.params.values()))


def flux2_lora_slots(config: Mapping[str, Any]) -> dict[str, ExportSlot]:
    """diffusers FLUX.2 module path → BFL kohya stem, e.g. ``transformer_blocks.0.attn.to_k`` →
    ``lora_unet_double_blocks_0_img_attn_qkv`` part 1 of 3; ``single_transformer_blocks.0.attn.to_qkv_mlp_proj``
    → ``lora_unet_single_blocks_0_linear1`` (1:1)."""
    return _slots_from_layout(flux2_layout(config))


__all__ = ["flux2_layout", "flux2_bfl_to_diffusers", "flux2_diffusers_to_bfl", "flux2_bfl_keys", "flux2_lora_slots",
           "flux2_inner_dim", "FLUX2_MODULATION"]
