"""The Run tab's Queue section: wires buttons to :mod:`ui.job_queue` and shows its table.  No logic here.

The handlers are plain functions returned by :func:`wire_queue_panel` (the tests call them directly too)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from core.settings import SettingsError
from ui import presets as preset_store
from ui.job_queue import (COLUMNS, JobQueue, JobRefused, QueueError, QueueRunner, job_choices, job_label,
                          queue_summary, table_rows)


def build_queue_panel(presets_dir: Path) -> dict[str, Any]:
    """The Queue accordion (closed: Start, status and the plan stay at the top of the Run tab)."""
    q: dict[str, Any] = {}
    with gr.Accordion("Queue", open=False, elem_id="queue") as q["accordion"]:
        q["summary"] = gr.Markdown("", elem_id="queue-summary")
        with gr.Row(equal_height=True):
            q["add_current"] = gr.Button("Add current settings to queue", elem_id="queue-add-current", scale=2)
            q["preset"] = gr.Dropdown(choices=preset_store.preset_choices(presets_dir), value=None,
                                      label="Preset", elem_id="queue-preset", scale=2, min_width=200)
            q["add_preset"] = gr.Button("Add preset", elem_id="queue-add-preset", scale=1, min_width=110)
        q["notice"] = gr.Markdown("", elem_id="queue-notice")
        q["table"] = gr.Dataframe(pd.DataFrame(columns=COLUMNS), headers=COLUMNS, interactive=False, wrap=True,
                                  elem_id="queue-table", label="Jobs (click a row to choose it)",
                                  column_widths=["5%", "19%", "11%", "9%", "9%", "30%", "17%"])
        with gr.Row(equal_height=True):
            q["job"] = gr.Dropdown(choices=[], value=None, label="Job", elem_id="queue-job", scale=3,
                                   min_width=220)
            q["up"] = gr.Button("↑ Up", elem_id="queue-up", scale=0, min_width=110)
            q["down"] = gr.Button("↓ Down", elem_id="queue-down", scale=0, min_width=110)
            q["remove"] = gr.Button("Remove", elem_id="queue-remove", scale=0, min_width=110)
            q["requeue"] = gr.Button("Re-queue", elem_id="queue-requeue", scale=0, min_width=120)
        with gr.Row(equal_height=True):
            q["run"] = gr.Button("▶ Run queue", elem_id="queue-run", variant="primary", scale=1)
            q["pause"] = gr.Button("Pause queue", elem_id="queue-pause", scale=1)
            q["clear"] = gr.Button("Clear finished", elem_id="queue-clear", scale=1)
        q["seen"] = gr.State(-1)
    return q


def wire_queue_panel(demo: gr.Blocks, q: dict[str, Any], timer: gr.Timer, runner: QueueRunner,
                     names: list[str], inputs: list, presets_dir: Path) -> dict[str, Callable]:
    from ui import warmup
    from ui.app import errors_markdown, settings_error_markdown
    from ui.schema_ui import values_to_settings
    queue: JobQueue = runner.queue

    def view(selected: str | None) -> list:
        """Accordion label, summary, table, job selector, Run/Pause buttons and the version shown."""
        jobs = queue.jobs()
        ids = {j.id for j in jobs}
        waiting = sum(1 for j in jobs if j.state == "waiting")
        running = [j.label for j in jobs if j.state == "running"]
        if queue.paused:
            text = ("**Paused.** " + ("Press **Run queue** to start the waiting jobs." if waiting else
                                      "Jobs added now wait until **Run queue** is pressed."))
        else:
            text = "**On.** " + (f"Running '{running[0]}'; the next waiting job follows it." if running else
                                 "A waiting job starts whenever no run is in progress.")
        text += f"  \n⚠ {queue.problem}" if queue.problem else ""
        return [gr.update(label=queue_summary(queue)), text, pd.DataFrame(table_rows(jobs), columns=COLUMNS),
                gr.update(choices=job_choices(jobs), value=selected if selected in ids else None),
                gr.update(interactive=queue.paused), gr.update(interactive=not queue.paused), queue.version]

    outputs = [q["accordion"], q["summary"], q["table"], q["job"], q["run"], q["pause"], q["seen"]]

    def refresh(seen: int, selected: str | None) -> list:
        if seen == queue.version:
            return [gr.skip()] * len(outputs)
        return view(selected)

    def added(job, selected) -> list:
        message = f"✓ Added **{job.label}** as job {len(queue.jobs())}."
        if queue.paused:
            message += " The queue is paused: press Run queue."
        runner.wake()
        return [message] + view(job.id)

    def add_current(selected, *vals) -> list:
        warmup.wait()  # the consistency check imports the architectures
        try:
            settings = values_to_settings(dict(zip(names, vals)))
            job = queue.add(settings, source="current settings")
        except JobRefused as exc:
            return [errors_markdown("Not added: fix these settings first", exc.problems)] + view(selected)
        except SettingsError as exc:
            return [settings_error_markdown(exc, "Not added")] + view(selected)
        except OSError as exc:
            return [f"✗ The queue could not be saved: {exc}"] + view(selected)
        return added(job, selected)

    def add_preset(preset, selected) -> list:
        if not (preset or "").strip():
            return ["✗ Choose a preset to add."] + view(selected)
        warmup.wait()
        try:
            settings = preset_store.load_preset(presets_dir, preset)
            job = queue.add(settings, label=job_label(settings, preset), source=f"preset {preset}")
        except JobRefused as exc:
            return [errors_markdown(f"Preset {preset} not added: fix these settings first", exc.problems)
                    ] + view(selected)
        except SettingsError as exc:
            return [settings_error_markdown(exc, f"Preset {preset} not added")] + view(selected)
        except OSError as exc:
            return [f"✗ The queue could not be saved: {exc}"] + view(selected)
        return added(job, selected)

    def act(operation: Callable[[str], str]) -> Callable:
        def handler(selected) -> list:
            if not selected:
                return ["✗ Choose a job first (click its row)."] + view(selected)
            try:
                message = operation(selected)
            except QueueError as exc:
                return [f"✗ {exc}"] + view(selected)
            except OSError as exc:
                return [f"✗ The queue could not be saved: {exc}"] + view(selected)
            return [message] + view(selected)
        return handler

    def move(delta: int) -> Callable[[str], str]:
        def operation(job_id: str) -> str:
            label = queue.get(job_id).label
            if not queue.move(job_id, delta):
                return f"'{label}' is already the {'first' if delta < 0 else 'last'} waiting job."
            return f"✓ Moved '{label}' {'up' if delta < 0 else 'down'}."
        return operation

    def remove(job_id: str) -> str:
        return f"✓ Removed '{queue.remove(job_id).label}'."

    def requeue(job_id: str) -> str:
        job = queue.requeue(job_id)
        runner.wake()
        return f"✓ '{job.label}' is waiting again, at the end of the queue."

    def run_queue(selected) -> list:
        runner.resume()
        return ["▶ The queue runs: the next waiting job starts when no run is in progress."] + view(selected)

    def pause_queue(selected) -> list:
        runner.pause()
        return ["Paused: the running job (if any) goes on, Stop ends it; no further job starts."] + view(selected)

    def clear(selected) -> list:
        n = queue.clear_finished()
        return [f"✓ Cleared {n} finished job(s)." if n else "No finished jobs."] + view(selected)

    def choose_row(evt: gr.SelectData):
        jobs = queue.jobs()
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return jobs[row].id if isinstance(row, int) and 0 <= row < len(jobs) else gr.skip()

    with_notice = [q["notice"]] + outputs
    q["add_current"].click(add_current, inputs=[q["job"]] + inputs, outputs=with_notice)
    q["add_preset"].click(add_preset, inputs=[q["preset"], q["job"]], outputs=with_notice)
    handlers = {"add_current": add_current, "add_preset": add_preset, "up": act(move(-1)),
                "down": act(move(+1)), "remove": act(remove), "requeue": act(requeue), "run": run_queue,
                "pause": pause_queue, "clear": clear, "refresh": refresh, "view": view}
    for key in ("up", "down", "remove", "requeue", "run", "pause", "clear"):
        q[key].click(handlers[key], inputs=[q["job"]], outputs=with_notice, queue=False)
    q["table"].select(choose_row, outputs=q["job"], queue=False)
    timer.tick(refresh, inputs=[q["seen"], q["job"]], outputs=outputs, show_progress="hidden",
               concurrency_limit=None)
    demo.load(view, inputs=[q["job"]], outputs=outputs, queue=False)
    # presets saved since the page was built are listed on every load
    demo.load(lambda: gr.update(choices=preset_store.preset_choices(presets_dir)), outputs=q["preset"],
              queue=False)
    return handlers
