"""Loading FLUX.3 klein (step-distilled) and klein base (undistilled) offline.

Accepted layouts (the user picks the variant; nothing is switched silently):

* **diffusers folder** (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` or ``processor/``,
  ``scheduler/``), read with ``local_files_only=True``;
* **BFL single file** of the transformer (``content_mode_blocks.*``, ``txt_mode_blocks.*``, ``single_blocks.*``,
  ``early_stream_modulations.*.lin`` …, optionally prefixed ``model.diffusion_model.``) plus
  ``model.components_path``, a diffusers-layout folder with ``text_encoder/``, ``tokenizer/`` and ``vae/``.  The
  transformer is read by diffusers' own converter (``Flux3Transformer2DModel.from_single_file``) with an explicit
  config folder (``model.config_path``, default the full-size configs shipped in ``architectures/configs/<id>``),
  so nothing is fetched.

Variant checks (before anything large is read): klein is a flow map (``flow_map`` in the transformer config; its
BFL files carry ``ref_time_in.*``), klein base is not; a transformer of the other variant, a FLUX.2 or another
family's model is refused naming the architecture to choose.  The text encoder must be Qwen3-VL whose stacked
hidden states (8 layers) are as wide as the transformer's ``joint_attention_dim``.

Tokenizers are never shipped: the Qwen3-VL processor (or its tokenizer alone: the processor's video part needs
torchvision) comes from the model folder or ``model.components_path``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from architectures.base import ModelLoadError, check_family, short_label
from architectures.load_util import (components_folder, default_config_dir, no_hf_progress_bars, part_loader,
                                     read_json)

log = logging.getLogger(__name__)

FLUX3_IDS = ("flux3_klein", "flux3_klein_base")
TEXT_ENCODER = ("qwen3_vl", "Qwen3VLForConditionalGeneration")
TOKENIZER_FOLDERS = ("tokenizer", "processor")
#: keys that mark a BFL FLUX.3 file (diffusers' ``CHECKPOINT_KEY_NAMES["flux3"]``) and its step-distilled variant
BFL_MARKER = "early_stream_modulations.image.lin.weight"
DISTILLED_MARKER = "ref_time_in.in_layer.weight"


def variant_id(distilled: bool) -> str:
    return "flux3_klein" if distilled else "flux3_klein_base"


def describe_variant(distilled: bool, evidence: str) -> str:
    if distilled:
        return f"the step-distilled FLUX.3 klein transformer (a flow map: {evidence})"
    return f"an undistilled FLUX.3 klein base transformer (no flow-map embedder: {evidence})"


def check_variant(arch_id: str, where, distilled: bool, evidence: str) -> None:
    check_family(arch_id, where, variant_id(distilled), describe_variant(distilled, evidence))


def _refuse_flux2(arch_id: str, where, features: dict[str, Any]) -> None:
    from architectures.flux2_loading import SIZE_GROUPS, describe_features, full_size_matches
    matches = full_size_matches(features)
    group = SIZE_GROUPS[matches[0]] if matches else "the FLUX.2 architecture of its size (dev, klein or klein base)"
    chosen = short_label(arch_id)
    raise ModelLoadError(f"You chose {chosen}, but {where} looks like {describe_features(features)}. Choose "
                         f"{group} for this model, or pick a {chosen} model.")


# ---------------------------------------------------------------------------------------------------------
# Transformer shapes (config vs BFL file)
# ---------------------------------------------------------------------------------------------------------

def config_features(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"distilled": bool(cfg.get("flow_map", False)), "mode": int(cfg.get("num_layers", 5)),
            "single": int(cfg.get("num_single_layers", 28)),
            "width": int(cfg.get("num_attention_heads", 24)) * int(cfg.get("attention_head_dim", 128)),
            "joint": int(cfg.get("joint_attention_dim", 20480)), "channels": int(cfg.get("in_channels", 128))}


def file_features(keys: list[str], shape) -> dict[str, Any]:
    """Features of a prefix-stripped BFL FLUX.3 file; ``shape(key)`` gives a tensor's shape."""
    from architectures.flux2_loading import _blocks
    img = tuple(shape("emb_in.image.weight")) if "emb_in.image.weight" in keys else (0, 0)
    txt = tuple(shape("txt_in.weight")) if "txt_in.weight" in keys else (0, 0)
    return {"distilled": DISTILLED_MARKER in keys, "mode": _blocks(keys, "txt_mode_blocks."),
            "single": _blocks(keys, "single_blocks."), "width": int(img[0]), "joint": int(txt[-1]),
            "channels": int(img[-1])}


def describe_shape(f: dict[str, Any]) -> str:
    return (f"{f['mode']} per-mode / {f['single']} single blocks, width {f['width']}, text width {f['joint']}, "
            f"{f['channels']} latent channels")


# ---------------------------------------------------------------------------------------------------------
# Text encoder, tokenizer, VAE
# ---------------------------------------------------------------------------------------------------------

def check_text_encoder(arch_id: str, folder: Path, transformer_cfg: dict[str, Any], layers: tuple[int, ...]) -> None:
    cfg = read_json(folder / "text_encoder" / "config.json")
    kind, cls = TEXT_ENCODER
    if cfg.get("model_type") != kind:
        raise ModelLoadError(f"You chose {short_label(arch_id)}, which uses a {cls} text encoder, but "
                             f"{folder / 'text_encoder'} holds a {cfg.get('model_type') or 'model of unknown type'!r} "
                             "model.")
    text = cfg.get("text_config") or {}
    hidden, depth = int(text.get("hidden_size", 0)), int(text.get("num_hidden_layers", 0))
    joint = int(transformer_cfg.get("joint_attention_dim", 0))
    if depth and depth < max(layers):
        raise ModelLoadError(f"The text encoder in {folder / 'text_encoder'} has {depth} layers; "
                             f"{short_label(arch_id)} stacks hidden states {', '.join(map(str, layers))}.")
    if hidden and joint and hidden * len(layers) != joint:
        raise ModelLoadError(f"The text encoder in {folder / 'text_encoder'} (hidden size {hidden}, {len(layers)} "
                             f"layers stacked: {hidden * len(layers)}) does not fit the transformer, which takes text "
                             f"of width {joint}.")


def tokenizer_folder(folder: Path) -> Path | None:
    return next((folder / n for n in TOKENIZER_FOLDERS if (folder / n).is_dir()), None)


def load_processor(arch_id: str, folder: Path) -> Any:
    """The Qwen3-VL processor in ``folder``, or its tokenizer when the processor cannot be built (its video
    processor needs torchvision); only the chat template and the tokenizer are used."""
    from transformers import AutoProcessor, AutoTokenizer
    if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        raise ModelLoadError(f"The {short_label(arch_id)} tokenizer was not found: {folder} should hold the Qwen3-VL "
                             "processor / tokenizer files (tokenizer.json, tokenizer_config.json, chat template), as "
                             "in the tokenizer/ folder of the model on Hugging Face. Tokenizers are not part of "
                             "checkpoints and are not shipped with this program.")
    try:
        return _with_chat_template(AutoProcessor.from_pretrained(str(folder), local_files_only=True), folder)
    except ModelLoadError:
        raise
    except Exception as e:
        log.info("AutoProcessor could not load %s (%s); using the tokenizer alone", folder, e)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"Loading the {short_label(arch_id)} tokenizer from {folder} failed: {e}") from e
    return _with_chat_template(tok, folder)


def _with_chat_template(tok: Any, folder: Path) -> Any:
    if getattr(tok, "chat_template", None):
        return tok
    legacy = folder / "chat_template.json"  # the processor's template file, which a bare tokenizer does not read
    if legacy.is_file():
        tok.chat_template = json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
    if not getattr(tok, "chat_template", None):
        raise ModelLoadError(f"The tokenizer in {folder} has no chat template; FLUX.3 prompts are encoded through it "
                             "(chat_template.jinja, chat_template.json or tokenizer_config.json).")
    return tok


def load_components(arch_id: str, folder: Path, dtype: torch.dtype, transformer_cfg: dict[str, Any], what: str,
                    layers: tuple[int, ...], text_encoders: bool = True) -> dict[str, Any]:
    """VAE, Qwen3-VL text encoder, processor and scheduler config from a diffusers-layout ``folder``
    (``text_encoders`` False: the text encoder's folder is checked, not loaded)."""
    import transformers
    from diffusers import AutoencoderKLFlux2

    from architectures.sd_loading import _variant
    absent = [n + "/" for n in ("vae", "text_encoder") if not (folder / n / "config.json").is_file()]
    tok_folder = tokenizer_folder(folder)
    if tok_folder is None:
        absent.append("tokenizer/")
    if absent:
        raise ModelLoadError(f"{what} {folder} lacks {', '.join(absent)}: {short_label(arch_id)} needs vae/ "
                             f"(AutoencoderKLFlux2), text_encoder/ ({TEXT_ENCODER[1]}) and tokenizer/ (the Qwen3-VL "
                             "processor) subfolders, each with config and weights, as in the model's Hugging Face "
                             "repository.")
    vae_cfg = read_json(folder / "vae" / "config.json")
    if vae_cfg.get("_class_name") not in (None, "AutoencoderKLFlux2"):
        raise ModelLoadError(f"{folder / 'vae'} holds a {vae_cfg.get('_class_name')}, not the FLUX.2 / FLUX.3 "
                             "autoencoder (AutoencoderKLFlux2, 32 latent channels).")
    check_text_encoder(arch_id, folder, transformer_cfg, layers)
    load = part_loader(folder)
    vae = load("vae", lambda: AutoencoderKLFlux2.from_pretrained(
        str(folder), subfolder="vae", torch_dtype=dtype, local_files_only=True, variant=_variant(folder / "vae")))
    cls = getattr(transformers, TEXT_ENCODER[1])
    text_encoder = load("text_encoder", lambda: cls.from_pretrained(
        str(folder / "text_encoder"), dtype=dtype, local_files_only=True,
        variant=_variant(folder / "text_encoder"))) if text_encoders else None
    sched = folder / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        sched = default_config_dir(arch_id) / "scheduler" / "scheduler_config.json"
    return {"vae": vae, "text_encoders": [text_encoder] if text_encoders else [],
            "tokenizers": [load_processor(arch_id, tok_folder)], "scheduler_config": read_json(sched)}


# ---------------------------------------------------------------------------------------------------------
# Diffusers folder
# ---------------------------------------------------------------------------------------------------------

def _load_folder(arch_id: str, folder: Path, dtype: torch.dtype, layers: tuple[int, ...], text_encoders: bool,
                 denoiser: bool) -> dict[str, Any]:
    from diffusers import Flux3Transformer2DModel

    from architectures.sd_loading import _variant
    tr_path = folder / "transformer" / "config.json"
    cfg = read_json(tr_path) if tr_path.is_file() else {}
    cls = str(cfg.get("_class_name", ""))
    if cls.startswith("Flux2"):
        from architectures.flux2_loading import config_features as flux2_features
        _refuse_flux2(arch_id, folder, flux2_features(cfg))
    if cls != "Flux3Transformer2DModel":
        from architectures.dit_loading import describe_dit_folder
        family, phrase = describe_dit_folder(folder)  # raises for folders without transformer/
        check_family(arch_id, folder, family, phrase)
    check_variant(arch_id, folder, bool(cfg.get("flow_map", False)),
                  f"transformer/config.json: flow_map {str(bool(cfg.get('flow_map', False))).lower()}")
    parts = load_components(arch_id, folder, dtype, cfg, "The model folder", layers, text_encoders)
    load = part_loader(folder)
    parts["transformer"] = load("transformer", lambda: Flux3Transformer2DModel.from_pretrained(
        str(folder), subfolder="transformer", torch_dtype=dtype, local_files_only=True,
        variant=_variant(folder / "transformer"))) if denoiser else None
    return parts


# ---------------------------------------------------------------------------------------------------------
# BFL single file + components folder
# ---------------------------------------------------------------------------------------------------------

def _check_file_family(arch_id: str, path: Path, raw_keys: list[str], keys: list[str], shape) -> None:
    if BFL_MARKER in keys:
        return
    if "early_stream_modulations.image.linear.weight" in keys:
        raise ModelLoadError(f"{path} is a FLUX.3 transformer in diffusers key layout; choose the whole diffusers "
                             "folder, or the original BFL single file.")
    if "double_stream_modulation_img.lin.weight" in keys:
        from architectures.flux2_loading import file_features as flux2_features
        _refuse_flux2(arch_id, path, flux2_features(keys, shape))
    from architectures.dit_loading import describe_dit_checkpoint
    family, phrase = describe_dit_checkpoint(raw_keys)
    check_family(arch_id, path, family, phrase)


def _check_against_config(arch_id: str, path: Path, keys: list[str], features: dict[str, Any],
                          config_dir: Path) -> dict[str, Any]:
    from architectures.flux3_keys import IGNORED_BFL_PREFIXES, flux3_bfl_keys
    from architectures.flux2_loading import transformer_config
    cfg = transformer_config(arch_id, config_dir, "Flux3Transformer2DModel", "FLUX.3")
    wanted = config_features(cfg)
    if wanted != features:
        raise ModelLoadError(f"{path} holds a FLUX.3 transformer with {describe_shape(features)}"
                             f"{' (step-distilled)' if features['distilled'] else ''}, but the config folder "
                             f"{config_dir / 'transformer'} describes {describe_shape(wanted)}"
                             f"{' (step-distilled)' if wanted['distilled'] else ''}. Pass the config folder that "
                             f"belongs to this checkpoint (model.config_path), or pick a {short_label(arch_id)} model.")
    have = {k for k in keys if not k.startswith(IGNORED_BFL_PREFIXES)}
    expected = flux3_bfl_keys(cfg)
    missing, extra = sorted(expected - have), sorted(have - expected)
    if missing or extra:
        details = ([f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"] if missing else []) + \
                  ([f"{len(extra)} tensor(s) the config has no place for, e.g. {extra[0]}"] if extra else [])
        raise ModelLoadError(f"The transformer in {path} does not match the config folder "
                             f"{config_dir / 'transformer'}: {'; '.join(details)}.")
    return cfg


def _load_single_file(arch_id: str, path: Path, config_dir: Path, dtype: torch.dtype, components: Path | None,
                      layers: tuple[int, ...], text_encoders: bool, denoiser: bool) -> dict[str, Any]:
    from diffusers import Flux3Transformer2DModel

    from architectures.flux2_loading import _strip, transformer_from_single_file
    from architectures.sd_loading import _Checkpoint
    ckpt = _Checkpoint(path)
    raw_keys = ckpt.keys()
    keys, prefix = _strip(raw_keys)
    shape = lambda k: ckpt.shape(prefix + k)  # noqa: E731
    _check_file_family(arch_id, path, raw_keys, keys, shape)
    features = file_features(keys, shape)
    check_variant(arch_id, path, features["distilled"],
                  f"{'it has' if features['distilled'] else 'no'} {DISTILLED_MARKER.split('.')[0]}.*")
    cfg = _check_against_config(arch_id, path, keys, features, config_dir)
    parts = load_components(arch_id, components_folder(path, components, "FLUX.3"), dtype, cfg, "model.components_path:",
                            layers, text_encoders)
    if not denoiser:
        parts["transformer"] = None
        return parts
    sd = ckpt.read(prefix)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    parts["transformer"] = transformer_from_single_file(Flux3Transformer2DModel, sd, path, config_dir, dtype)
    return parts


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------

def load_flux3_components(arch_id: str, model_path: Path, config_dir: Path | None, dtype: torch.dtype,
                          components_path: Path | None, layers: tuple[int, ...], text_encoders: bool = True,
                          denoiser: bool = True) -> dict[str, Any]:
    """FLUX.3 from a diffusers folder, or a BFL transformer file plus a components folder.  ``layers``: the text
    encoder's hidden states the family stacks (checked against the transformer's text width).

    Returns ``{"transformer", "vae", "text_encoders": [Qwen3-VL], "tokenizers": [processor or tokenizer],
    "scheduler_config"}``."""
    if arch_id not in FLUX3_IDS:
        raise ModelLoadError(f"{arch_id!r} is not a FLUX.3 architecture ({', '.join(FLUX3_IDS)})")
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"Model path {path} does not exist.")
    with no_hf_progress_bars():
        if path.is_dir():
            return _load_folder(arch_id, path, dtype, layers, text_encoders, denoiser)
        configs = Path(config_dir).expanduser() if config_dir else default_config_dir(arch_id)
        return _load_single_file(arch_id, path, configs, dtype, components_path, layers, text_encoders, denoiser)


__all__ = ["load_flux3_components", "load_processor", "check_variant", "config_features", "file_features",
           "FLUX3_IDS", "BFL_MARKER", "DISTILLED_MARKER"]
