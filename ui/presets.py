"""Named presets: the whole settings object as JSON in the presets folder (same shape as training.json)."""
from __future__ import annotations

import re
from pathlib import Path

from core.config import AppConfig
from core.kohya_import import ImportReport, import_kohya
from core.settings import Settings, SettingsError, load_settings, save_settings

_NAME = re.compile(r"^[\w][\w .+()-]{0,99}$")


#: the ready presets shipped with the project (read-only: saving always writes the user's presets folder)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "presets"


def list_presets(folder: Path) -> list[str]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p.stem for p in folder.glob("*.json") if not p.name.startswith(".")), key=str.lower)


def preset_choices(folder: Path, examples: Path = EXAMPLES) -> list[tuple[str, str]]:
    """(label, name) for the dropdown: the user's presets, then the shipped examples they do not shadow (read from
    disk each time, so a preset saved in another tab or before a restart is listed)."""
    own = list_presets(folder)
    return [(n, n) for n in own] + [(f"{n} (example)", n) for n in list_presets(examples) if n not in own]


def preset_path(folder: Path, name: str) -> Path:
    name = (name or "").strip()
    if name.lower().endswith(".json"):
        name = name[:-5]
    if not _NAME.match(name):
        raise SettingsError(f"Preset name {name!r}: use letters, digits, spaces, '.', '-', '_' (no slashes).")
    return Path(folder) / f"{name}.json"


def save_preset(folder: Path, name: str, settings: Settings) -> Path:
    path = preset_path(folder, name)
    save_settings(settings, path)
    return path


def load_preset(folder: Path, name: str, examples: Path = EXAMPLES) -> Settings:
    """The user's preset of that name, else the shipped example.  Raises SettingsError naming each invalid field
    (or a missing/unreadable file)."""
    path = preset_path(folder, name)
    if not path.is_file() and preset_path(examples, name).is_file():
        path = preset_path(examples, name)
    if not path.is_file():
        raise SettingsError(f"No preset named {name!r} in {Path(folder)} or among the examples")
    try:
        return load_settings(path)
    except SettingsError as exc:
        raise SettingsError(f"Preset {name!r}: {exc}") from None


def load_defaults(path: Path) -> tuple[Settings, str | None]:
    """The start-up settings from the training defaults file; the schema defaults (and a message saying why)
    when that file is missing or invalid."""
    path = Path(path)
    if not path.is_file():
        return Settings(), None
    try:
        return load_settings(path), None
    except SettingsError as exc:
        return Settings(), f"{path.name} was not used: {exc}"


def import_kohya_config(config: AppConfig, uploaded: str | None, typed: str, base: Settings
                        ) -> tuple[Settings, ImportReport]:
    """A kohya config into ``base`` (the current settings; its architecture is used where the file does not
    say): the uploaded file, else the typed path (relative: inside the presets folder, and confined to the
    app's folders).  Raises SettingsError (PathNotAllowed, KohyaImportError) saying what to change."""
    if uploaded:
        path = Path(uploaded)
    elif (typed or "").strip():
        path = config.resolve(typed.strip(), "presets_dir", "kohya config")
    else:
        raise SettingsError("Upload a kohya_ss GUI config (.json) or an sd-scripts TOML, or type its path.")
    if not path.is_file():
        raise SettingsError(f"{path} is not a file: choose the config the kohya_ss GUI saved or the .toml of "
                            "sd-scripts' --config_file.")
    return import_kohya(path, base.model.architecture, base=base, config=config)
