"""Offline loading of SD3 / SD3.5 / FLUX.1 (architectures/dit_loading.py): both layouts give the same weights,
wrong files fail with messages that say what was chosen and what was found, shipped configs are full size."""
from __future__ import annotations

import shutil

import pytest
import torch

import architectures
from architectures import ModelLoadError
from tests.tiny_models_dit import FLUX_IDS, SD3_IDS, build_tiny_dit, load_kwargs

ALL = SD3_IDS + FLUX_IDS
SINGLE = {a: ("single_file" if a in SD3_IDS else "bfl") for a in ALL}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {a: {"diffusers": build_tiny_dit(a, root / a / "diffusers", "diffusers"),
                "single": build_tiny_dit(a, root / a / "single", SINGLE[a])} for a in ALL} | {"root": root}


def _state(m):
    return m.state_dict()


@pytest.mark.parametrize("arch_id", ALL)
def test_both_layouts_load_the_same_weights(tiny, arch_id):
    arch = architectures.get(arch_id)
    d = tiny[arch_id]["diffusers"]
    s = tiny[arch_id]["single"]
    a = arch.load(d["model"], None, torch.float32)
    b = arch.load(s["model"], s["config_dir"], torch.float32, **load_kwargs(s))
    pairs = [(a.denoiser, b.denoiser), (a.vae, b.vae), *zip(a.text_encoders, b.text_encoders, strict=True)]
    for x, y in pairs:
        sx, sy = _state(x), _state(y)
        assert sx.keys() == sy.keys(), type(x).__name__
        assert all(torch.equal(sx[k], sy[k]) for k in sx), type(x).__name__
    assert [type(t).__name__ for t in a.tokenizers] == [type(t).__name__ for t in b.tokenizers]
    assert type(a.tokenizers[-1]).__name__ == "T5Tokenizer"
    assert a.vae.config.latent_channels == 16 and a.vae.config.shift_factor


def test_load_in_bf16_and_sd3_without_t5(tiny):
    arch = architectures.get("sd3")
    s = tiny["sd3"]["single"]
    c = arch.load(s["model"], s["config_dir"], torch.bfloat16, use_t5=False)
    assert len(c.text_encoders) == 2 and len(c.tokenizers) == 2
    assert next(c.denoiser.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("arch_id,params", [("sd3", 2.03e9), ("sd35_medium", 2.24e9), ("sd35_large", 8.06e9),
                                            ("flux1_dev", 11.90e9), ("flux1_schnell", 11.89e9)])
def test_shipped_configs_are_the_full_size_models(arch_id, params):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel

    from architectures.dit_loading import default_config_dir, describe_dit_folder
    folder = default_config_dir(arch_id)
    cls = SD3Transformer2DModel if arch_id in SD3_IDS else FluxTransformer2DModel
    config = cls.load_config(str(folder), subfolder="transformer")
    if "pos_embed_max_size" in config:  # a buffer (not a parameter) that takes seconds to compute at full size
        config["pos_embed_max_size"] = 8
    with init_empty_weights():
        tr = cls.from_config(config)
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder), subfolder="vae"))
    assert sum(p.numel() for p in tr.parameters()) == pytest.approx(params, rel=0.005)
    assert vae.config.latent_channels == 16
    assert describe_dit_folder(folder)[0] == arch_id


# -- clear errors ---------------------------------------------------------------------------------------------

def test_wrong_family_and_variant_are_named(tiny):
    with pytest.raises(ModelLoadError, match=r"You chose SD3 Medium.*SD3\.5 Large.*Choose the SD3\.5 Large"):
        architectures.get("sd3").load(tiny["sd35_large"]["diffusers"]["model"], None, torch.float32)
    with pytest.raises(ModelLoadError, match=r"SD3\.5 Medium checkpoint \(joint_blocks with x_block\.attn2"):
        s = tiny["sd35_medium"]["single"]
        architectures.get("sd35_large").load(s["model"], s["config_dir"], torch.float32)
    with pytest.raises(ModelLoadError, match=r"FLUX\.1 dev.*FLUX\.1 schnell transformer"):
        architectures.get("flux1_dev").load(tiny["flux1_schnell"]["diffusers"]["model"], None, torch.float32)
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.1 schnell.*SD3 Medium checkpoint"):
        s = tiny["sd3"]["single"]
        architectures.get("flux1_schnell").load(s["model"], None, torch.float32)
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.1 dev.*t5xxl\.safetensors looks like a T5 text-encoder file"):
        s = tiny["flux1_dev"]["single"]
        architectures.get("flux1_dev").load(s["t5xxl"], s["config_dir"], torch.float32, **load_kwargs(s))


def test_single_files_need_their_configs_and_parts(tiny, tmp_path):
    s = tiny["flux1_dev"]["single"]
    # the shipped full-size config does not fit a tiny file: the message names the tensor and both shapes
    with pytest.raises(ModelLoadError, match=r"does not match the config folder .*flux1_dev.*96 rows; the config needs 9216"):
        architectures.get("flux1_dev").load(s["model"], None, torch.float32, **load_kwargs(s))
    with pytest.raises(ModelLoadError, match=r"model\.ae_path"):
        architectures.get("flux1_dev").load(s["model"], s["config_dir"], torch.float32,
                                            clip_l_path=s["clip_l"], t5xxl_path=s["t5xxl"])
    with pytest.raises(ModelLoadError, match=r"model\.clip_l_path: .*t5xxl\.safetensors should be the CLIP-L"):
        architectures.get("flux1_dev").load(s["model"], s["config_dir"], torch.float32,
                                            **(load_kwargs(s) | {"clip_l_path": s["t5xxl"]}))
    # an SD3 file without T5 loads only when T5 is left out
    no_t5 = build_tiny_dit("sd3", tmp_path / "no_t5", "single_file", include_t5=False)
    with pytest.raises(ModelLoadError, match=r"no T5-XXL.*model\.use_t5"):
        architectures.get("sd3").load(no_t5["model"], no_t5["config_dir"], torch.float32)
    c = architectures.get("sd3").load(no_t5["model"], no_t5["config_dir"], torch.float32, use_t5=False)
    assert len(c.text_encoders) == 2


def test_missing_t5_tokenizer_names_the_places(tiny, tmp_path):
    d = tmp_path / "flux"
    shutil.copytree(tiny["flux1_schnell"]["diffusers"]["model"], d)
    shutil.rmtree(d / "tokenizer_2")
    with pytest.raises(ModelLoadError, match=r"T5 tokenizer.*not found.*tokenizer\.json or spiece\.model.*tokenizer_2"):
        architectures.get("flux1_schnell").load(d, None, torch.float32)
    s = tiny["flux1_dev"]["single"]
    moved = tmp_path / "t5only"
    moved.mkdir()
    shutil.copy(s["t5xxl"], moved / "t5xxl.safetensors")
    with pytest.raises(ModelLoadError, match=r"t5only/t5_tokenizer"):
        architectures.get("flux1_dev").load(s["model"], s["config_dir"], torch.float32,
                                            **(load_kwargs(s) | {"t5xxl_path": moved / "t5xxl.safetensors"}))


def test_not_a_model_folder(tmp_path, tiny):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        architectures.get("sd35_large").load(tmp_path / "empty", None, torch.float32)
    with pytest.raises(ModelLoadError, match="does not exist"):
        architectures.get("sd35_large").load(tmp_path / "nope", None, torch.float32)
