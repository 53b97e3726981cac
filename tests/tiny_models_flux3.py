"""Tiny, deterministic FLUX.3 models (klein, klein base) for tests, in real on-disk layouts.

The real classes with tiny sizes: ``Flux3Transformer2DModel`` (2 per-mode / 2 single blocks, width 32; klein with
``flow_map``), FLUX.2's ``AutoencoderKLFlux2`` (as in :mod:`tests.tiny_models_flux2`: 64 px images give 16×16
patchified latents of 32 channels) and ``Qwen3VLForConditionalGeneration`` (32 text layers so that hidden states
4, 8, …, 32 exist, hidden size 32: joint text width 256; a one-block vision tower).  The tokenizer is a tiny
word-level vocabulary with Qwen's special tokens and a Qwen3-VL-style chat template, saved as the ``tokenizer/``
folder (a bare tokenizer: the Qwen3-VL processor's video part needs torchvision, which the project does not
install).

Layouts (``layout`` argument of :func:`build_tiny_flux3`), as :mod:`tests.tiny_models_flux2`:

* ``"diffusers"``: a diffusers folder with weights, tokenizer and scheduler; returns ``{"model": folder}``.
* ``"bfl"``: ``folder/flux3-tiny.safetensors`` (BFL transformer keys), ``folder/components/`` (``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``, no transformer) and the config folder
  ``folder/tiny_<id>_config`` (configs only); returns ``{"model", "config_dir", "components"}``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.tiny_models_dit import _quiet
from tests.tiny_models_flux2 import (VAE, _perturb, _vocab, load_kwargs, settings_paths, write_layout,
                                     write_tensors)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "architectures" / "configs"

FLUX3_IDS = ("flux3_klein", "flux3_klein_base")
SEEDS = {"flux3_klein": 601, "flux3_klein_base": 602}
TE_HIDDEN = 32
LATENT_CHANNELS = VAE["latent_channels"]
TRANSFORMER: dict[str, Any] = dict(in_channels=4 * LATENT_CHANNELS, cond_in_channels=4 * LATENT_CHANNELS, num_layers=2,
                                   num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                   joint_attention_dim=8 * TE_HIDDEN, timestep_channels=32, axes_dims_rope=(4, 4, 4, 4))

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
#: Qwen3-VL's template for text-only turns (string or typed-list content), without the tool / vision branches
CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for c in message['content'] %}{%- if c['type'] == 'text' %}{{ c['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vocab() -> dict[str, int]:
    return _vocab(_SPECIAL)


def build_tiny_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer (lower-cased; unknown words → [UNK]) with Qwen's special tokens and the chat
    template, saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel(vocab(), unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="[UNK]", additional_special_tokens=_SPECIAL[1:])
    tok.chat_template = CHAT_TEMPLATE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return folder


def build_text_encoder() -> nn.Module:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    ids = vocab()
    text = dict(vocab_size=len(ids), hidden_size=TE_HIDDEN, intermediate_size=64, num_hidden_layers=32,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                 "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TE_HIDDEN,
                  patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    return Qwen3VLForConditionalGeneration(config)


def build_models(arch_id: str) -> dict[str, Any]:
    """{"transformer", "vae", "text_encoder"} of a tiny ``arch_id`` model (eval mode, fp32)."""
    from diffusers import AutoencoderKLFlux2, Flux3Transformer2DModel

    seed = SEEDS[arch_id]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux3Transformer2DModel(**TRANSFORMER, flow_map=arch_id == "flux3_klein")
        vae = AutoencoderKLFlux2(**VAE)
        text_encoder = build_text_encoder()
    gen = torch.Generator().manual_seed(seed + 1)
    for m in (transformer, vae, text_encoder):
        _perturb(m, gen)
        m.eval()
    with torch.no_grad():  # latents normalised by non-trivial statistics, so a wrong (de)normalisation shows
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=gen) * 0.3)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=gen) + 0.5)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder}


def _write_folder(arch_id: str, models: dict[str, Any], folder: Path, with_weights: bool,
                  with_transformer: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SHIPPED / arch_id / "model_index.json", folder / "model_index.json")
    shutil.copytree(SHIPPED / arch_id / "scheduler", folder / "scheduler", dirs_exist_ok=True)
    build_tiny_tokenizer(folder / "tokenizer")
    parts = [("vae", models["vae"]), ("text_encoder", models["text_encoder"])]
    if with_transformer:
        parts.insert(0, ("transformer", models["transformer"]))
    with _quiet():
        for name, model in parts:
            if with_weights:
                model.save_pretrained(folder / name)
            elif hasattr(model, "save_config"):
                model.save_config(folder / name)
            else:
                model.config.save_pretrained(folder / name)


def save_bfl(transformer: nn.Module, path: Path, prefix: str = "") -> Path:
    from architectures.flux3_keys import flux3_diffusers_to_bfl
    return write_tensors(flux3_diffusers_to_bfl(transformer.state_dict(), transformer.config), path, prefix)


def build_tiny_flux3(arch_id: str, folder: Path, layout: str = "diffusers") -> dict[str, Path]:
    """A tiny ``arch_id`` model in ``layout`` (see the module docstring); returns the paths to load it."""
    return write_layout(arch_id, folder, layout, build_models(arch_id), _write_folder,
                        lambda transformer, where: save_bfl(transformer, where / "flux3-tiny.safetensors"))


__all__ = ["build_tiny_flux3", "build_models", "build_tiny_tokenizer", "save_bfl", "load_kwargs", "settings_paths",
           "FLUX3_IDS", "CHAT_TEMPLATE"]
