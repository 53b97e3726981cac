"""Loading SD1.5 / SDXL from diffusers folders and original-layout single files (architectures.sd_loading),
and the diffusers <-> LDM key conversions (architectures.ldm_keys), on tiny models and on the shipped
full-size configs (meta tensors: no weights needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from architectures.base import ModelLoadError
from architectures.ldm_keys import (
    checkpoint_state_dict,
    lora_unet_name,
    save_single_file,
    unet_module_to_ldm,
    unet_state_dict_to_ldm,
)
from architectures.sd_loading import default_config_dir, load_sd_components
from tests.tiny_models import build_tiny_sd15, build_tiny_sdxl, tiny_config_dir

BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl}
CONFIGS = Path(__file__).resolve().parent.parent / "architectures" / "configs"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for arch, build in BUILDERS.items():
        out[arch] = {"folder": build(root / f"{arch}_diffusers", "diffusers"),
                     "file": build(root / f"{arch}_single", "single_file"),
                     "config": tiny_config_dir(arch, root / f"{arch}_single")}
    return out


def load_file_layout(tiny, arch: str) -> dict:
    return load_sd_components(arch, tiny[arch]["file"], tiny[arch]["config"], torch.float32)


# -- both layouts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_both_layouts_load(tiny, arch):
    n_te = 2 if arch == "sdxl" else 1
    for parts in (load_sd_components(arch, tiny[arch]["folder"], None, torch.float32), load_file_layout(tiny, arch)):
        assert set(parts) == {"unet", "vae", "text_encoders", "tokenizers", "scheduler_config"}
        assert type(parts["unet"]).__name__ == "UNet2DConditionModel"
        assert type(parts["vae"]).__name__ == "AutoencoderKL"
        assert [type(t).__name__ for t in parts["text_encoders"]] == \
            ["CLIPTextModel", "CLIPTextModelWithProjection"][:n_te]
        assert len(parts["tokenizers"]) == n_te
        assert parts["tokenizers"][0]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        if arch == "sdxl":
            assert parts["tokenizers"][1].pad_token == "!"
        expected = "EulerDiscreteScheduler" if arch == "sdxl" else "PNDMScheduler"
        assert parts["scheduler_config"]["_class_name"] == expected
        assert all(p.dtype == torch.float32 and not p.is_meta for p in parts["unet"].parameters())


def test_dtype_is_applied(tiny):
    parts = load_sd_components("sd15", tiny["sd15"]["file"], tiny["sd15"]["config"], torch.bfloat16)
    for model in (parts["unet"], parts["vae"], *parts["text_encoders"]):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _outputs(parts: dict, arch: str) -> dict[str, torch.Tensor]:
    """Deterministic forward passes of every component."""
    gen = torch.Generator().manual_seed(0)
    unet, vae = parts["unet"], parts["vae"]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        ids = [tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length,
                   return_tensors="pt").input_ids for tok in parts["tokenizers"]]
        hidden = []
        for i, (te, tokens) in enumerate(zip(parts["text_encoders"], ids, strict=True)):
            res = te(tokens, output_hidden_states=True)
            out[f"te{i}_last"] = res.last_hidden_state
            out[f"te{i}_penultimate"] = res.hidden_states[-2]
            out[f"te{i}_pooled"] = res.text_embeds if hasattr(res, "text_embeds") else res.pooler_output
            hidden.append(res.hidden_states[-2] if arch == "sdxl" else res.last_hidden_state)
        cond = torch.cat(hidden, dim=-1)
        latents = torch.randn(1, 4, 16, 16, generator=gen)
        extra = {}
        if arch == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": out["te1_pooled"],
                                          "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
        out["unet"] = unet(latents, torch.tensor([500]), cond, **extra).sample
        pixels = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
        out["vae_enc"] = vae.encode(pixels).latent_dist.mean
        out["vae_dec"] = vae.decode(latents).sample
    return out


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_folder_and_single_file_give_identical_outputs(tiny, arch):
    a = _outputs(load_sd_components(arch, tiny[arch]["folder"], None, torch.float32), arch)
    b = _outputs(load_file_layout(tiny, arch), arch)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].std() > 1e-3, f"{name} is degenerate; the comparison would prove nothing"
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=f"{name} differs")


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_uses_original_key_names(tiny, arch):
    sd = load_file(str(tiny[arch]["file"]))
    keys = set(sd)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.out.2.weight" in keys
    # LDM stores the VAE's mid-block attention projections as 1x1 convs
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in keys
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in keys
    if arch == "sd15":
        assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
        assert not any(k.startswith("conditioner.") for k in keys)
    else:
        assert "model.diffusion_model.label_emb.0.0.weight" in keys
        assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
        p = "conditioner.embedders.1.model."
        assert sd[p + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
        assert sd[p + "text_projection"].shape == (64, 64)
        assert {p + "positional_embedding", p + "token_embedding.weight", p + "ln_final.weight"} <= keys
        assert not any(k.startswith(p + "text_model") for k in keys)
    # No flattened transformers-5 names leak into the file
    assert not any(".transformer.encoder." in k or ".transformer.embeddings." in k for k in keys)


def test_diffusers_single_file_loader_reads_our_file(tiny):
    """diffusers' own reader (config=<local folder>) gets the same SDXL weights as our loader."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(str(tiny["sdxl"]["file"]), config=str(tiny["sdxl"]["config"]),
                                                      local_files_only=True)
    ours = load_file_layout(tiny, "sdxl")
    pairs = [(pipe.unet, ours["unet"]), (pipe.vae, ours["vae"]), (pipe.text_encoder, ours["text_encoders"][0]),
             (pipe.text_encoder_2, ours["text_encoders"][1])]
    for theirs, mine in pairs:
        a, b = theirs.state_dict(), mine.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_pickled_checkpoint_loads_with_weights_only(tiny, tmp_path):
    sd = load_file(str(tiny["sd15"]["file"]))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, path)
    parts = load_sd_components("sd15", path, tiny["sd15"]["config"], torch.float32)
    ref = load_file_layout(tiny, "sd15")
    got, want = parts["unet"].state_dict(), ref["unet"].state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


class NotATensor:
    """Stands in for arbitrary pickled objects, which weights_only loading must refuse."""


def test_pickled_checkpoint_with_objects_is_refused(tiny, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny["sd15"]["file"])), "callback": NotATensor()}, path)
    with pytest.raises(ModelLoadError, match="Python objects"):
        load_sd_components("sd15", path, tiny["sd15"]["config"], torch.float32)


# -- wrong family, bad paths -------------------------------------------------------------------------------

def test_sdxl_folder_chosen_as_sd15(tiny):
    with pytest.raises(ModelLoadError) as err:
        load_sd_components("sd15", tiny["sdxl"]["folder"], None, torch.float32)
    msg = str(err.value)
    assert "You chose SD 1.5" in msg and "SDXL model folder" in msg and "text_encoder_2" in msg
    assert "Choose the SDXL architecture" in msg


def test_sd15_folder_chosen_as_sdxl(tiny):
    with pytest.raises(ModelLoadError, match=r"You chose SDXL, but .* looks like an SD 1\.x model folder"):
        load_sd_components("sdxl", tiny["sd15"]["folder"], None, torch.float32)


def test_sdxl_file_chosen_as_sd15(tiny):
    # default (full-size) configs: the family check must come before any conversion or shape check
    with pytest.raises(ModelLoadError) as err:
        load_sd_components("sd15", tiny["sdxl"]["file"], None, torch.float32)
    msg = str(err.value)
    assert "You chose SD 1.5" in msg and "SDXL checkpoint" in msg and "conditioner.embedders.1.model." in msg


def test_sd15_file_chosen_as_sdxl(tiny):
    with pytest.raises(ModelLoadError) as err:
        load_sd_components("sdxl", tiny["sd15"]["file"], tiny["sdxl"]["config"], torch.float32)
    msg = str(err.value)
    assert "You chose SDXL" in msg and "SD 1.x checkpoint" in msg and "cond_stage_model.transformer." in msg


def test_config_folder_of_the_other_family(tiny):
    with pytest.raises(ModelLoadError, match=r"config folder .* looks like an SD 1\.x"):
        load_sd_components("sdxl", tiny["sdxl"]["file"], tiny["sd15"]["config"], torch.float32)


def test_weights_that_do_not_fit_the_configs(tiny):
    # the tiny file with the shipped full-size configs
    with pytest.raises(ModelLoadError, match=r"does not match the config folder .*shape mismatch"):
        load_sd_components("sd15", tiny["sd15"]["file"], None, torch.float32)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_sd_components("sd15", tmp_path / "nope.safetensors", None, torch.float32)


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00this is not a safetensors file" * 50)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors"):
        load_sd_components("sd15", path, None, torch.float32)


def test_truncated_file(tiny, tmp_path):
    data = tiny["sd15"]["file"].read_bytes()
    path = tmp_path / "partial.safetensors"
    path.write_bytes(data[: len(data) // 2])  # the header survives, the tensors do not
    with pytest.raises(ModelLoadError, match="partial.safetensors"):
        load_sd_components("sd15", path, tiny["sd15"]["config"], torch.float32)


def test_unsupported_extension(tiny, tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(tiny["sd15"]["file"].read_bytes())
    with pytest.raises(ModelLoadError, match="unsupported file type '.bin'"):
        load_sd_components("sd15", path, None, torch.float32)


def test_folder_that_is_not_diffusers(tiny, tmp_path):
    (tmp_path / "ckpt.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"not a diffusers model folder.*choose that file"):
        load_sd_components("sd15", tmp_path, None, torch.float32)


def test_incomplete_checkpoint(tiny, tmp_path):
    sd = {k: v for k, v in load_file(str(tiny["sd15"]["file"])).items() if not k.startswith("first_stage_model.")}
    path = tmp_path / "no_vae.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelLoadError, match=r"has no VAE"):
        load_sd_components("sd15", path, tiny["sd15"]["config"], torch.float32)


def test_lora_file_is_not_a_base_model(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(path))
    with pytest.raises(ModelLoadError, match="LoRA"):
        load_sd_components("sd15", path, None, torch.float32)


# -- key mapping on the full-size configs ------------------------------------------------------------------

def _full_config(arch: str) -> dict:
    return json.loads((CONFIGS / arch / "unet" / "config.json").read_text())


SDXL_NAMES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.0.transformer_blocks.9.ff.net.2": "input_blocks.7.1.transformer_blocks.9.ff.net.2",
    "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.downsamplers.0.conv.weight": "input_blocks.6.0.op.weight",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
    "mid_block.resnets.0.norm1": "middle_block.0.in_layers.0",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.attentions.0.transformer_blocks.9.attn1.to_out.0":
        "output_blocks.0.1.transformer_blocks.9.attn1.to_out.0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.2.conv_shortcut": "output_blocks.8.0.skip_connection",
    "up_blocks.2.resnets.2.time_emb_proj": "output_blocks.8.0.emb_layers.1",
    "up_blocks.2.resnets.0.norm2.bias": "output_blocks.6.0.out_layers.0.bias",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out.bias": "out.2.bias",
}

SD15_NAMES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v": "input_blocks.2.1.transformer_blocks.0.attn2.to_v",
    "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
    "down_blocks.3.resnets.1.conv2": "input_blocks.11.0.out_layers.3",
    "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
    "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj":
        "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.3.resnets.0.conv_shortcut": "output_blocks.9.0.skip_connection",
}


@pytest.mark.parametrize("arch, names", [("sdxl", SDXL_NAMES), ("sd15", SD15_NAMES)])
def test_unet_module_to_ldm_known_names(arch, names):
    config = _full_config(arch)
    for diffusers_path, ldm_path in names.items():
        assert unet_module_to_ldm(diffusers_path, config) == ldm_path, diffusers_path
    if arch == "sdxl":
        assert lora_unet_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", config) == \
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def test_unet_module_to_ldm_rejects_paths_without_counterpart():
    config = _full_config("sdxl")
    # containers, parameter-free modules, samplers the last blocks do not have, unknown children
    for path in ("down_blocks.1", "time_proj", "up_blocks.2.upsamplers.0.conv", "down_blocks.2.downsamplers.0.conv",
                 "down_blocks.0.resnets.0.foo", "down_blocks.3.resnets.0.conv1"):
        with pytest.raises(ValueError):
            unet_module_to_ldm(path, config)


def _meta_models(arch: str):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = default_config_dir(arch)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder), subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder), subfolder="vae"))
        tes = [CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))]
        if arch == "sdxl":
            tes.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(folder / "text_encoder_2"))))
    return unet, vae, tes


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_full_size_conversion_is_the_inverse_of_diffusers(arch):
    """Full-size models on the meta device: our LDM layout, read back by diffusers' converters, gives the
    very same tensors (UNet) / names and shapes (VAE, text encoders)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    unet, vae, tes = _meta_models(arch)
    usd, vsd, tsds = unet.state_dict(), vae.state_dict(), [t.state_dict() for t in tes]
    ldm = checkpoint_state_dict({"unet": usd, "vae": vsd, "text_encoders": tsds}, arch, unet_config=unet.config)

    unet_ldm = unet_state_dict_to_ldm(usd, unet.config)
    assert len(unet_ldm) == len(usd)  # injective
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert back.keys() == usd.keys() and all(back[k] is usd[k] for k in usd)

    vback = convert_ldm_vae_checkpoint(ldm, vae.config)
    assert vback.keys() == vsd.keys() and all(vback[k].shape == vsd[k].shape for k in vsd)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm
    assert "first_stage_model.encoder.down.3.downsample.conv.weight" not in ldm

    te1 = convert_ldm_clip_checkpoint(ldm)
    expected = {"text_model." + k for k in tsds[0]} | {"text_model.embeddings.position_ids"}
    assert set(te1) == expected
    if arch == "sd15":
        assert ldm["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"].shape == (768, 3072)
    else:
        assert ldm["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"].shape == \
            (49408, 768)
        p = "conditioner.embedders.1.model."
        assert ldm[p + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
        assert ldm[p + "text_projection"].shape == (1280, 1280)
        assert ldm[p + "positional_embedding"].shape == (77, 1280)
        te2 = convert_open_clip_checkpoint(tes[1], ldm, prefix=p)
        assert te2.keys() == tsds[1].keys() and all(te2[k].shape == tsds[1][k].shape for k in te2)


def test_save_single_file_round_trip(tiny, tmp_path):
    """save_single_file on loaded components writes what the loader reads back, bit for bit."""
    parts = load_sd_components("sdxl", tiny["sdxl"]["folder"], None, torch.float32)
    path = save_single_file(parts, tmp_path / "again.safetensors", "sdxl")
    again = load_sd_components("sdxl", path, tiny["sdxl"]["config"], torch.float32)
    for a, b in zip([parts["unet"], parts["vae"], *parts["text_encoders"]],
                    [again["unet"], again["vae"], *again["text_encoders"]], strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
