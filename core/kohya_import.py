"""Import of kohya configs: a kohya_ss GUI config (the JSON the GUI saves) or an sd-scripts training TOML (with
its ``dataset_config`` TOML) into the typed settings, with a report of every key: what it became, or why not.

The architecture is the config's own choice, never guessed from weights: the GUI's model-type checkboxes (named
after sd-scripts' base model versions, which each family declares as ``ss_base_model_version``: ``sdxl``,
``sd3_checkbox``, ``flux1_checkbox``; none ticked is train_network.py, SD 1.x), or, for a TOML that does not
say, the caller's.  Paths go through the app's folder confinement: one outside the allowed folders is reported
and not taken.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config import AppConfig, PathNotAllowed, confine, load_config
from core.prompts import OPTIONS as PROMPT_OPTIONS
from core.prompts import split_options
from core.settings import (ADAPTER_ALGORITHMS, LR_SCHEDULERS, OPTIMIZERS, TIMESTEP_SAMPLING, Settings, SettingsError,
                           SubsetSettings, set_value)


class KohyaImportError(SettingsError):
    """The file cannot be imported at all (not a kohya config, or no architecture); the message says why."""


@dataclass
class ImportReport:
    """Every key of the imported file(s): ``mapped`` (kohya key, our setting, value) and ``ignored`` (kohya key,
    value, why).  Keys of the dataset config are named like ``datasets[0].subsets[1].num_repeats``."""
    source: str
    kind: str
    mapped: list[tuple[str, str, Any]] = field(default_factory=list)
    ignored: list[tuple[str, Any, str]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"**Imported {self.kind}** `{self.source}`: {len(self.mapped)} key(s) mapped, "
                 f"{len(self.ignored)} not.", "", "| kohya key | setting | value |", "|---|---|---|"]
        lines += [f"| `{k}` | `{d}` | `{v!r}` |" for k, d, v in self.mapped]
        lines += ["", "| not imported | value | why |", "|---|---|---|"]
        lines += [f"| `{k}` | `{v!r}` | {why} |" for k, v, why in self.ignored]
        return "\n".join(lines)


# -- what the kohya names mean here ------------------------------------------------------------------------

# one kohya key → one setting, the value converted by the schema
DIRECT = {
    "network_dim": "network.rank", "network_alpha": "network.alpha", "network_dropout": "network.dropout",
    "conv_dim": "network.conv_rank", "conv_alpha": "network.conv_alpha", "rank_dropout": "network.rank_dropout",
    "module_dropout": "network.module_dropout", "dora_wd": "network.dora", "use_tucker": "network.use_tucker",
    "use_scalar": "network.use_scalar", "factor": "network.lokr_factor", "decompose_both": "network.decompose_both",
    "full_matrix": "network.full_matrix", "rescaled": "network.oft_rescale", "loraplus_lr_ratio": "network.loraplus_lr_ratio",
    "text_encoder_lr": "optimizer.text_encoder_lr", "max_grad_norm": "optimizer.max_grad_norm",
    "lr_warmup_steps": "optimizer.lr_warmup_steps", "lr_scheduler_num_cycles": "optimizer.lr_scheduler_num_cycles",
    "lr_scheduler_power": "optimizer.lr_scheduler_power",
    "lr_scheduler_min_lr_ratio": "optimizer.lr_scheduler_min_lr_ratio", "lr_decay_steps": "optimizer.lr_decay_steps",
    "lr_scheduler_timescale": "optimizer.lr_scheduler_timescale",
    "max_train_steps": "schedule.max_train_steps", "max_train_epochs": "schedule.max_train_epochs",
    "epoch": "schedule.max_train_epochs", "train_batch_size": "schedule.train_batch_size",
    "gradient_accumulation_steps": "schedule.gradient_accumulation_steps", "seed": "schedule.seed",
    "noise_offset": "schedule.noise_offset", "min_snr_gamma": "schedule.min_snr_gamma",
    "debiased_estimation_loss": "schedule.debiased_estimation_loss",
    "scale_v_pred_loss_like_noise_pred": "schedule.scale_v_pred_loss_like_noise_pred",
    "loss_type": "schedule.loss_type", "huber_schedule": "schedule.huber_schedule", "huber_c": "schedule.huber_c",
    "huber_scale": "schedule.huber_scale", "min_timestep": "schedule.min_timestep",
    "max_timestep": "schedule.max_timestep", "ip_noise_gamma": "schedule.ip_noise_gamma",
    "multires_noise_iterations": "schedule.multires_noise_iterations",
    "multires_noise_discount": "schedule.multires_noise_discount",
    "sigmoid_scale": "schedule.sigmoid_scale", "discrete_flow_shift": "schedule.discrete_flow_shift",
    "logit_mean": "schedule.logit_mean", "logit_std": "schedule.logit_std", "mode_scale": "schedule.mode_scale",
    "mixed_precision": "memory.mixed_precision", "save_precision": "saving.save_precision",
    "save_every_n_epochs": "saving.save_every_n_epochs", "save_every_n_steps": "saving.save_every_n_steps",
    "save_last_n_epochs": "saving.save_last_n", "save_state": "saving.save_state", "output_name": "saving.output_name",
    "training_comment": "saving.trigger_phrase",
    "enable_bucket": "dataset.enable_buckets", "min_bucket_reso": "dataset.min_bucket_reso",
    "max_bucket_reso": "dataset.max_bucket_reso", "bucket_reso_steps": "dataset.bucket_reso_steps",
    "bucket_no_upscale": "dataset.bucket_no_upscale", "shuffle_caption": "dataset.shuffle_caption",
    "keep_tokens": "dataset.keep_tokens", "caption_dropout_rate": "dataset.caption_dropout_rate",
    "flip_aug": "dataset.flip_aug", "caption_extension": "dataset.caption_extension",
    "prior_loss_weight": "dataset.prior_loss_weight", "clip_skip": "model.clip_skip",
    "guidance_scale": "model.guidance", "t5xxl_max_token_length": "model.t5_max_length",
    "apply_t5_attn_mask": "model.apply_t5_attention_mask", "zero_terminal_snr": "model.zero_terminal_snr",
    "sample_every_n_steps": "sampling.sample_every_n_steps", "train_blocks": "network.flux_blocks",
    # train_textual_inversion.py's token
    "token_string": "network.ti_token", "init_word": "network.ti_init_word",
    "num_vectors_per_token": "network.ti_num_vectors",
}
# paths: key → (setting, the app folder a relative path is read in)
PATHS = {
    "pretrained_model_name_or_path": ("model.model_path", "models_dir"), "clip_l": ("model.clip_l_path", "models_dir"),
    "t5xxl": ("model.t5xxl_path", "models_dir"), "ae": ("model.ae_path", "models_dir"),
    "train_data_dir": ("dataset.path", "datasets_dir"), "reg_data_dir": ("dataset.reg_path", "datasets_dir"),
    "output_dir": ("saving.output_dir", "outputs_dir"), "resume": ("saving.resume_from", "outputs_dir"),
    # train_controlnet.py's conditioning folder and starting ControlNet
    "conditioning_data_dir": ("dataset.conditioning_path", "datasets_dir"),
    "controlnet_model_name_or_path": ("network.controlnet_init", "models_dir"),
}
# the sd-scripts script a TOML is for, known by a key only it reads → the algorithm (no network_module there)
SCRIPT_KEYS = {"conditioning_data_dir": "controlnet", "token_string": "textual_inversion"}
# the kohya_ss GUI's LoRA_type → our algorithm (None: no equivalent here)
GUI_LORA_TYPES = {
    "Standard": "lora", "Kohya LoCon": "locon", "LoCon": "locon", "LyCORIS/LoCon": "locon", "LyCORIS/LoHa": "loha",
    "LyCORIS/LoKr": "lokr", "LyCORIS/iA3": "ia3", "LyCORIS/Diag-OFT": "diag-oft", "LyCORIS/BOFT": "boft",
    "LyCORIS/GLoRA": "glora", "LyCORIS/Native Fine-Tuning": "full", "Flux1": "lora", "LyCORIS/DyLoRA": None,
    "Kohya DyLoRA": None, "LoRA-FA": None, "Flux1 OFT": None,
}
# LyCORIS' algo → ours ("lora" in LyCORIS is LoCon: it adapts convolutions too)
LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "ia3": "ia3",
                 "diag-oft": "diag-oft", "boft": "boft", "glora": "glora", "full": "full"}
# LyCORIS' preset → our target layers
LYCORIS_PRESETS = {"full": "full", "full-lin": "full-lin", "attn-mlp": "attn_mlp", "attn-only": "attn",
                   "unet-transformer-only": "attn_mlp"}
# network modules of sd-scripts' plain LoRA (one per family script)
LORA_MODULES = {"networks.lora", "networks.lora_sd3", "networks.lora_flux"}
# network_args / optimizer_args key → setting
NETWORK_ARGS = {"conv_dim": "network.conv_rank", "conv_alpha": "network.conv_alpha", "dropout": "network.dropout",
                "rank_dropout": "network.rank_dropout", "module_dropout": "network.module_dropout",
                "dora_wd": "network.dora", "use_tucker": "network.use_tucker", "use_scalar": "network.use_scalar",
                "factor": "network.lokr_factor", "decompose_both": "network.decompose_both",
                "full_matrix": "network.full_matrix", "rescaled": "network.oft_rescale",
                "loraplus_lr_ratio": "network.loraplus_lr_ratio", "train_blocks": "network.flux_blocks"}
OPTIMIZER_ARGS = {"weight_decay": "optimizer.weight_decay", "eps": "optimizer.eps", "d_coef": "optimizer.d_coef",
                  "momentum": "optimizer.beta1"}
# kohya keys of the launcher, logging, hub upload and GUI: they change nothing about what is trained
LAUNCHER = re.compile(r"^(huggingface_|wandb_|log_|logging_|metadata_|num_cpu_threads|num_processes|num_machines|"
                      r"multi_gpu|gpu_ids|main_process_port|dynamo_|extra_accelerate|additional_parameters|"
                      r"max_data_loader_n_workers|persistent_data_loader|save_model_as|model_list|lowvram|"
                      r"highvram|async_upload|save_as_bool|resume_from_huggingface|save_state_to_huggingface|"
                      r"vae_batch_size|console_|mem_eff_attn|xformers|sdpa)")
# why a few well-known keys have no equivalent
NO_EQUIVALENT = {"sample_sampler": "previews use the model's own scheduler",
                 "model_prediction_type": "no setting for it here: the family decides what its model predicts",
                 "sample_every_n_epochs": "previews are made every N steps here (sampling.sample_every_n_steps)"}
SUBSET_KEYS = ("num_repeats", "caption_extension", "keep_tokens", "shuffle_caption", "flip_aug",
               "caption_dropout_rate", "is_reg")


def _empty(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def kohya_kind(ss_base_model_version: str) -> str:
    """The model kind sd-scripts names a base model version by ("sdxl_base_v1-0" → "sdxl", "sd3.5_large" →
    "sd3", "sd_v1" → "sd"): the GUI's model-type checkbox is named after it."""
    return re.match(r"[a-z]+\d*", ss_base_model_version).group()


def families_by_kind() -> dict[str, list[str]]:
    import architectures
    out: dict[str, list[str]] = {}
    for arch_id, cls in architectures.registry().items():
        out.setdefault(kohya_kind(cls.ss_base_model_version), []).append(arch_id)
    return out


def parse_args(value) -> dict[str, str]:
    """sd-scripts' ``key=value`` argument lists (network_args, optimizer_args): a TOML list or the GUI's
    space-separated string."""
    items = value if isinstance(value, list) else shlex.split(str(value or ""))
    out = {}
    for item in items:
        key, sep, val = str(item).partition("=")
        out[key.strip()] = val.strip() if sep else "True"
    return out


def parse_resolution(value) -> tuple[int, int]:
    """"1024,768", "1024", 1024 or [1024, 768] → (w, h)."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace("x", ",").split(",")
    parts = [int(float(p)) for p in items if str(p).strip()]
    return (parts[0], parts[-1]) if parts else (0, 0)


def square_side(w: int, h: int) -> int:
    """The side of the square of the same area, a multiple of 8 (what dataset.resolution means)."""
    return max(8, int(math.sqrt(w * h)) // 8 * 8)


def parse_sample_prompts(text: str) -> tuple[list[str], dict[str, str]]:
    """sd-scripts' prompt lines → the lines with the options this app reads (``--n --w --h --d --s --l``, kept
    per line: core.prompts) and the other options removed, and those removed options (name → first value)."""
    lines, dropped = [], {}
    for line in str(text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, options = split_options(line)
        kept = [f"--{name} {value}" for name, value in options if name in PROMPT_OPTIONS]
        dropped.update({name: value for name, value in options if name not in PROMPT_OPTIONS and name not in dropped})
        lines.append(" ".join([prompt, *kept]))
    return lines, dropped


# -- reading the files -------------------------------------------------------------------------------------

def read_config(path: Path) -> tuple[str, dict]:
    """("kohya_ss GUI config" | "sd-scripts TOML", its keys); KohyaImportError when it is neither."""
    text = path.read_text(encoding="utf-8-sig")
    problems = []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append(f"not JSON ({exc})")
    else:
        if isinstance(data, dict) and set(data) & set(DIRECT) | set(data) & set(PATHS) | {"LoRA_type"} & set(data):
            return "kohya_ss GUI config", data
        problems.append("JSON without kohya_ss keys" + (" (this app's own settings file: load it as a preset)"
                                                        if isinstance(data, dict) and "network" in data else ""))
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"not TOML ({exc})")
    else:
        flat = {}
        for key, value in data.items():  # sd-scripts reads [section] tables of a config file as plain keys
            flat.update(value if isinstance(value, dict) and key not in ("general",) else {key: value})
        if flat:
            return "sd-scripts TOML", flat
        problems.append("an empty TOML")
    raise KohyaImportError(f"{path} is neither a kohya_ss GUI config (JSON) nor an sd-scripts TOML: "
                           f"{'; '.join(problems)}. Choose the .json the kohya_ss GUI saved or the .toml given to "
                           "sd-scripts' --config_file.")


class _Import:
    def __init__(self, settings: Settings, report: ImportReport, config: AppConfig, base_dir: Path):
        self.s, self.report, self.config, self.base_dir = settings, report, config, base_dir

    def ignore(self, key: str, value, why: str) -> None:
        self.report.ignored.append((key, value, why))

    def set(self, key: str, dotted: str, value) -> bool:
        if _empty(value):
            self.ignore(key, value, "empty")
            return False
        try:
            set_value(self.s, dotted, value)
        except SettingsError as exc:
            self.ignore(key, value, str(exc).splitlines()[-1].strip())
            return False
        self.report.mapped.append((key, dotted, self.s.get(dotted)))
        return True

    def confined(self, key: str, value: str, folder: str, setting: str) -> bool:
        try:
            self.config.resolve(str(value), folder, setting)
        except PathNotAllowed as exc:
            self.ignore(key, value, f"not taken: {exc}")
            return False
        return True

    def file(self, key: str, value: str) -> Path | None:
        """A file the config names (relative to the config's folder, as sd-scripts reads it from there), if it
        lies inside the app's folders; reported otherwise."""
        path = Path(value).expanduser()
        try:
            return confine(path if path.is_absolute() else self.base_dir / path, self.config.roots(), key, value)
        except PathNotAllowed as exc:
            self.ignore(key, value, f"not taken: {exc}")
            return None

    def set_path(self, key: str, dotted: str, value, folder: str) -> None:
        if not _empty(value) and self.confined(key, value, folder, dotted):
            self.set(key, dotted, str(value))
        elif _empty(value):
            self.ignore(key, value, "empty")


def choose_architecture(data: dict, kind_of_file: str, architecture: str | None, imp: _Import) -> str:
    """The family the config trains: a ticked model-type checkbox of the GUI (``sdxl``, ``sd3_checkbox``…), no box
    ticked in a GUI config (SD 1.x), else the caller's ``architecture``.  Several families of one kind (FLUX.1
    dev / schnell) take the caller's if it is one of them."""
    kinds = families_by_kind()
    if data.get("v2") is True:
        raise KohyaImportError("The config trains Stable Diffusion 2.x (v2), which this app does not support.")
    if "v2" in data:
        imp.ignore("v2", data["v2"], "not Stable Diffusion 2.x")
    flags = {key: kind for kind in kinds for key in (kind, f"{kind}_checkbox") if key in data}
    ticked = sorted({kind for key, kind in flags.items() if data[key] is True})
    for key, kind in flags.items():
        if data[key] is not True:
            imp.ignore(key, data[key], "model-type checkbox not ticked")
    if len(ticked) > 1:
        raise KohyaImportError(f"The config ticks several model types ({', '.join(ticked)}); keep one.")
    if not ticked and kind_of_file == "kohya_ss GUI config":
        ticked = ["sd"]  # no box ticked: the GUI runs train_network.py (SD 1.x)
    candidates = kinds[ticked[0]] if ticked else [architecture] if architecture else []
    if architecture in candidates:
        chosen = architecture
    elif len(candidates) == 1:
        chosen = candidates[0]
    elif candidates:
        raise KohyaImportError(f"The config trains {ticked[0]}, which is one of {', '.join(candidates)} here: choose "
                               "the architecture for it first.")
    else:
        raise KohyaImportError("The config does not say which model it trains: choose the architecture first.")
    key = next((k for k, kind in flags.items() if ticked and kind == ticked[0] and data[k] is True),
               "(train_network.py)" if ticked == ["sd"] else "(your choice of architecture)")
    imp.s.model.architecture = chosen
    imp.report.mapped.append((key, "model.architecture", chosen))
    return chosen


def network_algorithm(data: dict, args: dict) -> tuple[str | None, Any, str | None]:
    """(the key that names the adapter, its kohya value, our algorithm or None when we lack it); (None, …)
    when the config names none.  ``args``: the parsed network_args."""
    module = str(data.get("network_module") or "")
    script_key = next((k for k in SCRIPT_KEYS if not _empty(data.get(k))), None)
    if script_key is not None and not module:
        return script_key, data[script_key], SCRIPT_KEYS[script_key]
    if "LoRA_type" in data:
        return "LoRA_type", data["LoRA_type"], GUI_LORA_TYPES.get(data["LoRA_type"])
    if module in LORA_MODULES:  # kohya's LoRA with conv_dim is LoCon
        return "network_module", module, "locon" if not _empty(args.get("conv_dim")) else "lora"
    if module == "lycoris.kohya":
        algo = args.get("algo", "lora").lower()
        return "network_args.algo", algo, LYCORIS_ALGOS.get(algo)
    return ("network_module", module, None) if module else (None, None, None)


def map_network(data: dict, imp: _Import) -> set[str]:
    """LoRA_type / network_module / network_args → algorithm, target and the algorithm's options."""
    args = parse_args(data.get("network_args"))
    key, value, algo = network_algorithm(data, args)
    if algo:
        imp.set(key, "network.algorithm", algo)
    elif key:
        imp.ignore(key, value, f"adapter not available here (available: {', '.join(ADAPTER_ALGORITHMS)}); the "
                   f"algorithm stays {imp.s.network.algorithm!r}")
    if key == "network_args.algo":
        args.pop("algo")
        imp.ignore("network_module", data["network_module"], "LyCORIS: the adapter is network_args.algo")
    if algo == "locon" and value in (*LORA_MODULES, "Kohya LoCon"):
        imp.set(key, "network.target", "full")  # kohya's LoCon adds the ResNet convolutions
    preset_key = "network_args.preset" if "preset" in args else "LyCORIS_preset"
    preset = args.pop("preset", data.get("LyCORIS_preset"))
    if preset is not None:
        if algo in (None, "lora"):
            imp.ignore(preset_key, preset, "a LyCORIS preset; not used for this adapter")
        elif preset in LYCORIS_PRESETS:
            imp.set(preset_key, "network.target", LYCORIS_PRESETS[preset])
        else:
            imp.ignore(preset_key, preset, f"no such target here ({', '.join(LYCORIS_PRESETS)})")
    for arg, v in args.items():
        if arg in NETWORK_ARGS:
            imp.set(f"network_args.{arg}", NETWORK_ARGS[arg], v)
        else:
            imp.ignore(f"network_args.{arg}", v, "no equivalent setting")
    return {"LoRA_type", "network_module", "network_args", "LyCORIS_preset"}


def map_optimizer(data: dict, imp: _Import) -> set[str]:
    key = "optimizer_type" if "optimizer_type" in data else "optimizer"
    name = data.get(key)
    if not _empty(name):
        ours = {o.lower(): o for o in OPTIMIZERS}.get(str(name).split(".")[-1].lower())
        if ours:
            imp.set(key, "optimizer.optimizer_type", ours)
        else:
            imp.ignore(key, name, f"optimizer not available here (available: {', '.join(OPTIMIZERS)}); the "
                       f"optimizer stays {imp.s.optimizer.optimizer_type!r}")
    for arg, value in parse_args(data.get("optimizer_args")).items():
        if arg in OPTIMIZER_ARGS:
            imp.set(f"optimizer_args.{arg}", OPTIMIZER_ARGS[arg], value)
        elif arg == "betas" and 2 <= len(betas := [b.strip() for b in str(value).strip("()[] ").split(",")]) <= 3:
            imp.set("optimizer_args.betas[0]", "optimizer.beta1", betas[0])
            imp.set("optimizer_args.betas[1]", "optimizer.beta2", betas[1])
        else:
            imp.ignore(f"optimizer_args.{arg}", value, "no equivalent setting")
    scheduler = data.get("lr_scheduler")
    if not _empty(scheduler):
        if scheduler in LR_SCHEDULERS:
            imp.set("lr_scheduler", "optimizer.lr_scheduler", scheduler)
        else:
            imp.ignore("lr_scheduler", scheduler, f"scheduler not available here ({', '.join(LR_SCHEDULERS)})")
    # sd-scripts trains the U-Net at unet_lr when set, at learning_rate otherwise
    lr_key = "unet_lr" if not _empty(data.get("unet_lr")) and float(data["unet_lr"]) > 0 else "learning_rate"
    if lr_key in data:
        imp.set(lr_key, "optimizer.learning_rate", data[lr_key])
    other = "learning_rate" if lr_key == "unet_lr" else "unet_lr"
    if other in data:
        imp.ignore(other, data[other], f"the U-Net / transformer learning rate is {lr_key}")
    return {key, "optimizer_args", "lr_scheduler", "unet_lr", "learning_rate"}


def map_special(data: dict, imp: _Import, kind_of_file: str, kind: str) -> set[str]:
    """Keys whose value needs converting (units, several keys into one setting, or the other way round)."""
    used = set()
    if "lr_warmup" in data:  # the GUI's warmup is a percentage of the steps
        used.add("lr_warmup")
        pct = float(data["lr_warmup"] or 0)
        imp.set("lr_warmup", "optimizer.lr_warmup_steps", round(pct / 100 * imp.s.schedule.max_train_steps))
    for key in ("resolution", "max_resolution"):
        if key in data and not _empty(data[key]):
            used.add(key)
            imp.set(key, "dataset.resolution", square_side(*parse_resolution(data[key])))
    if "cache_latents" in data or "cache_latents_to_disk" in data:
        used |= {"cache_latents", "cache_latents_to_disk"}
        mode = "disk" if data.get("cache_latents_to_disk") else "memory" if data.get("cache_latents") else "off"
        for key in ("cache_latents", "cache_latents_to_disk"):  # the two flags make one setting
            if key in data:
                imp.set(key, "dataset.cache_latents", mode)
    if "gradient_checkpointing" in data:
        used.add("gradient_checkpointing")
        imp.set("gradient_checkpointing", "memory.gradient_checkpointing",
                "on" if data["gradient_checkpointing"] else "off")
    if "v_parameterization" in data:
        used.add("v_parameterization")
        if data["v_parameterization"]:
            imp.set("v_parameterization", "model.prediction_type", "v_prediction")
        else:
            imp.ignore("v_parameterization", data["v_parameterization"],
                       f"off: the prediction type stays {imp.s.model.prediction_type!r}")
    if "network_train_unet_only" in data:
        used.add("network_train_unet_only")
        imp.set("network_train_unet_only", "network.train_text_encoder", not data["network_train_unet_only"])
    if "timestep_sampling" in data:
        used.add("timestep_sampling")
        value = data["timestep_sampling"]
        if value in TIMESTEP_SAMPLING:
            imp.set("timestep_sampling", "schedule.timestep_sampling", value)
        else:
            imp.ignore("timestep_sampling", value, f"not available here ({', '.join(TIMESTEP_SAMPLING)})")
    if "weighting_scheme" in data:  # sd-scripts' SD3 option: a timestep density or a loss weighting
        used.add("weighting_scheme")
        value = data["weighting_scheme"]
        target = ("schedule.timestep_sampling" if value in ("logit_normal", "mode", "uniform")
                  else "schedule.loss_weighting" if value in ("sigma_sqrt", "cosmap", "none") else None)
        if target:
            imp.set("weighting_scheme", target, value)
        else:
            imp.ignore("weighting_scheme", value, "no equivalent setting")
    for key in [k for k in data if k.endswith("cache_text_encoder_outputs")]:
        used.add(key)
        if key != "cache_text_encoder_outputs" and not key.startswith(kind + "_"):
            imp.ignore(key, data[key], "an option of another model type")
        else:
            imp.set(key, "memory.cache_text_encoder_outputs", "on" if data[key] else "off")
    if "fp8_base" in data:
        used.add("fp8_base")
        if data["fp8_base"]:
            imp.set("fp8_base", "memory.quantize_base", "qfloat8")
        else:
            imp.ignore("fp8_base", False, "off")
    if "sample_prompts" in data:
        used.add("sample_prompts")
        map_prompts(data["sample_prompts"], imp, kind_of_file)
    return used


def map_prompts(value, imp: _Import, kind_of_file: str) -> None:
    """The GUI keeps the prompt lines themselves; sd-scripts a prompt file (read when inside the app's folders)."""
    text = value
    if kind_of_file == "sd-scripts TOML" and not _empty(value):
        path = imp.file("sample_prompts", value)
        if path is None:
            return
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            imp.ignore("sample_prompts", value, f"cannot read the prompt file ({exc})")
            return
    prompts, dropped = parse_sample_prompts(text or "")
    if not prompts:
        imp.ignore("sample_prompts", value, "no prompts")
        return
    imp.set("sample_prompts", "sampling.prompts", "\n".join(prompts))
    for opt, v in dropped.items():
        imp.ignore(f"sample_prompts --{opt}", v, "no equivalent option (removed from the lines)")


def map_dataset_config(path_value: str, imp: _Import) -> bool:
    """sd-scripts' dataset config: [general] and the first [[datasets]] give the dataset's values; every
    [[datasets.subsets]] becomes a subset (a later dataset's own resolution and options go into its subsets)."""
    path = imp.file("dataset_config", path_value)
    if path is None:
        return False
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KohyaImportError(f"dataset_config {path_value}: cannot read it as TOML ({exc})") from None
    imp.report.mapped.append(("dataset_config", "dataset.subsets", str(path_value)))
    # sd-scripts ignores train_data_dir and reg_data_dir when a dataset config is given
    for key, dotted in (("train_data_dir", "dataset.path"), ("reg_data_dir", "dataset.reg_path")):
        for mapped in [m for m in imp.report.mapped if m[0] == key]:
            imp.report.mapped.remove(mapped)
            imp.ignore(key, mapped[2], "sd-scripts ignores it when a dataset_config is given")
        set_value(imp.s, dotted, "")
    map_dataset_levels(data, imp)
    return True


def map_dataset_levels(data: dict, imp: _Import) -> None:
    general = data.get("general", {})
    map_keys({k: v for k, v in general.items() if k != "batch_size"}, imp, "general.")
    subsets = []
    for d, dataset in enumerate(data.get("datasets", [])):
        own = {k: v for k, v in dataset.items() if k != "subsets"}
        if "batch_size" in own:
            batch = own.pop("batch_size")
            if d == 0:
                imp.set(f"datasets[{d}].batch_size", "schedule.train_batch_size", batch)
            else:
                imp.ignore(f"datasets[{d}].batch_size", batch, "one batch size for all datasets here")
        inherited = {}
        if d == 0:
            map_keys(own, imp, f"datasets[{d}].")
        else:  # a later dataset: its own values go into each of its subsets
            if "resolution" in own:
                inherited["resolution"] = square_side(*parse_resolution(own.pop("resolution")))
            inherited |= {k: own.pop(k) for k in list(own) if k in SUBSET_KEYS}
            for k, v in own.items():
                imp.ignore(f"datasets[{d}].{k}", v, "only the first dataset's bucket settings are used")
        for s, subset in enumerate(dataset.get("subsets", [])):
            prefix = f"datasets[{d}].subsets[{s}]."
            values = dict(inherited)
            for k, v in subset.items():
                if k in SUBSET_KEYS:
                    values[k] = v
                elif k != "image_dir":
                    imp.ignore(prefix + k, v, "no equivalent subset option")
            image_dir = subset.get("image_dir")
            if _empty(image_dir) or not imp.confined(prefix + "image_dir", image_dir, "datasets_dir",
                                                      f"dataset.subsets[{len(subsets)}].image_dir"):
                if _empty(image_dir):
                    imp.ignore(prefix + "image_dir", image_dir, "a subset without image_dir: not imported")
                continue
            try:
                sub = SubsetSettings(image_dir=str(image_dir), **values)
            except ValueError as exc:
                imp.ignore(prefix.rstrip("."), subset, f"subset not imported: {exc}")
                continue
            index = len(subsets)
            subsets.append(sub)
            for k in ["image_dir", *values]:
                where = prefix + k if k in subset or k == "image_dir" else f"datasets[{d}].{k}"
                imp.report.mapped.append((where, f"dataset.subsets[{index}].{k}", getattr(sub, k)))
    imp.s.dataset.subsets = subsets


def map_keys(data: dict, imp: _Import, prefix: str = "") -> set[str]:
    """The one-to-one keys (DIRECT, PATHS) and resolution / num_repeats of a dataset level."""
    used = set()
    for key, value in data.items():
        if key in DIRECT:
            imp.set(prefix + key, DIRECT[key], value)
        elif key in PATHS:
            imp.set_path(prefix + key, PATHS[key][0], value, PATHS[key][1])
        elif key == "resolution" and prefix:
            imp.set(prefix + key, "dataset.resolution", square_side(*parse_resolution(value)))
        elif key == "num_repeats" and prefix:
            imp.set(prefix + key, "dataset.num_repeats", value)
        elif prefix:
            imp.ignore(prefix + key, value, "no equivalent dataset option")
        else:
            continue
        used.add(key)
    return used


def import_kohya(path, architecture: str | None = None, *, base: Settings | None = None,
                 config: AppConfig | None = None) -> tuple[Settings, ImportReport]:
    """A kohya_ss GUI config (JSON) or an sd-scripts training TOML (with its dataset_config, or a dataset config
    alone) as settings, starting from ``base`` (the schema defaults when None), and the report of every key.

    ``architecture``: the family when the file does not say (a TOML), or which of several families of the
    file's kind (FLUX.1 dev or schnell).  Paths must lie inside ``config``'s folders (config.json's by default).
    Raises KohyaImportError when the file is not a kohya config or its architecture is not known."""
    path = Path(path)
    config = config or load_config()
    kind_of_file, data = read_config(path)
    settings = (base or Settings()).model_copy(deep=True)
    report = ImportReport(source=str(path), kind=kind_of_file)
    imp = _Import(settings, report, config, path.parent)
    if "datasets" in data and not any(k in data for k in DIRECT):
        kind_of_file = report.kind = "sd-scripts dataset config"
        map_dataset_levels(data, imp)
        return settings, report
    import architectures
    kind = kohya_kind(architectures.registry()[choose_architecture(data, kind_of_file, architecture, imp)]
                      .ss_base_model_version)
    used = {key for kind in families_by_kind() for key in (kind, f"{kind}_checkbox")} | {"v2"}
    used |= map_keys({k: v for k, v in data.items() if k not in ("resolution",)}, imp)
    used |= map_network(data, imp)
    used |= map_optimizer(data, imp)
    used |= map_special(data, imp, kind_of_file, kind)
    if not _empty(data.get("dataset_config")):
        used.add("dataset_config")
        map_dataset_config(data["dataset_config"], imp)
    for key, value in data.items():
        if key in used:
            continue
        why = ("launcher, logging or upload option: it does not change what is trained" if LAUNCHER.match(key)
               else "empty" if _empty(value) else NO_EQUIVALENT.get(key, "no equivalent setting"))
        imp.ignore(key, value, why)
    return settings, report
