"""Writing adapter files the way the community's loaders expect: kohya keys, ``ss_*`` and ``modelspec.*``."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import struct
from pathlib import Path

import torch

from core.io import atomic_save_safetensors

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


def tensor_data_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the safetensors tensor data, header excluded — sd-scripts' ``sshs_model_hash``, which stays
    the same whatever the metadata says."""
    from safetensors.torch import save
    blob = save(tensors)
    header_len = struct.unpack("<Q", blob[:8])[0]
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def tag_frequency(captions_by_folder: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    out = {}
    for folder, captions in captions_by_folder.items():
        freq: dict[str, int] = {}
        for caption in captions:
            for tag in (t.strip() for t in caption.split(",")):
                if tag:
                    freq[tag] = freq.get(tag, 0) + 1
        out[folder] = freq
    return out


def without_network_entries(adapter_md) -> dict[str, str]:
    """:func:`adapter_metadata` without the entries that describe an adapter network (``ss_network_*``, the
    learning rates of its parts): the base of a file that is not an adapter (an embedding, a ControlNet)."""
    return {k: v for k, v in adapter_md.items()
            if not k.startswith("ss_network_") and k not in ("ss_unet_lr", "ss_text_encoder_lr")}


def adapter_metadata(arch, settings, *, steps: int, epoch: int, num_images: int, tag_freq: dict,
                     model_name: str, started_at: float, mixed_precision: str, resolution: tuple[int, int],
                     tensors_hash: str) -> dict[str, str]:
    n = settings.network
    o = settings.optimizer
    title = settings.saving.output_name
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    te_lr = o.text_encoder_lr or o.learning_rate
    from core.adapters.network import AdapterOptions, network_args, network_module
    options = AdapterOptions.from_settings(n)
    alpha = n.alpha if n.alpha else n.rank
    md = {
        # "networks.lora" for plain LoRA, "lycoris.kohya" for the LyCORIS algorithms (and LoRA with DoRA)
        "ss_network_module": network_module(n.algorithm, options),
        "ss_network_dim": str(n.rank),
        # the alpha the file's keys carry (rs-LoRA writes alpha·√rank so that alpha/rank is the scale)
        "ss_network_alpha": str(alpha * n.rank ** 0.5 if options.rs_lora else alpha),
        "ss_network_dropout": str(n.dropout),
        "ss_network_args": json.dumps(network_args(n)),
        "ss_base_model_version": arch.ss_base_model_version,
        "ss_v2": "False",
        "ss_output_name": title,
        "ss_sd_model_name": model_name,
        "ss_resolution": f"({resolution[0]}, {resolution[1]})",
        "ss_num_train_images": str(num_images),
        "ss_tag_frequency": json.dumps(tag_freq),
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_learning_rate": str(o.learning_rate),
        "ss_unet_lr": str(o.learning_rate),
        "ss_text_encoder_lr": str(te_lr if n.train_text_encoder else 0.0),
        "ss_network_train_unet_only": str(not n.train_text_encoder),
        "ss_optimizer": o.optimizer_type,
        "ss_lr_scheduler": o.lr_scheduler,
        "ss_lr_warmup_steps": str(o.lr_warmup_steps),
        "ss_max_grad_norm": str(o.max_grad_norm),
        "ss_batch_size_per_device": str(settings.schedule.train_batch_size),
        "ss_gradient_accumulation_steps": str(settings.schedule.gradient_accumulation_steps),
        "ss_seed": str(settings.schedule.seed),
        "ss_noise_offset": str(settings.schedule.noise_offset),
        "ss_min_snr_gamma": str(settings.schedule.min_snr_gamma),
        "ss_clip_skip": str(settings.model.clip_skip),
        "ss_mixed_precision": mixed_precision,
        "ss_caption_dropout_rate": str(settings.dataset.caption_dropout_rate),
        "ss_shuffle_caption": str(settings.dataset.shuffle_caption),
        "ss_keep_tokens": str(settings.dataset.keep_tokens),
        "ss_flip_aug": str(settings.dataset.flip_aug),
        "ss_zero_terminal_snr": str(settings.model.zero_terminal_snr),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(now.timestamp()),
        "sshs_model_hash": tensors_hash,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": arch.modelspec_architecture,
        "modelspec.implementation": arch.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": now.isoformat(),
        "modelspec.hash_sha256": "0x" + tensors_hash,
    }
    if settings.saving.trigger_phrase:
        md["modelspec.trigger_phrase"] = settings.saving.trigger_phrase
    return md


def save_adapter_files(path: Path, network, metadata_fn, save_precision: str, export=None) -> list[Path]:
    """Write the adapter file(s) atomically; returns their paths, the main file first.

    ``export(state_dict) -> {suffix: tensors}`` is the family's hook (``Architecture.export_adapter``): ``""``
    is ``path`` itself, another suffix is written beside it as ``<stem><suffix>.safetensors``.
    ``metadata_fn(tensors_hash, suffix)`` builds each file's metadata."""
    return write_adapter_files(path, network.export_state_dict(SAVE_DTYPES[save_precision]), metadata_fn, export)


def write_adapter_files(path: Path, tensors: dict, metadata_fn, export=None) -> list[Path]:
    """:func:`save_adapter_files` for tensors already in the network's export layout (``{target}.{tensor}``)."""
    files = export(tensors) if export is not None else {"": tensors}
    out = []
    for suffix in sorted(files, key=lambda s: s != ""):
        target = path if not suffix else path.with_name(f"{path.stem}{suffix}{path.suffix}")
        t = files[suffix]
        out.append(atomic_save_safetensors(target, t, metadata_fn(tensor_data_sha256(t), suffix)))
    return out
