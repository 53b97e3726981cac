"""App settings from config.json (never training settings, never environment variables)."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

ROOT = Path(__file__).resolve().parent.parent


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(7860, ge=0, le=65535)
    share: bool = False
    auth: list[str] | None = Field(None, description="[user, password] to require a login")
    models_dir: str = "models"
    datasets_dir: str = "datasets"
    outputs_dir: str = "outputs"
    presets_dir: str = "presets"
    training_defaults: str = "training.json"

    def path(self, name: str) -> Path:
        p = Path(getattr(self, name))
        return p if p.is_absolute() else ROOT / p

    def resolve(self, value: str, folder: str) -> Path:
        """A user-given path: absolute as is, relative inside the named app folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.path(folder) / p


def load_config(path: str | Path | None = None) -> AppConfig:
    path = Path(path) if path else ROOT / "config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    return AppConfig.model_validate(data)
