"""Tiny, deterministic SD3 / SD3.5 / FLUX.1 models for tests and examples.

The real classes with tiny sizes: ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``, a 16-channel
``AutoencoderKL`` (two blocks: it downsamples by 2, so 64 px images give 32 px latents),
``CLIPTextModelWithProjection`` ×2 (SD3) or ``CLIPTextModel`` (FLUX), ``T5EncoderModel``.  CLIP tokenizers
are the real ones the project ships; the T5 tokenizer is a tiny Unigram vocabulary built here
(:func:`build_tiny_t5_tokenizer`) — checkpoints never contain tokenizers and the real one is not shipped.

Variants are told apart by their features, as the real ones are: SD3 Medium has neither q/k norms nor
dual attention, SD3.5 Large has q/k norms, SD3.5 Medium has q/k norms and dual-attention layers; FLUX.1
dev has the guidance embedding, schnell has not.

Layouts (``layout`` argument of :func:`build_tiny_dit`):

* ``"diffusers"``: a diffusers folder with weights and every tokenizer, written into ``folder``; returns
  ``{"model": folder}``.
* ``"single_file"`` (SD3 family): ``folder/tiny_<id>.safetensors`` in the original all-in-one layout
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``;
  T5 left out with ``include_t5=False``) plus the matching config folder ``folder/tiny_<id>_config``
  (configs, CLIP and T5 tokenizers, scheduler; no weights).
* ``"bfl"`` (FLUX): ``folder/flux1-tiny.safetensors`` (BFL transformer), ``clip_l.safetensors``,
  ``t5xxl.safetensors`` (Hugging Face key layouts), ``ae.safetensors`` (BFL autoencoder), a ``t5_tokenizer/``
  folder beside them, and the config folder ``folder/tiny_<id>_config``.

Single-file layouts return ``{"model", "config_dir", ...}`` with the extra file paths (``clip_l``,
``t5xxl``, ``ae``).  Both layouts of one variant hold bit-identical weights (same seed).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "architectures" / "configs"

SEEDS = {"sd3": 301, "sd35_medium": 302, "sd35_large": 303, "flux1_dev": 401, "flux1_schnell": 402}
SD3_IDS = ("sd3", "sd35_medium", "sd35_large")
FLUX_IDS = ("flux1_dev", "flux1_schnell")

T5_WIDTH = 96
_CLIP = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
CLIP_L: dict[str, Any] = dict(_CLIP, hidden_size=32, projection_dim=32, hidden_act="quick_gelu")
CLIP_G: dict[str, Any] = dict(_CLIP, hidden_size=48, intermediate_size=96, projection_dim=48, hidden_act="gelu")
T5: dict[str, Any] = dict(d_model=T5_WIDTH, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, relative_attention_max_distance=32,
                          feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, pad_token_id=0,
                          eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False, dropout_rate=0.0)

SD3_TRANSFORMER: dict[str, Any] = dict(
    sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
    pooled_projection_dim=CLIP_L["projection_dim"] + CLIP_G["projection_dim"], pos_embed_max_size=32)
SD3_VARIANT: dict[str, dict[str, Any]] = {
    "sd3": {}, "sd35_large": dict(qk_norm="rms_norm"),
    "sd35_medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))}
FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_L["hidden_size"], axes_dims_rope=(4, 6, 6))
VAE: dict[str, Any] = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
                           layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=64,
                           use_quant_conv=False, use_post_quant_conv=False)
VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}

# Words of the tiny dataset's captions and common prompt words; any other lowercase text falls back to letters.
_WORDS = ("a an and on the of in with photo picture background circle square checkerboard vertical stripes "
          "red blue green yellow purple orange white black person dog cat sks style").split()


# -- tokenizers -------------------------------------------------------------------------------------------

def build_tiny_t5_tokenizer(folder: Path) -> Path:
    """A tiny T5 (Unigram, SentencePiece-style "▁" word starts) tokenizer saved with ``save_pretrained``:
    ``tokenizer.json`` + ``tokenizer_config.json``, loadable with ``T5Tokenizer.from_pretrained``.
    Ids: <pad> 0, </s> 1, <unk> 2, then words, then single characters."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -3.0) for w in _WORDS]
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-"
    vocab += [("▁" + c, -8.0) for c in chars if c not in _WORDS] + [(c, -9.0) for c in chars]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    return folder


def t5_vocab_size() -> int:
    return 4 + len(_WORDS) + 2 * 42 - 1  # "a" is both a word and a character


# -- models -----------------------------------------------------------------------------------------------

def _perturb(module: nn.Module, gen: torch.Generator) -> None:
    """1-D parameters (norm scales, biases) off their constant initial values, so swapped norms or biases
    would show in output comparisons; zero-initialised output layers get small random weights."""
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.abs().max() == 0:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def build_models(arch_id: str) -> dict[str, Any]:
    """{"transformer", "vae", "text_encoders"} of a tiny ``arch_id`` model (eval mode, fp32)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    seed = SEEDS[arch_id]
    sd3 = arch_id in SD3_IDS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if sd3:
            transformer = SD3Transformer2DModel(**SD3_TRANSFORMER, **SD3_VARIANT[arch_id])
            scale, shift = VAE_FACTORS["sd3"]
            encoders: list[nn.Module] = [CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
                                         CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))]
        else:
            transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=arch_id == "flux1_dev")
            scale, shift = VAE_FACTORS["flux"]
            encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L))]
        vae = AutoencoderKL(**VAE, scaling_factor=scale, shift_factor=shift)
        encoders.append(T5EncoderModel(T5Config(vocab_size=t5_vocab_size(), **T5)))
    gen = torch.Generator().manual_seed(seed + 1)
    for m in (transformer, vae, *encoders):
        _perturb(m, gen)
        m.eval()
    return {"transformer": transformer, "vae": vae, "text_encoders": encoders}


def _quiet():
    from transformers.utils import logging as hf_logging

    class _Ctx:
        def __enter__(self):
            self.on = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()

        def __exit__(self, *a):
            if self.on:
                hf_logging.enable_progress_bar()
    return _Ctx()


def _write_folder(arch_id: str, models: dict[str, Any], folder: Path, with_weights: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shipped = SHIPPED / arch_id
    shutil.copy(shipped / "model_index.json", folder / "model_index.json")
    shutil.copytree(shipped / "scheduler", folder / "scheduler", dirs_exist_ok=True)
    sd3 = arch_id in SD3_IDS
    if sd3:
        shutil.copytree(SHIPPED / "sdxl" / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)
        shutil.copytree(SHIPPED / "sdxl" / "tokenizer_2", folder / "tokenizer_2", dirs_exist_ok=True)
        build_tiny_t5_tokenizer(folder / "tokenizer_3")
        enc_dirs = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    else:
        shutil.copytree(SHIPPED / "sd15" / "tokenizer", folder / "tokenizer", dirs_exist_ok=True)
        build_tiny_t5_tokenizer(folder / "tokenizer_2")
        enc_dirs = ["text_encoder", "text_encoder_2"]
    with _quiet():
        for name, model in (("transformer", models["transformer"]), ("vae", models["vae"])):
            (model.save_pretrained if with_weights else model.save_config)(folder / name)
        for name, enc in zip(enc_dirs, models["text_encoders"], strict=True):
            if with_weights:
                enc.save_pretrained(folder / name)
            else:
                enc.config.save_pretrained(folder / name)


def tiny_config_dir(arch_id: str, folder: Path) -> Path:
    return Path(folder) / f"tiny_{arch_id}_config"


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


def _clip_file_keys(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """HF CLIP state dict with the ``text_model.`` level files have (``text_projection`` stays top-level)."""
    from architectures.ldm_keys import clip_text_state_dict_to_ldm
    sd = dict(encoder.state_dict())
    proj = sd.pop("text_projection.weight", None)
    out = clip_text_state_dict_to_ldm(sd)
    if proj is not None:
        out["text_projection.weight"] = proj
    return out


def sd3_single_file_state_dict(models: dict[str, Any], include_t5: bool = True) -> dict[str, torch.Tensor]:
    """The original all-in-one SD3 layout of tiny (or real) diffusers-format models."""
    from architectures.dit_keys import sd3_diffusers_to_original
    from architectures.ldm_keys import vae_state_dict_to_ldm

    tr = models["transformer"]
    out = {"model.diffusion_model." + k: v for k, v in sd3_diffusers_to_original(tr.state_dict(), tr.config).items()}
    out.update({"first_stage_model." + k: v for k, v in vae_state_dict_to_ldm(models["vae"].state_dict()).items()})
    clip_l, clip_g, t5 = models["text_encoders"]
    out.update({"text_encoders.clip_l.transformer." + k: v for k, v in _clip_file_keys(clip_l).items()})
    out.update({"text_encoders.clip_g.transformer." + k: v for k, v in _clip_file_keys(clip_g).items()})
    if include_t5:
        sd = dict(t5.state_dict())
        sd.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight; real files store it once
        out.update({"text_encoders.t5xxl.transformer." + k: v for k, v in sd.items()})
    return out


def build_tiny_dit(arch_id: str, folder: Path, layout: str = "diffusers", include_t5: bool = True) -> dict[str, Path]:
    """A tiny ``arch_id`` model in ``layout`` (see the module docstring); returns the paths to load it."""
    from architectures.dit_keys import flux_diffusers_to_bfl
    from architectures.ldm_keys import vae_state_dict_to_ldm

    folder = Path(folder)
    models = build_models(arch_id)
    if layout == "diffusers":
        _write_folder(arch_id, models, folder, with_weights=True)
        return {"model": folder}
    config_dir = tiny_config_dir(arch_id, folder)
    _write_folder(arch_id, models, config_dir, with_weights=False)
    if layout == "single_file" and arch_id in SD3_IDS:
        path = _save(sd3_single_file_state_dict(models, include_t5), folder / f"tiny_{arch_id}.safetensors")
        return {"model": path, "config_dir": config_dir}
    if layout == "bfl" and arch_id in FLUX_IDS:
        tr = models["transformer"]
        clip_l, t5 = models["text_encoders"]
        t5_sd = dict(t5.state_dict())
        t5_sd.pop("encoder.embed_tokens.weight", None)
        out = {"model": _save(flux_diffusers_to_bfl(tr.state_dict(), tr.config), folder / "flux1-tiny.safetensors"),
               "clip_l": _save(_clip_file_keys(clip_l), folder / "clip_l.safetensors"),
               "t5xxl": _save(t5_sd, folder / "t5xxl.safetensors"),
               "ae": _save(vae_state_dict_to_ldm(models["vae"].state_dict()), folder / "ae.safetensors"),
               "config_dir": config_dir}
        # the T5 tokenizer lives with the user's T5 file, not in the config folder
        shutil.rmtree(config_dir / "tokenizer_2")
        build_tiny_t5_tokenizer(folder / "t5_tokenizer")
        return out
    raise ValueError(f"layout {layout!r} is not one of the layouts for {arch_id} (diffusers, "
                     f"{'single_file' if arch_id in SD3_IDS else 'bfl'})")


def load_kwargs(paths: dict[str, Path]) -> dict[str, Any]:
    """Keyword arguments of ``Architecture.load`` for what :func:`build_tiny_dit` returned."""
    kw: dict[str, Any] = {}
    if "clip_l" in paths:
        kw.update(clip_l_path=paths["clip_l"], t5xxl_path=paths["t5xxl"], ae_path=paths["ae"])
    return kw


def settings_paths(paths: dict[str, Path]) -> dict[str, str]:
    """The model.* settings (dotted names) that point the trainer at what :func:`build_tiny_dit` returned."""
    out = {"model.model_path": str(paths["model"])}
    if "config_dir" in paths:
        out["model.config_path"] = str(paths["config_dir"])
    if "clip_l" in paths:
        out.update({"model.clip_l_path": str(paths["clip_l"]), "model.t5xxl_path": str(paths["t5xxl"]),
                    "model.ae_path": str(paths["ae"])})
    return out


__all__ = ["build_tiny_dit", "build_models", "build_tiny_t5_tokenizer", "tiny_config_dir", "load_kwargs",
           "settings_paths", "sd3_single_file_state_dict", "SD3_IDS", "FLUX_IDS"]
