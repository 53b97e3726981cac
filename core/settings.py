"""The one typed settings object.

Every training setting is declared here exactly once, with its type, default, allowed range and the
metadata the UI needs to draw a control for it (label, help, widget, when it is shown).  training.json
holds the defaults, the UI is generated from these declarations, and validation errors name the field
and the allowed range.  A setting that is not declared here does not exist.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ARCHITECTURES = ("sd15", "sdxl")
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Adafactor", "Prodigy", "SGD")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def setting(default: Any, label: str, help: str = "", *, widget: str | None = None,
            choices: tuple | None = None, ge: float | None = None, le: float | None = None,
            step: float | None = None, show_if: dict | None = None, advanced: bool = False) -> Any:
    """A field with the UI metadata attached.

    ``show_if`` maps another field ("section.name") to the values for which this one applies; the UI hides
    the control otherwise and the trainer ignores it (it is still validated).
    """
    ui = {"label": label, "help": help, "widget": widget, "choices": list(choices) if choices else None,
          "step": step, "show_if": show_if or {}, "advanced": advanced}
    return Field(default, ge=ge, le=le, description=help, json_schema_extra={"ui": ui})


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetSettings(Section):
    path: str = setting("", "Image folder",
                        "Folder of images with same-name caption files. Subfolders named like '10_dog' repeat "
                        "their images 10 times per epoch. Relative paths are inside the datasets folder.",
                        widget="path")
    caption_extension: str = setting(".txt", "Caption file extension", advanced=True)
    default_caption: str = setting("", "Caption for images without one",
                                   "Used when an image has no caption file. Left empty, a missing caption "
                                   "stops the run with the list of files that lack one.")
    num_repeats: int = setting(1, "Repeats", "How often each image is seen per epoch (folders named "
                               "'N_name' set their own).", ge=1, le=10000)
    resolution: int = setting(512, "Resolution", "Training resolution (the side of a square of the same area).",
                              ge=64, le=4096, step=64)
    enable_buckets: bool = setting(True, "Aspect-ratio buckets",
                                   "Group images by aspect ratio instead of centre-cropping them to a square.")
    min_bucket_reso: int = setting(256, "Smallest bucket side", ge=32, le=4096, step=64,
                                   show_if={"dataset.enable_buckets": [True]}, advanced=True)
    max_bucket_reso: int = setting(1024, "Largest bucket side", ge=64, le=8192, step=64,
                                   show_if={"dataset.enable_buckets": [True]}, advanced=True)
    bucket_reso_steps: int = setting(64, "Bucket step", "Bucket sides are multiples of this.", ge=8, le=512,
                                     step=8, show_if={"dataset.enable_buckets": [True]}, advanced=True)
    bucket_no_upscale: bool = setting(False, "Never upscale", "Small images get a smaller bucket instead of "
                                      "being upscaled.", show_if={"dataset.enable_buckets": [True]})
    shuffle_caption: bool = setting(False, "Shuffle caption tags", "Shuffle the comma-separated parts of each "
                                    "caption every time it is used.")
    keep_tokens: int = setting(0, "Keep first N tags in place", ge=0, le=256,
                               show_if={"dataset.shuffle_caption": [True]})
    caption_dropout_rate: float = setting(0.0, "Caption dropout", "Share of steps trained with an empty "
                                          "caption.", ge=0.0, le=1.0, step=0.01)
    flip_aug: bool = setting(False, "Random horizontal flip")
    cache_latents: Literal["memory", "disk", "off"] = setting(
        "memory", "Cache latents", "Encode every image once. 'disk' keeps the cache next to the images and "
        "reuses it while the image file is unchanged.", choices=("memory", "disk", "off"))


class ModelSettings(Section):
    architecture: Literal["sd15", "sdxl"] = setting(
        "sd15", "Architecture", "The model family. The loader checks that the file fits it.",
        choices=ARCHITECTURES)
    model_path: str = setting("", "Base model", "A diffusers folder or a single .safetensors checkpoint. "
                              "Relative paths are inside the models folder.", widget="model")
    config_path: str = setting("", "Model config folder",
                               "Only for single-file checkpoints of an unusual size: a diffusers-layout folder "
                               "with the configs and tokenizers. Empty uses the configs shipped for the "
                               "architecture.", widget="path", advanced=True)
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = setting(
        "auto", "Prediction type", "'auto' uses what the model's scheduler config says (epsilon for "
        "single files).", choices=("auto", "epsilon", "v_prediction"))
    zero_terminal_snr: bool = setting(False, "Zero terminal SNR", "Rescale the noise schedule so the last "
                                      "step is pure noise (use with v-prediction).", advanced=True)
    clip_skip: int = setting(1, "CLIP skip", "Use the output of the N-th last text-encoder layer.", ge=1, le=12)


class NetworkSettings(Section):
    algorithm: Literal["lora"] = setting("lora", "Algorithm", choices=("lora",))
    rank: int = setting(16, "Rank (dim)", ge=1, le=1024)
    alpha: float = setting(16.0, "Alpha", "Scale = alpha / rank.", ge=0.0, le=4096.0)
    dropout: float = setting(0.0, "Dropout", "Dropout on the adapter's input.", ge=0.0, le=1.0, step=0.01)
    target: Literal["attn", "attn_mlp"] = setting(
        "attn_mlp", "Target layers", "Which UNet layers get an adapter: attention only, or attention and "
        "feed-forward.", choices=("attn", "attn_mlp"))
    train_text_encoder: bool = setting(False, "Train text encoder(s)")


class OptimizerSettings(Section):
    optimizer_type: Literal["AdamW", "AdamW8bit", "Lion", "Adafactor", "Prodigy", "SGD"] = setting(
        "AdamW", "Optimizer", "AdamW8bit needs an NVIDIA GPU. Prodigy sets its own step size: use a "
        "learning rate of 1.", choices=OPTIMIZERS)
    learning_rate: float = setting(1e-4, "Learning rate", ge=0.0, le=10.0)
    text_encoder_lr: float = setting(0.0, "Text encoder learning rate", "0 uses the learning rate above.",
                                     ge=0.0, le=10.0, show_if={"network.train_text_encoder": [True]})
    weight_decay: float = setting(0.01, "Weight decay", ge=0.0, le=10.0, advanced=True)
    max_grad_norm: float = setting(1.0, "Max gradient norm", "0 disables clipping.", ge=0.0, le=1000.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial"] = setting("constant", "LR scheduler", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Warmup steps", ge=0, le=1_000_000)
    lr_scheduler_num_cycles: int = setting(1, "Restarts (cycles)", ge=1, le=1000,
                                           show_if={"optimizer.lr_scheduler": ["cosine_with_restarts"]})
    lr_scheduler_power: float = setting(1.0, "Polynomial power", ge=0.0, le=10.0,
                                        show_if={"optimizer.lr_scheduler": ["polynomial"]})


class ScheduleSettings(Section):
    max_train_steps: int = setting(1000, "Training steps", "Optimizer steps to train.", ge=1, le=10_000_000)
    max_train_epochs: int = setting(0, "Training epochs", "When above 0, train this many epochs instead of "
                                    "the step count.", ge=0, le=100_000)
    train_batch_size: int = setting(1, "Batch size", ge=1, le=256)
    gradient_accumulation_steps: int = setting(1, "Gradient accumulation", ge=1, le=1024)
    seed: int = setting(42, "Seed", ge=0, le=2**32 - 1)
    noise_offset: float = setting(0.0, "Noise offset", ge=0.0, le=1.0, step=0.01, advanced=True)
    min_snr_gamma: float = setting(0.0, "Min-SNR gamma", "Loss weighting; 5 is common. 0 disables.",
                                   ge=0.0, le=100.0)
    log_every_n_steps: int = setting(10, "Report loss every N steps", "Reading the loss from the GPU "
                                     "waits for it; doing so rarely keeps the GPU busy.", ge=1, le=10000,
                                     advanced=True)


class SavingSettings(Section):
    output_name: str = setting("my_lora", "Output name", "File name of the adapter, without extension.")
    output_dir: str = setting("", "Output folder", "Empty: a folder named after the output inside the "
                              "outputs folder.", widget="path", advanced=True)
    save_every_n_steps: int = setting(0, "Save every N steps", "0 disables.", ge=0, le=10_000_000)
    save_every_n_epochs: int = setting(1, "Save every N epochs", "0 disables.", ge=0, le=100_000)
    save_last_n: int = setting(3, "Keep last K intermediate saves", "0 keeps all.", ge=0, le=10000)
    save_precision: Literal["fp16", "bf16", "float"] = setting("fp16", "Save precision",
                                                               choices=("fp16", "bf16", "float"))
    save_state: bool = setting(True, "Save resumable state", "Keep optimizer and scheduler state with each "
                               "save so the run can be resumed.")
    resume_from: str = setting("", "Resume from state", "A state folder written by an earlier run "
                               "(…/state-000100).", widget="path")
    trigger_phrase: str = setting("", "Trigger phrase", "Written into the file's metadata.", advanced=True)


class SamplingSettings(Section):
    sample_every_n_steps: int = setting(0, "Preview every N steps", "0 disables previews.", ge=0,
                                        le=10_000_000)
    prompts: str = setting("", "Preview prompts", "One prompt per line.", widget="textarea")
    negative_prompt: str = setting("", "Negative prompt")
    steps: int = setting(20, "Sampling steps", ge=1, le=200)
    guidance_scale: float = setting(7.0, "Guidance scale", ge=0.0, le=50.0)
    width: int = setting(0, "Width", "0 uses the training resolution.", ge=0, le=4096, step=8)
    height: int = setting(0, "Height", "0 uses the training resolution.", ge=0, le=4096, step=8)
    seed: int = setting(1234, "Preview seed", ge=0, le=2**32 - 1)


class MemorySettings(Section):
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = setting(
        "auto", "Precision", "'auto': bf16 where the GPU supports it, fp16 with loss scaling on older GPUs, "
        "fp32 on the CPU.", choices=("auto", "bf16", "fp16", "no"))
    gradient_checkpointing: Literal["auto", "on", "off"] = setting(
        "auto", "Gradient checkpointing", "Recompute activations in the backward pass: much less memory, "
        "about 30% slower. 'auto' turns it on when the plan needs the memory.", choices=("auto", "on", "off"))
    tf32: Literal["auto", "on", "off"] = setting("auto", "TF32 matmuls", "'auto': on for Ampere and newer.",
                                                 choices=("auto", "on", "off"), advanced=True)
    cache_text_encoder_outputs: Literal["auto", "on", "off"] = setting(
        "auto", "Cache text-encoder outputs", "Encode each caption once. Not possible while the text encoder "
        "trains or captions change every step (shuffle, dropout); 'auto' caches when possible.",
        choices=("auto", "on", "off"))
    dataloader_workers: int = setting(0, "Data loader workers", ge=0, le=64, advanced=True)


SECTIONS: dict[str, type[Section]] = {
    "dataset": DatasetSettings, "model": ModelSettings, "network": NetworkSettings,
    "optimizer": OptimizerSettings, "schedule": ScheduleSettings, "saving": SavingSettings,
    "sampling": SamplingSettings, "memory": MemorySettings,
}


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    optimizer: OptimizerSettings = Field(default_factory=OptimizerSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    saving: SavingSettings = Field(default_factory=SavingSettings)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)

    def get(self, dotted: str) -> Any:
        section, name = dotted.split(".")
        return getattr(getattr(self, section), name)

    def applies(self, dotted: str) -> bool:
        """Whether a field matters under the current values (its show_if conditions hold)."""
        ui = field_ui(dotted)
        return all(self.get(other) in values for other, values in ui["show_if"].items())

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


class SettingsError(ValueError):
    """Invalid settings; the message names every offending field and what it allows."""


def field_ui(dotted: str) -> dict:
    section, name = dotted.split(".")
    return SECTIONS[section].model_fields[name].json_schema_extra["ui"]


def iter_fields():
    """(dotted name, pydantic FieldInfo) for every setting, in declaration order."""
    for section, cls in SECTIONS.items():
        for name, info in cls.model_fields.items():
            yield f"{section}.{name}", info


def field_range(info) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in info.metadata:
        lo = getattr(m, "ge", lo) if getattr(m, "ge", None) is not None else lo
        hi = getattr(m, "le", hi) if getattr(m, "le", None) is not None else hi
    return lo, hi


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if len(err["loc"]) == 2 and err["loc"][0] in SECTIONS:
        section, name = err["loc"]
        info = SECTIONS[section].model_fields.get(name)
        if info is not None:
            lo, hi = field_range(info)
            ui = info.json_schema_extra["ui"]
            if ui["choices"]:
                msg += f" (allowed: {', '.join(map(str, ui['choices']))})"
            elif lo is not None or hi is not None:
                msg += f" (allowed range: {lo} … {hi})"
    got = err.get("input")
    if err["type"] not in ("extra_forbidden", "missing") and not isinstance(got, dict):
        msg += f"; got {got!r}"
    if err["type"] == "extra_forbidden":
        msg = "unknown setting"
    return f"{loc}: {msg}"


def validation_message(exc: ValidationError) -> str:
    return "Invalid settings:\n" + "\n".join("  " + _describe(e) for e in exc.errors())


def settings_from_dict(data: dict) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(validation_message(exc)) from None


def set_value(settings: Settings, dotted: str, value: Any) -> None:
    """Assign one field with validation; raises SettingsError naming the field."""
    section, name = dotted.split(".")
    try:
        setattr(getattr(settings, section), name, value)
    except ValidationError as exc:
        raise SettingsError(validation_message(exc).replace("  " + name, "  " + dotted)) from None


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Read a training.json-shaped file into the typed settings (missing keys take their defaults)."""
    path = Path(path) if path is not None else default_training_json()
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{path} is not valid JSON: {exc}") from None
    return settings_from_dict(data)


def save_settings(settings: Settings, path: str | os.PathLike) -> None:
    from core.io import atomic_write_text
    atomic_write_text(Path(path), json.dumps(settings.to_dict(), indent=2) + "\n")


def default_training_json() -> Path:
    return Path(__file__).resolve().parent.parent / "training.json"


def check_consistency(settings: Settings) -> list[str]:
    """Combinations that are each valid but cannot work together; returns messages (empty when fine)."""
    problems = []
    d = settings.dataset
    if d.enable_buckets and d.min_bucket_reso > d.max_bucket_reso:
        problems.append(f"dataset.min_bucket_reso ({d.min_bucket_reso}) is larger than dataset.max_bucket_reso "
                        f"({d.max_bucket_reso})")
    if d.enable_buckets and not (d.min_bucket_reso <= d.resolution <= d.max_bucket_reso):
        problems.append(f"dataset.resolution ({d.resolution}) must lie between the smallest and largest bucket "
                        f"side ({d.min_bucket_reso} … {d.max_bucket_reso})")
    if d.resolution % 8:
        problems.append(f"dataset.resolution ({d.resolution}) must be a multiple of 8")
    if d.enable_buckets and d.bucket_reso_steps % 8:
        problems.append(f"dataset.bucket_reso_steps ({d.bucket_reso_steps}) must be a multiple of 8")
    if not settings.dataset.path:
        problems.append("dataset.path: choose the folder with your training images")
    if not settings.model.model_path:
        problems.append("model.model_path: choose the base model")
    if not settings.saving.output_name.strip() or any(c in settings.saving.output_name for c in "/\\:"):
        problems.append("saving.output_name must be a plain file name (no slashes)")
    return problems


def write_training_json(path: str | os.PathLike | None = None) -> Path:
    """Regenerate training.json from the schema defaults (run after adding or changing a setting:
    ``.venv/bin/python -c "import core.settings as s; s.write_training_json()"``)."""
    from core.io import atomic_write_text
    path = Path(path) if path else default_training_json()
    atomic_write_text(path, json.dumps(Settings().to_dict(), indent=2) + "\n")
    return path
