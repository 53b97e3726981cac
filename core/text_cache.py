"""Text-encoder outputs per caption, so the training loop never runs a text encoder.

The outputs live in CPU memory (pinned when training on a GPU) and each batch's rows are copied to the device
without blocking: a FLUX.2 dev caption is ≈16 MB of hidden states, a few hundred captions would otherwise sit
in VRAM for the whole run.  With ``mode="disk"`` they are also written once per caption under the dataset's
``.cache/text-<key>/`` folder and reused by later runs with the same model and encoding settings, so a rerun
never loads a 24B text encoder onto the GPU at all.  The key covers everything that changes the output (the
family, the model files, clip skip, T5 length and mask, the text encoder's quantization, the dtype)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from core.io import atomic_save_safetensors

_FORMAT = "lora-studio-text-v1"


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TextCache:
    def __init__(self, mode: str, folder: Path | None, key_fields: dict, pin: bool):
        self.mode = mode if folder is not None else "memory"
        self.key = cache_key(key_fields)
        self.folder = None if folder is None else Path(folder) / f"text-{self.key}"
        self.pin = pin
        self.entries: dict[str, dict[str, torch.Tensor]] = {}
        self.disk_error: str | None = None       # why the disk cache stopped being written, if it did

    def _path(self, caption: str) -> Path:
        return self.folder / (hashlib.sha256(caption.encode()).hexdigest()[:32] + ".safetensors")

    def _keep(self, caption: str, cond: dict[str, torch.Tensor]) -> None:
        self.entries[caption] = {k: (v.pin_memory() if self.pin else v) for k, v in cond.items()}

    def load_existing(self, captions: list[str]) -> list[str]:
        """Reads what the disk cache has; returns the captions still to encode."""
        missing = []
        for caption in captions:
            cond = self._read(caption) if self.mode == "disk" else None
            if cond is None:
                missing.append(caption)
            else:
                self._keep(caption, cond)
        return missing

    def _read(self, caption: str) -> dict[str, torch.Tensor] | None:
        from safetensors import safe_open
        path = self._path(caption)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT or meta.get("caption") != caption:
                    return None
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception:  # an unreadable cache file of ours is simply recomputed
            return None

    def add(self, caption: str, cond: dict[str, torch.Tensor]) -> None:
        """One caption's outputs (batch dimension 1), from any device."""
        cond = {k: v.detach().to("cpu").contiguous() for k, v in cond.items()}
        if self.mode == "disk":
            try:
                atomic_save_safetensors(self._path(caption), cond, {"format": _FORMAT, "caption": caption})
            except OSError as exc:  # disk full, read-only folder: the run goes on with the copy in memory
                self.disk_error = f"{self.folder}: {exc}"
                self.mode = "memory"
        self._keep(caption, cond)

    def adopt(self, entries: dict[str, dict[str, torch.Tensor]]) -> None:
        """Outputs another process encoded (core.distributed), kept in memory only: that process wrote the disk
        cache where there is one."""
        for caption, cond in entries.items():
            self._keep(caption, cond)

    def batch(self, captions: list[str], device: torch.device, host_keys: tuple[str, ...] = ()
              ) -> dict[str, torch.Tensor]:
        """The captions' outputs on ``device``, those under ``host_keys`` in host memory."""
        rows = [self.entries[c] for c in captions]
        # row by row from pinned memory: each copy is asynchronous (a concatenation on the host would not be)
        return {k: torch.cat([r[k] if k in host_keys else r[k].to(device, non_blocking=True) for r in rows])
                for k in rows[0]}

    def __len__(self) -> int:
        return len(self.entries)
