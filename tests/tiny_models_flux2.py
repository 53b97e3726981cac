"""Tiny, deterministic FLUX.2 models (dev, klein, klein base) for tests, in real on-disk layouts.

The real classes with tiny sizes: ``Flux2Transformer2DModel`` (2 double / 2 single blocks, width 32),
``AutoencoderKLFlux2`` (two blocks: 64 px images give 32 px latents, 8 latent channels → 32 patchified, with
non-trivial batch-norm running statistics), ``Mistral3ForConditionalGeneration`` (dev; 31 text layers so that
hidden states 10, 20, 30 exist, a one-layer Pixtral vision tower) or ``Qwen3ForCausalLM`` (klein; 28 layers for
9, 18, 27), both of hidden size 32 (joint text width 96).  Tokenizers are tiny word-level vocabularies built
here with the ``tokenizers`` library and saved as ``PreTrainedTokenizerFast`` with the chat template the
pipelines use (Mistral: system prompt + ``[INST]``; Qwen: ``<|im_start|>`` turns, ``enable_thinking``).

dev has the guidance embedding and a Mistral 3 text encoder; klein / klein base have neither (klein and klein
base tiny models differ only in their seeds, like the real ones differ only in training).

Layouts (``layout`` argument of :func:`build_tiny_flux2`):

* ``"diffusers"``: a diffusers folder with weights, tokenizer and scheduler; returns ``{"model": folder}``.
* ``"bfl"``: ``folder/flux2-tiny.safetensors`` (BFL transformer keys), ``folder/components/`` (diffusers layout:
  ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, no transformer) and the config folder
  ``folder/tiny_<id>_config`` (configs only); returns ``{"model", "config_dir", "components"}``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.tiny_models_dit import _quiet

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "architectures" / "configs"

FLUX2_IDS = ("flux2_dev", "flux2_klein_4b", "flux2_klein_9b", "flux2_klein_base_4b", "flux2_klein_base_9b")
SEEDS = {"flux2_dev": 501, "flux2_klein_4b": 502, "flux2_klein_9b": 503, "flux2_klein_base_4b": 504,
         "flux2_klein_base_9b": 505}
TE_HIDDEN = 32
LATENT_CHANNELS = 8

TRANSFORMER: dict[str, Any] = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * TE_HIDDEN,
                                   timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4))
VAE: dict[str, Any] = dict(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32),
                           layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=64,
                           use_quant_conv=False, use_post_quant_conv=False)

_SPECIAL_QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_SPECIAL_MISTRAL = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
_WORDS = ("a an and on the of in with photo picture background circle square checkerboard vertical stripes "
          "red blue green yellow purple orange white black person dog cat sks style user assistant system "
          "you are ai that image descriptions give structured responses object").split()
_PUNCT = list(".,!?'-:;()")

QWEN_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join(' ') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{%- elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{%- else %}{{ text }}{{ eos_token }}{%- endif %}{%- endfor %}")


def is_dev(arch_id: str) -> bool:
    return arch_id == "flux2_dev"


def _vocab(special: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for w in special + ["[UNK]"] + _WORDS + _PUNCT:
        vocab.setdefault(w, len(vocab))
    return vocab


def vocab_size(arch_id: str) -> int:
    return len(_vocab(_SPECIAL_MISTRAL if is_dev(arch_id) else _SPECIAL_QWEN))


def build_tiny_tokenizer(arch_id: str, folder: Path) -> Path:
    """A word-level tokenizer (lower-cased, whitespace/punctuation split, unknown words → [UNK]) with the
    family's special tokens and chat template, saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    special = _SPECIAL_MISTRAL if is_dev(arch_id) else _SPECIAL_QWEN
    core = Tokenizer(WordLevel(_vocab(special), unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    if is_dev(arch_id):
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>", additional_special_tokens=special[4:])
        tok.chat_template = MISTRAL_TEMPLATE
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      unk_token="[UNK]", additional_special_tokens=special[1:])
        tok.chat_template = QWEN_TEMPLATE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return folder


def _perturb(module: nn.Module, gen: torch.Generator) -> None:
    """1-D parameters off their constant initial values; zero-initialised layers get small random weights."""
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.abs().max() == 0:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def build_text_encoder(arch_id: str) -> nn.Module:
    if is_dev(arch_id):
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig
        text = MistralConfig(vocab_size=vocab_size(arch_id), hidden_size=TE_HIDDEN, intermediate_size=64,
                             num_hidden_layers=31, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                             max_position_embeddings=1024, pad_token_id=3, bos_token_id=1, eos_token_id=2)
        vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     head_dim=8, image_size=28, patch_size=14)
        config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=8, spatial_merge_size=2,
                                multimodal_projector_bias=False, vision_feature_layer=-1)
        return Mistral3ForConditionalGeneration(config)
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size(arch_id), hidden_size=TE_HIDDEN, intermediate_size=64,
                                        num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
                                        pad_token_id=0, eos_token_id=2))


def build_models(arch_id: str) -> dict[str, Any]:
    """{"transformer", "vae", "text_encoder"} of a tiny ``arch_id`` model (eval mode, fp32)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    seed = SEEDS[arch_id]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(**TRANSFORMER, guidance_embeds=is_dev(arch_id))
        vae = AutoencoderKLFlux2(**VAE)
        text_encoder = build_text_encoder(arch_id)
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
    build_tiny_tokenizer(arch_id, folder / "tokenizer")
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


def tiny_config_dir(arch_id: str, folder: Path) -> Path:
    return Path(folder) / f"tiny_{arch_id}_config"


def write_tensors(sd: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.detach().contiguous().clone() for k, v in sd.items()}, str(path),
              metadata={"format": "pt"})
    return path


def save_bfl(transformer: nn.Module, path: Path, prefix: str = "") -> Path:
    from architectures.flux2_keys import flux2_diffusers_to_bfl
    return write_tensors(flux2_diffusers_to_bfl(transformer.state_dict(), transformer.config), path, prefix)


def write_layout(arch_id: str, folder: Path, layout: str, models: dict[str, Any], write_folder, save_file) -> dict:
    """``models`` written as a diffusers folder, or (``layout`` "bfl") as one BFL transformer file
    (``save_file(transformer, folder)``) beside a components folder and a weightless config folder."""
    folder = Path(folder)
    if layout == "diffusers":
        write_folder(arch_id, models, folder, with_weights=True)
        return {"model": folder}
    if layout == "bfl":
        config_dir = tiny_config_dir(arch_id, folder)
        write_folder(arch_id, models, config_dir, with_weights=False)
        write_folder(arch_id, models, folder / "components", with_weights=True, with_transformer=False)
        return {"model": save_file(models["transformer"], folder),
                "config_dir": config_dir, "components": folder / "components"}
    raise ValueError(f"layout must be 'diffusers' or 'bfl', not {layout!r}")


def build_tiny_flux2(arch_id: str, folder: Path, layout: str = "diffusers") -> dict[str, Path]:
    """A tiny ``arch_id`` model in ``layout`` (see the module docstring); returns the paths to load it."""
    return write_layout(arch_id, folder, layout, build_models(arch_id), _write_folder,
                        lambda transformer, where: save_bfl(transformer, where / "flux2-tiny.safetensors"))


def load_kwargs(paths: dict[str, Path]) -> dict[str, Any]:
    """Keyword arguments of ``Architecture.load`` for what :func:`build_tiny_flux2` returned."""
    return {"components_path": paths["components"]} if "components" in paths else {}


def settings_paths(paths: dict[str, Path]) -> dict[str, str]:
    """The model.* settings (dotted names) pointing the trainer at what :func:`build_tiny_flux2` returned."""
    out = {"model.model_path": str(paths["model"])}
    if "config_dir" in paths:
        out["model.config_path"] = str(paths["config_dir"])
    if "components" in paths:
        out["model.components_path"] = str(paths["components"])
    return out


def fake_full_size_bfl(arch_id: str, path: Path) -> Path:
    """A stand-in for a full-size BFL file of ``arch_id``: every key of the real layout (so block counts are
    right), ``img_in`` of the real shape in fp16, all other tensors 1-element.  Only for the
    variant checks, which run before anything is loaded."""
    from safetensors.torch import save_file

    from architectures.flux2_keys import flux2_bfl_keys
    cfg = json.loads((SHIPPED / arch_id / "transformer" / "config.json").read_text())
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    tensors = {k: torch.zeros(1, dtype=torch.float16) for k in flux2_bfl_keys(cfg)}
    tensors["img_in.weight"] = torch.zeros(width, cfg["in_channels"], dtype=torch.float16)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


__all__ = ["build_tiny_flux2", "build_models", "build_tiny_tokenizer", "tiny_config_dir", "load_kwargs",
           "settings_paths", "save_bfl", "fake_full_size_bfl", "FLUX2_IDS", "is_dev"]
