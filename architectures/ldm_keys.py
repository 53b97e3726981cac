"""Conversions between diffusers module/key names and the original (LDM / Stability) single-file layout.

Everything here is driven by the model's own config (``layers_per_block``, block types, number of VAE
blocks, hidden size), so it works for the full-size models and for the tiny test models alike.

The single-file layout written by :func:`save_single_file` is exactly what diffusers' single-file loader
(``diffusers/loaders/single_file_utils.py``: ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) reads back, and what ComfyUI / A1111 read:

=============  ================================================  ===========================================
part           SD 1.5                                             SDXL
=============  ================================================  ===========================================
UNet           ``model.diffusion_model.*``                        ``model.diffusion_model.*``
VAE            ``first_stage_model.*``                            ``first_stage_model.*``
text enc. 1    ``cond_stage_model.transformer.text_model.*``      ``conditioner.embedders.0.transformer.text_model.*``
text enc. 2    —                                                  ``conditioner.embedders.1.model.*`` (OpenCLIP)
=============  ================================================  ===========================================
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_TE_PREFIX = "cond_stage_model.transformer."
SDXL_TE1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."

#: Text-encoder prefixes of a full checkpoint, per architecture id, in text-encoder order.
TEXT_ENCODER_PREFIXES: dict[str, tuple[str, ...]] = {
    "sd15": (SD15_TE_PREFIX,),
    "sdxl": (SDXL_TE1_PREFIX, SDXL_TE2_PREFIX),
}

# ---------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------

# Top-level modules that exist once.  ``class_embedding`` (SD2-upscaler style "projection") and
# ``add_embedding`` (SDXL "text_time") both live in LDM's ``label_emb.0``.
_UNET_TOP_LEVEL: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# diffusers ResnetBlock2D child -> LDM ResBlock child.  LDM wraps the layers in nn.Sequential, hence the
# indices (in_layers = [GroupNorm, SiLU, Conv], emb_layers = [SiLU, Linear], out_layers = [GN, SiLU, Drop, Conv]).
_UNET_RESNET: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_BLOCK_RE = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _layers_per_block(unet_config: Mapping[str, Any]) -> list[int]:
    lpb = unet_config["layers_per_block"]
    n_blocks = len(unet_config["down_block_types"])
    return [int(lpb)] * n_blocks if isinstance(lpb, int) else [int(x) for x in lpb]


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def _resnet_child(rest: str | None, path: str) -> str | None:
    """Maps the part of a path below a ResnetBlock2D (``conv1.weight`` -> ``in_layers.2.weight``)."""
    if not rest:
        return None
    head, _, tail = rest.partition(".")
    if head not in _UNET_RESNET:
        raise ValueError(f"UNet path {path!r}: resnet child {head!r} has no LDM equivalent")
    return _join(_UNET_RESNET[head], tail)


def unet_module_to_ldm(path: str, unet_config: Mapping[str, Any]) -> str:
    """Maps a diffusers ``UNet2DConditionModel`` module (or parameter) path to its LDM path.

    ``path`` may name a module (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``) or a
    parameter (``….to_q.weight``).  The result has no ``model.diffusion_model.`` prefix.  Raises
    ``ValueError`` for paths that have no counterpart (e.g. ``down_blocks.1`` itself, ``time_proj``).

    Index arithmetic (LDM numbers every resnet/attention pair and every down/upsampler as one
    ``input_blocks`` / ``output_blocks`` entry):

    * ``input_blocks.0`` is ``conv_in``; down block ``i`` then takes ``layers_per_block[i]`` entries plus one
      for its downsampler (the last block has none).
    * up block ``i`` takes ``reversed(layers_per_block)[i] + 1`` entries; its upsampler is appended to the
      last entry, after the resnet (``.1``) or after the resnet and the attention (``.2``).
    """
    for src, dst in _UNET_TOP_LEVEL.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]

    mid = _MID_RE.match(path)
    if mid:
        kind, idx, rest = mid.group(1), int(mid.group(2)), mid.group(3)
        if kind == "attentions":
            if idx != 0:
                raise ValueError(f"UNet path {path!r}: LDM middle block has a single attention")
            return _join("middle_block.1", rest)
        if idx not in (0, 1):
            raise ValueError(f"UNet path {path!r}: LDM middle block has two resnets")
        return _join(f"middle_block.{0 if idx == 0 else 2}", _resnet_child(rest, path))

    blk = _BLOCK_RE.match(path)
    if not blk:
        raise ValueError(f"UNet path {path!r} has no LDM equivalent")
    side, block, kind, idx, rest = blk.group(1), int(blk.group(2)), blk.group(3), int(blk.group(4)), blk.group(5)
    layers = _layers_per_block(unet_config)
    n_blocks = len(layers)
    if block >= n_blocks:
        raise ValueError(f"UNet path {path!r}: the config has only {n_blocks} blocks")

    if side == "down_blocks":
        # +1 for conv_in; every block but the last adds a downsampler entry.
        start = 1 + sum(layers[k] + (1 if k < n_blocks - 1 else 0) for k in range(block))
        if kind == "resnets":
            return _join(f"input_blocks.{start + idx}.0", _resnet_child(rest, path))
        if kind == "attentions":
            return _join(f"input_blocks.{start + idx}.1", rest)
        if kind == "downsamplers" and idx == 0 and rest and rest.split(".")[0] == "conv" and block < n_blocks - 1:
            return _join(f"input_blocks.{start + layers[block]}.0.op", rest.partition(".")[2])
        raise ValueError(f"UNet path {path!r} has no LDM equivalent")

    up_layers = [n + 1 for n in reversed(layers)]
    start = sum(up_layers[:block])
    if kind == "resnets":
        return _join(f"output_blocks.{start + idx}.0", _resnet_child(rest, path))
    if kind == "attentions":
        return _join(f"output_blocks.{start + idx}.1", rest)
    if kind == "upsamplers" and idx == 0 and rest and rest.split(".")[0] == "conv" and block < n_blocks - 1:
        has_attention = "Attn" in unet_config["up_block_types"][block]
        return _join(f"output_blocks.{start + up_layers[block] - 1}.{2 if has_attention else 1}.conv",
                     rest.partition(".")[2])
    raise ValueError(f"UNet path {path!r} has no LDM equivalent")


def unet_state_dict_to_ldm(sd: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet state dict -> LDM UNet state dict (keys without the ``model.diffusion_model.`` prefix).

    Tensor shapes are identical in both layouts (SD1.5's conv proj_in/proj_out are convs in both)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new_key = unet_module_to_ldm(key, unet_config)
        if new_key in out:
            raise ValueError(f"two UNet keys map to {new_key!r}; the config does not match the weights")
        out[new_key] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------

_VAE_TOP_LEVEL: dict[str, str] = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
_VAE_ATTN: dict[str, str] = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_BLOCK_RE = re.compile(
    r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)$")
_VAE_MID_RE = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)$")


def _vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    for src, dst in _VAE_TOP_LEVEL.items():
        if key.startswith(src + "."):
            return dst + key[len(src):]
    mid = _VAE_MID_RE.match(key)
    if mid:
        part, kind, idx, rest = mid.group(1), mid.group(2), int(mid.group(3)), mid.group(4)
        if kind == "resnets":
            return f"{part}.mid.block_{idx + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        for src, dst in _VAE_ATTN.items():
            if rest.startswith(src + "."):
                return f"{part}.mid.attn_1.{dst}{rest[len(src):]}"
        raise ValueError(f"VAE key {key!r} has no LDM equivalent")
    blk = _VAE_BLOCK_RE.match(key)
    if blk:
        part, side, block, kind, idx, rest = (blk.group(1), blk.group(2), int(blk.group(3)), blk.group(4),
                                              int(blk.group(5)), blk.group(6))
        # LDM numbers decoder levels from the lowest resolution up, diffusers in execution order.
        level = block if side == "down_blocks" else num_up_blocks - 1 - block
        name = "down" if side == "down_blocks" else "up"
        if kind == "resnets":
            return f"{part}.{name}.{level}.block.{idx}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return f"{part}.{name}.{level}.{sampler}.{rest}"
    # conv_in, conv_out, quant_conv, post_quant_conv keep their names.
    return key


def vae_state_dict_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> LDM VAE state dict (keys without ``first_stage_model.``).

    The mid-block attention projections are ``nn.Linear`` in diffusers but 1x1 ``nn.Conv2d`` in LDM, so
    their weights get two trailing singleton dims (real SD/SDXL files store them 4-D)."""
    up_ids = {int(m.group(1)) for k in sd if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))}
    num_up_blocks = max(up_ids) + 1 if up_ids else 0
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new_key = _vae_key_to_ldm(key, num_up_blocks)
        if ".mid.attn_1." in new_key and new_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[new_key] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------------------------

def clip_text_state_dict_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPTextModel`` state dict -> keys as stored under ``cond_stage_model.transformer.``.

    transformers >= 5.6 flattened ``CLIPTextModel`` (``encoder.layers.0…`` instead of
    ``text_model.encoder.layers.0…``); the checkpoint format still has the ``text_model.`` level, so it is
    added back whatever the installed transformers produced."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        out[key if key.startswith("text_model.") else "text_model." + key] = value
    # Original checkpoints carry the position ids (a persistent buffer in older transformers); loaders
    # that still expect them then find them, newer ones ignore them.
    pos_key = "text_model.embeddings.position_ids"
    pos_emb = out.get("text_model.embeddings.position_embedding.weight")
    if pos_key not in out and pos_emb is not None:
        out[pos_key] = torch.arange(pos_emb.shape[0], dtype=torch.int64).unsqueeze(0)
    return out


_OPEN_CLIP_LAYER: dict[str, str] = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP: dict[str, str] = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_CLIP_LAYER_RE = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.*)$")


def open_clip_text_state_dict_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``CLIPTextModelWithProjection`` state dict -> OpenCLIP keys as stored under
    ``conditioner.embedders.1.model.`` (SDXL's CLIP-bigG).

    The inverse of diffusers' ``convert_open_clip_checkpoint``: q/k/v are fused into ``attn.in_proj_*``
    (q, k, v order), ``text_projection`` is stored as a bare (hidden, projection) matrix — OpenCLIP computes
    ``x @ text_projection`` where HF's Linear computes ``x @ W.T``."""
    flat = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
            continue
        if key.endswith("position_ids"):
            continue  # a buffer; OpenCLIP has none
        m = _CLIP_LAYER_RE.match(key)
        if not m:
            raise ValueError(f"CLIP-bigG key {key!r} has no OpenCLIP equivalent")
        layer, rest = int(m.group(1)), m.group(2)
        qm = re.match(r"^self_attn\.(q|k|v)_proj\.(weight|bias)$", rest)
        if qm:
            qkv.setdefault((layer, qm.group(2)), {})[qm.group(1)] = value
            continue
        for src, dst in _OPEN_CLIP_LAYER.items():
            if rest.startswith(src + "."):
                out[f"transformer.resblocks.{layer}.{dst}{rest[len(src):]}"] = value
                break
        else:
            raise ValueError(f"CLIP-bigG key {key!r} has no OpenCLIP equivalent")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"CLIP-bigG layer {layer}: incomplete q/k/v {kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


# ---------------------------------------------------------------------------------------------------------
# Whole checkpoint
# ---------------------------------------------------------------------------------------------------------

def _state_dict(module_or_sd: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(module_or_sd, nn.Module):
        return dict(module_or_sd.state_dict())
    return dict(module_or_sd)


def _unet_config(unet: nn.Module | Mapping[str, torch.Tensor],
                 unet_config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if unet_config is not None:
        return unet_config
    config = getattr(unet, "config", None)
    if config is None:
        raise ValueError("pass unet_config when the UNet is given as a state dict")
    return config


def checkpoint_state_dict(components: Mapping[str, Any], arch_id: str,
                          unet_config: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The full original-layout state dict of ``components`` (keys as in :func:`save_single_file`)."""
    if arch_id not in TEXT_ENCODER_PREFIXES:
        raise ValueError(f"unknown architecture {arch_id!r}; expected one of {sorted(TEXT_ENCODER_PREFIXES)}")
    prefixes = TEXT_ENCODER_PREFIXES[arch_id]
    text_encoders = list(components["text_encoders"])
    if len(text_encoders) != len(prefixes):
        raise ValueError(f"{arch_id} needs {len(prefixes)} text encoder(s), got {len(text_encoders)}")

    out: dict[str, torch.Tensor] = {}
    unet = components["unet"]
    for key, value in unet_state_dict_to_ldm(_state_dict(unet), _unet_config(unet, unet_config)).items():
        out[UNET_PREFIX + key] = value
    for key, value in vae_state_dict_to_ldm(_state_dict(components["vae"])).items():
        out[VAE_PREFIX + key] = value
    for prefix, encoder in zip(prefixes, text_encoders, strict=True):
        sd = _state_dict(encoder)
        # SDXL's second encoder is OpenCLIP in the original files; every other one is HF CLIP under
        # ``…transformer.text_model.``.
        if prefix == SDXL_TE2_PREFIX:
            converted = open_clip_text_state_dict_to_ldm(sd)
        else:
            converted = clip_text_state_dict_to_ldm(sd)
        for key, value in converted.items():
            out[prefix + key] = value
    return out


def save_single_file(components: Mapping[str, Any], path: str | Path, arch_id: str,
                     metadata: Mapping[str, str] | None = None,
                     unet_config: Mapping[str, Any] | None = None) -> Path:
    """Writes ``components`` (``unet``, ``vae``, ``text_encoders`` — modules or diffusers-layout state dicts,
    as returned by ``load_sd_components``) as one original-layout ``.safetensors`` checkpoint.

    ``arch_id`` is ``"sd15"`` or ``"sdxl"``.  Tensors keep their dtype.  ``unet_config`` is needed only
    when the UNet is given as a plain state dict."""
    from safetensors.torch import save_file  # local: keeps importing this module cheap

    from core.io import check_finite
    state = checkpoint_state_dict(components, arch_id, unet_config)
    # safetensors refuses views into shared storage and non-contiguous tensors; clone() makes each own its memory.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(dict(metadata) if metadata else {})}
    check_finite(tensors, str(path))
    save_file(tensors, str(path), metadata=meta)
    return path


def lora_unet_name(path: str, unet_config: Mapping[str, Any]) -> str:
    """kohya-style LDM name of a UNet module, e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``."""
    return "lora_unet_" + unet_module_to_ldm(path, unet_config).replace(".", "_")


__all__ = [
    "UNET_PREFIX", "VAE_PREFIX", "SD15_TE_PREFIX", "SDXL_TE1_PREFIX", "SDXL_TE2_PREFIX", "TEXT_ENCODER_PREFIXES",
    "unet_module_to_ldm", "unet_state_dict_to_ldm", "vae_state_dict_to_ldm", "clip_text_state_dict_to_ldm",
    "open_clip_text_state_dict_to_ldm", "checkpoint_state_dict", "save_single_file", "lora_unet_name",
]
