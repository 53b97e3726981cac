"""What the DiT families (SD3 / SD3.5, FLUX.1, FLUX.2, FLUX.3) share: a transformer trained with rectified flow
(flow matching) and adapters trained on the layers of the original checkpoint layout, under its (kohya / BFL)
names: where diffusers splits a layer the original holds as one (q, k, v → ``qkv``), one adapter of any
algorithm covers all the parts (``core.adapters.fused.FusedLinear``), so every LyCORIS algorithm, DoRA
included, is saved as the original layer's and loads in ComfyUI as trained.

The families differ in text conditioning, the transformer call, naming and metadata (``sd3.py``, ``flux1.py``,
``flux2.py``, ``flux3.py``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from architectures import flow_matching as fm
from architectures.base import AdapterTarget, Architecture, Components, Noised
from architectures.dit_keys import ExportSlot, export_community, export_peft, import_community, is_plain_lora
from core.loss import remap_level

#: Target presets: attention; attention + MLP; every linear layer of the blocks (adaLN modulation included).
DIT_PRESETS = ("attn", "attn_mlp", "full-lin")


def t5_targets(t5: nn.Module, prefix: str, part: str) -> list[AdapterTarget]:
    """T5 encoder attention and feed-forward linears, named like sd-scripts: ``lora_te3_encoder_block_0_layer_0_SelfAttention_q``."""
    out = []
    for name, module in t5.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("encoder.block.") and (
                ".SelfAttention." in name or ".DenseReluDense." in name):
            out.append(AdapterTarget(f"{prefix}_{name.replace('.', '_')}", module, part, name))
    return out


def clip_text_targets(text_encoder: nn.Module, prefix: str, part: str) -> list[AdapterTarget]:
    from architectures.sd_unet import clip_targets
    return clip_targets(text_encoder, prefix, part)


def flux_block_filter(components: Components, path: str, double: tuple[str, ...] = ("transformer_blocks.",),
                      single: tuple[str, ...] = ("single_transformer_blocks.",)) -> bool:
    """network.flux_blocks for FLUX.1 and FLUX.2 (same block lists) and FLUX.3 (whose per-stream blocks take the
    double-stream role; ``double`` / ``single``: their module-path prefixes): all, the double- or the
    single-stream blocks."""
    blocks = getattr(components.network, "flux_blocks", "all")
    if blocks == "double":
        return path.startswith(double)
    if blocks == "single":
        return path.startswith(single)
    return True


class FlowMatchingFamily(Architecture):
    """Shared behaviour of SD3 / SD3.5 and FLUX.1; subclasses fill in the family specifics."""

    adapter_presets = DIT_PRESETS
    default_resolution = 1024
    # embedders, the first projections of the inputs and the final modulation / output projection
    quantize_keep = ("time_text_embed.*", "x_embedder", "x_embedder.*", "context_embedder", "context_embedder.*",
                     "pos_embed.*", "norm_out.*", "proj_out")
    default_t5_max_length = 256
    #: per preset, the module paths (relative to a block of ``block_lists``) it adapts
    preset_modules: dict[str, dict[str, tuple[str, ...]]] = {}
    #: (transformer config) -> {diffusers module path: ExportSlot}: where each layer goes in the original layout
    slot_table = None
    #: sd-scripts' ``ss_network_module`` for a plain LoRA of this family (``networks.lora_flux``, …)
    lora_network_module = ""

    def lora_slots(self, components: Components) -> dict[str, ExportSlot]:
        """diffusers module path of each trainable transformer layer → where it goes in the original layout."""
        return self.slot_table(components.denoiser.config)

    def adapter_metadata(self, settings, suffix: str) -> dict[str, str]:
        n = settings.network
        md = {"ss_network_module": self.lora_network_module} if n.algorithm == "lora" and not n.dora else {}
        if suffix == ".diffusers":
            md["format"] = "pt"
        return md

    # -- hooks the subclasses implement ------------------------------------------------------------------

    def text_encoder_targets(self, components: Components, settings_network) -> list[AdapterTarget]:
        raise NotImplementedError

    def peft_parts(self, components: Components) -> dict[str, list[tuple[str, int, int | None]]]:
        """Adapter name → the diffusers/PEFT paths it is written to (see :meth:`transformer_parts`), for a
        diffusers-layout side file (empty: diffusers reads the main file, or nothing)."""
        return {}

    # -- objective -------------------------------------------------------------------------------------
    def guidance_input(self, components: Components, batch_size: int, device) -> torch.Tensor | None:
        """The training guidance value per sample for guidance-distilled transformers (FLUX dev), else None."""
        if not components.denoiser.config.get("guidance_embeds", False):
            return None
        return torch.full((batch_size,), self._objective(components)["guidance"], device=device, dtype=torch.float32)

    def check_settings(self, settings) -> list[str]:
        problems = super().check_settings(settings)
        n = settings.network
        if n.algorithm == "full_finetune" and n.train_text_encoder and self.supports_full_checkpoint:
            problems.append(f"network.train_text_encoder: a {self.label} full fine-tune saves the transformer alone "
                            "(its original single file); the text encoders are not trained with it. Turn it off.")
        conv_only = [f"network.{name}" for name in ("use_tucker", "conv_rank", "conv_alpha") if getattr(n, name)]
        if n.algorithm != "full_finetune" and conv_only and not n.include.strip():
            problems.append(f"{', '.join(conv_only)}: shape 3×3 convolutions only, and every layer the "
                            f"{self.label} target '{n.target}' adapts is linear (q, k, v fused into one, as the "
                            "original checkpoint holds them). Turn them off (Network → Advanced).")
        return problems

    def configure_objective(self, components: Components, settings) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler
        n = settings.network
        m = settings.model
        components.network = n
        components.objective = {
            "t5_max_length": m.t5_max_length or self.default_t5_max_length,
            "apply_t5_mask": bool(m.apply_t5_attention_mask),
            "guidance": float(m.guidance),
        }
        components.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)

    def _objective(self, components: Components) -> dict:
        return components.objective or {"t5_max_length": self.default_t5_max_length,
                                                      "apply_t5_mask": False, "guidance": 1.0}

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Tokens the transformer sees for these latents (2×2 patches)."""
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def noisy_input_and_target(self, components, latents, noise, settings, input_noise=None, level=None) -> Noised:
        s = settings.schedule
        if level is not None:
            sigmas = level.to(latents.device)
        else:
            cfg = components.scheduler_config
            sigmas = remap_level(fm.sample_sigmas(
                s.timestep_sampling, latents.shape[0], sigmoid_scale=s.sigmoid_scale, logit_mean=s.logit_mean,
                logit_std=s.logit_std, mode_scale=s.mode_scale, shift=s.discrete_flow_shift,
                image_seq_len=self.image_seq_len(latents),
                flux_shift_config={k: cfg[v] for k, v in (("base_seq_len", "base_image_seq_len"),
                                                          ("max_seq_len", "max_image_seq_len"),
                                                          ("base_shift", "base_shift"), ("max_shift", "max_shift"))
                                   if v in cfg},
                device=latents.device), s.min_timestep, s.max_timestep)
        noisy = fm.noisy_latents(latents, noise if input_noise is None else input_noise, sigmas)
        return Noised(noisy, sigmas, fm.velocity_target(latents, noise), fm.loss_weights(s.loss_weighting, sigmas),
                      sigmas, sigmas / (1 - sigmas).clamp(min=1e-6))

    # -- latents ---------------------------------------------------------------------------------------
    def encode_latents(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    # -- text ------------------------------------------------------------------------------------------
    def t5_tokens(self, components: Components, captions: list[str]) -> list[torch.Tensor]:
        """[input ids, attention mask] of the T5 tokenizer (the last tokenizer), padded to the T5 length."""
        tok = components.tokenizers[-1]
        length = self._objective(components)["t5_max_length"]
        enc = tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return [enc.input_ids, enc.attention_mask]

    def t5_encode(self, components: Components, t5: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """T5's last hidden state.  Like diffusers' pipelines, no mask by default; with
        model.apply_t5_attention_mask the padding is masked in attention and zeroed in the output (sd-scripts'
        apply_t5_attn_mask)."""
        param = next(t5.parameters())
        ids, mask = ids.to(param.device), mask.to(param.device)
        apply = self._objective(components)["apply_t5_mask"]
        if param.dtype == torch.float16:
            # T5 overflows in fp16: keep its output projections (wo) in fp32 as transformers' own fp16 loading
            # does (_keep_in_fp32_modules), and run it outside fp16 autocast so that they stay fp32
            for name, module in t5.named_modules():
                if name.endswith(".wo") and isinstance(module, nn.Linear) and module.weight.dtype == torch.float16:
                    module.float()
            with torch.autocast(param.device.type, enabled=False):
                hidden = t5(ids, attention_mask=mask if apply else None).last_hidden_state.to(torch.float16)
        else:
            hidden = t5(ids, attention_mask=mask if apply else None).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype) if apply else hidden

    # -- adapters --------------------------------------------------------------------------------------
    def _block_modules(self, components: Components, preset: str) -> list[tuple[str, nn.Module]]:
        found = []
        # a preset's lists may be nested (FLUX.3's ``mode_blocks.image``), which block_lists cannot name
        for list_name, rel_names in self.preset_modules[preset].items():
            for i, block in enumerate(components.denoiser.get_submodule(list_name)):
                modules = dict(block.named_modules())
                for rel in rel_names:
                    if isinstance(modules.get(rel), nn.Linear):
                        found.append((f"{list_name}.{i}.{rel}", modules[rel]))
        return found

    def block_filter(self, components: Components, path: str) -> bool:
        """Whether a transformer module path is inside the blocks the user chose (FLUX: double/single)."""
        return True

    def internal_name(self, path: str) -> str:
        return "lora_unet_" + path.replace(".", "_")

    def _target_name(self, path: str, slot: ExportSlot) -> str:
        """The community name an adapter on ``path`` trains under: the original layer's.  A layer the original
        stores with its output halves swapped keeps its diffusers name; the export swaps a LoRA's rows."""
        return self.internal_name(path) if slot.swap_halves else slot.stem

    def _targets_for(self, components: Components, paths) -> list[AdapterTarget]:
        """One target per layer of the original layout that ``paths`` (diffusers module paths) reach.  A fused layer
        (q, k, v → ``qkv``; FLUX.1's q, k, v, MLP-in → ``linear1``) is trained whole, as the original model holds it:
        one adapter over all its parts (:class:`FusedLinear`), whichever of them the preset named."""
        from core.adapters.fused import FusedLinear
        slots = self.lora_slots(components)
        modules = dict(components.denoiser.named_modules())
        members = self._fused_members(slots)
        out, seen = [], set()
        for path in paths:
            slot = slots.get(path)
            if slot is None or slot.stem in seen or not isinstance(modules.get(path), nn.Linear):
                continue
            seen.add(slot.stem)
            if slot.fused:
                layer = FusedLinear([modules[p] for p in members[slot.stem]])
                out.append(AdapterTarget(slot.stem, layer, "unet", members[slot.stem][0]))
            else:
                out.append(AdapterTarget(self._target_name(path, slot), modules[path], "unet", path))
        return out

    @staticmethod
    def _fused_members(slots: dict[str, ExportSlot]) -> dict[str, list[str]]:
        """Fused layer's stem → the diffusers paths of its parts, in the original's row order."""
        out: dict[str, list[str]] = {}
        for path, slot in sorted(((p, s) for p, s in slots.items() if s.fused), key=lambda ps: ps[1].index):
            out.setdefault(slot.stem, []).append(path)
        return out

    def adapter_targets(self, components: Components, target: str, text_encoder: bool) -> list[AdapterTarget]:
        paths = [path for path, _ in self._block_modules(components, target) if self.block_filter(components, path)]
        targets = self._targets_for(components, paths)
        if text_encoder:
            targets += self.text_encoder_targets(components, components.network)
        return targets

    def adapter_candidates(self, components: Components, text_encoder: bool) -> list[AdapterTarget]:
        """Every transformer layer with an original-layout name (embedders, final layer, …) for include patterns."""
        out = self._targets_for(components, list(self.lora_slots(components)))
        if text_encoder:
            out += self.text_encoder_targets(components, components.network)
        return out

    def transformer_parts(self, components: Components) -> dict[str, list[tuple[str, int, int | None]]]:
        """Trained target name → the diffusers layers it covers: (module path, first output row, rows; None for
        all of a layer trained alone)."""
        out: dict[str, list[tuple[str, int, int | None]]] = {}
        for path, slot in self.lora_slots(components).items():
            if slot.fused:
                out.setdefault(slot.stem, []).append((path, sum(slot.sizes[:slot.index]), slot.sizes[slot.index]))
            else:
                out[self._target_name(path, slot)] = [(path, 0, None)]
        for parts in out.values():
            parts.sort(key=lambda part: part[1])
        return out

    def original_names(self, components: Components) -> dict[str, str]:
        """Trained target name → the original module's dotted path (``double_blocks.0.img_attn.qkv``)."""
        return {self._target_name(path, slot): slot.original for path, slot in self.lora_slots(components).items()}

    def export_adapter(self, components: Components, state_dict: dict[str, torch.Tensor]
                       ) -> dict[str, dict[str, torch.Tensor]]:
        """The targets already carry the original names; only layers stored with swapped halves are rewritten.
        Where the family names diffusers/PEFT paths (:meth:`peft_parts`), a LoRA is also written in that layout."""
        files = {"": export_community(state_dict, self._swapped(components))}
        parts = self.peft_parts(components)
        if parts and is_plain_lora(state_dict):
            files[".diffusers"], _ = export_peft(state_dict, parts)
        return files

    def import_adapter(self, components: Components, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return import_community(state_dict, self._swapped(components))

    def _swapped(self, components: Components) -> dict[str, str]:
        """Trained name → original stem of the layers the original layout stores with their halves swapped."""
        return {self.internal_name(path): slot.stem for path, slot in self.lora_slots(components).items()
                if slot.swap_halves}

    # -- full fine-tuning ------------------------------------------------------------------------------
    #: (diffusers state dict, transformer config) → the original single-file layout (SAI MMDiT / BFL keys);
    #: families that set it set ``supports_full_checkpoint``
    to_original_layout = None
    #: its inverse: (original keys without the prefix, transformer config) → diffusers state dict
    from_original_layout = None
    #: the key prefix of the original single file (SD3's ``model.diffusion_model.``; BFL files have none)
    original_prefix = ""

    def load_checkpoint_parts(self, model_path: Path, config_dir: Path | None, dtype: torch.dtype) -> Components:
        """The transformer alone, what :meth:`save_full_checkpoint` writes (the tools merge into it and extract
        from it): a diffusers folder's, or a single file's in the original layout (ours, a community fine-tune,
        the MMDiT of an all-in-one SD3 file) with the transformer config of ``config_dir`` (default: shipped)."""
        from architectures.load_util import default_config_dir
        path = Path(model_path).expanduser()
        if path.is_dir():
            return self.load(path, config_dir, dtype, text_encoders=False)
        config_dir = Path(config_dir).expanduser() if config_dir else default_config_dir(self.id)
        return Components(denoiser=self._transformer_from_file(path, config_dir, dtype), vae=None, text_encoders=[],
                          tokenizers=[], noise_scheduler=None)

    def _transformer_from_file(self, path: Path, config_dir: Path, dtype: torch.dtype) -> nn.Module:
        import diffusers

        from architectures.base import ModelLoadError
        from architectures.dit_keys import BFL_PREFIXES
        from architectures.dit_loading import _build, describe_dit_checkpoint
        from architectures.sd_loading import _assign, _Checkpoint
        if not path.is_file():
            raise ModelLoadError(f"Model path {path} does not exist.")
        ckpt = _Checkpoint(path)
        keys = ckpt.keys()
        prefix = next((p for p in (self.original_prefix, *BFL_PREFIXES) if p and any(k.startswith(p) for k in keys)), "")
        cfg_file = config_dir / "transformer" / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"Config folder {config_dir} lacks transformer/config.json: pass the diffusers-layout "
                                 f"config folder of this {self.short_label or self.label} model.")
        cls = getattr(diffusers, json.loads(cfg_file.read_text())["_class_name"])
        transformer = _build(cls, config_dir, "transformer")
        try:
            sd = self.from_original_layout({k[len(prefix):]: v for k, v in ckpt.read(prefix).items()},
                                           transformer.config)
        except (KeyError, ValueError) as e:
            _, phrase = describe_dit_checkpoint(keys)
            raise ModelLoadError(f"{path} is not a {self.label} transformer in its original layout: it looks like "
                                 f"{phrase} ({e}). Choose the architecture of this file, or the config folder that "
                                 "belongs to it.") from e
        _assign(transformer, sd, "transformer", path, config_dir / "transformer", dtype)
        return transformer.eval()

    def _transformer_tensors(self, components: Components, dtype: torch.dtype, state_dicts) -> dict[str, torch.Tensor]:
        sd = (state_dicts or {}).get("denoiser") or components.denoiser.state_dict()
        return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}

    def save_full_checkpoint(self, components: Components, path: Path, dtype: torch.dtype,
                             state_dicts=None, metadata=None) -> Path:
        """The transformer as the family's original single file (what ComfyUI's loader and diffusers'
        ``from_single_file`` read, like ``flux1-dev.safetensors``): text encoders and VAE stay separate files,
        as people download them."""
        from core.io import atomic_save_safetensors
        diffusers_sd = self._transformer_tensors(components, dtype, state_dicts)
        tensors = {self.original_prefix + k: v.contiguous()
                   for k, v in self.to_original_layout(diffusers_sd, components.denoiser.config).items()}
        md = {"format": "pt", "modelspec.sai_model_spec": "1.0.1",
              "modelspec.architecture": self.modelspec_architecture.removesuffix("/lora"),
              "modelspec.implementation": self.modelspec_implementation, **(metadata or {})}
        return atomic_save_safetensors(Path(path), tensors, md)

    def save_diffusers_folder(self, components: Components, folder: Path, dtype: torch.dtype,
                              state_dicts=None) -> Path:
        """The transformer in diffusers layout, ``<folder>/transformer/`` (config and weights), written beside
        ``folder`` and moved into place complete: ``<Transformer class>.from_pretrained(folder,
        subfolder="transformer")`` loads it; the other parts are the base model's."""
        import os
        import shutil

        from core.io import atomic_save_safetensors
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            components.denoiser.save_config(tmp / "transformer")
            atomic_save_safetensors(tmp / "transformer" / "diffusion_pytorch_model.safetensors",
                                    {k: v.contiguous() for k, v in
                                     self._transformer_tensors(components, dtype, state_dicts).items()})
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    # -- previews --------------------------------------------------------------------------------------
    def preview_embeddings(self, components: Components, prompts: list[str], clip_skip: int) -> dict:
        return self.encode_text(components, self.tokenize(components, prompts), clip_skip)

    def scheduler_for_sampling(self, components: Components):
        from diffusers import FlowMatchEulerDiscreteScheduler
        return FlowMatchEulerDiscreteScheduler.from_config(components.scheduler_config)


class DoubleSingleStreamBlocks:
    """FLUX.1 and FLUX.2's block layout: double-stream ``transformer_blocks``, then single-stream
    ``single_transformer_blocks``; ``network.flux_blocks`` picks among them."""
    block_patterns = ((r"^transformer_blocks\.(\d+)\.", "double_{0}"),
                      (r"^single_transformer_blocks\.(\d+)\.", "single_{0}"))
    block_lists = ("transformer_blocks", "single_transformer_blocks")

    def block_filter(self, components: Components, path: str) -> bool:
        return flux_block_filter(components, path)


def resolve_optional(resolve_path, value: str, setting: str) -> Path | None:
    return resolve_path(value, setting) if value else None


__all__ = ["FlowMatchingFamily", "DIT_PRESETS", "t5_targets", "clip_text_targets",
           "resolve_optional"]
