"""ControlNet training, the parts that know no family: conditioning images matched to the training images,
fitted to their buckets exactly as the images are, and the two saved layouts (original single file and
diffusers folder).

Conditioning images are matched by path: ``<conditioning folder>/<same sub-folder>/<same stem>.<any image
extension>``, as masks are (:func:`core.dataset.attach_masks`).  They must be the same size as their image,
because the bucket crop is computed from the image's size; a mismatch would silently shift the condition
against the picture.  Every problem is collected into one message naming the setting, raised by
:func:`match_conditioning_images` before any model is loaded.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from core.dataset import IMAGE_EXTENSIONS, Bucket, DatasetError, ImageItem, _name_list, crop_geometry
from core.io import atomic_save_safetensors
from core.settings import SettingsError

#: network.algorithm's value for ControlNet training
CONTROLNET = "controlnet"
#: the setting that names the conditioning folder (messages add where its control is)
CONDITIONING_SETTING = "dataset.conditioning_path"


def settings_problems(settings) -> list[str]:
    """What ControlNet training cannot do with ``settings``, found before anything loads."""
    d, n = settings.dataset, settings.network
    out = []
    if not d.conditioning_path.strip():
        out.append(f"{CONDITIONING_SETTING}: choose the folder of conditioning images (one per training image, "
                   "with the same name and size)")
    if d.reg_path.strip() or d.subsets:
        out.append("ControlNet training reads one image folder (dataset.path) beside its conditioning images: "
                   "clear dataset.reg_path and dataset.subsets")
    if n.train_text_encoder:
        out.append("network.train_text_encoder: a ControlNet trains beside a frozen model; turn it off")
    return out


def _conditioning_file(item: ImageItem, image_root: Path, conditioning_root: Path) -> Path | None:
    rel = item.path.relative_to(image_root)
    for ext in IMAGE_EXTENSIONS:
        candidate = conditioning_root / rel.parent / (rel.stem + ext)
        if candidate.is_file():
            return candidate
    return None


def check_controlnet_source(path: Path) -> None:
    """``network.controlnet_init`` before anything loads: a ``.safetensors`` ControlNet in either key layout
    (original ``control_model.*`` or diffusers') or a diffusers ControlNet folder.  Whether it fits the chosen
    family is known only when the model is loaded (``Architecture.build_controlnet`` says so then)."""
    where = "network.controlnet_init"
    if not path.exists():
        raise SettingsError(f"{where}: {path} does not exist; pick a ControlNet file or folder, or clear it to "
                           "start from the model's UNet")
    if path.is_dir():
        config = path / "config.json"
        import json
        name = json.loads(config.read_text(encoding="utf-8")).get("_class_name") if config.is_file() else None
        if name != "ControlNetModel":
            raise SettingsError(f"{where}: {path} is not a diffusers ControlNet folder (its config.json names "
                               f"{name or 'nothing'}, not ControlNetModel)")
        return
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as exc:
        raise SettingsError(f"{where}: {path} cannot be read as a .safetensors file ({exc})") from exc
    if not any(k.startswith(("control_model.", "controlnet_cond_embedding.")) for k in keys):
        raise SettingsError(f"{where}: {path} holds no ControlNet (no control_model.* or controlnet_cond_embedding.* "
                           f"tensors; its first keys: {', '.join(keys[:3]) or 'none'})")


def match_conditioning_images(items: Sequence[ImageItem], image_root: Path,
                              conditioning_root: Path) -> dict[Path, Path]:
    """Each training image's conditioning image (image path -> conditioning path).

    Reads only the image headers, so it is cheap enough to run before models load.  Raises one
    :class:`DatasetError` listing every image whose conditioning image is missing, unreadable or of another
    size (after EXIF rotation, as the image's own size is)."""
    if not conditioning_root.is_dir():
        raise DatasetError(f"The conditioning image folder {conditioning_root} does not exist; set "
                           f"{CONDITIONING_SETTING} to a folder holding one image per training image.")
    matched: dict[Path, Path] = {}
    missing: list[str] = []
    unreadable: list[str] = []
    wrong_size: list[str] = []
    for item in items:
        rel = str(item.path.relative_to(image_root))
        found = _conditioning_file(item, image_root, conditioning_root)
        if found is None:
            missing.append(rel)
            continue
        try:
            with Image.open(found) as src:
                width, height = ImageOps.exif_transpose(src).size
        except Exception as exc:
            unreadable.append(f"{found.name} ({exc.__class__.__name__}: {exc})")
            continue
        if (width, height) != (item.width, item.height):
            wrong_size.append(f"{found.name}: {width}×{height}, its image {rel} is {item.width}×{item.height}")
            continue
        matched[item.path] = found
    problems = []
    if missing:
        problems.append(f"{len(missing)} image(s) have no conditioning image (the same name with any image "
                        f"extension):\n" + _name_list(missing))
    if unreadable:
        problems.append(f"{len(unreadable)} conditioning image(s) cannot be read:\n" + _name_list(unreadable))
    if wrong_size:
        problems.append(f"{len(wrong_size)} conditioning image(s) differ in size from their image:\n"
                        + _name_list(wrong_size))
    if problems:
        raise DatasetError(f"Conditioning images in {conditioning_root} ({CONDITIONING_SETTING}):\n"
                           + "\n".join(problems))
    return matched


def fitted_conditioning(path: Path, item: ImageItem, bucket: Bucket, flip: bool = False) -> Image.Image:
    """The conditioning image fitted to ``bucket`` exactly as its training image is (EXIF rotation, cover,
    centre crop, mirror)."""
    with Image.open(path) as src:
        im = ImageOps.exif_transpose(src).convert("RGB")
    bw, bh = bucket
    rw, rh, top, left = crop_geometry(item.width, item.height, bucket)
    im = im.resize((rw, rh), Image.Resampling.BICUBIC).crop((left, top, left + bw, top + bh))
    return ImageOps.mirror(im) if flip else im


def image_bytes(im: Image.Image) -> torch.Tensor:
    """(3, h, w) uint8 of an RGB image."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_conditioning(path: Path, item: ImageItem, bucket: Bucket, flip: bool = False) -> torch.Tensor:
    """:func:`fitted_conditioning` as (3, h, w) float in [0, 1], the range diffusers' ControlNet pipelines feed."""
    return image_bytes(fitted_conditioning(path, item, bucket, flip)).float() / 255.0


class ConditioningImages:
    """Each training image's conditioning image for every flip it is trained with, read once and kept as
    bytes (a quarter of float32), so later epochs read no files.  Filled as batches are first built, on the
    batch worker (core.prefetch), never on the training step's thread."""

    def __init__(self, matched: Mapping[Path, Path]):
        self.matched = dict(matched)
        self._images: dict[tuple[str, Bucket, bool], torch.Tensor] = {}

    def get(self, item: ImageItem, flip: bool) -> torch.Tensor:
        key = (str(item.path), item.bucket, flip)
        if key not in self._images:
            self._images[key] = image_bytes(fitted_conditioning(self.matched[item.path], item, item.bucket, flip))
        return self._images[key].float() / 255.0

    def preview_images(self, items: Sequence[ImageItem], count: int) -> list[Image.Image]:
        """``count`` conditioning images for the preview prompts: those of ``items`` in order, cycled, each
        fitted to its image's bucket as in training (from the kept bytes: no file is read again)."""
        chosen = [items[i % len(items)] for i in range(count)] if items else []
        return [Image.fromarray((self.get(it, False) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
                for it in chosen]


class ControlNetTrainable:
    """The trainable of a ControlNet run: the family's ControlNet (fp32), hooked into ``components`` so the
    family's ``predict`` adds its residuals; the denoiser stays frozen.  Offers what the loop needs of every
    trainable (parameters, param groups, train / eval / restore, the file's and the resumable state's tensors)."""

    trains_denoiser = False

    def __init__(self, arch, components, controlnet: torch.nn.Module, device: torch.device,
                 gradient_checkpointing: bool):
        self.arch = arch
        self.components = components
        self.module = torch.nn.Module.to(controlnet, device, torch.float32)  # (diffusers' override warns)
        self.module.requires_grad_(True)
        if gradient_checkpointing:
            self.module.enable_gradient_checkpointing()
        self.module.train()
        components.controlnet = self.module

    def summary(self) -> str:
        n = sum(p.numel() for p in self.module.parameters())
        return f"ControlNet: {n / 1e6:.2f} M trainable parameters (fp32)"

    def named_parameters(self):
        return self.module.named_parameters()

    def parameters(self):
        return self.module.parameters()

    def param_groups(self, lr: float, text_encoder_lr: float) -> list[dict]:
        return [{"params": list(self.module.parameters()), "lr": lr, "name": "controlnet"}]

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def restore(self) -> None:
        """The model without the ControlNet again (what the trainer's release does to every trainable)."""
        self.components.controlnet = None

    # -- files -----------------------------------------------------------------------------------------
    def export_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The single file's tensors: the original layout that ComfyUI and Forge load, in ``dtype``."""
        return {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)
                .contiguous() for k, v in self.arch.export_controlnet(self.module).items()}

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        """The resumable state's weights: diffusers' layout in fp32."""
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in self.module.state_dict().items()}

    @torch.no_grad()
    def load_export_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Weights from a resumable state (diffusers' layout) or a saved file (the original layout)."""
        if "controlnet_cond_embedding.conv_in.weight" not in sd:
            from architectures.controlnet_keys import controlnet_state_dict_from_original
            sd = controlnet_state_dict_from_original(sd, self.module.config)
        self.module.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)


def controlnet_metadata(adapter_md: Mapping[str, str], arch) -> dict[str, str]:
    """A ControlNet file's metadata: the run's ``ss_*`` / ``modelspec.*`` entries without those that describe an
    adapter network, and the family's architecture with modelspec's ``/controlnet`` suffix."""
    from core.export import without_network_entries
    md = without_network_entries(adapter_md)
    md["modelspec.architecture"] = arch.modelspec_architecture.removesuffix("/lora") + "/controlnet"
    return md


def save_controlnet_folder(controlnet: torch.nn.Module, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Writes a diffusers folder (``config.json`` + weights in ``dtype``) that ``ControlNetModel.from_pretrained``
    loads.

    Written into a temporary folder beside ``folder`` and renamed, so a crash never leaves half a folder; a
    folder that already exists is refused (a run never overwrites another run's files)."""
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; pick another output name")
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in controlnet.state_dict().items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        controlnet.save_config(staging)
        atomic_save_safetensors(staging / "diffusion_pytorch_model.safetensors", tensors, {"format": "pt"})
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


__all__ = ["CONTROLNET", "CONDITIONING_SETTING", "settings_problems", "check_controlnet_source",
           "match_conditioning_images",
           "fitted_conditioning", "load_conditioning", "ConditioningImages", "ControlNetTrainable",
           "controlnet_metadata", "save_controlnet_folder"]
