"""Loading SD3 / SD3.5 and FLUX.1 base models offline.

Accepted layouts (the user picks the architecture; these functions check that the files fit it and say what
they found when they do not):

* **diffusers folders** (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``,
  ``scheduler/``), read with ``local_files_only=True``;
* **SD3 / SD3.5 all-in-one single file** in the original layout: ``model.diffusion_model.*`` (MMDiT),
  ``first_stage_model.*`` (VAE), ``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*``
  and, unless T5 is left out, ``text_encoders.t5xxl.transformer.*``;
* **FLUX.1 BFL single file** (``flux1-dev.safetensors``: ``double_blocks.*``, optionally prefixed
  ``model.diffusion_model.``) plus separate CLIP-L, T5-XXL (Hugging Face key layout) and ``ae`` (BFL
  autoencoder) files.

Single files get their configs from a local diffusers-layout config folder (default: the full-size ones
shipped in ``architectures/configs/<id>``) and are loaded strictly (every tensor must fit the config).  The
FLUX transformer is converted by :mod:`architectures.dit_keys` from its config (diffusers 0.42.1's own
converter assumes the full width).

Tokenizers: CLIP tokenizers come from the model/config folder or, when it has none, from the CLIP
vocabulary the project ships (``architectures/configs/sdxl/tokenizer*``, ``sd15/tokenizer``).  The T5
tokenizer is never shipped: it comes from the user's files (see :func:`find_t5_tokenizer`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from architectures.base import ModelLoadError, check_family, short_label
from architectures.load_util import CONFIG_ROOT, default_config_dir, part_loader, read_json
from architectures.sd_loading import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    _assign,
    _Checkpoint,
    _convert,
    _empty_init,
    _variant,
    describe_checkpoint,
)

log = logging.getLogger(__name__)

SD3_IDS = ("sd3", "sd35_medium", "sd35_large")
FLUX_IDS = ("flux1_dev", "flux1_schnell")

# Shipped CLIP tokenizers (the same BPE vocabulary for every family): SD3's CLIP-G pads with "!" like SDXL's.
SHIPPED_CLIP_TOKENIZERS = {
    **{i: (CONFIG_ROOT / "sdxl" / "tokenizer", CONFIG_ROOT / "sdxl" / "tokenizer_2") for i in SD3_IDS},
    **{i: (CONFIG_ROOT / "sd15" / "tokenizer",) for i in FLUX_IDS},
}

SD3_TRANSFORMER_PREFIX = "model.diffusion_model."
SD3_VAE_PREFIX = "first_stage_model."
SD3_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
SD3_CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
SD3_T5_PREFIX = "text_encoders.t5xxl.transformer."

T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


# ---------------------------------------------------------------------------------------------------------
# What a file / folder is (for messages and the family check; never to pick the family)
# ---------------------------------------------------------------------------------------------------------

def describe_transformer_config(cfg: dict[str, Any]) -> tuple[str | None, str]:
    """(id or None, phrase) from a diffusers transformer config; variants by their features, not sizes."""
    cls = str(cfg.get("_class_name", ""))
    if cls == "SD3Transformer2DModel":
        if cfg.get("dual_attention_layers"):
            return "sd35_medium", "an SD3.5 Medium transformer (it has dual-attention layers)"
        if cfg.get("qk_norm"):
            return "sd35_large", "an SD3.5 Large transformer (q/k norms, no dual-attention layers)"
        return "sd3", "an SD3 Medium transformer (no q/k norms, no dual-attention layers)"
    if cls == "FluxTransformer2DModel":
        if cfg.get("guidance_embeds"):
            return "flux1_dev", "a FLUX.1 dev transformer (guidance embedding)"
        return "flux1_schnell", "a FLUX.1 schnell transformer (no guidance embedding)"
    if cls.startswith("Flux2"):
        return None, f"a FLUX.2 transformer ({cls})"
    return None, f"a {cls or 'unknown'} transformer"


def describe_dit_checkpoint(keys: list[str]) -> tuple[str | None, str]:
    """(id or None, phrase) of a single file from its key names."""
    def has(s: str) -> bool:
        return any(s in k for k in keys)

    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k or ".lora_A." in k
           for k in keys):
        return None, "a LoRA / LyCORIS adapter, not a base model"
    if has("joint_blocks."):
        if has(".x_block.attn2."):
            return "sd35_medium", "an SD3.5 Medium checkpoint (joint_blocks with x_block.attn2.* dual attention)"
        if has(".attn.ln_q."):
            return "sd35_large", "an SD3.5 Large checkpoint (joint_blocks with q/k norms, no dual attention)"
        return "sd3", "an SD3 Medium checkpoint (joint_blocks without q/k norms)"
    if has("double_blocks.") and has("single_blocks."):
        if has("double_stream_modulation"):
            return None, "a FLUX.2 transformer in BFL layout (double_stream_modulation_*), not FLUX.1"
        if has("guidance_in."):
            return "flux1_dev", "a FLUX.1 dev transformer in BFL layout (it has guidance_in.*)"
        return "flux1_schnell", "a FLUX.1 schnell transformer in BFL layout (no guidance_in.*)"
    if has("transformer_blocks.") and has("single_transformer_blocks."):
        return None, ("a FLUX transformer in diffusers key layout (transformer_blocks.* / single_transformer_blocks.*); "
                      "choose the whole diffusers folder, or the original BFL file (flux1-dev.safetensors)")
    if has("transformer_blocks.") and has("pos_embed.proj."):
        return None, ("an SD3 transformer in diffusers key layout; choose the whole diffusers folder or the "
                      "original single file")
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return None, "a VAE / autoencoder file (encoder.down.* / decoder.up.*), not a transformer"
    if has("encoder.block.") and has("SelfAttention"):
        return None, "a T5 text-encoder file, not a transformer"
    if any(k.startswith(("text_model.", "encoder.layers.")) for k in keys):
        return None, "a CLIP text-encoder file, not a transformer"
    return describe_checkpoint(keys)


def describe_dit_folder(folder: Path) -> tuple[str | None, str]:
    index_path, tr_path = folder / "model_index.json", folder / "transformer" / "config.json"
    if not tr_path.is_file():
        if (folder / "unet" / "config.json").is_file():
            return None, "a UNet model folder (SD 1.x / SDXL), which has no transformer/"
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        hint = f" It contains {', '.join(files[:3])}: choose the file itself to load a single file." if files else ""
        raise ModelLoadError(f"{folder} is a folder but not a diffusers model folder of a transformer model "
                             f"(it has no transformer/config.json).{hint}")
    family, phrase = describe_transformer_config(read_json(tr_path))
    pipeline = read_json(index_path).get("_class_name", "") if index_path.is_file() else ""
    return family, f"{phrase}{f' ({pipeline})' if pipeline else ''}"


def _check_config_dir(arch_id: str, config_dir: Path, needed: list[str]) -> None:
    if not config_dir.is_dir():
        raise ModelLoadError(f"Config folder {config_dir} does not exist.")
    if (config_dir / "transformer" / "config.json").is_file():
        family, phrase = describe_dit_folder(config_dir)
        if family != arch_id:
            raise ModelLoadError(f"You chose {short_label(arch_id)}, but the config folder {config_dir} looks like "
                                 f"{phrase}. Pass the config folder of a {short_label(arch_id)} model.")
    absent = [n for n in needed if not (config_dir / n).is_file()]
    if absent:
        raise ModelLoadError(f"Config folder {config_dir} is not a complete diffusers-layout config folder for "
                             f"{short_label(arch_id)}: it lacks {', '.join(absent)}.")


# ---------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------

def _has_tokenizer(folder: Path, names: tuple[str, ...]) -> bool:
    return folder.is_dir() and any((folder / n).is_file() for n in names)


def load_clip_tokenizers(arch_id: str, folders: list[Path]) -> list[Any]:
    """CLIP tokenizer i from ``folders[i]`` when it holds one, else the shipped vocabulary."""
    from transformers import CLIPTokenizer
    out = []
    for folder, shipped in zip(folders, SHIPPED_CLIP_TOKENIZERS[arch_id], strict=True):
        where = folder if _has_tokenizer(folder, ("vocab.json", "tokenizer.json")) else shipped
        try:
            out.append(CLIPTokenizer.from_pretrained(str(where), local_files_only=True))
        except Exception as e:
            raise ModelLoadError(f"Loading the CLIP tokenizer from {where} failed: {e}") from e
    return out


def find_t5_tokenizer(candidates: list[Path], what: str) -> Path:
    """The first candidate folder with T5 tokenizer files; a ``ModelLoadError`` naming every place looked at."""
    for folder in candidates:
        if _has_tokenizer(folder, T5_TOKENIZER_FILES):
            return folder
    places = "\n".join(f"  - {c}" for c in candidates)
    raise ModelLoadError(
        f"The T5 tokenizer for {what} was not found. It is not part of the checkpoint and is not shipped "
        f"with this program: put the T5 tokenizer files (tokenizer.json or spiece.model, with "
        f"tokenizer_config.json and special_tokens_map.json — the tokenizer_2/ folder of FLUX.1 or the "
        f"tokenizer_3/ folder of SD3 on Hugging Face) into one of:\n{places}")


def load_t5_tokenizer(folder: Path) -> Any:
    from transformers import T5Tokenizer
    try:
        return T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"Loading the T5 tokenizer from {folder} failed: {e}") from e


def _scheduler_config(arch_id: str, folder: Path) -> dict[str, Any]:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        path = default_config_dir(arch_id) / "scheduler" / "scheduler_config.json"
    return read_json(path)


# ---------------------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------------------

def _load_folder(arch_id: str, folder: Path, dtype: torch.dtype, use_t5: bool,
                 with_text_encoders: bool = True, with_denoiser: bool = True) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    family, phrase = describe_dit_folder(folder)
    check_family(arch_id, folder, family, phrase)
    sd3 = arch_id in SD3_IDS
    encoders = ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if use_t5 else []) if sd3 \
        else ["text_encoder", "text_encoder_2"]
    absent = [n for n in ["transformer", "vae", *encoders] if not (folder / n / "config.json").is_file()]
    if absent:
        hint = (" Leave T5 out (model.use_t5 off) to train without it." if sd3 and absent == ["text_encoder_3"]
                else "")
        raise ModelLoadError(f"{folder} looks like {phrase}, but it lacks {', '.join(n + '/' for n in absent)} "
                             f"(each with config.json and weights).{hint}")
    load = part_loader(folder)
    tr_cls = SD3Transformer2DModel if sd3 else FluxTransformer2DModel
    transformer = load("transformer", lambda: tr_cls.from_pretrained(
        str(folder), subfolder="transformer", torch_dtype=dtype, local_files_only=True,
        variant=_variant(folder / "transformer"))) if with_denoiser else None
    vae = load("vae", lambda: AutoencoderKL.from_pretrained(
        str(folder), subfolder="vae", torch_dtype=dtype, local_files_only=True, variant=_variant(folder / "vae")))
    classes = {"text_encoder": CLIPTextModelWithProjection if sd3 else CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection if sd3 else T5EncoderModel,
               "text_encoder_3": T5EncoderModel}
    text_encoders = [load(sub, lambda sub=sub: classes[sub].from_pretrained(
        str(folder / sub), dtype=dtype, local_files_only=True, variant=_variant(folder / sub)))
        for sub in (encoders if with_text_encoders else [])]
    clip_dirs = [folder / "tokenizer", folder / "tokenizer_2"] if sd3 else [folder / "tokenizer"]
    tokenizers = load_clip_tokenizers(arch_id, clip_dirs)
    if use_t5 or not sd3:
        t5_dir = "tokenizer_3" if sd3 else "tokenizer_2"
        tokenizers.append(load_t5_tokenizer(find_t5_tokenizer([folder / t5_dir], f"{short_label(arch_id)} ({folder})")))
    return {"transformer": transformer, "vae": vae, "text_encoders": text_encoders, "tokenizers": tokenizers,
            "scheduler_config": _scheduler_config(arch_id, folder)}


# ---------------------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------------------

def _build(cls, config_dir: Path, sub: str):
    cfg = cls.load_config(str(config_dir), subfolder=sub, local_files_only=True)
    with _empty_init():
        return cls.from_config(cfg)


def _hf_config(cls_config, config_dir: Path, sub: str):
    try:
        return cls_config.from_pretrained(str(config_dir / sub), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"Reading {config_dir / sub / 'config.json'} failed: {e}") from e


def _load_clip(cls, sd: dict[str, torch.Tensor], config_dir: Path, sub: str, what: str, source: Path,
               dtype: torch.dtype) -> nn.Module:
    from transformers import CLIPTextConfig
    config = _hf_config(CLIPTextConfig, config_dir, sub)
    with _empty_init():
        model = cls._from_config(config)
    expected = set(model.state_dict())
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel; files keep text_model.
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    if "text_projection.weight" in sd and "text_projection.weight" not in expected:
        sd.pop("text_projection.weight")  # ComfyUI's clip_l files carry it; FLUX's CLIPTextModel has no projection
    if "text_projection.weight" in expected and "text_projection.weight" not in sd:
        # Some SD3 files store CLIP-L without its projection; SD3's CLIP-L projection is the identity.
        log.info("%s: no text_projection in the file; using the identity, as SD3 does", what)
        sd["text_projection.weight"] = torch.eye(config.projection_dim, config.hidden_size)
    _assign(model, sd, what, source, config_dir / sub, dtype)
    return model


def _load_t5(sd: dict[str, torch.Tensor], config_dir: Path, sub: str, what: str, source: Path,
             dtype: torch.dtype) -> nn.Module:
    from transformers import T5Config, T5EncoderModel
    config = _hf_config(T5Config, config_dir, sub)
    with _empty_init():
        model = T5EncoderModel._from_config(config)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    if "shared.weight" in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    _assign(model, sd, what, source, config_dir / sub, dtype)
    model.encoder.embed_tokens = model.shared  # keep the tie (one copy of the 32k x 4096 table)
    return model


def _load_vae(sd: dict[str, torch.Tensor], config_dir: Path, what: str, source: Path, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    vae = _build(AutoencoderKL, config_dir, "vae")
    converted = _convert(what, source, convert_ldm_vae_checkpoint, sd, vae.config)
    _assign(vae, converted, what, source, config_dir / "vae", dtype)
    return vae


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _load_sd3_single_file(arch_id: str, path: Path, config_dir: Path, dtype: torch.dtype, use_t5: bool,
                          with_text_encoders: bool = True, with_denoiser: bool = True) -> dict[str, Any]:
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from transformers import CLIPTextModelWithProjection

    ckpt = _Checkpoint(path)
    keys = ckpt.keys()
    family, phrase = describe_dit_checkpoint(keys)
    check_family(arch_id, path, family, phrase)
    parts = {"MMDiT (model.diffusion_model.*)": SD3_TRANSFORMER_PREFIX, "VAE (first_stage_model.*)": SD3_VAE_PREFIX,
             "CLIP-L (text_encoders.clip_l.*)": SD3_CLIP_L_PREFIX, "CLIP-G (text_encoders.clip_g.*)": SD3_CLIP_G_PREFIX}
    if use_t5:
        parts["T5-XXL (text_encoders.t5xxl.*)"] = SD3_T5_PREFIX
    absent = [name for name, prefix in parts.items() if not any(k.startswith(prefix) for k in keys)]
    if absent:
        hint = (" Turn off 'Use T5' (model.use_t5) to train without T5, or use a file that includes it."
                if absent == ["T5-XXL (text_encoders.t5xxl.*)"] else
                " Only all-in-one files (MMDiT, VAE and the text encoders in one file, e.g. "
                "sd3.5_large.safetensors with clips, or sd3_medium_incl_clips_t5xxlfp16.safetensors) can be loaded.")
        raise ModelLoadError(f"{path} looks like {phrase}, but it has no {', no '.join(absent)}.{hint}")
    needed = ["transformer/config.json", "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json"]
    _check_config_dir(arch_id, config_dir, needed + (["text_encoder_3/config.json"] if use_t5 else []))

    transformer = None
    if with_denoiser:
        transformer = _build(SD3Transformer2DModel, config_dir, "transformer")
        sd = _convert("MMDiT", path, convert_sd3_transformer_checkpoint_to_diffusers,
                      ckpt.read(SD3_TRANSFORMER_PREFIX))
        _assign(transformer, sd, "MMDiT", path, config_dir / "transformer", dtype)
    vae = _load_vae(_strip(ckpt.read(SD3_VAE_PREFIX), SD3_VAE_PREFIX), config_dir, "VAE", path, dtype)
    text_encoders = [
        _load_clip(CLIPTextModelWithProjection, _strip(ckpt.read(SD3_CLIP_L_PREFIX), SD3_CLIP_L_PREFIX), config_dir,
                   "text_encoder", "CLIP-L", path, dtype),
        _load_clip(CLIPTextModelWithProjection, _strip(ckpt.read(SD3_CLIP_G_PREFIX), SD3_CLIP_G_PREFIX), config_dir,
                   "text_encoder_2", "CLIP-G", path, dtype)] if with_text_encoders else []
    tokenizers = load_clip_tokenizers(arch_id, [config_dir / "tokenizer", config_dir / "tokenizer_2"])
    if use_t5:
        if with_text_encoders:
            text_encoders.append(_load_t5(_strip(ckpt.read(SD3_T5_PREFIX), SD3_T5_PREFIX), config_dir,
                                          "text_encoder_3", "T5-XXL", path, dtype))
        where = find_t5_tokenizer([config_dir / "tokenizer_3", path.parent / "tokenizer_3", path.parent / "t5_tokenizer"],
                                  f"{short_label(arch_id)} ({path.name})")
        tokenizers.append(load_t5_tokenizer(where))
    return {"transformer": transformer, "vae": vae, "text_encoders": text_encoders, "tokenizers": tokenizers,
            "scheduler_config": _scheduler_config(arch_id, config_dir)}


def _read_component(path: Path | None, setting: str, what: str) -> dict[str, torch.Tensor]:
    if path is None or str(path) in ("", "."):
        raise ModelLoadError(f"A FLUX.1 single-file transformer needs its {what} as a separate file: set {setting}.")
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{setting}: {path} does not exist (it should be the {what} .safetensors file).")
    ckpt = _Checkpoint(path)
    return ckpt.read("")


def _check_component(sd: dict[str, torch.Tensor], path: Path, setting: str, what: str,
                     test: Callable[[list[str]], bool]) -> None:
    keys = list(sd)
    if not test(keys):
        _, phrase = describe_dit_checkpoint(keys)
        raise ModelLoadError(f"{setting}: {path} should be the {what}, but it looks like {phrase}.")


def _load_flux_single_file(arch_id: str, path: Path, config_dir: Path, dtype: torch.dtype, clip_l: Path | None,
                           t5xxl: Path | None, ae: Path | None, with_text_encoders: bool = True,
                           with_denoiser: bool = True) -> dict[str, Any]:
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    from architectures.dit_keys import flux_bfl_to_diffusers

    ckpt = _Checkpoint(path)
    keys = ckpt.keys()
    family, phrase = describe_dit_checkpoint(keys)
    check_family(arch_id, path, family, phrase)
    _check_config_dir(arch_id, config_dir, ["transformer/config.json", "vae/config.json", "text_encoder/config.json",
                                            "text_encoder_2/config.json"])
    # without text encoders the CLIP-L and T5 files (9.5 GB for T5) are not read at all
    clip_sd = _read_component(clip_l, "model.clip_l_path", "CLIP-L text encoder") if with_text_encoders else {}
    t5_sd = _read_component(t5xxl, "model.t5xxl_path", "T5-XXL text encoder") if with_text_encoders else {}
    ae_sd = _read_component(ae, "model.ae_path", "autoencoder (ae.safetensors)")
    for pre in ("text_encoders.clip_l.transformer.",):
        if any(k.startswith(pre) for k in clip_sd):
            clip_sd = _strip(clip_sd, pre)
    for pre in ("text_encoders.t5xxl.transformer.",):
        if any(k.startswith(pre) for k in t5_sd):
            t5_sd = _strip(t5_sd, pre)
    if any(k.startswith("vae.") for k in ae_sd):
        ae_sd = _strip(ae_sd, "vae.")
    if with_text_encoders:
        _check_component(clip_sd, Path(clip_l), "model.clip_l_path", "CLIP-L text encoder",
                         lambda ks: any(".self_attn.q_proj." in k for k in ks) and not any("SelfAttention" in k
                                                                                           for k in ks))
        _check_component(t5_sd, Path(t5xxl), "model.t5xxl_path", "T5-XXL text encoder",
                         lambda ks: any(".SelfAttention.q." in k for k in ks))
    _check_component(ae_sd, Path(ae), "model.ae_path", "autoencoder (ae.safetensors)",
                     lambda ks: any(k.startswith("encoder.down.") for k in ks) and any(k.startswith("decoder.up.") for k in ks))

    transformer = _build(FluxTransformer2DModel, config_dir, "transformer") if with_denoiser else None
    if with_denoiser:
        try:
            sd = flux_bfl_to_diffusers(ckpt.read(""), transformer.config)
        except (KeyError, ValueError) as e:
            raise ModelLoadError(f"The transformer in {path} does not match the config folder "
                                 f"{config_dir / 'transformer'}: {e}. Pass the config folder that belongs to this "
                                 f"checkpoint (model.config_path).") from e
        _assign(transformer, sd, "transformer", path, config_dir / "transformer", dtype)
    vae = _load_vae(ae_sd, config_dir, "autoencoder", Path(ae), dtype)
    text_encoders = [_load_clip(CLIPTextModel, clip_sd, config_dir, "text_encoder", "CLIP-L", Path(clip_l), dtype),
                     _load_t5(t5_sd, config_dir, "text_encoder_2", "T5-XXL", Path(t5xxl), dtype)
                     ] if with_text_encoders else []
    tokenizers = load_clip_tokenizers(arch_id, [config_dir / "tokenizer"])
    t5_dir = Path(t5xxl).expanduser().parent
    where = find_t5_tokenizer([config_dir / "tokenizer_2", t5_dir / "tokenizer_2", t5_dir / "t5_tokenizer", t5_dir],
                              f"{short_label(arch_id)} ({Path(t5xxl).name})")
    tokenizers.append(load_t5_tokenizer(where))
    return {"transformer": transformer, "vae": vae, "text_encoders": text_encoders, "tokenizers": tokenizers,
            "scheduler_config": _scheduler_config(arch_id, config_dir)}


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------

def _resolve(arch_id: str, model_path: Path, config_dir: Path | None) -> tuple[Path, Path]:
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"Model path {path} does not exist.")
    return path, Path(config_dir).expanduser() if config_dir else default_config_dir(arch_id)


def load_sd3_components(arch_id: str, model_path: Path, config_dir: Path | None = None,
                        dtype: torch.dtype = torch.float32, use_t5: bool = True,
                        text_encoders: bool = True, denoiser: bool = True) -> dict[str, Any]:
    """SD3 Medium / SD3.5 Medium / SD3.5 Large, from a diffusers folder or an all-in-one original file.

    Returns ``{"transformer", "vae", "text_encoders": [CLIP-L, CLIP-G(, T5)], "tokenizers": [...],
    "scheduler_config"}``; with ``use_t5=False`` T5 is neither loaded nor required."""
    if arch_id not in SD3_IDS:
        raise ModelLoadError(f"{arch_id!r} is not an SD3 architecture ({', '.join(SD3_IDS)})")
    path, configs = _resolve(arch_id, model_path, config_dir)
    if path.is_dir():
        return _load_folder(arch_id, path, dtype, use_t5, text_encoders, denoiser)
    return _load_sd3_single_file(arch_id, path, configs, dtype, use_t5, text_encoders, denoiser)


def load_flux_components(arch_id: str, model_path: Path, config_dir: Path | None = None,
                         dtype: torch.dtype = torch.float32, clip_l_path: Path | None = None,
                         t5xxl_path: Path | None = None, ae_path: Path | None = None,
                         text_encoders: bool = True, denoiser: bool = True) -> dict[str, Any]:
    """FLUX.1 dev / schnell, from a diffusers folder or a BFL transformer file plus CLIP-L, T5-XXL and AE files.

    Returns ``{"transformer", "vae", "text_encoders": [CLIP-L, T5], "tokenizers": [CLIP, T5], "scheduler_config"}``."""
    if arch_id not in FLUX_IDS:
        raise ModelLoadError(f"{arch_id!r} is not a FLUX.1 architecture ({', '.join(FLUX_IDS)})")
    path, configs = _resolve(arch_id, model_path, config_dir)
    if path.is_dir():
        return _load_folder(arch_id, path, dtype, True, text_encoders, denoiser)
    return _load_flux_single_file(arch_id, path, configs, dtype, clip_l_path, t5xxl_path, ae_path, text_encoders,
                                  denoiser)


__all__ = ["load_sd3_components", "load_flux_components", "describe_dit_checkpoint", "describe_dit_folder",
           "describe_transformer_config", "find_t5_tokenizer", "default_config_dir", "SD3_IDS", "FLUX_IDS"]
