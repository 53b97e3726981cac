"""Progress events that ``core.train`` sends to its ``on_event`` callback (the UI and scripts read these).

Every event is a plain dict with a ``type`` key:

- ``{"type": "status", "message": str[, "again": True]}``: a phase starts (loading, caching, training, saving);
  ``again``: the run returns to an activity a side task (a preview) interrupted.
- ``{"type": "log", "level": "info"|"warning", "message": str}``
- ``{"type": "plan", "summary": str, "device": "cuda"|"cpu", "estimate_gb": float|None, "budget_gb": float|None,
  "fits": bool}``: the memory/speed plan the run uses (core.plan) with its memory estimate (VRAM, or RAM on the
  CPU), sent once before loading.
- ``{"type": "progress", "step", "total_steps", "epoch", "total_epochs", "loss", "lr", "elapsed_s",
  "eta_s", "it_per_s", "vram_gb", "ram_gb"}``: sent every ``schedule.log_every_n_steps`` optimizer steps;
  ``loss`` is the mean loss since the previous progress event.
- ``{"type": "sample", "step", "paths": [str], "prompts": [str]}``: preview images written.
- ``{"type": "saved", "step", "path", "kind": "adapter"|"checkpoint"|"state"}``: "checkpoint" is a
  full fine-tune's whole model (a single file or a diffusers folder)
- ``{"type": "done", "outputs": [str], "final": str|None, "stopped": bool, "peak_vram_gb": float|None}``, with
  ``"message": str`` when Stop came before the first training step (nothing saved, ``final`` None)
- ``{"type": "error", "message": str}``: the run failed; ``core.train`` raises after sending it
  (a ``RunFailed``: ``TrainingDiverged`` when a loss, gradient norm or weight stopped being finite,
  ``SaveFailed`` when the disk refused a save).
"""
from __future__ import annotations

from typing import Callable

EventCallback = Callable[[dict], None]


class RunFailed(RuntimeError):
    """The run stopped for a reason its message explains in full (what happened, what was kept, what to do)."""


class TrainingDiverged(RunFailed):
    """A loss, gradient norm or weight stopped being finite; the message says where, what was kept and what to
    change.  Nothing non-finite was written."""


class SaveFailed(RunFailed):
    """A save could not be written (disk full, read-only, no permission); its partial files were removed and
    the earlier saves kept."""


def emit(callback: EventCallback | None, type: str, **fields) -> None:
    if callback is not None:
        callback({"type": type, **fields})
