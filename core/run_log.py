"""The run's logs for TensorBoard (event files) and, when the package is installed, Weights & Biases in offline mode.

The log reads the run's events (core.events), which already hold host values: the training step gains no device
read.  Files go to ``<output folder>/logs/<output name>-<start time>/`` (W&B: its ``wandb/`` folder inside), so
``tensorboard --logdir outputs/<run>`` shows every run of an output, a resumed one as a run of its own on the same
step axis.  Nothing is sent anywhere: W&B runs with ``mode="offline"`` (``wandb sync`` uploads it later if wanted).
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Callable

SMOOTHING = 0.9   # the exponential moving average of the loss ("loss/smoothed")


def log_problems(log_with: str) -> list[str]:
    """What stops the chosen logging before the run starts (a package that is not installed)."""
    wanted = _wanted(log_with)
    out = []
    if "tensorboard" in wanted and importlib.util.find_spec("tensorboard") is None:
        out.append("saving.log_with needs the tensorboard package, which is not installed: run `python3 run.py` "
                   "once to install what packages.jsonc lists, or set Output → Logs to none")
    if "wandb" in wanted and importlib.util.find_spec("wandb") is None:
        out.append("saving.log_with asks for Weights & Biases, but the wandb package is not installed: install it "
                   "into .venv (`.venv/bin/pip install wandb`) or choose tensorboard")
    return out


def _wanted(log_with: str) -> set[str]:
    return {"tensorboard", "wandb"} if log_with == "all" else ({log_with} - {"none"})


class RunLog:
    """Callable on every event of a run; opens its writers at the first event worth logging."""

    def __init__(self, folder: Callable[[], Path], log_with: str, config: dict[str, Any], warn: Callable[[str], None]):
        self.folder_of = folder      # called when the first event is written: the run's name is known by then
        self.folder: Path | None = None
        self.warn = warn
        self.wanted = _wanted(log_with)
        self.config = config
        self.tb = None
        self.wandb_run = None
        self.smoothed: float | None = None

    def _open(self) -> None:
        if self.tb is not None or self.wandb_run is not None:
            return
        self.folder = self.folder_of()
        self.folder.mkdir(parents=True, exist_ok=True)
        if "tensorboard" in self.wanted:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(self.folder), flush_secs=30)
            self.tb.add_text("settings", "```json\n" + _json(self.config) + "\n```", 0)
        if "wandb" in self.wanted:
            import wandb
            self.wandb_run = wandb.init(mode="offline", dir=str(self.folder), name=self.folder.name,
                                        config=self.config)

    def __call__(self, event: dict[str, Any]) -> None:
        """Writes what the event holds; a log that cannot be written (disk full, read-only folder) is dropped with
        a warning and never stops the run, whose own saves report such problems."""
        if not self.wanted or event.get("type") not in ("progress", "validation", "sample"):
            return
        try:
            self._write(event)
        except OSError as exc:
            self.wanted = set()
            self.close(quietly=True)
            self.warn(f"The logs in {self.folder} cannot be written ({exc}); training goes on without them")

    def _write(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        self._open()
        step = int(event["step"])
        scalars: dict[str, float] = {}
        if kind == "progress":
            # every step's loss (the report carries the interval's), the rest at the report's step
            for st, loss in event.get("step_losses") or [(step, event["loss"])]:
                loss = float(loss)
                self.smoothed = loss if self.smoothed is None else SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
                for name, value in (("loss/current", loss), ("loss/smoothed", self.smoothed)):
                    if self.tb is not None:
                        self.tb.add_scalar(name, value, int(st))
                    if self.wandb_run is not None:
                        self.wandb_run.log({name: value}, step=int(st))
            for i, lr in enumerate(event.get("lrs") or [event["lr"]]):
                scalars[f"lr/group{i}"] = float(lr)
            for key, name in (("it_per_s", "speed/it_per_s"), ("vram_gb", "memory/vram_gb"),
                              ("ram_gb", "memory/ram_gb"), ("epoch", "progress/epoch")):
                if event.get(key) is not None:
                    scalars[name] = float(event[key])
        elif kind == "validation":
            scalars = {"loss/validation": float(event["loss"])}
        for name, value in scalars.items():
            if self.tb is not None:
                self.tb.add_scalar(name, value, step)
        if self.wandb_run is not None and scalars:
            self.wandb_run.log(scalars, step=step)
        if kind == "sample":
            self._images(event, step)

    def _images(self, event: dict[str, Any], step: int) -> None:
        import numpy as np
        from PIL import Image
        for i, (path, prompt) in enumerate(zip(event["paths"], event.get("prompts") or [""] * len(event["paths"]))):
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
            if self.tb is not None:
                self.tb.add_image(f"preview/{i}", pixels, step, dataformats="HWC")
            if self.wandb_run is not None:
                import wandb
                self.wandb_run.log({f"preview/{i}": wandb.Image(pixels, caption=prompt)}, step=step)

    def close(self, quietly: bool = False) -> None:
        try:
            if self.tb is not None:
                self.tb.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()
        except OSError as exc:
            if not quietly:
                self.warn(f"The logs in {self.folder} could not be completed ({exc})")
        self.tb = self.wandb_run = None


def run_log_folder(output_dir: Path, run_stem: str) -> Path:
    """``<output folder>/logs/<run stem>-<start time>``: named like the run's files (``name``, ``name-1`` …)."""
    return Path(output_dir) / "logs" / f"{run_stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _json(config: dict[str, Any]) -> str:
    import json
    return json.dumps(config, indent=2, default=str)


__all__ = ["RunLog", "log_problems", "run_log_folder"]
