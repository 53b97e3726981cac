"""Loading SD1.5 / SDXL base models, offline, from a diffusers folder or an original-layout single file.

Nothing is downloaded: diffusers folders are read with ``local_files_only=True``; single files get their
configs, tokenizers and scheduler from a local diffusers-layout config folder (by default the full-size
ones shipped in ``architectures/configs/<arch_id>``).

Single files are converted here rather than through ``from_single_file``: the state dicts are mapped with
diffusers' own converters (``diffusers.loaders.single_file_utils``), then loaded *strictly* into models
built from the local configs.  ``from_single_file`` loads non-strictly (a tensor missing from the file
stays on the meta device: silently for the text encoders, as a puzzling "Cannot copy out of meta tensor"
for the UNet/VAE), guesses which text encoder is which from the embedding width (two encoders of the same
width get the same weights), and re-reads the whole file once per component.

Every failure the user can cause is a ``ModelLoadError`` whose message says what was chosen and what was
found.  The family is checked before anything is converted, and nothing silently switches families.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from architectures.base import ModelLoadError, check_family, short_label
from architectures.load_util import default_config_dir, part_loader, read_json
from architectures.ldm_keys import SD15_TE_PREFIX, SDXL_TE1_PREFIX, SDXL_TE2_PREFIX, UNET_PREFIX, VAE_PREFIX

log = logging.getLogger(__name__)

ARCH_LABELS: dict[str, str] = {a: short_label(a) for a in ("sd15", "sdxl")}  # the families this loader reads
SAFETENSORS_SUFFIXES = (".safetensors",)
# Pickled checkpoints are read with torch.load(weights_only=True) only: plain unpickling runs arbitrary code.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")

_TEXT_ENCODER_DIRS = {"sd15": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
_TOKENIZER_DIRS = {"sd15": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}
_TE_PREFIXES = {"sd15": (SD15_TE_PREFIX,), "sdxl": (SDXL_TE1_PREFIX, SDXL_TE2_PREFIX)}


# ---------------------------------------------------------------------------------------------------------
# What a file / folder looks like
# ---------------------------------------------------------------------------------------------------------

def describe_checkpoint(keys: Iterable[str], shape: Callable[[str], tuple[int, ...]] | None = None
                        ) -> tuple[str | None, str]:
    """(family id or None, a phrase for messages) of a single-file checkpoint, from its key names.

    ``shape(key)`` (optional) lets it tell inpainting UNets (9 input channels) apart."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(k.startswith(("lora_unet_", "lora_te", "lycoris_")) or ".lora_down." in k or ".lora_A." in k
           or ".hada_w1_a" in k or ".lokr_w1" in k for k in keys):
        return None, "a LoRA / LyCORIS adapter, not a base model"
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        return None, "an SD3 / SD3.5 checkpoint (joint_blocks.* keys)"
    if has("model.diffusion_model.double_blocks.") or has("double_blocks."):
        return None, "a FLUX checkpoint (double_blocks.* keys)"
    if not has(UNET_PREFIX) and (has("down_blocks.") or has("encoder.down_blocks.") or has("text_model.")):
        return None, ("a single diffusers-format component (keys like down_blocks.* / text_model.*), "
                      "not a full checkpoint; choose the whole diffusers folder instead")

    inpainting = ""
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    if shape is not None and conv_in in keys and len(shape(conv_in)) == 4 and shape(conv_in)[1] == 9:
        inpainting = " inpainting"

    if has(SDXL_TE2_PREFIX):
        return "sdxl", (f"an SDXL{inpainting} checkpoint (it has conditioner.embedders.1.model.* keys: "
                        "the OpenCLIP-bigG text encoder)")
    if has("conditioner.embedders.0.model."):
        return None, ("an SDXL refiner checkpoint (its only text encoder is OpenCLIP-bigG under "
                      "conditioner.embedders.0.model.*); the refiner is not a supported base model")
    if has(SD15_TE_PREFIX):
        return "sd15", (f"an SD 1.x{inpainting} checkpoint (it has cond_stage_model.transformer.* keys: "
                        "the CLIP-L text encoder)")
    if has("cond_stage_model.model."):
        return None, ("an SD 2.x checkpoint (its text encoder is OpenCLIP-H under cond_stage_model.model.*), "
                      "which is neither SD 1.5 nor SDXL")
    if has(UNET_PREFIX):
        # A UNet without text encoders: still say which family the UNet belongs to.
        if UNET_PREFIX + "label_emb.0.0.weight" in keys:
            return "sdxl", "an SDXL UNet-only file (model.diffusion_model.* with label_emb, no text encoders)"
        return "sd15", "an SD 1.x-style UNet-only file (model.diffusion_model.* keys, no text encoders)"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
    return None, f"not a Stable Diffusion checkpoint (first keys: {sample})"


def describe_folder(folder: Path) -> tuple[str | None, str]:
    """(family id or None, a phrase for messages) of a diffusers-layout folder; raises ``ModelLoadError``
    when the folder is not a diffusers layout at all."""
    index_path, unet_cfg_path = folder / "model_index.json", folder / "unet" / "config.json"
    if not index_path.is_file() and not unet_cfg_path.is_file():
        hint = ""
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        if files:
            hint = f" It contains {', '.join(files[:3])}: choose that file itself to load a single-file checkpoint."
        elif (folder / "transformer").is_dir():
            hint = " It has a transformer/ folder: a transformer-based model (SD3, FLUX, …), not SD 1.5 / SDXL."
        raise ModelLoadError(f"{folder} is a folder but not a diffusers model folder (it has neither "
                             f"model_index.json nor unet/config.json).{hint}")
    index = read_json(index_path) if index_path.is_file() else {}
    pipeline = str(index.get("_class_name", ""))
    if not unet_cfg_path.is_file():
        if (folder / "transformer").is_dir():
            return None, f"a transformer-based model folder ({pipeline or 'no UNet'}), not SD 1.5 / SDXL"
        return None, f"a diffusers folder without unet/config.json ({pipeline or 'unknown pipeline'})"
    unet_cfg = read_json(unet_cfg_path)
    has_te2 = (folder / "text_encoder_2").is_dir() or "text_encoder_2" in index
    text_time = unet_cfg.get("addition_embed_type") == "text_time"
    if has_te2 or text_time or "XL" in pipeline:
        if not (folder / "text_encoder").is_dir() and index.get("text_encoder", [None])[0] is None and has_te2:
            return None, "an SDXL refiner folder (text_encoder_2 only); the refiner is not a supported base model"
        clues = [c for c, present in (("text_encoder_2/", has_te2),
                                      ("unet addition_embed_type 'text_time'", text_time),
                                      (pipeline, "XL" in pipeline)) if present]
        return "sdxl", f"an SDXL model folder (it has {' and '.join(clues)})"
    width = unet_cfg.get("cross_attention_dim")
    if width == 1024:
        return None, "an SD 2.x model folder (UNet cross_attention_dim 1024), which is neither SD 1.5 nor SDXL"
    if unet_cfg.get("in_channels") == 9:
        return "sd15", f"an SD 1.x inpainting model folder (UNet in_channels 9, {pipeline or 'no model_index'})"
    return "sd15", (f"an SD 1.x model folder ({pipeline or 'no model_index.json'}, no text_encoder_2, "
                    f"UNet cross_attention_dim {width})")


# ---------------------------------------------------------------------------------------------------------
# Single-file reading
# ---------------------------------------------------------------------------------------------------------

class _Checkpoint:
    """Key listing and per-prefix tensor reads of a single file; safetensors are read lazily so that only
    one component's tensors (plus the model being built) are in memory at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None
        self._tensors: dict[str, torch.Tensor] | None = None
        suffix = path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors import safe_open
            try:
                self._handle = safe_open(str(path), framework="pt", device="cpu")
                self._keys = list(self._handle.keys())
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ModelLoadError(f"{path} is not a readable .safetensors file ({e}). It may be incomplete "
                                     "(an interrupted download) or corrupt.") from e
        elif suffix in PICKLE_SUFFIXES:
            self._tensors = self._torch_load(path)
            self._keys = list(self._tensors)
        else:
            raise ModelLoadError(f"{path}: unsupported file type {path.suffix or '(none)'!r}. Choose a "
                                 f".safetensors (or .ckpt) checkpoint, or a diffusers model folder.")

    @staticmethod
    def _torch_load(path: Path) -> dict[str, torch.Tensor]:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            if "weights_only" in str(e) or "Weights only load failed" in str(e):
                raise ModelLoadError(f"{path} contains Python objects besides tensors. It is not unpickled "
                                     "(that could run code hidden in the file); convert it to .safetensors "
                                     "with a tool you trust, or use the .safetensors release.") from e
            raise ModelLoadError(f"{path} is not a readable checkpoint ({e}). It may be incomplete or corrupt.") from e
        # Lightning checkpoints nest the weights under "state_dict" (sometimes twice).
        while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise ModelLoadError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
        return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        if self._handle is not None:
            return tuple(self._handle.get_slice(key).get_shape())
        assert self._tensors is not None
        return tuple(self._tensors[key].shape)

    def read(self, *prefixes: str) -> dict[str, torch.Tensor]:
        keys = [k for k in self._keys if k.startswith(prefixes)]
        if self._handle is not None:
            try:
                return {k: self._handle.get_tensor(k) for k in keys}
            except Exception as e:
                raise ModelLoadError(f"{self.path}: reading tensors failed ({e}); the file is corrupt.") from e
        assert self._tensors is not None
        return {k: self._tensors[k] for k in keys}


def _empty_init() -> Any:
    """Parameters on the meta device while building (no random init of a 2.6 B-parameter model just to
    overwrite it); buffers stay real because nothing in the checkpoint provides them."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # slower, same result
        return nullcontext()
    return init_empty_weights(include_buffers=False)


def _assign(model: nn.Module, sd: Mapping[str, torch.Tensor | None], what: str, source: Path,
            config: Path, dtype: torch.dtype) -> None:
    """Strict load: every parameter must come from the file with the config's shape; cast to ``dtype``."""
    sd = {k: v for k, v in sd.items() if v is not None}
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    # position_ids: a buffer some checkpoints carry and current transformers does not persist.
    unexpected = [k for k in sd if k not in expected and not k.endswith("position_ids")]
    mismatched = [f"{k}: {tuple(sd[k].shape)} in the file, {tuple(expected[k].shape)} in the config"
                  for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        details = []
        if mismatched:
            details.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[0]}")
        if missing:
            details.append(f"{len(missing)} tensor(s) missing from the file, e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} tensor(s) the config has no place for, e.g. {unexpected[0]}")
        advice = ("Pass the config folder that belongs to this checkpoint." if mismatched or unexpected
                  else "The file is incomplete, or the config folder does not belong to it.")
        raise ModelLoadError(f"The {what} in {source} does not match the config folder {config}: "
                             f"{'; '.join(details)}. {advice}")
    model.load_state_dict({k: sd[k].to(dtype).contiguous() if sd[k].is_floating_point() else sd[k]
                           for k in expected}, strict=True, assign=True)
    # nn.Module.to, not ModelMixin.to: diffusers 0.42 warns on every dtype cast ("modules that should be
    # kept in float32: []"). Parameters are already in dtype; this only moves floating buffers along.
    nn.Module.to(model, dtype)
    model.eval()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:  # cannot happen after a strict load; guards against a silently half-loaded model
        raise ModelLoadError(f"The {what} from {source} was left partly unloaded ({meta[0]}).")


def _convert(what: str, source: Path, fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any
             ) -> dict[str, Any]:
    """diffusers' converters index keys directly; a file lacking one raises KeyError & co., not our error."""
    try:
        return fn(*args, **kwargs)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"The {what} in {source} is not in the expected layout ({type(e).__name__}: {e}).") from e


def _check_config_dir(arch_id: str, config_dir: Path) -> None:
    if not config_dir.is_dir():
        raise ModelLoadError(f"Config folder {config_dir} does not exist.")
    # The family first: "it is the SD 1.5 config folder" says more than "it lacks text_encoder_2/".
    family, description = describe_folder(config_dir)
    if family != arch_id:
        raise ModelLoadError(f"You chose {short_label(arch_id)}, but the config folder {config_dir} looks like "
                             f"{description}. Pass the config folder of an {short_label(arch_id)} model.")
    needed = ["unet/config.json", "vae/config.json"] + [f"{d}/config.json" for d in _TEXT_ENCODER_DIRS[arch_id]]
    absent = [n for n in needed if not (config_dir / n).is_file()]
    if absent:
        raise ModelLoadError(f"Config folder {config_dir} is not a complete diffusers-layout config folder for "
                             f"{short_label(arch_id)}: it lacks {', '.join(absent)}.")


def _load_single_file(arch_id: str, path: Path, config_dir: Path, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ckpt = _Checkpoint(path)
    keys = ckpt.keys()
    family, description = describe_checkpoint(keys, ckpt.shape)
    check_family(arch_id, path, family, description)

    # The family is right; now every part must be present before anything is built.
    te_prefixes = _TE_PREFIXES[arch_id]
    parts = {"UNet (model.diffusion_model.*)": UNET_PREFIX, "VAE (first_stage_model.*)": VAE_PREFIX}
    parts.update({f"text encoder {i + 1} ({p}*)": p for i, p in enumerate(te_prefixes)})
    absent = [name for name, prefix in parts.items() if not any(k.startswith(prefix) for k in keys)]
    if absent:
        raise ModelLoadError(f"{path} looks like {description}, but it has no {', no '.join(absent)}. "
                             "Only full checkpoints (UNet, VAE and text encoders in one file) can be loaded.")
    _check_config_dir(arch_id, config_dir)

    unet_cfg = UNet2DConditionModel.load_config(str(config_dir), subfolder="unet", local_files_only=True)
    with _empty_init():
        unet = UNet2DConditionModel.from_config(unet_cfg)
    sd = _convert("UNet", path, convert_ldm_unet_checkpoint, ckpt.read(UNET_PREFIX), unet.config)
    _assign(unet, sd, "UNet", path, config_dir / "unet", dtype)

    vae_cfg = AutoencoderKL.load_config(str(config_dir), subfolder="vae", local_files_only=True)
    with _empty_init():
        vae = AutoencoderKL.from_config(vae_cfg)
    sd = _convert("VAE", path, convert_ldm_vae_checkpoint, ckpt.read(VAE_PREFIX), vae.config)
    _assign(vae, sd, "VAE", path, config_dir / "vae", dtype)

    text_encoders: list[nn.Module] = []
    for i, (prefix, sub) in enumerate(zip(te_prefixes, _TEXT_ENCODER_DIRS[arch_id], strict=True)):
        config = CLIPTextConfig.from_pretrained(str(config_dir / sub), local_files_only=True)
        if prefix == SDXL_TE2_PREFIX:
            with _empty_init():
                encoder: nn.Module = CLIPTextModelWithProjection._from_config(config)
            sd = _convert(f"text encoder {i + 1}", path, convert_open_clip_checkpoint, encoder, ckpt.read(prefix),
                          prefix=prefix)
        else:
            with _empty_init():
                encoder = CLIPTextModel._from_config(config)
            sd = _convert(f"text encoder {i + 1}", path, convert_ldm_clip_checkpoint, ckpt.read(prefix))
        if not hasattr(encoder, "text_model"):
            # transformers >= 5.6 flattened CLIPTextModel; the file keeps the text_model. level.
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        _assign(encoder, sd, f"text encoder {i + 1}", path, config_dir / sub, dtype)
        text_encoders.append(encoder)

    return {"unet": unet, "vae": vae, "text_encoders": text_encoders,
            "tokenizers": _load_tokenizers(arch_id, config_dir),
            "scheduler_config": _scheduler_config(arch_id, config_dir)}


# ---------------------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------------------

_PLAIN_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                  "pytorch_model.bin")


def _variant(sub: Path) -> str | None:
    """``"fp16"`` when a component folder holds only ``*.fp16.*`` weights (common in Hub downloads)."""
    names = [p.name for p in sub.iterdir()] if sub.is_dir() else []
    if any(n.startswith(_PLAIN_WEIGHTS) for n in names):
        return None
    for variant in ("fp16", "bf16"):
        if any(f".{variant}." in n for n in names):
            return variant
    return None


def _load_diffusers_folder(arch_id: str, folder: Path, dtype: torch.dtype) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family, description = describe_folder(folder)
    check_family(arch_id, folder, family, description)
    needed = ["unet", "vae", *_TEXT_ENCODER_DIRS[arch_id]]
    absent = [n for n in needed if not (folder / n / "config.json").is_file()]
    if absent:
        raise ModelLoadError(f"{folder} looks like {description}, but it lacks {', '.join(n + '/' for n in absent)} "
                             "(each with config.json and weights).")

    load = part_loader(folder)
    unet = load("unet", lambda: UNet2DConditionModel.from_pretrained(
        str(folder), subfolder="unet", torch_dtype=dtype, local_files_only=True, variant=_variant(folder / "unet")))
    vae = load("vae", lambda: AutoencoderKL.from_pretrained(
        str(folder), subfolder="vae", torch_dtype=dtype, local_files_only=True, variant=_variant(folder / "vae")))
    text_encoders = []
    for sub in _TEXT_ENCODER_DIRS[arch_id]:
        cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel
        text_encoders.append(load(sub, lambda cls=cls, sub=sub: cls.from_pretrained(
            str(folder / sub), dtype=dtype, local_files_only=True, variant=_variant(folder / sub))))
    return {"unet": unet, "vae": vae, "text_encoders": text_encoders,
            "tokenizers": _load_tokenizers(arch_id, folder),
            "scheduler_config": _scheduler_config(arch_id, folder)}


# ---------------------------------------------------------------------------------------------------------
# Shared: tokenizers and scheduler
# ---------------------------------------------------------------------------------------------------------

def _load_tokenizers(arch_id: str, folder: Path) -> list[Any]:
    """Tokenizers from ``folder``; the shipped ones where a folder has none (checkpoints never contain
    tokenizers, and both SD families use the same CLIP BPE vocabulary, differing only in SDXL's second
    tokenizer padding with "!")."""
    from transformers import CLIPTokenizer

    out = []
    for sub in _TOKENIZER_DIRS[arch_id]:
        where = folder / sub
        if not ((where / "vocab.json").is_file() or (where / "tokenizer.json").is_file()):
            log.info("%s has no tokenizer files; using the shipped %s tokenizer", where, short_label(arch_id))
            where = default_config_dir(arch_id) / sub
        try:
            out.append(CLIPTokenizer.from_pretrained(str(where), local_files_only=True))
        except Exception as e:
            raise ModelLoadError(f"Loading the tokenizer from {where} failed: {e}") from e
    return out


def _scheduler_config(arch_id: str, folder: Path) -> dict[str, Any]:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        log.info("%s not found; using the shipped %s scheduler config", path, short_label(arch_id))
        path = default_config_dir(arch_id) / "scheduler" / "scheduler_config.json"
    return read_json(path)


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------

def load_sd_components(arch_id: str, model_path: Path, config_dir: Path | None = None,
                       dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Loads an SD1.5 (``arch_id="sd15"``) or SDXL (``"sdxl"``) base model, offline.

    ``model_path``: a diffusers folder (its own configs are used; ``config_dir`` is ignored) or a
    ``.safetensors`` / ``.ckpt`` single file in the original layout, whose configs, tokenizers and
    scheduler come from ``config_dir`` (default: the shipped full-size ``architectures/configs/<arch_id>``).

    Returns ``{"unet", "vae", "text_encoders": [...], "tokenizers": [...], "scheduler_config": dict}``;
    models are in ``dtype`` and eval mode.  Raises ``ModelLoadError`` for a missing path, a folder that is
    not a diffusers layout, an unsupported or corrupt file, a model of the other family, or weights that do
    not fit the configs.
    """
    if arch_id not in ARCH_LABELS:
        raise ModelLoadError(f"Unknown architecture {arch_id!r}; this loader handles {', '.join(ARCH_LABELS)}.")
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"Model path {path} does not exist.")
    if path.is_dir():
        return _load_diffusers_folder(arch_id, path, dtype)
    configs = Path(config_dir).expanduser() if config_dir else default_config_dir(arch_id)
    return _load_single_file(arch_id, path, configs, dtype)


__all__ = ["load_sd_components", "describe_checkpoint", "describe_folder", "default_config_dir", "ARCH_LABELS"]
