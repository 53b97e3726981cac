"""Conversions between diffusers ``ControlNetModel`` keys and the original (lllyasviel / Stability) ControlNet
single-file layout that ComfyUI, Forge and A1111 load.

The original layout is the encoder half of the LDM UNet plus ControlNet's own parts, all under
``control_model.``:

==============================================  =================================================
diffusers                                       original
==============================================  =================================================
``conv_in``, ``time_embedding``, ``down_blocks``  UNet encoder keys (:func:`ldm_keys.unet_module_to_ldm`)
``mid_block``, ``add_embedding`` (SDXL)           ``middle_block.*``, ``label_emb.0.*``
``controlnet_cond_embedding.conv_in``            ``input_hint_block.0``
``controlnet_cond_embedding.blocks.i``           ``input_hint_block.{2 * (i + 1)}`` (SiLU between)
``controlnet_cond_embedding.conv_out``           ``input_hint_block.{2 * (len(blocks) + 1)}``
``controlnet_down_blocks.i``                     ``zero_convs.i.0``
``controlnet_mid_block``                         ``middle_block_out.0``
==============================================  =================================================

diffusers' ``convert_controlnet_checkpoint`` reads this back (it strips ``control_model.``), and ComfyUI's
``comfy/controlnet.py`` ``load_controlnet`` recognises it by ``control_model.zero_convs.0.0.weight``.
The UNet part is driven by the ControlNet's own config (``layers_per_block``, block types), which has the
same fields as the UNet's, so the map works for full-size and tiny models alike.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from architectures.ldm_keys import unet_module_to_ldm

CONTROLNET_PREFIX = "control_model."

_COND_BLOCK_RE = re.compile(r"^controlnet_cond_embedding\.blocks\.(\d+)\.(.*)$")
_ZERO_CONV_RE = re.compile(r"^controlnet_down_blocks\.(\d+)\.(.*)$")


def _cond_embedding_blocks(controlnet_config: Mapping[str, Any]) -> int:
    """Number of convs in ``controlnet_cond_embedding.blocks`` (two per step between the out channels)."""
    return 2 * (len(controlnet_config["conditioning_embedding_out_channels"]) - 1)


def controlnet_key_to_original(key: str, controlnet_config: Mapping[str, Any]) -> str:
    """One diffusers ``ControlNetModel`` key -> its original-layout key (without ``control_model.``)."""
    if key.startswith("controlnet_cond_embedding.conv_in."):
        return "input_hint_block.0." + key[len("controlnet_cond_embedding.conv_in."):]
    if key.startswith("controlnet_cond_embedding.conv_out."):
        index = 2 * (_cond_embedding_blocks(controlnet_config) + 1)
        return f"input_hint_block.{index}." + key[len("controlnet_cond_embedding.conv_out."):]
    block = _COND_BLOCK_RE.match(key)
    if block:
        return f"input_hint_block.{2 * (int(block.group(1)) + 1)}.{block.group(2)}"
    zero_conv = _ZERO_CONV_RE.match(key)
    if zero_conv:
        return f"zero_convs.{zero_conv.group(1)}.0.{zero_conv.group(2)}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key[len("controlnet_mid_block."):]
    return unet_module_to_ldm(key, controlnet_config)


def controlnet_state_dict_to_original(sd: Mapping[str, torch.Tensor],
                                      controlnet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ControlNet state dict -> original single-file state dict (keys under ``control_model.``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new_key = CONTROLNET_PREFIX + controlnet_key_to_original(key, controlnet_config)
        if new_key in out:
            raise ValueError(f"two ControlNet keys map to {new_key!r}; the config does not match the weights")
        out[new_key] = value
    return out


def controlnet_state_dict_from_original(sd: Mapping[str, torch.Tensor],
                                        controlnet_config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Original single-file ControlNet state dict (with or without ``control_model.``) -> diffusers keys.

    The inverse of :func:`controlnet_state_dict_to_original`, built from the forward map of every key the
    config's model has, so a file whose keys do not all match is refused rather than half loaded."""
    from diffusers import ControlNetModel  # local: keeps importing this module cheap

    with torch.device("meta"):
        model = ControlNetModel.from_config(dict(controlnet_config))
    inverse = {controlnet_key_to_original(key, controlnet_config): key for key in model.state_dict()}
    stripped = {k[len(CONTROLNET_PREFIX):] if k.startswith(CONTROLNET_PREFIX) else k: v for k, v in sd.items()}
    unknown = sorted(set(stripped) - set(inverse))
    missing = sorted(set(inverse) - set(stripped))
    if unknown or missing:
        raise ValueError(f"the ControlNet file does not match its config: {len(missing)} key(s) missing "
                         f"(e.g. {missing[:3]}), {len(unknown)} unexpected (e.g. {unknown[:3]})")
    return {inverse[key]: value for key, value in stripped.items()}


__all__ = ["CONTROLNET_PREFIX", "controlnet_key_to_original", "controlnet_state_dict_to_original",
           "controlnet_state_dict_from_original"]
