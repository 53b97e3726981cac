"""Key layouts of SD3 / FLUX.1 (architectures/dit_keys.py): config-driven BFL ↔ diffusers conversion, the
original MMDiT layout, and the adapter export (swapped halves, the diffusers/PEFT split of a fused LoRA)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from architectures.dit_keys import (
    ExportSlot,
    export_community,
    export_peft,
    flux_bfl_to_diffusers,
    flux_diffusers_to_bfl,
    flux_lora_slots,
    sd3_diffusers_to_original,
    sd3_lora_slots,
)
from tests.tiny_models_dit import build_models


@pytest.mark.parametrize("arch_id", ["flux1_dev", "flux1_schnell"])
def test_flux_bfl_round_trip_tiny(arch_id):
    tr = build_models(arch_id)["transformer"]
    sd = tr.state_dict()
    bfl = flux_diffusers_to_bfl(sd, tr.config)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.1.linear1.weight" in bfl
    assert ("guidance_in.in_layer.weight" in bfl) == (arch_id == "flux1_dev")
    back = flux_bfl_to_diffusers({"model.diffusion_model." + k: v for k, v in bfl.items()}, tr.config)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_flux_conversion_agrees_with_diffusers_at_full_width():
    """diffusers' own converter only handles width 3072: compare on a full-width layout with 1 double and 1
    single block whose tensors are narrow in their input dimension (the converter only splits rows)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    config = dict(num_attention_heads=24, attention_head_dim=128, num_layers=1, num_single_layers=1,
                  guidance_embeds=True)
    g = torch.Generator().manual_seed(0)
    inner, mlp = 3072, 12288
    shapes = {
        "img_in": inner, "txt_in": inner, "time_in.in_layer": inner, "time_in.out_layer": inner,
        "vector_in.in_layer": inner, "vector_in.out_layer": inner, "guidance_in.in_layer": inner,
        "guidance_in.out_layer": inner, "final_layer.linear": 64, "final_layer.adaLN_modulation.1": 2 * inner,
        "double_blocks.0.img_mod.lin": 6 * inner, "double_blocks.0.txt_mod.lin": 6 * inner,
        "double_blocks.0.img_attn.qkv": 3 * inner, "double_blocks.0.txt_attn.qkv": 3 * inner,
        "double_blocks.0.img_attn.proj": inner, "double_blocks.0.txt_attn.proj": inner,
        "double_blocks.0.img_mlp.0": mlp, "double_blocks.0.img_mlp.2": inner, "double_blocks.0.txt_mlp.0": mlp,
        "double_blocks.0.txt_mlp.2": inner, "single_blocks.0.modulation.lin": 3 * inner,
        "single_blocks.0.linear1": 3 * inner + mlp, "single_blocks.0.linear2": inner,
    }
    bfl = {}
    for name, rows in shapes.items():
        bfl[f"{name}.weight"] = torch.randn(rows, 2, generator=g)
        bfl[f"{name}.bias"] = torch.randn(rows, generator=g)
    for n in ("double_blocks.0.img_attn.norm", "double_blocks.0.txt_attn.norm", "single_blocks.0.norm"):
        bfl[f"{n}.query_norm.scale"] = torch.randn(128, generator=g)
        bfl[f"{n}.key_norm.scale"] = torch.randn(128, generator=g)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = flux_bfl_to_diffusers(bfl, config)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = flux_diffusers_to_bfl(ours, config)
    assert back.keys() == bfl.keys() and all(torch.equal(back[k], bfl[k]) for k in bfl)


def test_flux_conversion_rejects_a_file_of_another_size():
    tr = build_models("flux1_schnell")["transformer"]
    bfl = flux_diffusers_to_bfl(tr.state_dict(), tr.config)
    wider = dict(tr.config, num_attention_heads=4)
    with pytest.raises(ValueError, match="different sizes"):
        flux_bfl_to_diffusers(bfl, wider)
    fewer = dict(tr.config, num_single_layers=1)
    with pytest.raises(ValueError, match="no place for"):
        flux_bfl_to_diffusers(bfl, fewer)


@pytest.mark.parametrize("arch_id", ["sd3", "sd35_medium", "sd35_large"])
def test_sd3_original_layout_round_trips_through_diffusers_converter(arch_id):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    tr = build_models(arch_id)["transformer"]
    sd = tr.state_dict()
    orig = sd3_diffusers_to_original(sd, tr.config)
    assert "joint_blocks.0.x_block.attn.qkv.weight" in orig and "joint_blocks.2.context_block.adaLN_modulation.1.weight" in orig
    assert ("joint_blocks.0.x_block.attn2.qkv.weight" in orig) == (arch_id == "sd35_medium")
    assert ("joint_blocks.0.x_block.attn.ln_q.weight" in orig) == (arch_id != "sd3")
    back = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in orig.items()})
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_lora_slot_names():
    flux = flux_lora_slots(dict(num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1))
    assert flux["transformer_blocks.0.attn.to_k"] == ExportSlot("lora_unet_double_blocks_0_img_attn_qkv", 1, (32, 32, 32),
                                                                 original="double_blocks.0.img_attn.qkv")
    assert flux["transformer_blocks.0.attn.add_v_proj"].stem == "lora_unet_double_blocks_0_txt_attn_qkv"
    assert flux["transformer_blocks.0.attn.to_add_out"].stem == "lora_unet_double_blocks_0_txt_attn_proj"
    assert flux["transformer_blocks.0.ff.net.0.proj"].stem == "lora_unet_double_blocks_0_img_mlp_0"
    assert flux["transformer_blocks.0.ff_context.net.2"].stem == "lora_unet_double_blocks_0_txt_mlp_2"
    assert flux["transformer_blocks.0.norm1.linear"].stem == "lora_unet_double_blocks_0_img_mod_lin"
    assert flux["single_transformer_blocks.0.proj_mlp"] == ExportSlot("lora_unet_single_blocks_0_linear1", 3,
                                                                      (32, 32, 32, 128),
                                                                      original="single_blocks.0.linear1")
    assert flux["single_transformer_blocks.0.proj_out"].stem == "lora_unet_single_blocks_0_linear2"
    assert flux["single_transformer_blocks.0.norm.linear"].stem == "lora_unet_single_blocks_0_modulation_lin"
    sd3 = sd3_lora_slots(dict(num_layers=2, num_attention_heads=2, attention_head_dim=8))
    assert sd3["transformer_blocks.0.attn.to_v"] == ExportSlot("lora_unet_joint_blocks_0_x_block_attn_qkv", 2, (16, 16, 16),
                                                              original="joint_blocks.0.x_block.attn.qkv")
    assert sd3["transformer_blocks.0.attn.add_q_proj"].stem == "lora_unet_joint_blocks_0_context_block_attn_qkv"
    assert sd3["transformer_blocks.0.attn.to_add_out"].stem == "lora_unet_joint_blocks_0_context_block_attn_proj"
    assert sd3["transformer_blocks.0.ff.net.0.proj"].stem == "lora_unet_joint_blocks_0_x_block_mlp_fc1"
    assert sd3["transformer_blocks.1.norm1_context.linear"].swap_halves  # the last block's context adaLN
    assert "transformer_blocks.1.attn.to_add_out" not in sd3  # the last context block has no output projection


def _lora(name, base: nn.Linear, rank: int, alpha: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.randn(rank, base.in_features, generator=g),
            f"{name}.lora_up.weight": torch.randn(base.out_features, rank, generator=g),
            f"{name}.alpha": torch.tensor(alpha)}


def _delta(sd, name):
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else down.shape[0]
    return up @ down * (alpha / down.shape[0])


def test_export_swaps_halves_and_passes_everything_else():
    """Names already are the original's: tensors pass through bit-exactly (any algorithm); a LoRA on a layer stored
    with swapped output halves gets its up rows swapped; another algorithm there is refused."""
    g = torch.Generator().manual_seed(0)
    sd = _lora("lora_unet_single_blocks_0_linear1", nn.Linear(12, 56), 4, 2.0, g)
    sd |= {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.randn(4, 4, generator=g)}
    sd |= _lora("norm", nn.Linear(12, 16), 3, 3.0, g)
    out = export_community(sd, {"norm": "lora_unet_final_layer_adaLN_modulation_1"})
    assert all(torch.equal(out[k], v) for k, v in sd.items() if not k.startswith("norm."))
    swapped = _delta(out, "lora_unet_final_layer_adaLN_modulation_1")
    torch.testing.assert_close(torch.cat(swapped.chunk(2)[::-1]), _delta(sd, "norm"))
    assert not any(k.startswith("norm.") for k in out)
    loha = {"norm.hada_w1_a": torch.zeros(2, 2), "norm.hada_w1_b": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="plain LoRA"):
        export_community(loha, {"norm": "lora_unet_final_layer_adaLN_modulation_1"})


def test_peft_export_folds_alpha():
    g = torch.Generator().manual_seed(1)
    sd = _lora("a", nn.Linear(4, 6), 2, 8.0, g) | _lora("t5", nn.Linear(4, 4), 2, 2.0, g)
    out, skipped = export_peft(sd, {"a": [("transformer.blocks.0.to_q", 0, None)]})
    assert skipped == ["t5"] and set(out) == {"transformer.blocks.0.to_q.lora_A.weight", "transformer.blocks.0.to_q.lora_B.weight"}
    torch.testing.assert_close(out["transformer.blocks.0.to_q.lora_B.weight"] @ out["transformer.blocks.0.to_q.lora_A.weight"],
                               _delta(sd, "a"))


def test_peft_export_splits_a_fused_lora_exactly():
    """A LoRA trained on a fused qkv is written as one LoRA per diffusers layer: the same A, that layer's B rows."""
    g = torch.Generator().manual_seed(2)
    sd = _lora("qkv", nn.Linear(12, 24), 4, 2.0, g)
    parts = [("transformer.b.to_q", 0, 8), ("transformer.b.to_k", 8, 8), ("transformer.b.to_v", 16, 8)]
    out, skipped = export_peft(sd, {"qkv": parts})
    assert not skipped
    full = _delta(sd, "qkv")
    for path, start, rows in parts:
        torch.testing.assert_close(out[f"{path}.lora_B.weight"] @ out[f"{path}.lora_A.weight"], full[start:start + rows])
    a = [out[f"{p}.lora_A.weight"] for p, _, _ in parts]
    assert len({t.data_ptr() for t in a}) == 3   # no shared memory (safetensors refuses it)
