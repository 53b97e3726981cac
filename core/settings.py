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
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# what the UI shows for each id (tests/test_settings.py checks these equal the plug-ins' labels)


def _first_family() -> str:
    import architectures
    return next(iter(architectures.registry()))


@dataclass(frozen=True)
class FamilyTrait:
    """In a ``show_if`` (for ``model.architecture``): the families that declare this trait
    (``architectures.base.TRAITS``).  Resolved from the registry when read (:func:`field_ui`), so a new family
    needs no edit here."""
    trait: str


#: ``choices`` of ``model.architecture``: every registered family, labelled with its UI name
ALL_FAMILIES = FamilyTrait("")
# flow-matching choices, named once (architectures/flow_matching.py implements them)
TimestepSampling = Literal["uniform", "sigmoid", "logit_normal", "mode", "shift", "flux_shift"]
LossWeighting = Literal["none", "sigma_sqrt", "cosmap"]
TIMESTEP_SAMPLING: tuple[str, ...] = get_args(TimestepSampling)
LOSS_WEIGHTING: tuple[str, ...] = get_args(LossWeighting)
LogWith = Literal["none", "tensorboard", "wandb", "all"]
LOG_WITH: tuple[str, ...] = get_args(LogWith)
QUANTIZE_LABELS = {"qfloat8": "fp8 (quanto qfloat8)", "qint8": "int8 (quanto qint8)", "qint4": "int4 (quanto qint4)",
                   "nf4": "NF4 (bitsandbytes)"}
LossType = Literal["l2", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
HUBER_SCHEDULES: tuple[str, ...] = get_args(HuberSchedule)
OptimizerType = Literal["AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "PagedLion8bit", "Adafactor",
                        "CAME", "AdamWScheduleFree", "Prodigy", "DAdaptAdam", "SGD"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerType)
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                      "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt", "rex", "piecewise_constant"]
LR_SCHEDULERS: tuple[str, ...] = get_args(LrScheduler)


def setting(default: Any, label: str, help: str = "", *, widget: str | None = None,
            choices: tuple | None = None, ge: float | None = None, le: float | None = None,
            step: float | None = None, show_if: dict | None = None, or_show_if: dict | None = None,
            advanced: bool = False, choice_labels: dict | None = None) -> Any:
    """A field with the UI metadata attached.

    ``default`` may be a function that returns it (the first registered family for ``model.architecture``).
    ``show_if`` maps another field ("section.name") to the values for which this one applies; the UI hides
    the control otherwise and the trainer ignores it (it is still validated).  For ``model.architecture`` the
    values may be a :class:`FamilyTrait`, and ``choices`` :data:`ALL_FAMILIES`: :func:`field_ui` resolves them.
    ``or_show_if`` is a second set of conditions under which the field applies too (either set holding is
    enough: :func:`show_conditions`).
    """
    if choices and not isinstance(choices, FamilyTrait):
        choices = list(choices)
    ui = {"label": label, "help": help, "widget": widget, "choices": choices or None,
          "step": step, "show_if": show_if or {}, "or_show_if": or_show_if or None, "advanced": advanced,
          "choice_labels": dict(choice_labels) if choice_labels else None}
    if callable(default):
        return Field(default_factory=default, ge=ge, le=le, description=help, json_schema_extra={"ui": ui})
    return Field(default, ge=ge, le=le, description=help, json_schema_extra={"ui": ui})


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SubsetSettings(BaseModel):
    """One folder of a dataset with several subsets (sd-scripts' ``[[datasets.subsets]]``).  An option left
    unset (None) takes the dataset's value (:meth:`DatasetSettings.subset_settings`)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    image_dir: str = Field(min_length=1, description="Folder of images with same-name caption files; relative "
                           "paths are inside the datasets folder.")
    num_repeats: int | None = Field(None, ge=1, le=10000)
    caption_extension: str | None = Field(None, min_length=1)
    keep_tokens: int | None = Field(None, ge=0, le=256)
    shuffle_caption: bool | None = None
    flip_aug: bool | None = None
    caption_dropout_rate: float | None = Field(None, ge=0.0, le=1.0)
    is_reg: bool = Field(False, description="Regularization (class) images for DreamBooth prior preservation, "
                         "weighted by the prior loss weight")
    resolution: int | None = Field(None, ge=64, le=4096, multiple_of=8)


class ImageFolder(NamedTuple):
    """A folder of images to scan, as :meth:`DatasetSettings.folders` lists them."""
    setting: str            # the field that holds the path, for PathNotAllowed
    path: str               # as the user gave it
    is_reg: bool
    settings: "DatasetSettings"  # what its images are scanned and trained with
    label: str | None = None  # how messages name a subset's ("folder of subset 2 (dataset.subsets[1].image_dir)")


class DatasetSettings(Section):
    path: str = setting("", "Image folder",
                        "Folder of images with same-name caption files. Subfolders named like '10_dog' repeat "
                        "their images 10 times per epoch. Relative paths are inside the datasets folder.",
                        widget="dataset")
    caption_extension: str = setting(".txt", "Caption file extension", advanced=True)
    default_caption: str = setting("", "Caption for images without one",
                                   "Used when an image has no caption file. Left empty, a missing caption "
                                   "stops the run with the list of files that lack one.")
    num_repeats: int = setting(1, "Repeats", "How often each image is seen per epoch (folders named "
                               "'N_name' set their own).", ge=1, le=10000)
    reg_path: str = setting("", "Regularization images (DreamBooth)",
                            "Optional folder of class images with captions (laid out like the image folder, "
                            "'N_name' subfolders included) for prior preservation. Each epoch they are cycled "
                            "to as many samples as the training images give. Empty: off. Relative paths are "
                            "inside the datasets folder.", widget="dataset")
    reg_num_repeats: int = setting(1, "Regularization repeats", "Repeats of each regularization image before "
                                   "cycling (folders named 'N_name' set their own). Only used with a "
                                   "regularization folder.", ge=1, le=10000, advanced=True)
    prior_loss_weight: float = setting(1.0, "Prior loss weight", "Weight of the regularization images' loss "
                                       "(DreamBooth prior preservation; training images weigh 1). Only used "
                                       "with a regularization folder.", ge=0.0, le=100.0, step=0.05)
    resolution: int = setting(512, "Resolution", "Training resolution (the side of a square of the same area).",
                              ge=64, le=4096, step=64)
    enable_buckets: bool = setting(True, "Aspect-ratio buckets",
                                   "Group images by aspect ratio instead of centre-cropping them to a square.")
    min_bucket_reso: int = setting(256, "Smallest bucket side", "Lowered to the resolution when that is smaller.",
                                   ge=32, le=4096, step=64,
                                   show_if={"dataset.enable_buckets": [True]}, advanced=True)
    max_bucket_reso: int = setting(1024, "Largest bucket side", "Raised to the resolution when that is larger.",
                                   ge=64, le=8192, step=64,
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
    masked_loss: bool = setting(False, "Masked loss", "Train only where the mask is white (grey: partly): masks "
                                "from the mask folder, else each image's alpha channel (an image without one trains "
                                "everywhere). sd-scripts' masked_loss.", advanced=True)
    mask_path: str = setting("", "Mask folder", "Grayscale masks named like the image folder's images (same "
                             "subfolders, any image extension). Empty: the images' alpha channel. Relative paths "
                             "are inside the datasets folder.", widget="dataset", advanced=True,
                             show_if={"dataset.masked_loss": [True]})
    conditioning_path: str = setting("", "Conditioning images", "ControlNet: one conditioning image (edges, depth, "
                                     "pose …) per training image, with the same name and size (same subfolders, "
                                     "any image extension); it is cropped and flipped with its image. Previews use "
                                     "the held-out validation images' conditioning images, else the first training "
                                     "ones. Relative paths are inside the datasets folder.", widget="dataset",
                                     show_if={"network.algorithm": ["controlnet"]})
    validation_split: float = setting(0.0, "Validation share", "Share of the training images held out to "
                                      "measure a validation loss (sd-scripts' validation_split); 0 disables. The "
                                      "held-out images are not trained on.", ge=0.0, le=0.5, step=0.01)
    validation_seed: int = setting(42, "Validation seed", "Which images are held out, and the fixed noise they "
                                   "are measured with.", ge=0, le=2**32 - 1, advanced=True)
    cache_latents: Literal["memory", "disk", "off"] = setting(
        "memory", "Cache latents", "Encode every image once. 'disk' keeps the cache next to the images and "
        "reuses it while the image file is unchanged; the text-encoder outputs are then kept there too, so a "
        "rerun with the same model does not run the text encoders again.", choices=("memory", "disk", "off"),
        choice_labels={"memory": "in memory", "disk": "on disk (kept for reruns)", "off": "off (encode every step)"})
    subsets: list[SubsetSettings] = setting(
        list, "Subsets", "More image folders, each with its own options, as in sd-scripts' dataset config "
        "([[datasets.subsets]]): one row per folder. An empty cell takes the value set above. is_reg marks "
        "regularization images (weighted by the prior loss weight); a resolution of its own gives the folder "
        "its own buckets. The image folder above, when set, is trained as well.", widget="table")

    def subset_settings(self, subset: SubsetSettings) -> "DatasetSettings":
        """The settings a subset's images are scanned and trained with: its own values where set, the
        dataset's otherwise (a regularization subset's repeats are its ``reg_num_repeats``)."""
        own = subset.model_dump(exclude={"image_dir", "is_reg"}, exclude_none=True)
        if subset.is_reg and "num_repeats" in own:
            own["reg_num_repeats"] = own.pop("num_repeats")
        return self.model_copy(update=own | {"subsets": []})

    def folders(self) -> list[ImageFolder]:
        """Every folder of images: the image folder, the regularization folder, then the subsets, each when set."""
        out = [ImageFolder("dataset.path", self.path, False, self)] if self.path.strip() else []
        if self.reg_path.strip():
            out.append(ImageFolder("dataset.reg_path", self.reg_path.strip(), True, self))
        return out + [ImageFolder(f"dataset.subsets[{i}].image_dir", sub.image_dir, sub.is_reg,
                                  self.subset_settings(sub), f"{'regularization ' if sub.is_reg else ''}folder of "
                                  f"subset {i + 1} (dataset.subsets[{i}].image_dir)")
                      for i, sub in enumerate(self.subsets)]

    def uses(self, option: str) -> bool:
        """Whether the dataset or any subset turns this option on (e.g. ``shuffle_caption``)."""
        return any(getattr(d, option) for d in [self, *map(self.subset_settings, self.subsets)])

    def largest_resolution(self) -> int:
        """The largest resolution any folder trains at (what the memory estimate plans for)."""
        return max([self.resolution, *(sub.resolution for sub in self.subsets if sub.resolution)])

    def problems(self) -> list[str]:
        """Subset values that are each valid but do not fit the dataset's (see :func:`check_consistency`)."""
        out = []
        if all(folder.is_reg for folder in self.folders()):
            out.append("dataset.path: choose the folder with your training images (or add a subset that is not "
                       "is_reg)")
        return out


class ModelSettings(Section):
    architecture: str = setting(_first_family, "Architecture",
                                "The model family. The loader checks that the file fits it.", choices=ALL_FAMILIES)

    @field_validator("architecture")
    @classmethod
    def _registered_family(cls, value: str) -> str:
        import architectures
        if value not in architectures.registry():
            raise ValueError(f"unknown architecture (allowed: {', '.join(architectures.registry())})")
        return value
    model_path: str = setting("", "Base model", "A diffusers folder or a single .safetensors checkpoint. "
                              "Relative paths are inside the models folder.", widget="model")
    config_path: str = setting("", "Model config folder",
                               "Only for single-file checkpoints of an unusual size: a diffusers-layout folder "
                               "with the configs and tokenizers. Empty uses the configs shipped for the "
                               "architecture.", widget="path", advanced=True)
    clip_l_path: str = setting("", "CLIP-L file", "FLUX.1 single-file transformers only: the CLIP-L text "
                               "encoder (clip_l.safetensors). Not needed for a diffusers folder.", widget="model",
                               show_if={"model.architecture": FamilyTrait("bfl_text_encoder_files")})
    t5xxl_path: str = setting("", "T5-XXL file", "FLUX.1 single-file transformers only: the T5-XXL text encoder "
                              "(t5xxl_fp16.safetensors). Its tokenizer (tokenizer.json or spiece.model) goes into "
                              "a t5_tokenizer folder beside it.", widget="model",
                              show_if={"model.architecture": FamilyTrait("bfl_text_encoder_files")})
    ae_path: str = setting("", "Autoencoder file", "FLUX.1 single-file transformers only: the autoencoder "
                           "(ae.safetensors).", widget="model", show_if={"model.architecture": FamilyTrait("bfl_text_encoder_files")})
    components_path: str = setting("", "Text encoder / VAE folder", "Single-file transformers only: a "
                                   "diffusers-layout folder of the same model with text_encoder, tokenizer and "
                                   "vae subfolders (the transformer file supplies the rest). Not needed for a "
                                   "diffusers folder.", widget="path", show_if={"model.architecture": FamilyTrait("components_folder")})
    use_t5: bool = setting(True, "Use T5", "Load the T5-XXL text encoder. Off: T5's part of the conditioning is "
                           "zeros (as SD3 runs without T5), saving about 10 GB of memory; the model then does not "
                           "need to contain T5.", show_if={"model.architecture": FamilyTrait("optional_t5")})
    t5_max_length: int = setting(0, "T5 tokens", "Length T5 captions are padded or cut to. 0: the model's "
                                 "default (256 for SD3 and FLUX.1 schnell, 512 for FLUX.1 dev).", ge=0, le=512,
                                 show_if={"model.architecture": FamilyTrait("t5")}, advanced=True)
    apply_t5_attention_mask: bool = setting(False, "Mask T5 padding", "Mask T5's padding tokens and zero their "
                                            "output (sd-scripts' apply_t5_attn_mask). Off matches how diffusers "
                                            "and ComfyUI encode prompts.",
                                            show_if={"model.architecture": FamilyTrait("t5")}, advanced=True)
    guidance: float = setting(1.0, "Training guidance", "The guidance value a guidance-distilled model "
                              "(FLUX dev) is given while training. 1.0 is common for LoRAs; diffusers' example uses 3.5.",
                              ge=0.0, le=20.0, step=0.1, show_if={"model.architecture": FamilyTrait("guidance_input")})
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = setting(
        "auto", "Prediction type", "'auto' uses what the model's scheduler config says (epsilon for "
        "single files).", choices=("auto", "epsilon", "v_prediction"),
        choice_labels={"auto": "auto (the model's config)", "epsilon": "ε (noise)", "v_prediction": "v-prediction"},
        show_if={"model.architecture": FamilyTrait("ddpm")})
    zero_terminal_snr: bool = setting(False, "Zero terminal SNR", "Rescale the noise schedule so the last "
                                      "step is pure noise (use with v-prediction).", advanced=True,
                                      show_if={"model.architecture": FamilyTrait("ddpm")})
    clip_skip: int = setting(1, "CLIP skip", "Use the output of the N-th last text-encoder layer.", ge=1, le=12,
                             show_if={"model.architecture": FamilyTrait("clip_skip")})


# the adapter algorithms, named once (core/adapters implements them)
AdapterAlgorithm = Literal["lora", "locon", "loha", "lokr", "ia3", "diag-oft", "boft", "glora", "full"]
ADAPTER_ALGORITHMS: tuple[str, ...] = get_args(AdapterAlgorithm)
# network.algorithm's choices: the adapters, full fine-tuning of the model itself, textual inversion and a
# ControlNet (no adapter)
ALGORITHMS = ADAPTER_ALGORITHMS + ("full_finetune", "textual_inversion", "controlnet")
ALGORITHM_LABELS = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "ia3": "(IA)³",
                    "diag-oft": "Diag-OFT", "boft": "BOFT", "glora": "GLoRA", "full": "Full-rank adapter",
                    "full_finetune": "Full fine-tune (no adapter)",
                    "textual_inversion": "Textual inversion (embedding)", "controlnet": "ControlNet"}
_ADAPTERS = list(ADAPTER_ALGORITHMS)
_TRAINS_WEIGHTS = _ADAPTERS + ["full_finetune"]  # every algorithm but textual inversion, which trains a new word only
_TI = ["textual_inversion"]
# pivotal tuning: an adapter with a new token's embedding beside it (the textual-inversion fields apply)
_PIVOTAL = {"network.algorithm": _ADAPTERS, "network.pivotal": [True]}
_CONTROLNET = ["controlnet"]
RANKED_ALGORITHMS = ("lora", "locon", "loha", "lokr", "glora")  # strength set by rank / alpha
DORA_ALGORITHMS = ("lora", "locon", "loha", "lokr")
_RANKED = list(RANKED_ALGORITHMS)
_CONV_RANKED = ["locon", "loha", "lokr", "glora"]  # can adapt k×k convolutions with their own rank
_DORA = list(DORA_ALGORITHMS)
ADAPTER_TARGETS = ("attn", "attn_mlp", "full", "full-lin")


class NetworkSettings(Section):
    algorithm: Literal[AdapterAlgorithm, "full_finetune", "textual_inversion", "controlnet"] = setting(
        "lora", "Algorithm",
        "LoRA: kohya LoRA on linear layers, loaded by every tool. LoCon: LoRA on 3x3 convolutions too. "
        "LoHa / LoKr: Hadamard / Kronecker products (more capacity per parameter). (IA)³: per-channel scales "
        "(tiny; needs a learning rate around 5e-3). Diag-OFT / BOFT: orthogonal fine-tuning (rotates the "
        "weights). GLoRA: generalised LoRA. Full: full-rank weight differences (large files). All but LoRA "
        "are saved as LyCORIS files (kohya key names); ComfyUI loads all of them except (IA)³. Full fine-tune: "
        "no adapter; the UNet itself (and the text encoders if chosen) trains in fp32 and a whole checkpoint "
        "is saved (SD1.5 / SDXL only; needs far more memory). Textual inversion: no adapter; a new word's "
        "embedding trains and is saved as an embedding file for A1111, ComfyUI and diffusers (SD1.5 / SDXL only). "
        "ControlNet: a ControlNet learns to steer the frozen model from conditioning images (Dataset tab); saved "
        "as one file for ComfyUI / Forge and, if chosen, a diffusers folder (SD1.5 / SDXL only).",
        choices=ALGORITHMS, choice_labels=ALGORITHM_LABELS)
    ti_token: str = setting("", "Token", "The new word that stands for what the images show: a made-up word the "
                            "tokenizer does not know (e.g. 'sks' or 'ohwx'). Captions that contain it train its "
                            "embedding; preview prompts may use it too. A1111 and ComfyUI call an embedding by its "
                            "file name (saving.output_name).", show_if={"network.algorithm": _TI}, or_show_if=_PIVOTAL)
    ti_num_vectors: int = setting(1, "Vectors per token", "Embedding vectors the token stands for: more hold more "
                                  "detail but take more of a prompt's 75 tokens. The extra ones are named <token>1, "
                                  "<token>2 … (sd-scripts' num_vectors_per_token).", ge=1, le=75,
                                  show_if={"network.algorithm": _TI}, or_show_if=_PIVOTAL)
    ti_init_word: str = setting("", "Initialisation word", "A word close to what the images show (e.g. 'dog' or "
                                "'painting'): its embedding, averaged over its tokens, starts every vector.",
                                show_if={"network.algorithm": _TI}, or_show_if=_PIVOTAL)
    pivotal: bool = setting(False, "Pivotal tuning (a new token too)", "Train a new token's embedding (Token, "
                            "Vectors per token and Initialisation word below) together with the adapter: the word "
                            "learns what the images show while the adapter learns the rest. Saved inside the "
                            "adapter file as bundle_emb entries (A1111 / Forge load them with the LoRA; ComfyUI "
                            "reads them when the file is used as an embedding) and as <name>_emb.safetensors, an "
                            "embedding file for every tool. diffusers' load_lora_weights refuses the bundle_emb "
                            "keys: give it the file's other tensors and the _emb file to load_textual_inversion. "
                            "SD1.5 / SDXL.", show_if={"network.algorithm": _ADAPTERS,
                                                      "model.architecture": FamilyTrait("embeddings")})
    controlnet_init: str = setting("", "Start from ControlNet", "An existing ControlNet to go on training (a "
                                   "single .safetensors in either key layout, or a diffusers folder) for this "
                                   "model. Empty: a new one copied from the model's UNet encoder, whose outputs "
                                   "start at zero. Relative paths are inside the models folder.", widget="model",
                                   show_if={"network.algorithm": _CONTROLNET})
    rank: int = setting(16, "Rank (dim)", "LoKr: rank of the low-rank Kronecker factor (large ranks make it a "
                        "full matrix). Diag-OFT / BOFT: the block size.", ge=1, le=1024,
                        show_if={"network.algorithm": _RANKED + ["diag-oft", "boft"]})
    alpha: float = setting(16.0, "Alpha", "Scale = alpha / rank (alpha / √rank with rs-LoRA). 0 means "
                           "alpha = rank.", ge=0.0, le=4096.0, show_if={"network.algorithm": _RANKED})
    dropout: float = setting(0.0, "Dropout", "Dropout on the adapter's input.", ge=0.0, le=1.0, step=0.01,
                             show_if={"network.algorithm": _RANKED})
    target: Literal["attn", "attn_mlp", "full", "full-lin"] = setting(
        "attn_mlp", "Target layers", "Which UNet layers get an adapter: attention only; attention and "
        "feed-forward; 'full': also the ResNet blocks, down/upsamplers, conv_in/out and time embedding, 3x3 "
        "convolutions included (not for plain LoRA: use LoCon); 'full-lin': the same without 3x3 "
        "convolutions. SD3 / FLUX.1: attention; + MLPs; 'full-lin': every linear layer of the transformer "
        "blocks (adaLN modulation too); 'full' does not apply. FLUX.2: its blocks have no modulation of "
        "their own (three shared layers, which diffusers' loader drops), so 'full-lin' equals attention + MLPs; "
        "add them with the patterns below if wanted.", choices=ADAPTER_TARGETS,
        choice_labels={"attn": "attention", "attn_mlp": "attention + MLP", "full": "full (convolutions too)",
                       "full-lin": "every linear layer"},
        show_if={"network.algorithm": _ADAPTERS})
    train_text_encoder: bool = setting(False, "Train text encoder(s)",
                                       show_if={"network.algorithm": _TRAINS_WEIGHTS})
    ema: bool = setting(False, "EMA weights", "Keep an exponential moving average of the trained weights and "
                        "save it instead of the live weights.", show_if={"network.algorithm": ["full_finetune"]})
    ema_decay: float = setting(0.9999, "EMA decay", "Per optimizer step: ema = decay·ema + (1−decay)·weights.",
                               ge=0.0, le=1.0, step=0.0001,
                               show_if={"network.algorithm": ["full_finetune"], "network.ema": [True]})
    ema_on_cpu: bool = setting(False, "EMA in CPU memory", "Keep the average in RAM instead of VRAM (saves a "
                               "full fp32 copy of the weights on the GPU; each step waits for the copy).",
                               show_if={"network.algorithm": ["full_finetune"], "network.ema": [True]})
    flux_blocks: Literal["all", "double", "single"] = setting(
        "all", "FLUX blocks", "Which FLUX transformer blocks get adapters: all, only the double-stream "
        "(or per-mode) blocks, or only the single-stream blocks.", choices=("all", "double", "single"),
        choice_labels={"all": "all blocks", "double": "double-stream blocks", "single": "single-stream blocks"},
        show_if={"model.architecture": FamilyTrait("double_single_blocks")})
    train_t5: bool = setting(False, "Train T5 too", "Also train the T5-XXL text encoder (lora_te3_ keys; large "
                             "and slow; diffusers does not load T5 adapters).",
                             show_if={"model.architecture": FamilyTrait("t5"), "network.algorithm": _TRAINS_WEIGHTS,
                                      "network.train_text_encoder": [True]},
                             advanced=True)
    conv_rank: int = setting(0, "Conv rank", "Rank for 3x3 convolutions. 0 uses the rank above.", ge=0, le=1024,
                             show_if={"network.algorithm": _CONV_RANKED, "network.target": ["full"]})
    conv_alpha: float = setting(0.0, "Conv alpha", "Alpha for 3x3 convolutions. 0 uses the alpha above.",
                                ge=0.0, le=4096.0,
                                show_if={"network.algorithm": _CONV_RANKED, "network.target": ["full"]})
    use_tucker: bool = setting(False, "Tucker decomposition", "Decompose 3x3 convolutions with a Tucker core "
                               "(lora_mid / hada_t / lokr_t2): fewer parameters.",
                               show_if={"network.algorithm": ["locon", "loha", "lokr"], "network.target": ["full"]},
                               advanced=True)
    dora: bool = setting(False, "DoRA (weight decomposition)", "Learn each weight's magnitude separately from "
                         "its direction (saved as dora_scale). diffusers ignores it; ComfyUI, Forge and A1111 "
                         "apply it.", show_if={"network.algorithm": _DORA})
    dora_on_output: bool = setting(False, "DoRA norm per output channel", "Normalise per output channel (the "
                                   "DoRA paper, LyCORIS' wd_on_output) instead of per input channel. ComfyUI "
                                   "currently normalises such files by the base weight: they look slightly "
                                   "different there.", show_if={"network.algorithm": _DORA, "network.dora": [True]},
                                   advanced=True)
    rs_lora: bool = setting(False, "rs-LoRA scaling", "Scale by alpha / √rank instead of alpha / rank (the "
                            "file's alpha is adjusted so every loader gets the same scale).",
                            show_if={"network.algorithm": _RANKED}, advanced=True)
    use_scalar: bool = setting(False, "Learned scalar", "LyCORIS' scalar: both sides start random and a learned "
                               "scale, starting at 0, gates the adapter (folded into the weights on save).",
                               show_if={"network.algorithm": _CONV_RANKED}, advanced=True)
    rank_dropout: float = setting(0.0, "Rank dropout", "Drop ranks (LoRA) or rows of the weight change (others) "
                                  "during training.", ge=0.0, le=1.0, step=0.01,
                                  show_if={"network.algorithm": _RANKED}, advanced=True)
    module_dropout: float = setting(0.0, "Module dropout", "Skip a whole adapted layer with this probability "
                                    "during training.", ge=0.0, le=1.0, step=0.01, advanced=True,
                                    show_if={"network.algorithm": _ADAPTERS})
    loraplus_lr_ratio: float = setting(0.0, "LoRA+ ratio", "Train the up (B) matrices at this multiple of the "
                                       "learning rate (LoRA+; 16 is common). 0 disables.", ge=0.0, le=1000.0,
                                       show_if={"network.algorithm": ["lora", "locon"]}, advanced=True)
    lokr_factor: int = setting(-1, "LoKr factor", "Split each dimension as factor × rest. -1: as square as "
                               "possible (smallest files); 4–16 keep more capacity.", ge=-1, le=8192,
                               show_if={"network.algorithm": ["lokr"]})
    decompose_both: bool = setting(False, "Decompose both factors", "Make the smaller Kronecker factor low-rank "
                                   "too.", show_if={"network.algorithm": ["lokr"]}, advanced=True)
    full_matrix: bool = setting(False, "Full-matrix factor", "Keep the larger Kronecker factor a full matrix "
                                "(no rank).", show_if={"network.algorithm": ["lokr"]}, advanced=True)
    oft_rescale: bool = setting(False, "Rescale outputs", "Learn a per-output-channel scale after the rotation. "
                                "ComfyUI applies it for BOFT but ignores it for Diag-OFT.",
                                show_if={"network.algorithm": ["diag-oft", "boft"]}, advanced=True)
    include: str = setting("", "Also adapt (patterns)", "Extra layers beyond the target preset: module-name "
                           "patterns, one per line or comma-separated, matched against the model path "
                           "(down_blocks.1.resnets.0.conv1) or the file key (lora_unet_…). With * ? [ ] a "
                           "pattern must match the whole name, without them any part.", widget="textarea",
                           advanced=True, show_if={"network.algorithm": _ADAPTERS})
    exclude: str = setting("", "Skip (patterns)", "Layers to leave out, same pattern rules (e.g. attn1, "
                           "*_ff_net_*).", widget="textarea", advanced=True,
                           show_if={"network.algorithm": _ADAPTERS})
    block_ranks: str = setting("", "Rank per block", "Overrides of rank (and optionally alpha) per block, e.g. "
                               "'down_0=4, mid=32/16, up_3=8, te1=4'. Blocks: UNet down_N / mid / up_N, SD3 "
                               "joint_N, FLUX double_N / single_N, text encoders te1, te2, te3. Without an alpha the "
                               "block keeps the network's alpha/rank scale; a rank of 0 leaves the block out.", advanced=True,
                               show_if={"network.algorithm": ["lora", "locon", "loha", "lokr", "glora"]})


class OptimizerSettings(Section):
    optimizer_type: OptimizerType = setting(
        "AdamW", "Optimizer", "The 8-bit ones (bitsandbytes; Paged: state in pageable memory) need an NVIDIA GPU. "
        "Prodigy and DAdaptAdam set their own step size: use a learning rate of 1. AdamWScheduleFree needs no "
        "scheduler (constant; it warms up by Warmup steps). CAME: Adafactor-like memory, Adam-like steps.",
        choices=OPTIMIZERS)
    learning_rate: float = setting(1e-4, "Learning rate", ge=0.0, le=10.0)
    text_encoder_lr: float = setting(0.0, "Text encoder learning rate", "0 uses the learning rate above.",
                                     ge=0.0, le=10.0, show_if={"network.algorithm": _TRAINS_WEIGHTS,
                                                               "network.train_text_encoder": [True]})
    embedding_lr: float = setting(0.0, "Embedding learning rate", "Pivotal tuning: the new token's learning rate "
                                  "(embeddings train well around 1e-3 to 5e-3, far above a LoRA's); 0 uses the "
                                  "learning rate above.", ge=0.0, le=10.0, show_if=_PIVOTAL)
    weight_decay: float = setting(0.01, "Weight decay", ge=0.0, le=10.0, advanced=True)
    max_grad_norm: float = setting(1.0, "Max gradient norm", "0 disables clipping.", ge=0.0, le=1000.0)
    fused_backward_pass: bool = setting(False, "Fused backward pass", "Update each weight as soon as its "
                                        "gradient is ready and free the gradient: much less memory for full "
                                        "fine-tuning, whose blocks can then also be swapped to CPU memory. Needs "
                                        "gradient accumulation 1, no clipping (max gradient norm is ignored) and "
                                        "bf16 or fp32.",
                                        show_if={"optimizer.optimizer_type": ["Adafactor"]})
    beta1: float = setting(0.0, "Beta 1", "The first moment's decay (SGD: momentum). 0: the optimizer's default "
                           "(0.9; Adafactor: none).", ge=0.0, le=0.9999, step=0.001, advanced=True)
    beta2: float = setting(0.0, "Beta 2", "The second moment's decay (Lion: the momentum's). 0: the optimizer's "
                           "default (0.999; Lion 0.99).", ge=0.0, le=0.99999, step=0.001, advanced=True,
                           show_if={"optimizer.optimizer_type": [o for o in OPTIMIZERS
                                                                 if o not in ("Adafactor", "SGD")]})
    eps: float = setting(0.0, "Epsilon", "Added to the denominator. 0: the optimizer's default (1e-8).", ge=0.0,
                         le=1.0, advanced=True,
                         show_if={"optimizer.optimizer_type": ["AdamW", "AdamW8bit", "PagedAdamW8bit",
                                                               "AdamWScheduleFree", "Prodigy", "DAdaptAdam"]})
    d_coef: float = setting(1.0, "Prodigy d_coef", "Scales Prodigy's estimated step size (below 1: smaller "
                            "steps).", ge=0.01, le=100.0, step=0.1, advanced=True,
                            show_if={"optimizer.optimizer_type": ["Prodigy"]})
    adafactor_relative_step: bool = setting(False, "Adafactor relative step", "Adafactor chooses its own step "
                                            "size (relative_step, scale_parameter and warmup_init on; the learning "
                                            "rate is then ignored).", advanced=True,
                                            show_if={"optimizer.optimizer_type": ["Adafactor"]})
    lr_scheduler: LrScheduler = setting("constant", "LR scheduler", "rex: (1−z)/(1−z/2) of the steps' share z "
                                        "after warmup. warmup_stable_decay: warmup, constant, then a cosine decay "
                                        "over the last decay steps.", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Warmup steps", ge=0, le=1_000_000)
    lr_scheduler_num_cycles: int = setting(1, "Restarts (cycles)", ge=1, le=1000,
                                           show_if={"optimizer.lr_scheduler": ["cosine_with_restarts"]})
    lr_scheduler_power: float = setting(1.0, "Polynomial power", ge=0.0, le=10.0,
                                        show_if={"optimizer.lr_scheduler": ["polynomial"]})
    lr_scheduler_min_lr_ratio: float = setting(0.1, "Minimum learning rate (share)", "The learning rate decays "
                                               "to this share of its value.", ge=0.0, le=1.0, step=0.01,
                                               show_if={"optimizer.lr_scheduler": ["cosine_with_min_lr",
                                                                                   "warmup_stable_decay"]})
    lr_decay_steps: int = setting(0, "Decay steps", "warmup_stable_decay: the last steps, over which the learning "
                                  "rate decays; 0 uses the last 10 %.", ge=0, le=10_000_000,
                                  show_if={"optimizer.lr_scheduler": ["warmup_stable_decay"]})
    lr_scheduler_timescale: int = setting(0, "Timescale", "inverse_sqrt: steps after which the learning rate is "
                                          "divided by √(1 + step/timescale); 0 uses the warmup steps.", ge=0,
                                          le=10_000_000, show_if={"optimizer.lr_scheduler": ["inverse_sqrt"]})
    lr_scheduler_step_rules: str = setting("1:1000,0.1", "Step rules", "piecewise_constant: multipliers and the "
                                           "step each holds until, then the last multiplier (diffusers' "
                                           "step_rules: '1:1000,0.1:2000,0.01').",
                                           show_if={"optimizer.lr_scheduler": ["piecewise_constant"]})


class ScheduleSettings(Section):
    max_train_steps: int = setting(1000, "Training steps", "Optimizer steps to train.", ge=1, le=10_000_000)
    max_train_epochs: int = setting(0, "Training epochs", "When above 0, train this many epochs instead of "
                                    "the step count.", ge=0, le=100_000)
    train_batch_size: int = setting(1, "Batch size", ge=1, le=256)
    gradient_accumulation_steps: int = setting(1, "Gradient accumulation", ge=1, le=1024)
    seed: int = setting(42, "Seed", ge=0, le=2**32 - 1)
    noise_offset: float = setting(0.0, "Noise offset", ge=0.0, le=1.0, step=0.01, advanced=True)
    min_snr_gamma: float = setting(0.0, "Min-SNR gamma", "Loss weighting; 5 is common. 0 disables.",
                                   ge=0.0, le=100.0, show_if={"model.architecture": FamilyTrait("ddpm")})
    debiased_estimation_loss: bool = setting(False, "Debiased estimation", "Weights each sample's loss by "
                                             "1/√SNR (1/(SNR+1) for v-prediction models), as sd-scripts' "
                                             "debiased_estimation_loss.", advanced=True,
                                             show_if={"model.architecture": FamilyTrait("ddpm")})
    scale_v_pred_loss_like_noise_pred: bool = setting(
        False, "Scale v-prediction loss like noise prediction", "For v-prediction models: weights the loss by "
        "SNR/(SNR+1) so that it behaves like an ε-prediction loss (sd-scripts' option of that name). No effect on "
        "ε-prediction models.", advanced=True, show_if={"model.architecture": FamilyTrait("ddpm")})
    loss_type: LossType = setting(
        "l2", "Loss", "l2: mean squared error. huber / smooth_l1: pseudo-Huber losses that outliers pull less "
        "(sd-scripts' loss_type).", choices=LOSS_TYPES, advanced=True,
        choice_labels={"l2": "L2 (MSE)", "huber": "Huber", "smooth_l1": "Smooth L1"})
    huber_schedule: HuberSchedule = setting(
        "snr", "Huber schedule", "The Huber threshold per noise level: constant (huber_c); exponential (1 on "
        "clean inputs down to huber_c on pure noise); snr (follows the signal-to-noise ratio; sd-scripts' "
        "default).", choices=HUBER_SCHEDULES, advanced=True,
        choice_labels={"constant": "constant", "exponential": "exponential in the timestep", "snr": "by SNR"}, show_if={"schedule.loss_type": ["huber", "smooth_l1"]})
    huber_c: float = setting(0.1, "Huber c", "The Huber threshold (or its value on pure noise for the "
                             "exponential and snr schedules).", ge=0.0001, le=10.0, step=0.01, advanced=True,
                             show_if={"schedule.loss_type": ["huber", "smooth_l1"]})
    huber_scale: float = setting(1.0, "Huber scale", "Multiplies the constant and exponential thresholds.",
                                 ge=0.0001, le=100.0, step=0.1, advanced=True,
                                 show_if={"schedule.loss_type": ["huber", "smooth_l1"],
                                          "schedule.huber_schedule": ["constant", "exponential"]})
    min_timestep: int = setting(0, "Min timestep", "The least noisy level trained, out of 1000 (flow-matching "
                                "models: σ × 1000).", ge=0, le=999, advanced=True)
    max_timestep: int = setting(1000, "Max timestep", "The noisiest level trained (exclusive for SD1.5/SDXL), out "
                                "of 1000. Flow-matching models map their sampled σ linearly into the range.",
                                ge=1, le=1000, advanced=True)
    ip_noise_gamma: float = setting(0.0, "Input perturbation noise", "Extra noise in the model's input that the "
                                    "target does not contain (sd-scripts' ip_noise_gamma; 0.1 is common). 0 "
                                    "disables.", ge=0.0, le=1.0, step=0.01, advanced=True)
    multires_noise_iterations: int = setting(0, "Multires noise iterations", "Pyramid noise: adds coarser noise "
                                             "levels (6–10 is common). 0 disables.", ge=0, le=20, advanced=True)
    multires_noise_discount: float = setting(0.3, "Multires noise discount", "Strength kept per coarser level.",
                                             ge=0.0, le=1.0, step=0.05, advanced=True)
    timestep_sampling: TimestepSampling = setting(
        "sigmoid", "Timestep sampling", "How noise levels σ are drawn for flow-matching models: uniform; "
        "sigmoid(scale·N(0,1)); logit-normal(mean, std) (SD3 paper); mode (heavy tails); shift: sigmoid, then "
        "σ' = sσ/(1+(s−1)σ); flux_shift: sigmoid, then the shift FLUX.1 uses for the image size.",
        choices=TIMESTEP_SAMPLING, show_if={"model.architecture": FamilyTrait("flow_matching")},
        choice_labels={"uniform": "uniform", "sigmoid": "sigmoid", "logit_normal": "logit-normal",
                       "mode": "mode (SD3 paper)", "shift": "shifted sigmoid", "flux_shift": "FLUX shift (by resolution)"})
    sigmoid_scale: float = setting(1.0, "Sigmoid scale", "Spread of sigmoid sampling (larger: more samples near "
                                   "pure image and pure noise).", ge=0.01, le=10.0, step=0.1,
                                   show_if={"model.architecture": FamilyTrait("flow_matching"),
                                            "schedule.timestep_sampling": ["sigmoid", "shift", "flux_shift"]})
    logit_mean: float = setting(0.0, "Logit mean", ge=-5.0, le=5.0, step=0.1,
                                show_if={"model.architecture": FamilyTrait("flow_matching"),
                                         "schedule.timestep_sampling": ["logit_normal"]})
    logit_std: float = setting(1.0, "Logit std", ge=0.01, le=10.0, step=0.1,
                               show_if={"model.architecture": FamilyTrait("flow_matching"),
                                        "schedule.timestep_sampling": ["logit_normal"]})
    mode_scale: float = setting(1.29, "Mode scale", "SD3 paper's mode sampling; 0 is uniform.", ge=-1.0, le=2.0,
                                step=0.01, show_if={"model.architecture": FamilyTrait("flow_matching"),
                                                    "schedule.timestep_sampling": ["mode"]})
    discrete_flow_shift: float = setting(3.0, "Shift", "s in σ' = sσ/(1+(s−1)σ); above 1 trains more on noisy "
                                         "steps (SD3 samples with 3.0).", ge=0.01, le=100.0, step=0.1,
                                         show_if={"model.architecture": FamilyTrait("flow_matching"),
                                                  "schedule.timestep_sampling": ["shift"]})
    loss_weighting: LossWeighting = setting(
        "none", "Loss weighting", "Per-sample weight of flow-matching losses: none; σ⁻² (sigma_sqrt); cosmap.",
        choices=LOSS_WEIGHTING, show_if={"model.architecture": FamilyTrait("flow_matching")},
        choice_labels={"none": "none", "sigma_sqrt": "σ⁻² (sigma_sqrt)", "cosmap": "cosmap"})
    validate_every_n_steps: int = setting(0, "Validate every N steps", "With a validation share: measure the "
                                          "validation loss every N steps; 0 measures it at the end of each epoch.",
                                          ge=0, le=10_000_000)
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
                                                               choices=("fp16", "bf16", "float"),
                                                               choice_labels={"float": "fp32 (float)"})
    save_diffusers_folder: bool = setting(False, "Also save a diffusers folder", "Full fine-tune / ControlNet: "
                                          "write the model as a diffusers folder (<name>_diffusers) beside the "
                                          "single file.", show_if={"network.algorithm": ["full_finetune", "controlnet"]})
    save_state: bool = setting(True, "Save resumable state", "Keep optimizer and scheduler state with each "
                               "save so the run can be resumed.")
    resume_from: str = setting("", "Resume from state", "A state folder written by an earlier run "
                               "(…/<output name>-state-000100).", widget="state")
    trigger_phrase: str = setting("", "Trigger phrase", "Written into the file's metadata.", advanced=True)
    log_with: LogWith = setting(
        "tensorboard", "Logs", "Loss, learning rates, speed, memory and previews, written in the output folder's "
        "logs/ (sd-scripts' log_with). View them with `tensorboard --logdir <output folder>`. Weights & Biases "
        "runs offline and needs the wandb package.", choices=LOG_WITH, advanced=True,
        choice_labels={"none": "none", "tensorboard": "TensorBoard", "wandb": "Weights & Biases (offline)",
                       "all": "TensorBoard and W&B"})


class SamplingSettings(Section):
    sample_every_n_steps: int = setting(0, "Preview every N steps", "0 disables previews.", ge=0,
                                        le=10_000_000)
    prompts: str = setting("", "Preview prompts", "One prompt per line. A line may add sd-scripts' options: "
                           "--n negative prompt, --w width, --h height, --d seed, --s steps, --l guidance scale "
                           "(e.g. 'a photo of sks dog --n blurry --w 768 --h 512 --d 42').", widget="textarea")
    negative_prompt: str = setting("", "Negative prompt")
    steps: int = setting(20, "Sampling steps", ge=1, le=200)
    guidance_scale: float = setting(7.0, "Guidance scale", ge=0.0, le=50.0)
    width: int = setting(0, "Width", "0 uses the training resolution.", ge=0, le=4096, step=8)
    height: int = setting(0, "Height", "0 uses the training resolution.", ge=0, le=4096, step=8)
    seed: int = setting(1234, "Preview seed", ge=0, le=2**32 - 1)


class MemorySettings(Section):
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = setting(
        "auto", "Precision", "'auto': bf16 where the GPU supports it, fp16 with loss scaling on older GPUs; "
        "on the CPU bf16 where it has bf16 instructions (AVX512-BF16 / AMX), else fp32.",
        choices=("auto", "bf16", "fp16", "no"), choice_labels={"no": "no (fp32)"})
    gradient_checkpointing: Literal["auto", "on", "off"] = setting(
        "auto", "Gradient checkpointing", "Recompute activations in the backward pass: much less memory, "
        "about 30% slower. 'auto' turns it on when the plan needs the memory.", choices=("auto", "on", "off"))
    tf32: Literal["auto", "on", "off"] = setting("auto", "TF32 matmuls", "'auto': on for Ampere and newer.",
                                                 choices=("auto", "on", "off"), advanced=True)
    cache_text_encoder_outputs: Literal["auto", "on", "off"] = setting(
        "auto", "Cache text-encoder outputs", "Encode each caption once. Not possible while the text encoder "
        "trains or captions change every step (shuffle, dropout); 'auto' caches when possible.",
        choices=("auto", "on", "off"))
    compile: Literal["auto", "off", "regional"] = setting(
        "auto", "Compile (torch.compile)", "Compile the model's repeated blocks: ≈1.5× faster steps on NVIDIA GPUs "
        "after about a minute of compiling. 'auto': on with CUDA and Triton.", choices=("auto", "off", "regional"),
        choice_labels={"regional": "regional (each repeated block)"})
    vram_budget_gb: float = setting(0.0, "VRAM to plan for (GB)", "0: the GPU's total memory. Set less to leave "
                                    "room for other programs on the same GPU; the plan then fits the run into it.",
                                    ge=0.0, le=1024.0, step=0.5)
    attention: Literal["auto", "flash", "efficient", "cudnn", "math", "default"] = setting(
        "auto", "Attention kernel", "PyTorch SDPA backend. 'auto': flash attention on NVIDIA GPUs in bf16/fp16 "
        "(with the memory-efficient kernel as fallback for masks; PyTorch's own first choice, cuDNN attention, has "
        "crashed in FLUX backward passes), the memory-efficient kernel in fp32, PyTorch's default on the CPU; "
        "'default' lets PyTorch choose.", choices=("auto", "flash", "efficient", "cudnn", "math", "default"),
        choice_labels={"flash": "flash", "efficient": "memory-efficient", "cudnn": "cuDNN", "math": "math (reference)",
                       "default": "PyTorch's choice"},
        advanced=True)
    blocks_to_swap: int = setting(-1, "Blocks swapped to CPU", "Keep this many transformer/UNet blocks in CPU "
                                  "memory and stream each to the GPU just before it runs (overlapped with compute). "
                                  "-1: as many as the plan needs to fit, 0: none. A full fine-tune swaps blocks "
                                  "only with Adafactor's fused backward pass.", ge=-1, le=200)
    quantize_base: Literal["auto", "none", "qfloat8", "qint8", "qint4", "nf4"] = setting(
        "auto", "Quantize the frozen model", "Store the frozen base weights in 8 or 4 bits (optimum-quanto "
        "qfloat8/qint8/qint4, bitsandbytes nf4); the adapter still trains in full precision on top. "
        "'auto': only when the model does not fit otherwise.", choices=("auto", "none", "qfloat8", "qint8", "qint4",
                                                                          "nf4"), choice_labels=QUANTIZE_LABELS)
    quantize_text_encoder: Literal["auto", "none", "qfloat8", "qint8", "qint4", "nf4"] = setting(
        "auto", "Quantize text encoders for caching", "Load the text encoders in 8 or 4 bits while captions are "
        "encoded ('auto': when they do not fit in VRAM in bf16). Large encoders that still do not fit are "
        "streamed layer by layer.", choices=("auto", "none", "qfloat8", "qint8", "qint4", "nf4"),
        choice_labels=QUANTIZE_LABELS)
    activation_offload: Literal["auto", "on", "off"] = setting(
        "auto", "Offload activations to CPU", "Keep the activations saved for the backward pass in CPU memory "
        "(with gradient checkpointing: the block inputs). Saves about 1 GB on large models at ≈15% speed. "
        "'auto': only when the plan cannot fit otherwise.", choices=("auto", "on", "off"), advanced=True)
    optimizer_8bit: Literal["auto", "on", "off"] = setting(
        "auto", "8-bit optimizer state", "Keep AdamW / Lion state in 8 bits (bitsandbytes, NVIDIA GPUs). "
        "'auto': when the plan needs the memory.", choices=("auto", "on", "off"), advanced=True)
    channels_last: Literal["auto", "on", "off"] = setting(
        "auto", "Channels-last memory format", "NHWC layout for the UNet's convolutions on NVIDIA GPUs. 'auto': "
        "off (measured within noise on an H100).", choices=("auto", "on", "off"), advanced=True)
    cuda_graphs: Literal["auto", "on", "off"] = setting(
        "auto", "CUDA graphs (capture the step)", "Record the whole training step (forward, backward, optimizer) "
        "once per bucket shape and replay it: far fewer kernel launches, for the UNet models whose steps are bound "
        "by the CPU. Not with block swapping, activation offload, a quantized base, fp16, gradient accumulation, "
        "text-encoder training, several GPUs or optimizers other than AdamW (the plan names every reason). 'auto': "
        "off for now (not yet verified on a GPU). 'on' is refused before loading when the run has one of those; a "
        "capture that still fails is logged and the steps run as usual. Each new bucket shape takes 3 ordinary steps "
        "and one capture first.",
        choices=("auto", "on", "off"), advanced=True)
    cpu_threads: int = setting(0, "CPU threads", "Threads for a CPU-only run. 0: one per physical core.", ge=0,
                               le=1024, advanced=True)


class DistributedSettings(Section):
    num_processes: int = setting(0, "Processes (GPUs)", "Train on several GPUs at once: one process per GPU, each "
                                 "with the batch size of the Optimizer tab, so one optimizer step sees that batch "
                                 "times the processes, exactly as one process with the larger batch would. 0: one "
                                 "per usable NVIDIA GPU (1 without one). On the CPU, the processes share its cores.",
                                 ge=0, le=64)
    strategy: Literal["ddp", "fsdp"] = setting(
        "ddp", "Strategy", "DDP: every process holds the whole model and the gradients are summed after each "
        "backward pass, so the memory plan is per GPU. FSDP (full fine-tuning only): the model's weights, "
        "gradients and optimizer state are sharded over the processes, each holding 1/N of them, for models "
        "whose full fine-tune does not fit one GPU (SD3.5 Large, FLUX.1, FLUX.2); the blocks' weights are "
        "gathered as they run, which costs transfers between the GPUs.", choices=("ddp", "fsdp"),
        choice_labels={"ddp": "DDP (data parallel)", "fsdp": "FSDP (sharded, full fine-tune)"}, advanced=True)


SECTIONS: dict[str, type[Section]] = {
    "dataset": DatasetSettings, "model": ModelSettings, "network": NetworkSettings,
    "optimizer": OptimizerSettings, "schedule": ScheduleSettings, "saving": SavingSettings,
    "sampling": SamplingSettings, "memory": MemorySettings, "distributed": DistributedSettings,
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
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)

    def get(self, dotted: str) -> Any:
        section, name = dotted.split(".")
        return getattr(getattr(self, section), name)

    def applies(self, dotted: str) -> bool:
        """Whether a field matters under the current values (its show_if conditions hold)."""
        return any(all(self.get(other) in values for other, values in conditions.items())
                   for conditions in show_conditions(field_ui(dotted)))

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


class SettingsError(ValueError):
    """Invalid settings; the message names every offending field and what it allows."""


def field_ui(dotted: str) -> dict:
    """A field's UI metadata (see :func:`setting`), family traits resolved to the ids of the families having them."""
    section, name = dotted.split(".")
    ui = SECTIONS[section].model_fields[name].json_schema_extra["ui"]
    if not isinstance(ui["choices"], FamilyTrait) and not any(isinstance(v, FamilyTrait)
                                                              for v in ui["show_if"].values()):
        return ui
    import architectures
    ui = dict(ui)
    if ui["choices"] == ALL_FAMILIES:
        ui["choices"], ui["choice_labels"] = list(architectures.registry()), architectures.available()
    ui["show_if"] = {other: architectures.with_trait(v.trait) if isinstance(v, FamilyTrait) else v
                     for other, v in ui["show_if"].items()}
    return ui


def show_conditions(ui: dict) -> list[dict]:
    """A field's alternative sets of show_if conditions: it applies while every condition of any one holds."""
    return [ui["show_if"]] + ([ui["or_show_if"]] if ui.get("or_show_if") else [])


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
    msg = err["msg"].removeprefix("Value error, ")
    if len(err["loc"]) == 2 and err["loc"][0] in SECTIONS:
        section, name = err["loc"]
        info = SECTIONS[section].model_fields.get(name)
        if info is not None:
            lo, hi = field_range(info)
            ui = field_ui(f"{section}.{name}")
            if ui["choices"] and err["type"] != "value_error":
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
    from core.prompts import prompt_problems
    problems = prompt_problems(settings.sampling.prompts)
    o = settings.optimizer
    if o.lr_scheduler == "piecewise_constant":
        from core.optim import step_rules_problem
        problem = step_rules_problem(o.lr_scheduler_step_rules)
        if problem:
            problems.append(f"optimizer.lr_scheduler_step_rules: {problem} (Optimizer → Step rules)")
    if o.optimizer_type == "AdamWScheduleFree" and o.lr_scheduler != "constant":
        problems.append(f"optimizer.optimizer_type AdamWScheduleFree schedules itself: set optimizer.lr_scheduler "
                        f"to constant (not {o.lr_scheduler}); its warmup is Warmup steps (Optimizer tab)")
    sch = settings.schedule
    if sch.min_timestep >= sch.max_timestep:
        problems.append(f"schedule.min_timestep ({sch.min_timestep}) must be below schedule.max_timestep "
                        f"({sch.max_timestep}) (Schedule → Advanced)")
    d = settings.dataset
    if d.enable_buckets and d.min_bucket_reso > d.max_bucket_reso:
        problems.append(f"dataset.min_bucket_reso ({d.min_bucket_reso}) is larger than dataset.max_bucket_reso "
                        f"({d.max_bucket_reso}) (Dataset → Advanced)")
    if d.resolution % 8:
        problems.append(f"dataset.resolution ({d.resolution}) must be a multiple of 8")
    if d.enable_buckets and d.bucket_reso_steps % 8:
        problems.append(f"dataset.bucket_reso_steps ({d.bucket_reso_steps}) must be a multiple of 8")
    if settings.optimizer.optimizer_type == "Adafactor" and settings.optimizer.fused_backward_pass:
        if settings.schedule.gradient_accumulation_steps > 1:
            problems.append("optimizer.fused_backward_pass steps during the backward pass: set "
                            "schedule.gradient_accumulation_steps to 1")
        if settings.memory.mixed_precision == "fp16":
            problems.append("optimizer.fused_backward_pass cannot use fp16 loss scaling: choose bf16 or no")
    problems += d.problems()
    if not settings.model.model_path:
        problems.append("model.model_path: choose the base model")
    n = settings.network
    if n.target == "full" and n.algorithm == "lora":
        problems.append("network.target 'full' includes 3x3 convolutions, which plain LoRA cannot adapt: choose "
                        "LoCon (or another algorithm), or the target 'full-lin'")
    import architectures
    from core.embeddings import trains_new_token
    if trains_new_token(n, architectures.get(settings.model.architecture)):
        from core.embeddings import settings_problems
        problems += settings_problems(n)
    if n.algorithm == "controlnet":
        from core.controlnet import settings_problems
        problems += settings_problems(settings)
    if not settings.saving.output_name.strip() or any(c in settings.saving.output_name for c in "/\\:"):
        problems.append("saving.output_name must be a plain file name (no slashes)")
    from core.adapters.network import parse_block_ranks
    try:
        parse_block_ranks(n.block_ranks)
    except ValueError as exc:
        problems.append(str(exc))
    from core.distributed import distributed_problems
    problems += distributed_problems(settings, settings.distributed.num_processes)
    return problems + architectures.get(settings.model.architecture).check_settings(settings)


def write_training_json(path: str | os.PathLike | None = None) -> Path:
    """Regenerate training.json from the schema defaults (run after adding or changing a setting:
    ``.venv/bin/python -c "import core.settings as s; s.write_training_json()"``)."""
    from core.io import atomic_write_text
    path = Path(path) if path else default_training_json()
    atomic_write_text(path, json.dumps(Settings().to_dict(), indent=2) + "\n")
    return path
