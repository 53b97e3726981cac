"""Tiny, deterministic SD1.5 / SDXL models and a tiny image dataset for tests and examples.

The models use the real classes (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``,
``CLIPTextModelWithProjection``) with tiny sizes, so every code path of the real families runs, in a
fraction of a second on a CPU.  The tokenizers are the real CLIP tokenizers shipped in
``architectures/configs`` (hence ``vocab_size`` 49408 in the tiny text encoders).

Layouts (``layout`` argument of the builders):

* ``"diffusers"``: a diffusers folder with weights is written *into* ``folder``; returns ``folder``.
* ``"single_file"``: writes ``folder/tiny_<arch>.safetensors`` in the original (LDM / Stability) layout and,
  beside it, the matching diffusers-layout config folder ``tiny_config_dir(arch, folder)``
  (``folder/tiny_<arch>_config``: configs, tokenizers, scheduler, no weights); returns the file path.
  The full-size configs that ``load_sd_components`` uses by default do not fit these weights, so pass
  ``config_dir=tiny_config_dir(arch, folder)`` when loading.

Both layouts of one family hold bit-identical weights (same seed).

Sizes worth knowing: the tiny VAE has two blocks, so it downsamples by 2 (not 8): 64 px images give 32 px
latents.  SDXL's second text encoder is 64 wide, the first 32 (as in the real model, the two differ; when
they are equally wide, diffusers' single-file loader cannot tell CLIP-L from CLIP-bigG and loads the wrong
weights into the second one).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIGS = ROOT / "architectures" / "configs"

SD15_SEED = 1234
SDXL_SEED = 5678

_TE1 = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
            # The real configs say bos 0 / eos 2 (a leftover of the original export); with eos_token_id == 2
            # transformers pools at argmax(input_ids), i.e. at <|endoftext|> — keep that behaviour.
            bos_token_id=0, eos_token_id=2, pad_token_id=1)
_TE2 = dict(_TE1, hidden_size=64, intermediate_size=128, hidden_act="gelu", projection_dim=64)
_ADD_TIME_DIM = 8  # SDXL: 6 size/crop numbers, each embedded to this width, + the pooled text embedding

SD15_UNET: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=_TE1["hidden_size"], attention_head_dim=4, norm_num_groups=8,
)
SDXL_UNET: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
    cross_attention_dim=_TE1["hidden_size"] + _TE2["hidden_size"], norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=_ADD_TIME_DIM,
    projection_class_embeddings_input_dim=6 * _ADD_TIME_DIM + _TE2["projection_dim"],
)
_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8, sample_size=64,
)
SD15_VAE: dict[str, Any] = dict(_VAE, scaling_factor=0.18215)
SDXL_VAE: dict[str, Any] = dict(_VAE, scaling_factor=0.13025, force_upcast=True)


def _perturb(module: nn.Module, gen: torch.Generator) -> None:
    """Moves the 1-D parameters (norm scales/shifts, biases) off their constant initial values.

    With every norm at weight 1 / bias 0, a conversion that swapped two norms, or a bias with its twin,
    would go unnoticed by an output comparison; distinct values make any such mix-up visible."""
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _build(arch_id: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    seed = SD15_SEED if arch_id == "sd15" else SDXL_SEED
    # fork_rng: building must not disturb the caller's global RNG stream (tests seed their own).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(SD15_UNET if arch_id == "sd15" else SDXL_UNET))
        vae = AutoencoderKL(**(SD15_VAE if arch_id == "sd15" else SDXL_VAE))
        text_encoders: list[nn.Module] = [CLIPTextModel(CLIPTextConfig(**_TE1))]
        if arch_id == "sdxl":
            text_encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**_TE2)))
    gen = torch.Generator().manual_seed(seed + 1)
    for module in (unet, vae, *text_encoders):
        _perturb(module, gen)
        module.eval()
    return {"unet": unet, "vae": vae, "text_encoders": text_encoders}


def _write_non_weights(arch_id: str, models: dict[str, Any], folder: Path, with_weights: bool) -> None:
    """model_index, scheduler, tokenizers and every model's config (+ weights when ``with_weights``)."""
    folder.mkdir(parents=True, exist_ok=True)
    shipped = SHIPPED_CONFIGS / arch_id
    # The family's real model_index.json: same pipeline class and component list as the full-size model.
    shutil.copy(shipped / "model_index.json", folder / "model_index.json")
    shutil.copytree(shipped / "scheduler", folder / "scheduler", dirs_exist_ok=True)
    tokenizer_dirs = ["tokenizer"] + (["tokenizer_2"] if arch_id == "sdxl" else [])
    for name in tokenizer_dirs:
        shutil.copytree(shipped / name, folder / name, dirs_exist_ok=True)

    encoder_dirs = ["text_encoder", "text_encoder_2"][: len(models["text_encoders"])]
    if with_weights:
        from transformers.utils import logging as hf_logging

        models["unet"].save_pretrained(folder / "unet")
        models["vae"].save_pretrained(folder / "vae")
        # transformers draws a "Writing model shards" bar per file; silence it without changing the
        # caller's setting for good.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            for name, encoder in zip(encoder_dirs, models["text_encoders"], strict=True):
                encoder.save_pretrained(folder / name)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    else:
        models["unet"].save_config(folder / "unet")
        models["vae"].save_config(folder / "vae")
        for name, encoder in zip(encoder_dirs, models["text_encoders"], strict=True):
            encoder.config.save_pretrained(folder / name)


def tiny_config_dir(arch_id: str, folder: Path) -> Path:
    """The config folder written beside a ``"single_file"`` tiny model built into ``folder``."""
    return Path(folder) / f"tiny_{arch_id}_config"


def tiny_single_file(arch_id: str, folder: Path) -> Path:
    """The checkpoint path of a ``"single_file"`` tiny model built into ``folder``."""
    return Path(folder) / f"tiny_{arch_id}.safetensors"


def _build_tiny(arch_id: str, folder: Path, layout: str) -> Path:
    from architectures.ldm_keys import save_single_file

    folder = Path(folder)
    models = _build(arch_id)
    if layout == "diffusers":
        _write_non_weights(arch_id, models, folder, with_weights=True)
        return folder
    if layout == "single_file":
        _write_non_weights(arch_id, models, tiny_config_dir(arch_id, folder), with_weights=False)
        return save_single_file(models, tiny_single_file(arch_id, folder), arch_id)
    raise ValueError(f"layout must be 'diffusers' or 'single_file', not {layout!r}")


def build_tiny_sd15(folder: Path, layout: str = "diffusers") -> Path:
    """A tiny SD1.5 model (see the module docstring for the layouts and what is returned)."""
    return _build_tiny("sd15", folder, layout)


def build_tiny_sdxl(folder: Path, layout: str = "diffusers") -> Path:
    """A tiny SDXL base model (see the module docstring for the layouts and what is returned)."""
    return _build_tiny("sdxl", folder, layout)


# -- dataset ------------------------------------------------------------------------------------------------

_COLOURS: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (220, 40, 40)), ("blue", (40, 70, 220)), ("green", (40, 180, 60)), ("yellow", (235, 210, 40)),
    ("purple", (140, 50, 190)), ("orange", (240, 140, 30)), ("white", (245, 245, 245)), ("black", (15, 15, 15)),
]


def _pattern(index: int, width: int, height: int) -> tuple[np.ndarray, str]:
    fg_name, fg = _COLOURS[index % len(_COLOURS)]
    bg_name, bg = _COLOURS[(index * 3 + 1) % len(_COLOURS)]
    yy, xx = np.mgrid[0:height, 0:width]
    kind = index % 4
    if kind == 0:  # a disc
        mask = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (min(width, height) * 0.3) ** 2
        caption = f"a {fg_name} circle on a {bg_name} background"
    elif kind == 1:  # a centred square
        s = min(width, height) // 4
        mask = (abs(xx - width // 2) < s) & (abs(yy - height // 2) < s)
        caption = f"a {fg_name} square on a {bg_name} background"
    elif kind == 2:
        mask = ((xx // 8 + yy // 8) % 2) == 0
        caption = f"a {fg_name} and {bg_name} checkerboard"
    else:
        mask = (xx // 6) % 2 == 0
        caption = f"{fg_name} and {bg_name} vertical stripes"
    img = np.where(mask[..., None], np.array(fg, np.uint8), np.array(bg, np.uint8)).astype(np.uint8)
    return img, caption


def build_tiny_dataset(folder: Path, n: int = 4) -> Path:
    """Writes ``n`` small PNG images (alternately 64x64 and 64 wide x 96 high; discs, squares, checkerboards,
    stripes in varied colours) with matching ``.txt`` captions into ``folder``; returns ``folder``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        width, height = (64, 64) if i % 2 == 0 else (64, 96)
        pixels, caption = _pattern(i, width, height)
        Image.fromarray(pixels, "RGB").save(folder / f"img_{i:03d}.png")
        (folder / f"img_{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def build_tiny_controlnet_base(arch_id: str, folder: Path) -> Path:
    """A tiny SD1.5 / SDXL diffusers folder whose VAE downsamples 8× as the real ones do: a ControlNet's
    conditioning embedding always downsamples its image 8× (the layout every loader expects), so its features
    meet the UNet's latents only then (the other tiny models' VAE downsamples 2×)."""
    from diffusers import AutoencoderKL

    model = _build_tiny(arch_id, folder, "diffusers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SD15_SEED)
        vae = AutoencoderKL(**dict(SD15_VAE if arch_id == "sd15" else SDXL_VAE, block_out_channels=(8, 8, 16, 16),
                                   down_block_types=("DownEncoderBlock2D",) * 4,
                                   up_block_types=("UpDecoderBlock2D",) * 4))
    shutil.rmtree(model / "vae")
    vae.save_pretrained(model / "vae")
    return model


def build_conditioning_folder(images: Path, folder: Path) -> Path:
    """One ControlNet conditioning image per image of ``images`` (same name, size and extension .jpg): its
    horizontal grey gradient, so a mirror is visible."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True)
    for path in sorted(Path(images).glob("*.png")):
        with Image.open(path) as im:
            width, height = im.size
        ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
        Image.fromarray(np.stack([ramp] * 3, axis=-1), "RGB").save(folder / (path.stem + ".jpg"))
    return folder


__all__ = ["build_tiny_sd15", "build_tiny_sdxl", "build_tiny_controlnet_base", "build_conditioning_folder",
           "build_tiny_dataset", "tiny_config_dir", "tiny_single_file",
           "SD15_UNET", "SDXL_UNET", "SD15_VAE", "SDXL_VAE"]


def tiny_train_settings(arch_id: str, model_fields: dict, data: Path, tmp_path: Path, **overrides):
    """Settings and an AppConfig for a few-step CPU training run on a tiny model.

    ``model_fields`` maps dotted names to values for the model's paths (``{"model.model_path": …}``);
    ``overrides`` use ``section__name=value``.  Returns ``(settings, config)``."""
    import core
    from core.config import AppConfig

    s = core.load_settings()
    s.model.architecture = arch_id
    values = {"dataset.path": str(data), "dataset.resolution": 64, "dataset.min_bucket_reso": 32,
              "dataset.max_bucket_reso": 128, "dataset.bucket_reso_steps": 32, "network.rank": 4,
              "network.alpha": 2.0, "optimizer.learning_rate": 1e-3, "schedule.max_train_steps": 4,
              "schedule.log_every_n_steps": 1, "saving.output_name": f"tiny_{arch_id}",
              "saving.save_every_n_epochs": 0, "sampling.steps": 2, "sampling.width": 64, "sampling.height": 64,
              # one thread, as tests/conftest.py sets (the plan would use every core)
              "memory.cpu_threads": 1,
              # fp32 on every CPU: 'auto' picks bf16 on CPUs with AVX512-BF16 / AMX, and the suite's comparisons
              # and tolerances must not depend on the machine that runs them
              "memory.mixed_precision": "no", **model_fields, **{k.replace("__", "."): v for k, v in overrides.items()}}
    for dotted, value in values.items():
        section, name = dotted.split(".")
        setattr(getattr(s, section), name, value)
    # the tiny models and data of a test module live beside each other, outside this test's folder
    roots = {str(Path(data).parent)} | {str(Path(v).parent) for k, v in model_fields.items()
                                         if k.endswith("_path") and isinstance(v, str) and v}
    config = AppConfig(outputs_dir=str(tmp_path / "outputs"), models_dir=str(tmp_path), datasets_dir=str(tmp_path),
                       allowed_roots=sorted(roots))
    return s, config


def train_twice_with_disk_cache(arch_id: str, model_fields: dict, data: Path, tmp_path: Path, **overrides):
    """Two short runs on a copy of ``data`` with the disk caches on; returns, per run, its log/status messages and
    the final adapter's tensors (the second run finds every latent and caption embedding on disk)."""
    import shutil

    import core
    from safetensors.torch import load_file
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    runs = []
    for i in range(2):
        events = []
        s, config = tiny_train_settings(arch_id, model_fields, copy, tmp_path / f"run{i}",
                                        dataset__cache_latents="disk", schedule__max_train_steps=2, **overrides)
        result = core.train(s, on_event=events.append, config=config)
        runs.append(([e["message"] for e in events if e["type"] in ("log", "status")], load_file(str(result.final))))
    return runs


_TRAIN_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import core
from core.config import load_config
result = core.train(core.load_settings(sys.argv[2]), config=load_config(sys.argv[3]))
print("TRAIN_RESULT " + json.dumps({"final": str(result.final), "outputs": [str(p) for p in result.outputs],
                                    "steps": result.steps, "samples": [str(p) for p in result.samples],
                                    "validation": result.validation}))
"""


def train_in_fresh_process(settings, config, folder: Path) -> dict:
    """``core.train`` as a user's script runs it: a new Python process that imported nothing before ``core``,
    with ``settings`` and ``config`` written into ``folder``.  Returns the run's final file, outputs, steps,
    samples and validation losses; a failed run fails the calling test with the child's stderr."""
    import json
    import subprocess
    import sys

    folder = Path(folder)
    (folder / "settings.json").write_text(json.dumps(settings.to_dict()), encoding="utf-8")
    (folder / "config.json").write_text(config.model_dump_json(), encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", _TRAIN_CHILD, str(Path(__file__).resolve().parent.parent),
                          str(folder / "settings.json"), str(folder / "config.json")],
                         capture_output=True, text=True, timeout=600, cwd=folder)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("TRAIN_RESULT "))[13:])
