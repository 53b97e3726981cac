"""FLUX.3 key layouts: BFL (what ComfyUI-style tools and BFL's single files use) ↔ diffusers
``Flux3Transformer2DModel``, and the adapter export names.

Driven by the model's config (block counts, flow map), so it serves full-size and tiny models alike.  The names
are the inverse of diffusers 0.42.1's own ``convert_flux3_transformer_checkpoint_to_diffusers`` (the loader uses
that converter; this module writes BFL files, validates a file against its config before loading, and names
adapters).  Unlike FLUX.1 / FLUX.2, BFL's FLUX.3 keeps q, k and v as separate layers, so every diffusers module
maps 1:1 and adapters of any algorithm keep their tensors unchanged.

Correspondence (diffusers → BFL):

* ``x_embedders.image`` / ``.image_cond`` → ``emb_in.image`` / ``.image_cond``, ``context_embedder`` → ``txt_in``,
  ``timestep_embedder.linear_1/2`` → ``time_in.in_layer/out_layer``, ``target_timestep_embedder.*`` →
  ``ref_time_in.*`` (step-distilled flow-map models only);
* the shared modulations ``early_stream_modulations.{image,image_cond,txt}.linear`` and
  ``single_stream_modulations.*.linear`` → ``….lin``;
* ``proj_out`` → ``final_layer.image.linear``, ``norm_out.linear`` → ``final_layer.image.adaLN_modulation.1``
  (halves swapped);
* per-mode blocks ``mode_blocks.{image,image_cond}.i`` → ``content_mode_blocks.{mode}.i``, ``txt_mode_blocks.i``
  (same name) and joint blocks ``single_transformer_blocks.i`` → ``single_blocks.i``, inside each:
  ``attn.to_q/k/v`` → ``q_proj/k_proj/v_proj``, ``attn.to_out.0`` → ``attn_out``, ``ff.linear_in/out`` →
  ``mlp_in/mlp_out``, ``attn.norm_q/k.weight`` → ``norm.query_norm/key_norm.scale``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from architectures.dit_keys import ExportSlot, _Layout, _slots_from_layout, _split_key, _to_diffusers, _to_original, \
    strip_bfl_prefix

MODES = ("image", "image_cond")
_BLOCK = {"attn.to_q": "q_proj", "attn.to_k": "k_proj", "attn.to_v": "v_proj", "attn.to_out.0": "attn_out",
          "ff.linear_in": "mlp_in", "ff.linear_out": "mlp_out"}
_BLOCK_PARAMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
#: BFL keys diffusers' converter drops (training-only REPA heads): allowed in a file, never loaded
IGNORED_BFL_PREFIXES = ("repa_projectors.",)


def flux3_block_prefixes(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, BFL prefix) of every transformer block, in execution order."""
    n, m = int(config["num_layers"]), int(config["num_single_layers"])
    out = [(f"txt_mode_blocks.{i}.", f"txt_mode_blocks.{i}.") for i in range(n)]
    out += [(f"mode_blocks.{mode}.{i}.", f"content_mode_blocks.{mode}.{i}.") for mode in MODES for i in range(n)]
    return out + [(f"single_transformer_blocks.{i}.", f"single_blocks.{i}.") for i in range(m)]


def flux3_layout(config: Mapping[str, Any]) -> _Layout:
    modules = {"context_embedder": "txt_in", "timestep_embedder.linear_1": "time_in.in_layer",
               "timestep_embedder.linear_2": "time_in.out_layer", "proj_out": "final_layer.image.linear",
               "norm_out.linear": "final_layer.image.adaLN_modulation.1"}
    if config.get("flow_map", False):
        modules.update({"target_timestep_embedder.linear_1": "ref_time_in.in_layer",
                        "target_timestep_embedder.linear_2": "ref_time_in.out_layer"})
    for mode in MODES:
        modules[f"x_embedders.{mode}"] = f"emb_in.{mode}"
    for stream in ("early_stream_modulations", "single_stream_modulations"):
        for mode in (*MODES, "txt"):
            modules[f"{stream}.{mode}.linear"] = f"{stream}.{mode}.lin"
    params: dict[str, str] = {}
    for d, b in flux3_block_prefixes(config):
        modules.update({d + dif: b + orig for dif, orig in _BLOCK.items()})
        params.update({d + dif: b + orig for dif, orig in _BLOCK_PARAMS.items()})
    return _Layout(modules, {}, params, frozenset({"final_layer.image.adaLN_modulation.1"}))


def flux3_bfl_to_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """BFL-layout FLUX.3 transformer state dict (optionally ``model.diffusion_model.``-prefixed) → diffusers keys."""
    sd = {k: v for k, v in strip_bfl_prefix(sd).items() if not k.startswith(IGNORED_BFL_PREFIXES)}
    return _to_diffusers(sd, flux3_layout(config), "FLUX.3 transformer")


def flux3_diffusers_to_bfl(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``Flux3Transformer2DModel`` state dict → BFL layout (no prefix)."""
    return _to_original(sd, flux3_layout(config), "FLUX.3 transformer")


def flux3_bfl_keys(config: Mapping[str, Any]) -> set[str]:
    """The tensor names a BFL FLUX.3 file of this config holds (its layers have no biases)."""
    layout = flux3_layout(config)
    return {f"{m}.weight" for m in layout.modules.values()} | set(layout.params.values())


def flux3_lora_slots(config: Mapping[str, Any]) -> dict[str, ExportSlot]:
    """diffusers FLUX.3 module path → BFL kohya stem, e.g. ``mode_blocks.image.0.attn.to_k`` →
    ``lora_unet_content_mode_blocks_image_0_k_proj`` (always 1:1)."""
    return _slots_from_layout(flux3_layout(config))


#: LoKr tensors PEFT's ``LoKrConfig`` layers hold (no Tucker core: every FLUX.3 layer is a Linear)
LOKR_TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def export_peft_lokr(state_dict: Mapping[str, torch.Tensor], paths: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """A LoKr network's state dict → PEFT keys ``{paths[name]}.lokr_w1`` … that diffusers' ``load_lora_adapter``
    loads through ``LoKrConfig``.  PEFT files carry no alpha and diffusers builds the config with scale 1, so
    LyCORIS' ``alpha / rank`` (rank: the low-rank factor's, none when both factors are full) is folded into
    the ``w1`` side, as diffusers' own ``_bake_lokr_alpha_`` does for the files it converts."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name, suffix = _split_key(key)
        by_module.setdefault(name, {})[suffix] = value
    out: dict[str, torch.Tensor] = {}
    for name, tensors in by_module.items():
        if name not in paths:
            continue
        extra = sorted(set(tensors) - set(LOKR_TENSORS) - {"alpha"})
        if extra:
            raise ValueError(f"{name}: the diffusers/PEFT LoKr layout has no place for {', '.join(extra)}")
        low = tensors.get("lokr_w2_b", tensors.get("lokr_w1_b"))
        scale = float(tensors["alpha"]) / low.shape[0] if low is not None and "alpha" in tensors else 1.0
        first = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
        for suffix, t in tensors.items():
            if suffix != "alpha":
                baked = suffix == first and scale != 1.0
                out[f"{paths[name]}.{suffix}"] = (t.float() * scale).to(t.dtype) if baked else t
    return out


__all__ = ["flux3_layout", "flux3_bfl_to_diffusers", "flux3_diffusers_to_bfl", "flux3_bfl_keys", "flux3_lora_slots",
           "flux3_block_prefixes", "export_peft_lokr", "MODES", "IGNORED_BFL_PREFIXES"]
