"""The state of the one training run the app can have at a time, filled from trainer events.

``core.train`` runs in a worker thread and calls :meth:`RunState.handle` for every event (see
core/events.py); the page polls :meth:`RunState.snapshot` once a second.  Each kind of data carries a
version number so the poll resends only what changed (a gallery that is resent every second flickers).
No training logic lives here: the controller only starts ``core.train`` and sets its stop event.
"""
from __future__ import annotations

import re
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.events import RunFailed
from core.settings import Settings, SettingsError


def is_user_error(exc: BaseException) -> bool:
    """Whether the error's message already says what is wrong and what to change (bad settings, dataset or model
    file, a refused plan, a failed save): shown as it is, with no traceback.  Anything else is a bug: its type
    is shown and its traceback goes to the log.  (Imported here, not at start-up: they pull in torch.)"""
    from architectures.base import ModelLoadError
    from core.dataset import DatasetError
    from core.plan import PlanRefusal
    return isinstance(exc, (SettingsError, RunFailed, DatasetError, ModelLoadError, PlanRefusal))

LOG_LINES = 500


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:  # None or NaN
        return "–"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class Snapshot:
    """A consistent copy of the run state for the page (plain data, safe to use without the lock)."""
    running: bool
    phase: str                      # idle | starting | running | stopping | finished | stopped | failed
    status: str
    step: int
    total_steps: int
    epoch: int
    total_epochs: int
    it_per_s: float | None
    eta_s: float | None
    elapsed_s: float | None
    lr: float | None
    losses: list[tuple[int, float]]
    samples: list[tuple[str, str]]          # (image path, caption)
    val_losses: list[tuple[int, float]]     # (step, validation loss)
    log: list[str]
    outputs: list[str]
    final: str | None
    vram_gb: float | None
    peak_vram_gb: float | None
    ram_gb: float | None
    error: str | None
    versions: dict[str, int]
    estimate_gb: float | None = None        # the plan's memory estimate for this run
    estimate_device: str = "cuda"           # what it estimates: "cuda" (VRAM) or "cpu" (RAM)
    run_name: str = ""                      # the run's output name, shown in every tab
    started_at: float | None = None         # time.time() when it was started


@dataclass
class RunState:
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    running: bool = False
    phase: str = "idle"
    status: str = "Ready."
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    it_per_s: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    lr: float | None = None
    losses: list = field(default_factory=list)
    val_losses: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    outputs: list = field(default_factory=list)
    final: str | None = None
    vram_gb: float | None = None
    peak_vram_gb: float | None = None
    ram_gb: float | None = None
    estimate_gb: float | None = None
    estimate_device: str = "cuda"
    error: str | None = None
    run_name: str = ""
    started_at: float | None = None
    versions: dict = field(default_factory=lambda: {k: 0 for k in
                                                    ("status", "progress", "losses", "samples", "log",
                                                     "outputs", "memory", "run")})

    # -- mutation (worker thread) -----------------------------------------------------------------------
    def _bump(self, *kinds: str) -> None:
        for k in kinds:
            self.versions[k] += 1

    def _log(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        for part in str(line).splitlines() or [""]:
            self.log.append(f"[{stamp}] {part}")
        self._bump("log")

    def reset(self, status: str, run_name: str = "") -> None:
        with self.lock:
            self.running, self.phase, self.status = True, "starting", status
            self.run_name, self.started_at = run_name, time.time()
            self.step = self.total_steps = self.epoch = self.total_epochs = 0
            self.it_per_s = self.eta_s = self.elapsed_s = self.lr = None
            self.losses, self.val_losses, self.samples, self.outputs = [], [], [], []
            self.final = self.error = None
            self.vram_gb = self.peak_vram_gb = self.ram_gb = self.estimate_gb = None
            self.log.clear()
            self._log(status)
            self._bump("status", "progress", "losses", "samples", "outputs", "memory", "run")

    def set_status(self, status: str, phase: str | None = None, log: bool = True) -> None:
        with self.lock:
            self.status = status
            if phase:
                self.phase = phase
            if log:
                self._log(status)
            self._bump("status", "run")

    def handle(self, event: dict) -> None:
        """The ``on_event`` callback for core.train (called from the worker thread)."""
        kind = event.get("type")
        with self.lock:
            if kind == "status":
                self.status = event.get("message", "")
                if self.phase == "starting":
                    self.phase = "running"
                if not event.get("again"):
                    self._log(self.status)
                self._bump("status", "run")
            elif kind == "log":
                level = event.get("level", "info")
                msg = event.get("message", "")
                self._log(f"{level.upper()}: {msg}" if level != "info" else msg)
            elif kind == "plan":
                if event.get("estimate_gb") is not None:
                    self.estimate_gb = float(event["estimate_gb"])
                    self.estimate_device = str(event.get("device") or "cuda")
                self._bump("memory")
            elif kind == "progress":
                self.phase = "running" if self.phase == "starting" else self.phase
                self.step = int(event.get("step") or 0)
                self.total_steps = int(event.get("total_steps") or self.total_steps)
                self.epoch = int(event.get("epoch") or self.epoch)
                self.total_epochs = int(event.get("total_epochs") or self.total_epochs)
                for name in ("it_per_s", "eta_s", "elapsed_s", "lr"):
                    if event.get(name) is not None:
                        setattr(self, name, float(event[name]))
                # every step's loss of the report interval (one point per step from the first), else the mean
                points = event.get("step_losses") or ([(self.step, event["loss"])] if event.get("loss") is not None
                                                      else [])
                if points:
                    self.losses.extend((int(st), float(v)) for st, v in points)
                    self._bump("losses")
                for name in ("vram_gb", "ram_gb"):
                    if event.get(name) is not None:
                        setattr(self, name, float(event[name]))
                if self.vram_gb is not None:
                    self.peak_vram_gb = max(self.peak_vram_gb or 0.0, self.vram_gb)
                self._bump("progress", "memory")
            elif kind == "validation":
                self.val_losses.append((int(event["step"]), float(event["loss"])))
                self._bump("losses")
            elif kind == "sample":
                step = event.get("step")
                prompts = list(event.get("prompts") or [])
                for i, path in enumerate(event.get("paths") or []):
                    prompt = prompts[i] if i < len(prompts) else ""
                    self.samples.append((str(path), f"step {step}: {prompt}".strip()))
                self._bump("samples")
            elif kind == "saved":
                path = str(event.get("path"))
                if event.get("kind", "adapter") in ("adapter", "checkpoint") and path not in self.outputs:
                    self.outputs.append(path)
                self._log(f"Saved {event.get('kind', 'adapter')} at step {event.get('step')}: {path}")
                self._bump("outputs")
            elif kind == "deleted":
                gone = {str(p) for p in event.get("paths") or []}
                self.outputs = [p for p in self.outputs if p not in gone]
                self._log(f"Removed {', '.join(sorted(Path(p).name for p in gone))} ({event.get('reason', '')})")
                self._bump("outputs")
            elif kind == "done":
                for p in event.get("outputs") or []:
                    if str(p) not in self.outputs:
                        self.outputs.append(str(p))
                self.final = str(event["final"]) if event.get("final") else self.final
                if event.get("peak_vram_gb") is not None:
                    self.peak_vram_gb = float(event["peak_vram_gb"])
                stopped = bool(event.get("stopped"))
                self.phase = "stopped" if stopped else "finished"
                self.status = event.get("message") or (
                    "Stopped early; saved what was trained." if stopped else "Finished.")
                self._bump("status", "outputs", "memory", "run")
            elif kind == "error":
                self.error = event.get("message", "")
                self.phase = "failed"
                self.status = f"Failed: {self.error}"
                self._log(self.status)
                self._bump("status", "run")

    def finish(self, result: Any = None, error: BaseException | None = None, detail: str = "") -> None:
        """Called by the worker when core.train returned or raised."""
        with self.lock:
            self.running = False
            if error is not None:
                msg = str(error) if is_user_error(error) else f"{type(error).__name__}: {error}"
                already_reported = self.phase == "failed" and self.error is not None and self.error in msg
                if not already_reported:
                    self.error = msg
                    self.phase = "failed"
                    self.status = f"Failed: {self.error}"
                    self._log(self.status)
                if detail:
                    self._log(detail)
            elif result is not None:
                for p in getattr(result, "outputs", None) or []:
                    if str(p) not in self.outputs:
                        self.outputs.append(str(p))
                final = getattr(result, "final", None)
                if final:
                    self.final = str(final)
                stopped = bool(getattr(result, "stopped", False))
                if self.phase not in ("finished", "stopped"):
                    self.phase = "stopped" if stopped else "finished"
                    self.status = "Stopped early; saved what was trained." if stopped else "Finished."
                    self._log(self.status)
            elif self.phase not in ("finished", "stopped", "failed"):
                self.phase = "finished"
                self.status = "Finished."
            self._bump("status", "outputs", "run", "progress")

    def set_memory(self, use: dict) -> None:
        with self.lock:
            changed = False
            for name in ("vram_gb", "peak_vram_gb", "ram_gb"):
                v = use.get(name)
                if v is not None and getattr(self, name) != float(v):
                    setattr(self, name, float(v))
                    changed = True
            if changed:
                self._bump("memory")

    # -- reading (page) ---------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self.lock:
            return Snapshot(
                running=self.running, phase=self.phase, status=self.status, step=self.step,
                total_steps=self.total_steps, epoch=self.epoch, total_epochs=self.total_epochs,
                it_per_s=self.it_per_s, eta_s=self.eta_s, elapsed_s=self.elapsed_s, lr=self.lr,
                losses=list(self.losses), val_losses=list(self.val_losses), samples=list(self.samples),
                log=list(self.log),
                outputs=list(self.outputs), final=self.final, vram_gb=self.vram_gb,
                peak_vram_gb=self.peak_vram_gb, ram_gb=self.ram_gb, error=self.error,
                versions=dict(self.versions), estimate_gb=self.estimate_gb,
                estimate_device=self.estimate_device, run_name=self.run_name, started_at=self.started_at)


def _default_train() -> Callable:
    try:
        import core
        train = getattr(core, "train", None)
        if train is not None:
            return train
    except ImportError:
        pass
    from core.trainer import train
    return train


class RunController:
    """Starts ``core.train`` in a worker thread (one run at a time) and stops it via its stop event."""

    def __init__(self, config=None, train_fn: Callable | None = None):
        self.config = config
        self._train_fn = train_fn
        self.state = RunState()
        self._thread: threading.Thread | None = None
        self._stop_event: threading.Event | None = None
        self._start_lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, settings: Settings) -> tuple[bool, str]:
        """Start a run; returns (started, message)."""
        with self._start_lock:
            if self.running:
                return False, "A run is already in progress. Stop it first."
            try:
                train = self._train_fn or _default_train()
            except Exception as exc:  # the trainer module is missing or broken
                return False, f"The trainer cannot be loaded: {type(exc).__name__}: {exc}"
            self._stop_event = threading.Event()
            name = settings.saving.output_name
            self.state.reset(f"Starting '{name}'…", run_name=name)
            self._thread = threading.Thread(target=self._work, args=(train, settings, self._stop_event),
                                            name="training-run", daemon=True)
            self._thread.start()
            return True, f"Starting '{name}'…"

    def _work(self, train: Callable, settings: Settings, stop_event: threading.Event) -> None:
        try:
            result = train(settings, on_event=self.state.handle, stop_event=stop_event, config=self.config)
        except BaseException as exc:  # shown in the page; the traceback goes to the log only
            detail = "" if is_user_error(exc) else traceback.format_exc()
            self.state.finish(error=exc, detail=detail)
        else:
            self.state.finish(result=result)

    def stop(self) -> str:
        if not self.running or self._stop_event is None:
            return "Nothing is running."
        if not self._stop_event.is_set():
            self._stop_event.set()
            self.state.set_status("Stopping: saving what was trained so far…", phase="stopping")
        return "Stopping…"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the worker (tests, shutdown). True when no run is active afterwards."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running


# -- formatting for the page ----------------------------------------------------------------------------

def progress_html(s: Snapshot) -> str:
    total = s.total_steps or 0
    frac = min(1.0, s.step / total) if total else (1.0 if s.phase == "finished" else 0.0)
    parts = [f"Step {s.step} / {total}" if total else "Step –"]
    if s.total_epochs:
        parts.append(f"epoch {s.epoch} / {s.total_epochs}")
    if s.it_per_s:
        parts.append(f"{s.it_per_s:.2f} it/s" if s.it_per_s >= 1 else f"{1 / s.it_per_s:.1f} s/it")
    if s.running:
        parts.append(f"ETA {_fmt_duration(s.eta_s)}")
    if s.elapsed_s is not None:
        parts.append(f"elapsed {_fmt_duration(s.elapsed_s)}")
    if s.losses:
        parts.append(f"loss {s.losses[-1][1]:.4g}")
    if s.lr is not None:
        parts.append(f"lr {s.lr:.3g}")
    cls = {"failed": "failed", "stopped": "stopped", "finished": "finished"}.get(s.phase, "active")
    return (f'<div class="run-progress {cls}"><div class="bar"><div class="fill" '
            f'style="width:{frac * 100:.1f}%"></div></div><div class="text">{" · ".join(parts)}</div></div>')


def run_label(s: Snapshot) -> str:
    """'name' (started 23:41): what every tab shows of the run, whoever started it."""
    if not s.run_name:
        return ""
    started = time.strftime("%H:%M", time.localtime(s.started_at)) if s.started_at else "?"
    return f"'{s.run_name}' (started {started})"


_DOTTED = re.compile(r"`?\b([a-z_]+)\.([a-z0-9_]+)\b`?")


def field_place(dotted: str) -> str:
    """Where a setting's control is, as the page shows it: 'Dataset → Resolution', 'Optimizer → Advanced →
    Report loss every N steps', 'Run → Memory and speed choices → Gradient checkpointing'."""
    from core.settings import field_ui
    from ui.schema_ui import TABS
    section = dotted.split(".")[0]
    ui = field_ui(dotted)
    for tab_id, tab_label, sections in TABS:
        if any(name == section for name, _ in sections):
            folded = (["Memory and speed choices"] if tab_id == "run" else []) + (["Advanced"] if ui["advanced"]
                                                                                  else [])
            return " → ".join([tab_label, *folded, ui["label"]])
    return ui["label"]


def with_places(message: str) -> str:
    """``message`` (Markdown) with the place of every setting it names after the name:
    '`dataset.resolution` (**Dataset → Resolution**) must lie …'.  Each setting once; other dotted words (file
    names, numbers) stay as they are."""
    from core.settings import iter_fields
    known = {dotted for dotted, _ in iter_fields()}
    seen: set[str] = set()

    def place(m: re.Match) -> str:
        dotted = f"{m.group(1)}.{m.group(2)}"
        if dotted not in known or dotted in seen:
            return m.group(0)
        seen.add(dotted)
        return f"`{dotted}` (**{field_place(dotted)}**)"
    return _DOTTED.sub(place, message)


def status_text(s: Snapshot) -> str:
    icon = {"idle": "○", "starting": "…", "running": "▶", "stopping": "■", "finished": "✓",
            "stopped": "■", "failed": "✗"}.get(s.phase, "")
    label = run_label(s)
    first, *rest = (s.status or "").splitlines() or [""]
    text = f"{icon} {label + ': ' if label else ''}{with_places(first)}".strip()
    # a message of several lines (each problem on its own) stays one line each, not one run-on paragraph
    items = [with_places(line.strip()) for line in rest if line.strip()]
    return text + ("\n\n" + "\n".join(f"- {line}" for line in items) if items else "")


def memory_text(s: Snapshot) -> str:
    def gb(v):
        return "–" if v is None else f"{v:.2f} GB"
    on_gpu = s.estimate_gb is not None and s.estimate_device == "cuda"
    vram = ("n/a (no GPU in use)" if s.vram_gb is None and s.peak_vram_gb is None
            else f"{gb(s.vram_gb)} (peak {gb(s.peak_vram_gb)}" + (f", estimated {gb(s.estimate_gb)})" if on_gpu
                                                                   else ")"))
    ram = gb(s.ram_gb)
    if s.estimate_gb is not None and not on_gpu:
        ram += f" (training tensors estimated {gb(s.estimate_gb)})"
    return f"**VRAM** {vram} · **RAM** {ram}"


def outputs_text(s: Snapshot) -> str:
    if not s.outputs and not s.final:
        return "No files saved yet."
    lines = []
    if s.final:
        lines.append(f"**Final adapter:** `{s.final}`")
        lines.append("")
    others = [p for p in s.outputs if p != s.final]
    if others:
        lines.append("Intermediate saves:")
        lines.extend(f"- `{p}`" for p in others)
    return "\n".join(lines)


def loss_frame(s: Snapshot):
    """step/loss DataFrame for the chart: the reported loss, an exponential moving average and the validation
    loss (when the run holds images out for it).

    None while there is no loss yet: Gradio's LinePlot draws no lines when a colour-split plot was first
    given an empty frame and data arrives later (its colour domain stays empty)."""
    import pandas as pd
    if not s.losses:
        return None
    steps = [st for st, _ in s.losses]
    raw = [v for _, v in s.losses]
    ema, avg = [], None
    for v in raw:
        avg = v if avg is None else 0.9 * avg + 0.1 * v
        ema.append(avg)
    val_steps = [st for st, _ in s.val_losses]
    return pd.DataFrame({"step": steps + steps + val_steps, "loss": raw + ema + [v for _, v in s.val_losses],
                         "series": ["loss"] * len(raw) + ["smoothed"] * len(ema) + ["validation"] * len(val_steps)})


# Vega-Lite puts up to one x tick per 40 px of chart.  An axis at least this many steps wide (the chart is
# narrower than 40 px × this) gets a tick step of at least 1, so no tick falls between two steps.
MIN_STEP_AXIS = 40


def loss_axis(s: Snapshot) -> list[float]:
    """x range of the loss chart: from 0 to the last plotted step, and at least :data:`MIN_STEP_AXIS` steps wide
    so that its ticks are whole steps (Gradio's LinePlot has no tick-step option)."""
    last = max([st for st, _ in s.losses] + [st for st, _ in s.val_losses] + [0])
    return [0, max(last, MIN_STEP_AXIS)]


def samples_for_gallery(s: Snapshot) -> list[tuple[str, str]]:
    return [(p, cap) for p, cap in reversed(s.samples) if Path(p).exists()]
