"""App settings from config.json (never training settings, never environment variables)."""
from __future__ import annotations

import json
from pathlib import Path

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.settings import SettingsError

ROOT = Path(__file__).resolve().parent.parent

AUTH_SHAPE = ('"auth": ["user", "password"] for one login, or [["alice", "pw1"], ["bob", "pw2"]] for several '
              "(every password non-empty)")


def parse_auth(value: Any) -> list[tuple[str, str]] | None:
    """config.json's ``auth``: None, one ``[user, password]`` pair or a list of pairs; a ValueError naming
    ``auth`` and the expected shape otherwise."""
    if value is None:
        return None
    pairs = [value] if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value) \
        else value
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError(f"auth must be null (no login) or {AUTH_SHAPE}; got {value!r}")
    out = []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, str) for v in pair)
                and pair[0].strip() and pair[1]):
            raise ValueError(f"auth: {pair!r} is not a [user, password] pair with a non-empty user and password; "
                             f"write {AUTH_SHAPE}")
        out.append((pair[0], pair[1]))
    return out


#: the app's folders; user-given paths stay inside them (or config.json's allowed_roots)
FOLDERS = ("models_dir", "datasets_dir", "outputs_dir", "presets_dir")


class PathNotAllowed(SettingsError):
    """A user-given path resolves outside the folders config.json allows."""


def confine(path: Path, roots: list[Path], setting: str, given: str) -> Path:
    """``path`` resolved (symlinks and ``..`` followed) if that lies in one of ``roots``; PathNotAllowed naming
    ``setting``, what the user typed (``given``) and the folders otherwise."""
    real = Path(path).resolve()
    if not any(real == root or root in real.parents for root in roots):
        raise PathNotAllowed(f"{setting}: {given} is outside the folders this app may use "
                             f"({', '.join(str(r) for r in roots)}). Move it into one of them, or add its "
                             "folder to \"allowed_roots\" in config.json.")
    return real


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(7860, ge=0, le=65535)
    share: bool = False
    auth: list[tuple[str, str]] | None = Field(None, description="[user, password], or a list of such pairs: "
                                                                 "the login the page asks for")
    models_dir: str = "models"
    datasets_dir: str = "datasets"
    outputs_dir: str = "outputs"
    presets_dir: str = "presets"
    training_defaults: str = "training.json"
    allowed_roots: list[str] = Field(default_factory=list, description="More folders that paths given in the UI may "
                                                                       "point into (besides the four above)")

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_pairs(cls, value):
        return parse_auth(value)

    @model_validator(mode="after")
    def _no_open_share_link(self):
        if self.share and not self.auth:
            raise ValueError('"share": true opens a public link that anyone holding it can use: set a login '
                             f"first ({AUTH_SHAPE}), or set \"share\": false")
        return self

    def path(self, name: str) -> Path:
        p = Path(getattr(self, name))
        return p if p.is_absolute() else ROOT / p

    def roots(self) -> list[Path]:
        """The folders every user-given path must lie in (symlinks followed)."""
        return list(dict.fromkeys([self.path(name).resolve() for name in FOLDERS]
                                  + [Path(r).expanduser().resolve() for r in self.allowed_roots]))

    def resolve(self, value: str, folder: str, setting: str = "path") -> Path:
        """A user-given path (absolute, or relative to the named app folder), resolved with symlinks and ``..``
        followed; outside :meth:`roots` it is refused (PathNotAllowed names ``setting`` and the folders)."""
        p = Path(value).expanduser()
        return confine(p if p.is_absolute() else self.path(folder) / p, self.roots(), setting, value)


def load_config(path: str | Path | None = None) -> AppConfig:
    path = Path(path) if path else ROOT / "config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    return AppConfig.model_validate(data)
