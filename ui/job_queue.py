"""The job queue: runs that start one after another through the one :class:`RunController` of the app.

A job is a whole settings dict (the current settings or a preset, validated when it is added) with its label,
state and times; the queue lives in ``<outputs>/queue.json`` (written atomically after every change), so a page
reload or an app restart shows the same jobs in the same order.  While a job runs, the Run tab shows it like any
other run (the controller's own state); when it ends, its final status line, output file and a log file of its
lines are kept with the job.

:class:`QueueRunner` starts the next waiting job whenever no run is in progress and the queue is not paused.
A stopped job pauses the queue (the user pressed Stop: running on would contradict them); a failed job does not
(the next one may well be fine, and an overnight queue should not wait for a morning look).
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.io import atomic_write_json, atomic_write_text, unused_path
from core.settings import Settings, SettingsError, check_consistency, settings_from_dict
from ui.run_state import RunController, Snapshot

QUEUE_FILE = "queue.json"
LOG_FOLDER = "queue-logs"

WAITING, RUNNING, DONE, FAILED, STOPPED, INTERRUPTED = (
    "waiting", "running", "done", "failed", "stopped", "interrupted")
FINISHED = (DONE, FAILED, STOPPED, INTERRUPTED)
STATES = (WAITING, RUNNING) + FINISHED
ICONS = {WAITING: "…", RUNNING: "▶", DONE: "✓", FAILED: "✗", STOPPED: "■", INTERRUPTED: "⚠"}


class QueueError(ValueError):
    """An operation the queue refuses (moving a job that already ran, an unknown job); the message says why."""


class JobRefused(SettingsError):
    """Settings that Start would refuse; ``problems`` holds one message per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("Fix these settings first:\n" + "\n".join(problems))
        self.problems = list(problems)


@dataclass
class Job:
    id: str
    label: str
    settings: dict
    source: str = ""                    # "current settings" or "preset <name>"
    state: str = WAITING
    added_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    status: str = ""                    # the run's last status line (or why it did not run)
    final: str | None = None            # the final adapter file
    outputs: list[str] = field(default_factory=list)
    error: str | None = None
    log_path: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> "Job":
        if not isinstance(data, dict) or not isinstance(data.get("id"), str) \
                or not isinstance(data.get("settings"), dict) or data.get("state") not in STATES:
            raise ValueError(f"not a job: {str(data)[:200]}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def job_label(settings: Settings, preset: str | None = None) -> str:
    name = settings.saving.output_name
    return f"{preset} → {name}" if preset and preset != name else name


def settings_problems(settings: Settings) -> list[str]:
    """What the Start button refuses for these settings (a job is checked the same way when it is added)."""
    return check_consistency(settings)


class JobQueue:
    """The jobs in their order, kept in ``path`` (JSON).  Safe to use from the runner thread and the page."""

    def __init__(self, path: Path, config=None):
        self.path = Path(path)
        self.config = config
        self.log_dir = self.path.parent / LOG_FOLDER
        self._lock = threading.RLock()
        self._jobs: list[Job] = []
        self.paused = False
        self.version = 0                 # bumped by every change: the page resends the table only then
        self.problem: str | None = None  # why the stored queue could not be read (it was set aside, not lost)
        self._load()

    @classmethod
    def for_config(cls, config) -> "JobQueue":
        return cls(config.path("outputs_dir") / QUEUE_FILE, config)

    # -- storage --------------------------------------------------------------------------------------
    def _load(self) -> None:
        if not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            jobs = [Job.from_dict(j) for j in data["jobs"]]
            paused = bool(data.get("paused", False))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # keep the user's file for a look instead of overwriting it with an empty queue
            aside = unused_path(self.path.with_name(self.path.name + ".unreadable"))
            try:
                self.path.replace(aside)
                self.problem = f"{self.path.name} could not be read ({exc}); it was moved to {aside.name}."
            except OSError as move_exc:
                self.problem = f"{self.path} could not be read ({exc}) nor moved aside ({move_exc})."
            return
        interrupted = [j for j in jobs if j.state == RUNNING]
        for job in interrupted:
            # the app ended during this job: never re-run it silently, say how to go on
            job.state, job.finished_at = INTERRUPTED, None
            job.status = "The app stopped during this job. " + self._resume_hint(job)
        self._jobs, self.paused = jobs, paused or bool(interrupted)
        if interrupted:
            self._save()

    def _resume_hint(self, job: Job) -> str:
        """Re-queue it to run it again; its last state folder (when it saved one) lets it continue instead."""
        state = None
        try:
            s = settings_from_dict(job.settings)
            if self.config is not None:
                folder = self.config.resolve(s.saving.output_dir or s.saving.output_name, "outputs_dir",
                                             "saving.output_dir")
                from core.trainer import STATE_INFIX
                found = [p for p in folder.glob(f"{s.saving.output_name}*{STATE_INFIX}*") if p.is_dir()]
                state = max(found, key=lambda p: p.stat().st_mtime) if found else None
        except (SettingsError, OSError):
            pass
        if state is not None:
            return (f"Re-queue it to run it again; to continue where it was, set Saving & previews → Resume from "
                    f"state to {state} and add those settings instead.")
        return ("Re-queue it to run it again (it saved no state to resume from; Saving & previews → Save resumable "
                "state keeps one with each save).")

    def _save(self) -> None:
        atomic_write_json(self.path, {"version": 1, "paused": self.paused,
                                      "jobs": [asdict(j) for j in self._jobs]})

    def _changed(self) -> None:
        self.version += 1
        self._save()

    # -- reading --------------------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        with self._lock:
            return [Job(**asdict(j)) for j in self._jobs]

    def get(self, job_id: str) -> Job:
        with self._lock:
            return Job(**asdict(self._find(job_id)))

    def _find(self, job_id: str) -> Job:
        for j in self._jobs:
            if j.id == job_id:
                return j
        raise QueueError("That job is no longer in the queue.")

    def next_waiting(self) -> Job | None:
        with self._lock:
            return next((Job(**asdict(j)) for j in self._jobs if j.state == WAITING), None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {s: sum(1 for j in self._jobs if j.state == s) for s in STATES}

    # -- changes --------------------------------------------------------------------------------------
    def add(self, settings: Settings, label: str | None = None, source: str = "current settings") -> Job:
        """Append a waiting job; JobRefused (a SettingsError listing each problem) when Start would refuse it."""
        problems = settings_problems(settings)
        if problems:
            raise JobRefused(problems)
        with self._lock:
            return self._append(label or job_label(settings), settings.to_dict(), source)

    def requeue(self, job_id: str) -> Job:
        """A copy of a job that has run, waiting at the end (the original keeps its result)."""
        with self._lock:
            old = self._find(job_id)
            if old.state in (WAITING, RUNNING):
                raise QueueError(f"'{old.label}' is {old.state}: it runs anyway.")
            return self._append(old.label, dict(old.settings), old.source)

    def _append(self, label: str, settings: dict, source: str) -> Job:
        """A new waiting job at the end (the lock held); returns a copy."""
        job = Job(id=uuid.uuid4().hex[:10], label=label, settings=settings, source=source, added_at=time.time())
        self._jobs.append(job)
        self._changed()
        return Job(**asdict(job))

    def remove(self, job_id: str) -> Job:
        with self._lock:
            job = self._find(job_id)
            if job.state != WAITING:
                raise QueueError(f"'{job.label}' is {job.state}: only waiting jobs can be removed "
                                 "(Clear finished removes the ones that ran).")
            self._jobs.remove(job)
            self._changed()
            return job

    def move(self, job_id: str, delta: int) -> bool:
        """Swap a waiting job with the nearest waiting job above (delta -1) or below (+1): the jobs that ran
        keep their places.  False when it is already first / last."""
        with self._lock:
            job = self._find(job_id)
            if job.state != WAITING:
                raise QueueError(f"'{job.label}' is {job.state}: only waiting jobs can be moved.")
            i = self._jobs.index(job)
            others = [k for k, j in enumerate(self._jobs) if j.state == WAITING and (k - i) * delta > 0]
            if not others:
                return False
            k = min(others, key=lambda k: abs(k - i))
            self._jobs[i], self._jobs[k] = self._jobs[k], self._jobs[i]
            self._changed()
            return True

    def clear_finished(self) -> int:
        with self._lock:
            kept = [j for j in self._jobs if j.state not in FINISHED]
            n = len(self._jobs) - len(kept)
            if n:
                self._jobs = kept
                self._changed()
            return n

    def set_paused(self, paused: bool) -> None:
        with self._lock:
            if self.paused != paused:
                self.paused = paused
                self._changed()

    def mark_running(self, job_id: str) -> None:
        with self._lock:
            job = self._find(job_id)
            job.state, job.started_at, job.status = RUNNING, time.time(), "Running."
            self._changed()

    def mark_finished(self, job_id: str, state: str, status: str, *, final: str | None = None,
                      outputs: list[str] | None = None, error: str | None = None, log_lines: list[str] = (),
                      pause: bool = False) -> None:
        """Record how a job ended (and its log lines in a file of its own); ``pause`` pauses the queue."""
        log_path = None
        if log_lines:
            try:
                log_path = str(atomic_write_text(self.log_dir / f"{job_id}.log", "\n".join(log_lines) + "\n"))
            except OSError as exc:  # the result still counts; the table says why there is no log
                status += f" (log not written: {exc})"
        with self._lock:
            job = self._find(job_id)
            job.state, job.status, job.finished_at = state, status, time.time()
            job.final, job.outputs, job.error, job.log_path = final, list(outputs or []), error, log_path
            if pause:
                self.paused = True
            self._changed()


class QueueRunner:
    """Starts the queue's jobs one after another through ``controller``; a background thread calls
    :meth:`tick` every ``poll_s`` seconds (and at once after :meth:`wake`)."""

    def __init__(self, queue: JobQueue, controller: RunController, poll_s: float = 0.5):
        self.queue = queue
        self.controller = controller
        self.poll_s = poll_s
        self.current: str | None = None          # the id of the job the controller runs now
        self._tick_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._closed.clear()
            self._thread = threading.Thread(target=self._loop, name="job-queue", daemon=True)
            self._thread.start()

    def close(self, timeout: float | None = 5) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                self.tick()
            except Exception:  # a bad tick (disk full writing queue.json) must not end the queue for good
                import traceback
                traceback.print_exc()
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def resume(self) -> None:
        self.queue.set_paused(False)
        self.wake()

    def pause(self) -> None:
        self.queue.set_paused(True)

    def tick(self) -> None:
        """Record the job that ended; start the next waiting one when nothing runs and the queue is not paused."""
        with self._tick_lock:
            if self.current is not None and not self.controller.running:
                self._finish(self.current, self.controller.state.snapshot())
                self.current = None
            while not self.controller.running and not self.queue.paused:
                job = self.queue.next_waiting()
                if job is None:
                    return
                try:
                    settings = settings_from_dict(job.settings)
                    problems = settings_problems(settings)
                except SettingsError as exc:   # a setting renamed since the job was added
                    problems = [str(exc)]
                if problems:   # refused like Start refuses it; the next job may be fine
                    self.queue.mark_finished(job.id, FAILED, "Not started: " + "; ".join(problems),
                                             error="\n".join(problems))
                    continue
                from ui import warmup
                warmup.wait()
                ok, _message = self.controller.start(settings)
                if not ok:   # someone pressed Start meanwhile: this job waits for that run
                    return
                self.current = job.id
                self.queue.mark_running(job.id)
                return

    def _finish(self, job_id: str, snap: Snapshot) -> None:
        state = {"finished": DONE, "stopped": STOPPED, "failed": FAILED}.get(snap.phase, FAILED)
        status = (snap.status or "").splitlines()[0] if snap.status else ""
        if state == FAILED and not snap.error and snap.phase not in ("failed",):
            status = f"Ended without a result ({snap.phase})."
        lines = list(snap.log)
        if status and not (lines and lines[-1].endswith(status)):
            # the trainer's "done" event sets the status without a log line: the file ends with how the job ended
            lines.append(f"[{time.strftime('%H:%M:%S')}] {status}")
        self.queue.mark_finished(job_id, state, status, final=snap.final, outputs=snap.outputs,
                                 error=snap.error, log_lines=lines, pause=state == STOPPED)


# -- the table ------------------------------------------------------------------------------------------

COLUMNS = ["#", "Job", "State", "Started", "Finished", "Result", "Log"]


def _when(t: float | None) -> str:
    if not t:
        return ""
    today = time.strftime("%Y-%m-%d") == time.strftime("%Y-%m-%d", time.localtime(t))
    return time.strftime("%H:%M" if today else "%Y-%m-%d %H:%M", time.localtime(t))


def job_result(job: Job) -> str:
    if job.state == WAITING:
        return ""
    if job.state in (DONE, STOPPED) and job.final:
        return job.final if job.state == DONE else f"{job.final} ({job.status})"
    return job.error.splitlines()[0] if job.state == FAILED and job.error else job.status


def table_rows(jobs: list[Job]) -> list[list[str]]:
    return [[str(i), job.label, f"{ICONS.get(job.state, '')} {job.state}", _when(job.started_at),
             _when(job.finished_at), job_result(job), job.log_path or ""] for i, job in enumerate(jobs, 1)]


def job_choices(jobs: list[Job]) -> list[tuple[str, str]]:
    return [(f"{i}. {job.label} ({job.state})", job.id) for i, job in enumerate(jobs, 1)]


def queue_summary(queue: JobQueue) -> str:
    c = queue.counts()
    parts = [f"{c[WAITING]} waiting"] + [f"{c[s]} {s}" for s in (RUNNING, DONE, FAILED, STOPPED, INTERRUPTED)
                                          if c[s]]
    return f"Queue ({'paused' if queue.paused else 'on'}): " + ", ".join(parts)
