"""What every family's loader shares: where the shipped configs are, reading a JSON config with a message,
quiet transformers loading, and loading one model part with an error that names the part and its folder."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from architectures.base import ModelLoadError

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"


def default_config_dir(arch_id: str) -> Path:
    """The shipped full-size config folder of ``arch_id`` (configs, tokenizers, scheduler; no weights)."""
    return CONFIG_ROOT / arch_id


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


@contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """transformers draws a "Loading weights" bar per text encoder; keep the training log clean without
    changing the user's setting for good."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def part_loader(folder: Path) -> Callable[[str, Callable[[], nn.Module]], nn.Module]:
    """``load(part, fn)``: ``fn()`` in eval mode, quietly; any failure (missing or corrupt weights, a config
    error: all the user's to fix) becomes a ModelLoadError naming ``folder / part``."""
    def load(what: str, fn: Callable[[], nn.Module]) -> nn.Module:
        try:
            with no_hf_progress_bars():
                return fn().eval()
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"Loading the {what} from {folder / what} failed: {e}") from e
    return load


def components_folder(path: Path, components: Path | None, family: str) -> Path:
    """The diffusers-layout folder that gives a single-file transformer its text encoder, tokenizer and
    autoencoder (model.components_path), refused with the fix when unset or not a folder."""
    if components is None or str(components) in ("", "."):
        raise ModelLoadError(f"{path} is a single-file {family} transformer; its text encoder, tokenizer and "
                             "autoencoder come from a diffusers-layout folder of the same model: set "
                             "model.components_path to a folder with text_encoder/, tokenizer/ and vae/ subfolders.")
    components = Path(components).expanduser()
    if not components.is_dir():
        raise ModelLoadError(f"model.components_path: {components} is not a folder (a diffusers-layout folder with "
                             "text_encoder/, tokenizer/ and vae/ subfolders is expected).")
    return components
