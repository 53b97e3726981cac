"""The interface every model family implements.  The trainer talks only to this; it never names a family."""
from __future__ import annotations

import re

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelLoadError(ValueError):
    """The chosen file/folder cannot be loaded as the chosen architecture; the message says why."""


#: What a family may declare in :attr:`Architecture.traits`: the settings' visibility rules
#: (``core.settings.FamilyTrait``) show a control for the families with the trait.
TRAITS = {
    "ddpm": "trained on a DDPM noise schedule (prediction type, zero terminal SNR, min-SNR weighting)",
    "flow_matching": "trained by rectified flow (timestep sampling, loss weighting)",
    "clip_skip": "conditioned on CLIP hidden states, where CLIP skip applies",
    "t5": "has a T5-XXL text encoder (its token length, padding mask and training)",
    "optional_t5": "runs with or without its T5 encoder (model.use_t5)",
    "bfl_text_encoder_files": "a single-file transformer takes CLIP-L, T5-XXL and autoencoder files",
    "components_folder": "a single-file transformer takes a diffusers folder with the text encoder and VAE",
    "guidance_input": "guidance-distilled: the transformer is given a guidance value (model.guidance)",
    "double_single_blocks": "double- and single-stream transformer blocks (network.flux_blocks)",
    "embeddings": "trains textual-inversion embeddings (its embedding_keys), alone or beside an adapter",
}


def short_label(arch_id: str | None) -> str:
    """The family's name in messages ("SD3.5 Large"), or the id itself if no family has it."""
    from architectures import registry
    cls = registry().get(arch_id or "")
    return (cls.short_label or cls.label) if cls else str(arch_id)


def check_family(arch_id: str, where, family: str | None, description: str) -> None:
    """Refuse a model that is not of the chosen family, saying what it looks like (never switch silently)."""
    if family == arch_id:
        return
    chosen = short_label(arch_id)
    if family is None:
        raise ModelLoadError(f"You chose {chosen}, but {where} looks like {description}. "
                             f"It cannot be loaded as {chosen}.")
    raise ModelLoadError(f"You chose {chosen}, but {where} looks like {description}. Choose the "
                         f"{short_label(family)} architecture for this model, or pick a {chosen} model.")


@dataclass
class Components:
    """What a family's ``load`` returns.  ``denoiser`` is the UNet or transformer that is trained."""
    denoiser: nn.Module
    vae: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    #: the noise scheduler's diffusers config (the objective and the previews build their schedulers from it)
    scheduler_config: dict = field(default_factory=dict)
    #: the run's ``settings.network`` (set by ``configure_objective``; the memory estimate passes it): which
    #: blocks and encoders get adapters besides the preset (e.g. ``flux_blocks``, ``train_t5``); None: defaults
    network: Any = None
    #: what ``configure_objective`` took from the settings for the training step (keys defined by the family)
    objective: dict = field(default_factory=dict)
    #: a ControlNet whose residuals ``predict`` adds to the denoiser's (network.algorithm "controlnet")
    controlnet: Any = None


@dataclass
class Noised:
    """One batch noised for training: the model's input and timesteps, the target, a loss weight per sample, and
    the noise level per sample as ``level`` (t/T for DDPM, σ for flow matching) and ``noise_to_signal`` (noise std
    over signal std) for the loss options of core.loss."""
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    level: torch.Tensor
    noise_to_signal: torch.Tensor


@dataclass
class AdapterTarget:
    """A layer that gets an adapter.  ``name`` is the community (kohya) key stem, e.g.
    ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``; ``part`` is "unet" or "te<N>"; ``path`` is
    the layer's module path in the loaded model (``down_blocks.1.attentions.0.…``), for include/exclude
    patterns."""
    name: str
    module: nn.Module
    part: str
    path: str = ""
    block: str = ""  # set by select_adapter_targets: what a per-block rank refers to


def split_patterns(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """Module-name patterns from a setting: one per line or comma-separated."""
    if isinstance(text, str):
        text = text.replace(",", "\n").splitlines()
    return [p.strip() for p in text if p.strip()]


def pattern_matches(pattern: str, target: AdapterTarget) -> bool:
    """A pattern with ``*``/``?``/``[`` is a glob over the whole name; otherwise a substring.  Either the key
    (``lora_unet_…``) or the module path (``down_blocks.0.…``) may match."""
    import fnmatch
    names = [target.name] + ([target.path] if target.path else [])
    if any(c in pattern for c in "*?["):
        return any(fnmatch.fnmatchcase(n, pattern) for n in names)
    return any(pattern in n for n in names)


def apply_patterns(targets: list[AdapterTarget], candidates: list[AdapterTarget] | None,
                   include: list[str], exclude: list[str]) -> list[AdapterTarget]:
    """The preset's ``targets`` plus every candidate an include pattern matches, minus every layer an exclude
    pattern matches.  An include pattern that matches no candidate is an error (a typo would otherwise pass
    silently)."""
    out = list(targets)
    if include:
        if candidates is None:
            raise ModelLoadError("this model family does not support network.include patterns")
        have = {t.name for t in out}
        for pattern in include:
            hits = [c for c in candidates if pattern_matches(pattern, c)]
            if not hits:
                raise ValueError(f"network.include: pattern {pattern!r} matches no layer that can take an adapter")
            for c in hits:
                if c.name not in have:
                    have.add(c.name)
                    out.append(c)
    if exclude:
        out = [t for t in out if not any(pattern_matches(p, t) for p in exclude)]
    return out


class Architecture:
    id: str = ""
    label: str = ""          # the name in the UI's choice of architecture
    short_label: str = ""    # the name in messages, where shorter than ``label``
    #: what kind of model this is (keys of :data:`TRAITS`): decides which settings the UI shows for it
    traits: frozenset[str] = frozenset()
    #: fnmatch patterns of the denoiser's Linear layers a quantized base keeps in full precision (see
    #: core/quantize.py: embedders and first / last projections, whose errors no later layer averages out)
    quantize_keep: tuple[str, ...] = ()
    #: the same for the text encoders: CLIP's projection lands directly in the conditioning
    text_encoder_quantize_keep: tuple[str, ...] = ("text_projection", "text_model.text_projection")
    ss_base_model_version: str = ""
    modelspec_architecture: str = ""
    modelspec_implementation: str = ""
    default_resolution: int = 512
    vae_scale_factor: int = 8
    compile_blocks: tuple[str, ...] = ()  # class names of the denoiser's repeated blocks
    # which block a denoiser layer belongs to, for per-block ranks: (regex on the module path, name template)
    block_patterns: tuple[tuple[str, str], ...] = ((r"^down_blocks\.(\d+)\.", "down_{0}"), (r"^mid_block\.", "mid"),
                                                   (r"^up_blocks\.(\d+)\.", "up_{0}"))
    #: whether the denoiser is mostly convolutions (a UNet), where a channels-last memory layout could matter
    convolutional: bool = False
    # below this much VRAM (GB) the denoiser needs gradient checkpointing at batch 1 (bf16 base, LoRA)
    checkpointing_below_gb: float = 24.0

    # -- loading ---------------------------------------------------------------------------------------
    #: whether ``load`` accepts ``text_encoders=False`` (everything but the text encoders: a run whose caption
    #: embeddings are all cached on disk and that renders no previews never needs them) and ``denoiser=False``
    #: (``Components.denoiser`` None: the text encoders can be run and dropped before the denoiser is read, so
    #: loading never holds both in memory)
    loads_without_text_encoders = False

    def load(self, model_path: Path, config_dir: Path | None, dtype: torch.dtype, **options) -> Components:
        """``options``: what :meth:`load_options` returned (none for most families)."""
        raise NotImplementedError

    def load_options(self, settings, resolve_path) -> dict:
        """Extra keyword arguments of :meth:`load` taken from the settings (e.g. FLUX's separate text-encoder
        and autoencoder files); ``resolve_path(value, setting name) -> Path`` resolves user paths like the model
        path (inside the app's folders; a refusal names the setting)."""
        return {}

    def configure_objective(self, components: Components, settings) -> None:
        """Apply the user's objective settings (prediction type, schedule shift, …) after loading."""

    def check_settings(self, settings) -> list[str]:
        """What this family cannot do with ``settings``, found before anything loads: one message per problem,
        naming the setting and what to choose.  The trainer refuses to start on any (``check_consistency``),
        and the Run tab's plan lists them."""
        n = settings.network
        # the modes without an adapter: the family must implement what each writes
        capability = {"textual_inversion": (lambda c: bool(c.embedding_keys), "textual inversion",
                                            "writes embeddings"),
                      "controlnet": (lambda c: c.supports_controlnet, "ControlNet training", "trains ControlNets"),
                      "full_finetune": (lambda c: c.supports_full_checkpoint, "full fine-tuning",
                                        "writes whole checkpoints")}.get(n.algorithm)
        if capability is not None:
            able, what, does = capability
            if not able(self):
                from architectures import registry
                families = ", ".join(c.short_label or c.label for c in registry().values() if able(c))
                return [f"network.algorithm: {what} is not available for {self.label} (this trainer {does} of "
                        f"{families}); choose an adapter algorithm such as LoRA"]
            if n.algorithm != "textual_inversion":
                return []
        from core.embeddings import known_token_problems, trains_new_token
        problems = known_token_problems(n, self.token_known) if trains_new_token(n, self) else []
        if n.algorithm != "textual_inversion" and n.target not in self.adapter_presets:
            problems.append(f"network.target: {self.label} supports {', '.join(self.adapter_presets)}, not "
                            f"{n.target!r}")
        return problems

    # -- adapters --------------------------------------------------------------------------------------
    #: the target presets this family knows (``settings.network.target``)
    adapter_presets: tuple[str, ...] = ("attn", "attn_mlp")

    def adapter_targets(self, components: Components, target: str, text_encoder: bool) -> list[AdapterTarget]:
        raise NotImplementedError

    def adapter_candidates(self, components: Components, text_encoder: bool) -> list[AdapterTarget] | None:
        """Every layer an include pattern may add (None: the family supports no include patterns)."""
        return None

    def select_adapter_targets(self, components: Components, target: str, text_encoder: bool,
                               include=(), exclude=()) -> list[AdapterTarget]:
        """The preset's layers adjusted by the user's include/exclude module-name patterns."""
        include, exclude = split_patterns(include), split_patterns(exclude)
        targets = self.adapter_targets(components, target, text_encoder)
        candidates = self.adapter_candidates(components, text_encoder) if include else None
        selected = apply_patterns(targets, candidates, include, exclude)
        for t in selected:
            t.block = self.block_of(t)
        return selected

    def block_of(self, target: AdapterTarget) -> str:
        """The block name a per-block rank refers to: "te1"… for text encoders, else from ``block_patterns``."""
        if target.part != "unet":
            return target.part
        for pattern, template in self.block_patterns:
            m = re.match(pattern, target.path)
            if m:
                return template.format(*m.groups())
        return ""

    def export_adapter(self, components: Components, state_dict: dict[str, torch.Tensor]
                       ) -> dict[str, dict[str, torch.Tensor]]:
        """The adapter file(s) to write from the network's state dict (keys ``{target name}.{tensor}``):
        file-name suffix → tensors.  ``""`` is the main file; e.g. ``".diffusers"`` is written beside it as
        ``<name>.diffusers.safetensors``.  Families whose community layout differs from the trained modules
        (fused q/k/v, other module names) transform the tensors here."""
        return {"": state_dict}

    def import_adapter(self, components: Components, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`export_adapter`'s main file: a community file's tensors → the trained names
        (``{target name}.{tensor}``), as the tools read adapter files."""
        return dict(state_dict)

    def adapter_metadata(self, settings, suffix: str) -> dict[str, str]:
        """Metadata entries this family adds to / overrides in the file written for ``suffix``."""
        return {}

    # -- full fine-tuning -------------------------------------------------------------------------------
    #: whether :meth:`save_full_checkpoint` is implemented (full fine-tuning is refused at the start otherwise)
    supports_full_checkpoint: bool = False

    def load_checkpoint_parts(self, model_path: Path, config_dir: Path | None, dtype: torch.dtype) -> Components:
        """The parts :meth:`save_full_checkpoint` writes, loaded from a model (the tools merge into them and
        extract from them); here the whole model."""
        return self.load(Path(model_path), Path(config_dir) if config_dir else None, dtype)

    def save_full_checkpoint(self, components: Components, path: Path, dtype: torch.dtype,
                             state_dicts: dict[str, dict[str, torch.Tensor]] | None = None,
                             metadata: dict[str, str] | None = None) -> Path:
        """Write the whole model as one checkpoint in the family's original key layout (atomically).

        ``state_dicts`` replaces the weights of trained parts (``"denoiser"``, ``"te0"``, ``"te1"``, …), e.g.
        with EMA weights; tensors are written in ``dtype``."""
        raise NotImplementedError(f"{self.label}: saving a full checkpoint is not supported")

    def save_diffusers_folder(self, components: Components, folder: Path, dtype: torch.dtype,
                              state_dicts: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
        """Write the whole model as a diffusers folder (same ``state_dicts`` meaning as above)."""
        raise NotImplementedError(f"{self.label}: saving a diffusers folder is not supported")

    # -- ControlNet --------------------------------------------------------------------------------------
    #: the family implements ``build_controlnet`` / ``export_controlnet`` and feeds ``Components.controlnet``
    supports_controlnet: bool = False

    def build_controlnet(self, components: Components, init_path: Path | None) -> nn.Module:
        """A trainable ControlNet for the loaded denoiser: from ``init_path`` (a ControlNet file or diffusers
        folder), else initialised from the denoiser's encoder.  Fp32, on the CPU."""
        raise NotImplementedError(f"{self.label} has no ControlNet training; pick SD 1.5 or SDXL "
                                  "(Model → Architecture) or another Network → Algorithm")

    def export_controlnet(self, controlnet: nn.Module) -> dict[str, torch.Tensor]:
        """The ControlNet's state dict in the original single-file layout that ComfyUI and Forge load."""
        raise NotImplementedError(f"{self.label} has no ControlNet training")

    # -- textual inversion -------------------------------------------------------------------------------
    #: the embedding file's key for each text encoder's vectors, in the order of ``Components.text_encoders``
    #: (empty: the family trains no textual inversion)
    embedding_keys: tuple[str, ...] = ()
    #: each embedding tensor's name inside an adapter file's ``bundle_emb.<token>.<name>`` (pivotal tuning), in
    #: the order of ``embedding_keys``: the names A1111 / Forge and ComfyUI read there
    embedding_bundle_names: tuple[str, ...] = ()
    #: ``modelspec.architecture`` of an embedding file
    modelspec_embedding_architecture: str = ""

    def token_known(self, text: str) -> bool:
        """Whether the family's tokenizers already have ``text`` as a token (checked before anything loads)."""
        raise NotImplementedError

    # -- data ------------------------------------------------------------------------------------------
    def tokenize(self, components: Components, captions: list[str]) -> list[torch.Tensor]:
        raise NotImplementedError

    def encode_text(self, components: Components, tokens: list[torch.Tensor], clip_skip: int) -> dict:
        raise NotImplementedError

    def encode_latents(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- training objective ----------------------------------------------------------------------------
    def on_device(self, name: str, shape: tuple, device, dtype: torch.dtype | None, build) -> torch.Tensor:
        """``build()``'s tensor, made on ``device``, once per (name, shape, device, dtype) and then reused: inputs
        that depend on a batch's shape only (position ids …) cost the step neither a rebuild nor a copy from the
        host.  One entry per bucket shape; the cache lives as long as this plug-in object (one run)."""
        cache = self.__dict__.setdefault("_on_device", {})
        key = (name, tuple(shape), torch.device(device), dtype)
        if key not in cache:
            cache[key] = build()
        return cache[key]

    #: keys of the text conditioning that stay in host memory, also when cached: values the step reads on the
    #: host (FLUX.3's caption windows), which on the device would cost a synchronisation every step
    host_conditioning: tuple[str, ...] = ()

    def noisy_input_and_target(self, components: Components, latents: torch.Tensor, noise: torch.Tensor,
                               settings, input_noise: torch.Tensor | None = None,
                               level: torch.Tensor | None = None) -> Noised:
        """Draws the noise levels (within ``schedule.min_timestep`` … ``max_timestep``; ``level``, one per sample
        in [0, 1], fixes them instead: the validation loss) and noises ``latents`` with ``input_noise`` (input
        perturbation; default ``noise``); the target is built from ``noise``."""
        raise NotImplementedError

    def predict(self, components: Components, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict,
                batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def conditioning_rows(self, components: Components, cond: dict, start: int, stop: int) -> dict:
        """The conditioning of rows [start, stop) of a batch (one worker's share of a several-process run), such
        that :meth:`predict` gives those rows what it gives them within the whole batch.  Every entry of
        :meth:`encode_text`'s dict holds one row per sample (the text cache stores them row by row), so every
        entry is cut; a family whose model reads something across the whole batch overrides this."""
        return {k: v[start:stop] for k, v in cond.items()}

    # -- previews --------------------------------------------------------------------------------------
    @staticmethod
    def render_each(pipe, prompts: list[str], settings, size: tuple[int, int], device: torch.device,
                    dtype: torch.dtype, prompt_kwargs) -> list:
        """One image per prompt through a diffusers pipeline: seed ``sampling.seed + i``, the run's autocast,
        ``sampling.steps`` and the size; ``prompt_kwargs(prompt)`` gives the family's conditioning arguments."""
        pipe.set_progress_bar_config(disable=True)
        images = []
        for i, prompt in enumerate(prompts):
            gen = torch.Generator("cpu").manual_seed(settings.sampling.seed + i)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = pipe(**prompt_kwargs(prompt), guidance_scale=settings.sampling.guidance_scale,
                           num_inference_steps=settings.sampling.steps, width=size[0], height=size[1],
                           generator=gen, output_type="pil")
            images.append(out.images[0])
        return images

    def sample(self, components: Components, prompts: list[str], settings, size: tuple[int, int],
               device: torch.device, dtype: torch.dtype) -> list:
        raise NotImplementedError

    # -- memory estimate (core.estimate) -----------------------------------------------------------------
    #: sub-folder of the shipped config folder that holds the denoiser's diffusers config
    denoiser_subfolder: str = "unet"
    #: the denoiser's lists of repeated blocks (attribute names, in forward order): what block swapping may keep
    #: in CPU memory and the memory estimate counts per block (empty: none)
    block_lists: tuple[str, ...] = ()

    def config_dir(self) -> Path:
        """The shipped full-size config folder (diffusers layout, no weights)."""
        from architectures.load_util import default_config_dir
        return default_config_dir(self.id)

    def build_denoiser_on_meta(self, config_dir: Path | None = None) -> nn.Module:
        """The denoiser built from its config on the meta device: exact shapes, no memory, no weights."""
        import json

        import diffusers
        folder = Path(config_dir or self.config_dir()) / self.denoiser_subfolder
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        cls = getattr(diffusers, config["_class_name"])
        with torch.device("meta"):
            return cls.from_config(config)

    def probe_inputs(self, denoiser: nn.Module, resolution: int, batch_size: int, dtype: torch.dtype,
                     device="meta") -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
        """Dummy ``(noisy latents, timesteps, cond, batch)`` of the training shapes for ``predict`` at a square
        ``resolution``: what the memory estimate runs the denoiser on (contents do not matter)."""
        raise NotImplementedError(f"{self.label}: no memory-probe inputs")
