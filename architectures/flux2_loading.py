"""Loading FLUX.2 (dev, klein 4B / 9B and their undistilled base models) offline.

Accepted layouts (the user picks the variant; nothing is switched silently):

* **diffusers folder** (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``), read with ``local_files_only=True``;
* **BFL single file** of the transformer (``flux2-dev.safetensors``, ``flux-2-klein-4b.safetensors``:
  ``double_blocks.*``, ``single_blocks.*``, ``double_stream_modulation_img.lin.*`` …, optionally prefixed
  ``model.diffusion_model.``) plus ``model.components_path``: a diffusers-layout folder of the same model with
  ``text_encoder/``, ``tokenizer/`` and ``vae/`` (the Hugging Face repository without its transformer does).
  The transformer is read with diffusers' ``Flux2Transformer2DModel.from_single_file`` given an explicit config
  folder (``model.config_path``, default the full-size configs shipped in ``architectures/configs/<id>``):
  diffusers infers every FLUX.2 file as ``flux-2-dev``, so klein needs the explicit config.

Variant checks (before anything large is read): the guidance embedding (dev has one, klein and klein base have
none), the block counts / width / text width compared with the shipped full-size configs (a klein 4B file
chosen as klein 9B or dev is refused, naming what it looks like), the text encoder's kind (Mistral 3 for dev,
Qwen 3 for klein) and its width (3 × hidden size = the transformer's ``joint_attention_dim``).  klein and klein
base have identical tensors: a diffusers folder's ``model_index.json`` (``is_distilled``) tells them apart; for a
single file the choice cannot be checked and is the user's.

Tokenizers are never shipped: the Mistral (dev) and Qwen (klein) tokenizers come from the ``tokenizer/``
folder of the user's model folder (or of ``model.components_path``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from architectures.base import ModelLoadError, check_family, short_label
from architectures.load_util import (components_folder, default_config_dir, no_hf_progress_bars, part_loader,
                                     read_json)


log = logging.getLogger(__name__)

FLUX2_IDS = ("flux2_dev", "flux2_klein_4b", "flux2_klein_9b", "flux2_klein_base_4b", "flux2_klein_base_9b")
DEV_IDS = ("flux2_dev",)
KLEIN_IDS = ("flux2_klein_4b", "flux2_klein_9b", "flux2_klein_base_4b", "flux2_klein_base_9b")
#: what a text encoder of each family is (config model_type) and its class
TEXT_ENCODERS = {"flux2_dev": ("mistral3", "Mistral3ForConditionalGeneration"),
                 **{i: ("qwen3", "Qwen3ForCausalLM") for i in KLEIN_IDS}}
#: variants sharing one transformer shape (klein and klein base differ only in training)
SIZE_GROUPS = {"flux2_dev": "FLUX.2 dev", "flux2_klein_4b": "FLUX.2 klein 4B or klein base 4B",
               "flux2_klein_base_4b": "FLUX.2 klein 4B or klein base 4B",
               "flux2_klein_9b": "FLUX.2 klein 9B or klein base 9B", "flux2_klein_base_9b": "FLUX.2 klein 9B or klein base 9B"}
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


# ---------------------------------------------------------------------------------------------------------
# Features of a transformer (from a config or a BFL file) and the variant check
# ---------------------------------------------------------------------------------------------------------

def config_features(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"guidance": bool(cfg.get("guidance_embeds", True)), "double": int(cfg.get("num_layers", 8)),
            "single": int(cfg.get("num_single_layers", 48)),
            "width": int(cfg.get("num_attention_heads", 48)) * int(cfg.get("attention_head_dim", 128)),
            "joint": int(cfg.get("joint_attention_dim", 15360))}


def _blocks(keys: list[str], prefix: str) -> int:
    idx = [int(k.split(".")[1]) for k in keys if k.startswith(prefix) and k.split(".")[1].isdigit()]
    return max(idx) + 1 if idx else 0


def file_features(keys: list[str], shape) -> dict[str, Any]:
    """Features of a (prefix-stripped) BFL FLUX.2 file; ``shape(key)`` gives a tensor's shape."""
    def dim(key: str, i: int) -> int:
        s = tuple(shape(key)) if key in keys else ()
        return int(s[i]) if len(s) == 2 else 0

    return {"guidance": any(k.startswith("guidance_in.") for k in keys), "double": _blocks(keys, "double_blocks."),
            "single": _blocks(keys, "single_blocks."), "width": dim("img_in.weight", 0), "joint": dim("txt_in.weight", 1)}


def _sizes(f: dict[str, Any]) -> tuple[int, int, int, int]:
    return f["double"], f["single"], f["width"], f["joint"]


def full_size_matches(features: dict[str, Any]) -> list[str]:
    """The ids whose shipped full-size transformer config has these block counts and widths."""
    out = []
    for arch_id in FLUX2_IDS:
        cfg = read_json(default_config_dir(arch_id) / "transformer" / "config.json")
        if _sizes(config_features(cfg))[:3] == _sizes(features)[:3]:  # blocks and width (text width: config check)
            out.append(arch_id)
    return out


def describe_features(f: dict[str, Any]) -> str:
    kind = ("a guidance-distilled FLUX.2 transformer (guidance embedding), like FLUX.2 dev" if f["guidance"] else
            "a FLUX.2 transformer without guidance embedding, like FLUX.2 klein")
    return (f"{kind}, with {f['double']} double / {f['single']} single blocks, width {f['width']}, "
            f"text width {f['joint']}")


def check_variant(arch_id: str, where, features: dict[str, Any], config: dict[str, Any] | None = None,
                  config_where=None) -> None:
    """Refuse a transformer of another FLUX.2 variant (or, with ``config``, one the config does not describe)."""
    chosen = short_label(arch_id)
    phrase = describe_features(features)
    matches = full_size_matches(features)
    if features["guidance"] != (arch_id in DEV_IDS):
        if features["guidance"]:
            check_family(arch_id, where, "flux2_dev", phrase)
        group = SIZE_GROUPS[matches[0]] if matches else "FLUX.2 klein (4B or 9B, distilled or base)"
        raise ModelLoadError(f"You chose {chosen}, but {where} looks like {phrase}. Choose {group} for this model, "
                             f"or pick a {chosen} model.")
    if matches and arch_id not in matches:
        raise ModelLoadError(f"You chose {chosen}, but {where} looks like {phrase}: the size of "
                             f"{SIZE_GROUPS[matches[0]]}. Choose that architecture for this model, or pick a "
                             f"{chosen} model.")
    if config is not None and _sizes(config_features(config)) != _sizes(features):
        raise ModelLoadError(f"{where} looks like {phrase}, but the config folder {config_where} describes "
                             f"{describe_features(config_features(config))}. Pass the config folder that belongs "
                             f"to this checkpoint (model.config_path), or pick a {chosen} model.")


def check_distilled(arch_id: str, folder: Path, index: dict[str, Any]) -> None:
    """klein (step-distilled) and klein base have the same tensors; a diffusers folder says which it is in
    ``model_index.json`` (``is_distilled``), a single file does not (the user's choice stands)."""
    if arch_id not in KLEIN_IDS or not isinstance(index.get("is_distilled"), bool):
        return
    base = "_base_" in arch_id
    if index["is_distilled"] == base:
        other = arch_id.replace("_base_", "_") if base else arch_id.replace("klein_", "klein_base_")
        what = "the step-distilled FLUX.2 klein" if index["is_distilled"] else "an undistilled FLUX.2 klein base model"
        raise ModelLoadError(f"You chose {short_label(arch_id)}, but {folder} is {what} (model_index.json: "
                             f"is_distilled {str(index['is_distilled']).lower()}). Choose the {short_label(other)} "
                             f"architecture for this model, or pick a {short_label(arch_id)} model.")


def _check_text_encoder(arch_id: str, folder: Path, transformer_cfg: dict[str, Any]) -> dict[str, Any]:
    path = folder / "text_encoder" / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no text_encoder/config.json: the {short_label(arch_id)} text encoder "
                             f"({TEXT_ENCODERS[arch_id][1]}) is expected in {folder / 'text_encoder'}.")
    cfg = read_json(path)
    kind, cls = TEXT_ENCODERS[arch_id]
    have = cfg.get("model_type", "")
    if have != kind:
        other = {"mistral3": "a Mistral 3 text encoder (FLUX.2 dev)", "qwen3": "a Qwen 3 text encoder (FLUX.2 klein)"}
        raise ModelLoadError(f"You chose {short_label(arch_id)}, which uses a {cls} text encoder, but "
                             f"{folder / 'text_encoder'} holds {other.get(have, repr(have or 'an unknown model'))}.")
    hidden = int((cfg.get("text_config") or cfg).get("hidden_size", 0))
    joint = int(transformer_cfg.get("joint_attention_dim", 0))
    if hidden and joint and 3 * hidden != joint:
        raise ModelLoadError(f"The text encoder in {folder / 'text_encoder'} (hidden size {hidden}, three layers "
                             f"stacked: {3 * hidden}) does not fit the transformer, which takes text of width {joint}. "
                             "The text encoder belongs to another FLUX.2 size (klein 4B uses Qwen3-4B, klein 9B "
                             "Qwen3-8B).")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------

def load_tokenizer(arch_id: str, folder: Path) -> Any:
    """The Mistral (dev) / Qwen (klein) tokenizer from ``folder`` (a model folder's ``tokenizer/``)."""
    from transformers import AutoTokenizer
    want = "Mistral (PixtralProcessor / tokenizer.json)" if arch_id in DEV_IDS else "Qwen2 (tokenizer.json)"
    if not folder.is_dir() or not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json",
                                                                         "tokenizer.model", "tekken.json")):
        raise ModelLoadError(f"The {short_label(arch_id)} tokenizer was not found: {folder} should hold the {want} "
                             "tokenizer files (tokenizer.json and tokenizer_config.json, as in the tokenizer/ folder "
                             "of the model on Hugging Face). Tokenizers are not part of checkpoints and are not "
                             "shipped with this program.")
    tok = None
    if arch_id in DEV_IDS and (folder / "processor_config.json").is_file():
        from transformers import AutoProcessor
        try:
            tok = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # fall back to the bare tokenizer: only its chat template is used
            log.info("AutoProcessor could not load %s (%s); using the tokenizer alone", folder, e)
    if tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"Loading the {short_label(arch_id)} tokenizer from {folder} failed: {e}") from e
    if not getattr(tok, "chat_template", None) and not getattr(getattr(tok, "tokenizer", None), "chat_template", None):
        raise ModelLoadError(f"The tokenizer in {folder} has no chat template; {short_label(arch_id)} prompts are "
                             "encoded through it (chat_template in tokenizer_config.json or chat_template.jinja).")
    return tok


def _text_encoder_class(arch_id: str):
    import transformers
    return getattr(transformers, TEXT_ENCODERS[arch_id][1])


def _load_components(arch_id: str, folder: Path, dtype: torch.dtype, transformer_cfg: dict[str, Any],
                     what: str, text_encoders: bool = True) -> dict[str, Any]:
    """VAE, text encoder, tokenizer and scheduler config from a diffusers-layout ``folder`` (``text_encoders``
    False: no text encoder is loaded, its folder is still checked)."""
    from diffusers import AutoencoderKLFlux2

    from architectures.sd_loading import _variant
    absent = [n + "/" for n in ("vae", "text_encoder") if not (folder / n / "config.json").is_file()]
    if not (folder / "tokenizer").is_dir():
        absent.append("tokenizer/")
    if absent:
        raise ModelLoadError(f"{what} {folder} lacks {', '.join(absent)}: {short_label(arch_id)} needs vae/ "
                             f"(AutoencoderKLFlux2), text_encoder/ ({TEXT_ENCODERS[arch_id][1]}) and tokenizer/ "
                             "subfolders, each with config and weights, as in the model's Hugging Face repository.")
    vae_cfg = read_json(folder / "vae" / "config.json")
    if vae_cfg.get("_class_name") not in (None, "AutoencoderKLFlux2"):
        raise ModelLoadError(f"{folder / 'vae'} holds a {vae_cfg.get('_class_name')}, not the FLUX.2 autoencoder "
                             "(AutoencoderKLFlux2, 32 latent channels).")
    _check_text_encoder(arch_id, folder, transformer_cfg)
    load = part_loader(folder)
    vae = load("vae", lambda: AutoencoderKLFlux2.from_pretrained(
        str(folder), subfolder="vae", torch_dtype=dtype, local_files_only=True, variant=_variant(folder / "vae")))
    cls = _text_encoder_class(arch_id)
    text_encoder = load("text_encoder", lambda: cls.from_pretrained(
        str(folder / "text_encoder"), dtype=dtype, local_files_only=True,
        variant=_variant(folder / "text_encoder"))) if text_encoders else None
    tokenizer = load_tokenizer(arch_id, folder / "tokenizer")
    sched = folder / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        sched = default_config_dir(arch_id) / "scheduler" / "scheduler_config.json"
    return {"vae": vae, "text_encoders": [text_encoder] if text_encoders else [], "tokenizers": [tokenizer],
            "scheduler_config": read_json(sched)}


# ---------------------------------------------------------------------------------------------------------
# Diffusers folder
# ---------------------------------------------------------------------------------------------------------

def _load_folder(arch_id: str, folder: Path, dtype: torch.dtype, text_encoders: bool = True,
                 denoiser: bool = True) -> dict[str, Any]:
    from diffusers import Flux2Transformer2DModel

    from architectures.dit_loading import describe_dit_folder
    from architectures.sd_loading import _variant
    tr_path = folder / "transformer" / "config.json"
    cfg = read_json(tr_path) if tr_path.is_file() else {}
    if cfg.get("_class_name") != "Flux2Transformer2DModel":
        family, phrase = describe_dit_folder(folder)  # raises for folders without transformer/
        check_family(arch_id, folder, family, phrase)
    index = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    pipeline = index.get("_class_name", "")
    check_variant(arch_id, f"{folder}{f' ({pipeline})' if pipeline else ''}", config_features(cfg))
    check_distilled(arch_id, folder, index)
    parts = _load_components(arch_id, folder, dtype, cfg, "The model folder", text_encoders)
    load = part_loader(folder)
    parts["transformer"] = load("transformer", lambda: Flux2Transformer2DModel.from_pretrained(
        str(folder), subfolder="transformer", torch_dtype=dtype, local_files_only=True,
        variant=_variant(folder / "transformer"))) if denoiser else None
    return parts


# ---------------------------------------------------------------------------------------------------------
# BFL single file + components folder
# ---------------------------------------------------------------------------------------------------------

def _strip(keys: list[str]) -> tuple[list[str], str]:
    for p in BFL_PREFIXES:
        if keys and all(k.startswith(p) for k in keys):
            return [k[len(p):] for k in keys], p
    return keys, ""


def _load_single_file(arch_id: str, path: Path, config_dir: Path, dtype: torch.dtype,
                      components: Path | None, text_encoders: bool = True,
                      denoiser: bool = True) -> dict[str, Any]:
    from diffusers import Flux2Transformer2DModel

    from architectures.dit_loading import describe_dit_checkpoint
    from architectures.flux2_keys import flux2_bfl_keys
    from architectures.sd_loading import _Checkpoint

    ckpt = _Checkpoint(path)
    raw_keys = ckpt.keys()
    keys, prefix = _strip(raw_keys)
    if "double_stream_modulation_img.lin.weight" not in keys:
        if any(k.startswith("double_stream_modulation_img.linear") for k in keys):
            raise ModelLoadError(f"{path} is a FLUX.2 transformer in diffusers key layout; choose the whole diffusers "
                                 "folder, or the original BFL file (flux2-dev.safetensors, flux-2-klein-4b.safetensors).")
        family, phrase = describe_dit_checkpoint(raw_keys)
        check_family(arch_id, path, family, phrase)
    features = file_features(keys, lambda k: ckpt.shape(prefix + k))
    cfg = transformer_config(arch_id, config_dir, "Flux2Transformer2DModel", "FLUX.2")
    check_variant(arch_id, path, features, cfg, config_dir / "transformer")
    expected = flux2_bfl_keys(cfg)
    have = set(keys)
    missing, extra = sorted(expected - have), sorted(have - expected)
    if missing or extra:
        details = ([f"{len(missing)} tensor(s) missing, e.g. {missing[0]}"] if missing else []) + \
                  ([f"{len(extra)} tensor(s) the config has no place for, e.g. {extra[0]}"] if extra else [])
        raise ModelLoadError(f"The transformer in {path} does not match the config folder {config_dir / 'transformer'}: "
                             f"{'; '.join(details)}.")
    components = components_folder(path, components, "FLUX.2")
    parts = _load_components(arch_id, components, dtype, cfg, "model.components_path:", text_encoders)
    if not denoiser:
        parts["transformer"] = None
        return parts
    sd = ckpt.read(prefix) if prefix else ckpt.read("")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    parts["transformer"] = transformer_from_single_file(Flux2Transformer2DModel, sd, path, config_dir, dtype)
    return parts


def transformer_config(arch_id: str, config_dir: Path, class_name: str, family: str) -> dict:
    """The transformer config of a config folder for a single file, refused unless it is ``class_name``'s."""
    tr_cfg_path = config_dir / "transformer" / "config.json"
    if not tr_cfg_path.is_file():
        raise ModelLoadError(f"Config folder {config_dir} lacks transformer/config.json (a diffusers-layout config "
                             f"folder of {short_label(arch_id)} is expected; leave model.config_path empty to use the "
                             "shipped one).")
    cfg = read_json(tr_cfg_path)
    if cfg.get("_class_name") != class_name:
        raise ModelLoadError(f"The config folder {config_dir} describes a {cfg.get('_class_name')}, not a {family} "
                             f"transformer. Pass a {family} config folder (model.config_path).")
    return cfg


def transformer_from_single_file(cls, sd: dict[str, torch.Tensor], path: Path, config_dir: Path,
                                 dtype: torch.dtype) -> torch.nn.Module:
    """``cls.from_single_file`` (diffusers' own key converter) on the prefix-free state dict of ``path``, with the
    explicit config folder and nothing fetched; any failure or weight left unloaded is a ModelLoadError."""
    from diffusers.utils import logging as dlogging
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # from_single_file's dtype cast warns "modules … kept in float32: []"
    try:
        with no_hf_progress_bars():
            transformer = cls.from_single_file(sd, config=str(config_dir), subfolder="transformer",
                                               local_files_only=True, torch_dtype=dtype)
    except Exception as e:
        raise ModelLoadError(f"Loading the transformer from {path} with the config {config_dir / 'transformer'} "
                             f"failed: {e}") from e
    finally:
        dlogging.set_verbosity(level)
    meta = [n for n, p in transformer.named_parameters() if p.is_meta]
    if meta:
        raise ModelLoadError(f"The transformer from {path} was left partly unloaded ({meta[0]}).")
    return transformer.eval()


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------

def load_flux2_components(arch_id: str, model_path: Path, config_dir: Path | None = None,
                          dtype: torch.dtype = torch.float32, components_path: Path | None = None,
                          text_encoders: bool = True, denoiser: bool = True) -> dict[str, Any]:
    """FLUX.2 from a diffusers folder, or a BFL transformer file plus a components folder (``text_encoders``
    False: everything but the text encoder, for a run whose caption embeddings are all cached on disk).

    Returns ``{"transformer", "vae", "text_encoders": [Mistral3 or Qwen3], "tokenizers": [tokenizer or
    processor], "scheduler_config"}``."""
    if arch_id not in FLUX2_IDS:
        raise ModelLoadError(f"{arch_id!r} is not a FLUX.2 architecture ({', '.join(FLUX2_IDS)})")
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"Model path {path} does not exist.")
    if path.is_dir():
        return _load_folder(arch_id, path, dtype, text_encoders, denoiser)
    configs = Path(config_dir).expanduser() if config_dir else default_config_dir(arch_id)
    return _load_single_file(arch_id, path, configs, dtype, components_path, text_encoders, denoiser)


__all__ = ["load_flux2_components", "load_tokenizer", "check_variant", "config_features", "file_features",
           "full_size_matches", "FLUX2_IDS", "DEV_IDS", "KLEIN_IDS", "default_config_dir"]
