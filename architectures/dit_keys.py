"""Key layouts of the transformer (DiT) families: SD3 / SD3.5 (MMDiT) and FLUX.1.

Everything is driven by the model's own config (block counts, widths), so it works for the full-size models
and for tiny test models alike — unlike diffusers 0.42.1's FLUX single-file converter, which hard-codes
the width 3072.

* FLUX.1 transformer: BFL layout (``double_blocks.N.img_attn.qkv`` …, what ``flux1-dev.safetensors`` and
  ComfyUI use) ↔ diffusers ``FluxTransformer2DModel`` (:func:`flux_bfl_to_diffusers`,
  :func:`flux_diffusers_to_bfl`).
* SD3 transformer: diffusers → original MMDiT layout (:func:`sd3_diffusers_to_original`, the inverse of
  diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``; used to write original-layout files).
* Adapter names: the community (kohya / BFL / original MMDiT) name of each trainable diffusers module
  (:func:`flux_lora_slots`, :func:`sd3_lora_slots`) and the export of separately trained q/k/v (and FLUX's
  single-block MLP input) LoRAs as one fused module (:func:`export_community`), plus the diffusers/PEFT
  layout (:func:`export_peft`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) ↔ (scale, shift) along dim 0: original AdaLayerNormContinuous order vs diffusers'."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# ---------------------------------------------------------------------------------------------------------
# FLUX.1: BFL ↔ diffusers
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """One transformer's correspondence: 1:1 modules (weight + bias), fused modules (rows concatenated in
    order) and 1:1 parameters (norm scales); ``swapped`` original modules store (shift, scale) halves."""
    modules: dict[str, str]                     # diffusers module -> original module
    fused: dict[str, list[tuple[str, int]]]     # original module -> [(diffusers module, rows)]
    params: dict[str, str]                      # diffusers parameter key -> original parameter key
    swapped: frozenset[str] = frozenset()       # original modules whose output halves are swapped


def _flux_dims(config: Mapping[str, Any]) -> tuple[int, int]:
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    return inner, int(inner * 4.0)  # FluxSingleTransformerBlock's mlp_ratio is fixed at 4


def double_block_attention(d: str, b: str, inner: int) -> tuple[dict[str, list[tuple[str, int]]], dict[str, str]]:
    """The joint attention of a FLUX double block, diffusers path prefix ``d`` → BFL prefix ``b`` (FLUX.1 and
    FLUX.2 alike): (each stream's q, k, v fused as ``img_attn.qkv`` / ``txt_attn.qkv``, the q/k norm scales)."""
    fused = {b + "img_attn.qkv": [(d + f"attn.to_{x}", inner) for x in "qkv"],
             b + "txt_attn.qkv": [(d + f"attn.add_{x}_proj", inner) for x in "qkv"]}
    params = {d + "attn.norm_q.weight": b + "img_attn.norm.query_norm.scale",
              d + "attn.norm_k.weight": b + "img_attn.norm.key_norm.scale",
              d + "attn.norm_added_q.weight": b + "txt_attn.norm.query_norm.scale",
              d + "attn.norm_added_k.weight": b + "txt_attn.norm.key_norm.scale"}
    return fused, params


def flux_layout(config: Mapping[str, Any]) -> _Layout:
    inner, mlp = _flux_dims(config)
    modules = {
        "x_embedder": "img_in", "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
    }
    if config.get("guidance_embeds"):
        modules["time_text_embed.guidance_embedder.linear_1"] = "guidance_in.in_layer"
        modules["time_text_embed.guidance_embedder.linear_2"] = "guidance_in.out_layer"
    fused: dict[str, list[tuple[str, int]]] = {}
    params: dict[str, str] = {}
    for i in range(int(config["num_layers"])):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        modules.update({d + "norm1.linear": b + "img_mod.lin", d + "norm1_context.linear": b + "txt_mod.lin",
                        d + "attn.to_out.0": b + "img_attn.proj", d + "attn.to_add_out": b + "txt_attn.proj",
                        d + "ff.net.0.proj": b + "img_mlp.0", d + "ff.net.2": b + "img_mlp.2",
                        d + "ff_context.net.0.proj": b + "txt_mlp.0", d + "ff_context.net.2": b + "txt_mlp.2"})
        block_fused, block_params = double_block_attention(d, b, inner)
        fused.update(block_fused)
        params.update(block_params)
    for i in range(int(config["num_single_layers"])):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        modules.update({d + "norm.linear": b + "modulation.lin", d + "proj_out": b + "linear2"})
        fused[b + "linear1"] = [(d + "attn.to_q", inner), (d + "attn.to_k", inner), (d + "attn.to_v", inner),
                                (d + "proj_mlp", mlp)]
        params.update({d + "attn.norm_q.weight": b + "norm.query_norm.scale",
                       d + "attn.norm_k.weight": b + "norm.key_norm.scale"})
    return _Layout(modules, fused, params, frozenset({"final_layer.adaLN_modulation.1"}))


def _to_original(sd: Mapping[str, torch.Tensor], layout: _Layout, what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for dif, orig in layout.modules.items():
        for suffix in ("weight", "bias"):
            key = f"{dif}.{suffix}"
            if key in sd:
                t = sd[key]
                out[f"{orig}.{suffix}"] = _swap_halves(t) if orig in layout.swapped else t
                used.add(key)
    for orig, parts in layout.fused.items():
        for suffix in ("weight", "bias"):
            keys = [f"{dif}.{suffix}" for dif, _ in parts]
            if all(k in sd for k in keys):
                out[f"{orig}.{suffix}"] = torch.cat([sd[k] for k in keys], dim=0)
                used.update(keys)
    for dif, orig in layout.params.items():
        if dif in sd:
            out[orig] = sd[dif]
            used.add(dif)
    left = sorted(k for k in sd if k not in used)
    if left:
        raise ValueError(f"{what}: {len(left)} diffusers key(s) have no original-layout name, e.g. {left[:3]}")
    return out


def _to_diffusers(sd: Mapping[str, torch.Tensor], layout: _Layout, what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for dif, orig in layout.modules.items():
        for suffix in ("weight", "bias"):
            key = f"{orig}.{suffix}"
            if key in sd:
                t = sd[key]
                out[f"{dif}.{suffix}"] = _swap_halves(t) if orig in layout.swapped else t
                used.add(key)
    for orig, parts in layout.fused.items():
        for suffix in ("weight", "bias"):
            key = f"{orig}.{suffix}"
            if key not in sd:
                continue
            sizes = [rows for _, rows in parts]
            t = sd[key]
            if t.shape[0] != sum(sizes):
                raise ValueError(f"{what}: {key} has {t.shape[0]} rows; the config needs {sum(sizes)} "
                                 f"({' + '.join(map(str, sizes))}). The file and the config are of different sizes.")
            for (dif, _), piece in zip(parts, torch.split(t, sizes, dim=0)):
                out[f"{dif}.{suffix}"] = piece.contiguous()
            used.add(key)
    for dif, orig in layout.params.items():
        if orig in sd:
            out[dif] = sd[orig]
            used.add(orig)
    left = sorted(k for k in sd if k not in used)
    if left:
        raise ValueError(f"{what}: {len(left)} key(s) the config has no place for, e.g. {left[:3]} (the file has "
                         "more blocks or other parts than the config describes)")
    return out


def strip_bfl_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for p in BFL_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def flux_bfl_to_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """BFL-layout FLUX.1 transformer state dict (optionally ``model.diffusion_model.``-prefixed) → diffusers
    ``FluxTransformer2DModel`` keys, for the size ``config`` describes."""
    return _to_diffusers(strip_bfl_prefix(sd), flux_layout(config), "FLUX transformer")


def flux_diffusers_to_bfl(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``FluxTransformer2DModel`` state dict → BFL layout (no prefix), as in ``flux1-dev.safetensors``."""
    return _to_original(sd, flux_layout(config), "FLUX transformer")


# ---------------------------------------------------------------------------------------------------------
# SD3 / SD3.5 MMDiT: diffusers ↔ original
# ---------------------------------------------------------------------------------------------------------

def sd3_layout(config: Mapping[str, Any]) -> _Layout:
    n = int(config["num_layers"])
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    dual = set(config.get("dual_attention_layers") or ())
    modules = {
        "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
        "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
    }
    swapped = {"final_layer.adaLN_modulation.1"}
    fused: dict[str, list[tuple[str, int]]] = {}
    params = {"pos_embed.pos_embed": "pos_embed"}
    for i in range(n):
        d, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == n - 1  # the last block's context stream only feeds the attention (context_pre_only)
        modules.update({d + "norm1.linear": x + "adaLN_modulation.1", d + "attn.to_out.0": x + "attn.proj",
                        d + "ff.net.0.proj": x + "mlp.fc1", d + "ff.net.2": x + "mlp.fc2",
                        d + "norm1_context.linear": c + "adaLN_modulation.1"})
        fused[x + "attn.qkv"] = [(d + f"attn.to_{q}", inner) for q in "qkv"]
        fused[c + "attn.qkv"] = [(d + f"attn.add_{q}_proj", inner) for q in "qkv"]
        if last:
            swapped.add(c + "adaLN_modulation.1")
        else:
            modules.update({d + "attn.to_add_out": c + "attn.proj", d + "ff_context.net.0.proj": c + "mlp.fc1",
                            d + "ff_context.net.2": c + "mlp.fc2"})
        if config.get("qk_norm"):
            params.update({d + "attn.norm_q.weight": x + "attn.ln_q.weight", d + "attn.norm_k.weight": x + "attn.ln_k.weight",
                           d + "attn.norm_added_q.weight": c + "attn.ln_q.weight",
                           d + "attn.norm_added_k.weight": c + "attn.ln_k.weight"})
        if i in dual:
            fused[x + "attn2.qkv"] = [(d + f"attn2.to_{q}", inner) for q in "qkv"]
            modules[d + "attn2.to_out.0"] = x + "attn2.proj"
            if config.get("qk_norm"):
                params.update({d + "attn2.norm_q.weight": x + "attn2.ln_q.weight",
                               d + "attn2.norm_k.weight": x + "attn2.ln_k.weight"})
    return _Layout(modules, fused, params, frozenset(swapped))


def sd3_diffusers_to_original(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``SD3Transformer2DModel`` state dict → original MMDiT keys (without ``model.diffusion_model.``)."""
    return _to_original(sd, sd3_layout(config), "SD3 transformer")


def sd3_original_to_diffusers(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Original MMDiT keys (without ``model.diffusion_model.``) → diffusers ``SD3Transformer2DModel`` keys."""
    return _to_diffusers(sd, sd3_layout(config), "SD3 transformer")


# ---------------------------------------------------------------------------------------------------------
# Adapter export: community names, fused q/k/v
# ---------------------------------------------------------------------------------------------------------

LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass(frozen=True)
class ExportSlot:
    """Where a trained diffusers module's adapter goes in the community file: the key stem, this module's
    position among the fused module's parts, the output rows of every part, and whether the original
    layout stores the two output halves swapped."""
    stem: str
    index: int = 0
    sizes: tuple[int, ...] = ()
    swap_halves: bool = False
    original: str = ""       # the original module's dotted path (``double_blocks.0.img_attn.qkv``)

    @property
    def fused(self) -> bool:
        return len(self.sizes) > 1


def _kohya(prefix: str, module: str) -> str:
    return f"{prefix}_{module.replace('.', '_')}"


def _slots_from_layout(layout: _Layout, prefix: str = "lora_unet") -> dict[str, ExportSlot]:
    """diffusers module path → ExportSlot (kohya stem of the original module)."""
    out = {dif: ExportSlot(_kohya(prefix, orig), 0, (), orig in layout.swapped, orig)
           for dif, orig in layout.modules.items()}
    for orig, parts in layout.fused.items():
        sizes = tuple(rows for _, rows in parts)
        for j, (dif, _) in enumerate(parts):
            out[dif] = ExportSlot(_kohya(prefix, orig), j, sizes, False, orig)
    return out


def flux_lora_slots(config: Mapping[str, Any]) -> dict[str, ExportSlot]:
    """diffusers FLUX module path → BFL kohya stem, e.g. ``transformer_blocks.0.attn.to_k`` →
    ``lora_unet_double_blocks_0_img_attn_qkv`` part 1 of 3; ``single_transformer_blocks.0.proj_mlp`` →
    ``lora_unet_single_blocks_0_linear1`` part 3 of 4."""
    return _slots_from_layout(flux_layout(config))


def sd3_lora_slots(config: Mapping[str, Any]) -> dict[str, ExportSlot]:
    """diffusers SD3 module path → original MMDiT kohya stem, e.g. ``transformer_blocks.0.attn.add_v_proj`` →
    ``lora_unet_joint_blocks_0_context_block_attn_qkv`` part 2 of 3."""
    return _slots_from_layout(sd3_layout(config))


def _split_key(key: str) -> tuple[str, str]:
    name, _, suffix = key.partition(".")
    return name, suffix


def _lora_parts(name: str, tensors: dict[str, torch.Tensor], why: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    extra = sorted(set(tensors) - set(LORA_SUFFIXES))
    if extra or "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
        raise ValueError(f"{name}: {why} needs plain LoRA tensors (lora_down/lora_up/alpha); this adapter has "
                         f"{', '.join(sorted(tensors))}. Train this family with the LoRA algorithm.")
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    rank = down.shape[0]
    alpha = float(tensors["alpha"]) if "alpha" in tensors and float(tensors["alpha"]) != 0 else float(rank)
    return down, up, alpha


def export_community(state_dict: Mapping[str, torch.Tensor], swapped: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The network's state dict (``{name}.{suffix}``) → the community file.  The adapters already carry the original
    layout's names (fused layers are trained whole); only a layer the original stores with its output halves
    swapped (``swapped``: trained name → original stem; the final AdaLN modulation) is rewritten, as a LoRA with
    its ``up`` rows swapped — other algorithms cannot be permuted so and raise ``ValueError``."""
    out: dict[str, torch.Tensor] = {}
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name, suffix = _split_key(key)
        if name in swapped:
            by_module.setdefault(name, {})[suffix] = value
        else:
            out[key] = value
    for name, tensors in by_module.items():
        _lora_parts(name, tensors, "a layer stored with swapped halves")
        stem = swapped[name]
        out.update({f"{stem}.{s}": t for s, t in tensors.items()})
        out[f"{stem}.lora_up.weight"] = _swap_halves(tensors["lora_up.weight"])
    return out


def import_community(state_dict: Mapping[str, torch.Tensor], swapped: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`export_community`: a community file's tensors → the trained names (``swapped``: trained
    name → original stem, as there), un-swapping the ``up`` rows of a LoRA on a layer stored with swapped halves."""
    trained = {stem: name for name, stem in swapped.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        stem, suffix = _split_key(key)
        if stem not in trained:
            out[key] = value
            continue
        if suffix not in LORA_SUFFIXES:
            raise ValueError(f"{stem}: a layer stored with swapped halves needs plain LoRA tensors "
                             f"(lora_down/lora_up/alpha), not {suffix}")
        out[f"{trained[stem]}.{suffix}"] = _swap_halves(value) if suffix == "lora_up.weight" else value
    return out


def export_peft(state_dict: Mapping[str, torch.Tensor], parts: Mapping[str, list[tuple[str, int, int | None]]]
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The network's LoRA state dict → diffusers/PEFT keys ``{path}.lora_A.weight`` / ``.lora_B.weight`` with
    ``alpha / rank`` folded into ``lora_A`` (PEFT files carry no alpha).  ``parts`` maps each adapter name to the
    diffusers layers it covers, ``(path, first output row, rows or None for all)``: a LoRA on a fused layer is
    written exactly as one LoRA per part (the same A, that part's rows of B).  Returns (tensors, names left out
    because ``parts`` has no entry for them)."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        name, suffix = _split_key(key)
        by_module.setdefault(name, {})[suffix] = value
    out: dict[str, torch.Tensor] = {}
    skipped = []
    for name, tensors in by_module.items():
        where = parts.get(name)
        if where is None:
            skipped.append(name)
            continue
        down, up, alpha = _lora_parts(name, tensors, "the diffusers/PEFT layout")
        scale = alpha / down.shape[0]
        a = down if scale == 1.0 else (down.float() * scale).to(down.dtype)
        for i, (path, start, rows) in enumerate(where):
            # each key its own tensor: safetensors refuses tensors that share memory
            out[f"{path}.lora_A.weight"] = a if i == 0 else a.clone()
            out[f"{path}.lora_B.weight"] = up if rows is None else up[start:start + rows].contiguous()
    return out, skipped


def is_plain_lora(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether every tensor is LoRA's (down, up, alpha): what the diffusers/PEFT LoRA layout can hold."""
    return all(_split_key(k)[1] in LORA_SUFFIXES for k in state_dict)


__all__ = ["flux_layout", "sd3_layout", "flux_bfl_to_diffusers", "flux_diffusers_to_bfl", "sd3_diffusers_to_original", "sd3_original_to_diffusers",
           "strip_bfl_prefix", "ExportSlot", "flux_lora_slots", "sd3_lora_slots", "export_community", "import_community",
           "export_peft",
           "is_plain_lora", "LORA_SUFFIXES"]
