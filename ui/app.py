"""The web app: assembles the generated setting controls, presets and the Run tab.

Holds no training logic: Start turns the control values into the typed ``Settings`` and hands them to
``core.train`` in a worker thread (ui/run_state.py); a 1-second timer shows the events it sends.
"""
from __future__ import annotations

import contextlib
import functools
import socket
from pathlib import Path
from typing import Any

import gradio as gr

from core.config import AppConfig
from core.settings import Settings, SettingsError, check_consistency, iter_fields
from ui import presets as preset_store
from ui import warmup
from ui.job_queue import JobQueue, QueueRunner
from ui.queue_panel import build_queue_panel, wire_queue_panel
from ui.run_state import (MIN_STEP_AXIS, with_places, RunController, Snapshot, loss_axis, loss_frame, memory_text, outputs_text,
                          progress_html, run_label, samples_for_gallery, status_text)
from ui.pickers import build_dataset_preview, picker_sources, wire_dataset_preview, wire_pickers
from ui.schema_ui import (TABS, GeneratedControls, describe_error, help_more_js, render_advanced, render_section,
                          settings_to_values, values_to_settings, wire_visibility)

APP_TITLE = "Adapter Training Studio"

CSS = """
#app-header { align-items: end; }
#app-title h1 { margin: 0; font-size: 1.6rem; }
#app-hardware, #app-hardware * { color: var(--body-text-color-subdued); font-size: 0.85rem; }
#preset-bar { align-items: end; }
#preset-bar button { align-self: end; }
.refresh-btn { align-self: end; margin-bottom: 8px; }
.setting-spacer { min-height: 0 !important; }
.run-progress .bar { height: 12px; border-radius: 6px; background: var(--neutral-200); overflow: hidden; }
.dark .run-progress .bar { background: var(--neutral-700); }
.run-progress .fill { height: 100%; background: var(--color-accent); transition: width .5s; }
.run-progress.finished .fill { background: #16a34a; }
.run-progress.failed .fill { background: #dc2626; }
.run-progress.stopped .fill { background: #d97706; }
.run-progress .text { margin-top: 4px; font-variant-numeric: tabular-nums; }
#run-status { font-size: 1.05rem; }
#run-log textarea { font-family: var(--font-mono); font-size: 0.8rem; }
"""


# Keep the log scrolled to its end while new lines arrive, unless the user scrolled up to read.
FOLLOW_LOG_JS = """
() => {
  if (window.__studioFollowLog) return;
  window.__studioFollowLog = setInterval(() => {
    const t = document.querySelector('#run-log textarea');
    if (!t) return;
    if (!t.__follow) {
      t.__follow = {on: true, len: -1};
      t.addEventListener('scroll', () => {
        t.__follow.on = t.scrollHeight - t.scrollTop - t.clientHeight < 30;
      });
    }
    if (t.value.length !== t.__follow.len) {
      t.__follow.len = t.value.length;
      if (t.__follow.on) t.scrollTop = t.scrollHeight;
    }
  }, 500);
}
"""


# -- hardware (core/hardware.py is optional while it is being written) ----------------------------------

def hardware_summary() -> str:
    try:
        from core.hardware import detect_hardware
        return detect_hardware().summary()
    except Exception as exc:  # missing module or a detection failure must not stop the app
        return f"Hardware detection unavailable ({type(exc).__name__})."


def memory_use() -> dict:
    try:
        from core.hardware import current_memory_use
        return current_memory_use() or {}
    except Exception:
        return {}


# -- messages -------------------------------------------------------------------------------------------

def errors_markdown(title: str, lines: list[str]) -> str:
    """Bullet list of problems, each setting a line names followed by where its control is
    ('`network.rank` (Network → Rank (dim))')."""
    out = [f"✗ **{title}**"]
    out.extend(f"- {with_places(line.strip())}" for line in lines if line.strip())
    return "\n".join(out)


def settings_error_markdown(exc: Exception, title: str = "Cannot start") -> str:
    """A SettingsError as a list naming each field; its first line becomes the title when it is a heading."""
    lines = describe_error(exc).splitlines()
    if len(lines) > 1 and lines[0].rstrip().endswith(":"):
        return errors_markdown(lines[0].rstrip(" :"), lines[1:])
    return errors_markdown(title, lines)


# -- app ------------------------------------------------------------------------------------------------

def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
        return s.getsockname()[1]


def build_app(config: AppConfig, *, controller: RunController | None = None) -> gr.Blocks:
    controller = controller or RunController(config)
    # started by launch(): an app built only to be inspected (tests, scripts) runs no queued job
    queue_runner = QueueRunner(JobQueue.for_config(config), controller)
    presets_dir = config.path("presets_dir")
    defaults, defaults_problem = preset_store.load_defaults(config.path("training_defaults"))
    start_values = settings_to_values(defaults)
    hardware = hardware_summary()
    generated = GeneratedControls()
    pickers = picker_sources(config, defaults)

    with gr.Blocks(title=APP_TITLE, analytics_enabled=False) as demo:
        with gr.Row(elem_id="app-header", equal_height=True):
            with gr.Column(scale=3, min_width=320):
                gr.Markdown(f"# {APP_TITLE}", elem_id="app-title")
                gr.Markdown(" · ".join(hardware.splitlines()), elem_id="app-hardware")
            with gr.Column(scale=4, min_width=420):
                with gr.Row(elem_id="preset-bar", equal_height=True):
                    preset_name = gr.Dropdown(
                        choices=preset_store.preset_choices(presets_dir), value=None, allow_custom_value=True,
                        label="Preset: pick one, or type a new name", elem_id="preset-name",
                        scale=4, min_width=200)
                    preset_load = gr.Button("Load", elem_id="preset-load", scale=1, min_width=70, size="md")
                    preset_save = gr.Button("Save", elem_id="preset-save", scale=1, min_width=70, size="md")
                    preset_reset = gr.Button("Defaults", elem_id="preset-defaults", scale=1, min_width=90,
                                             size="md")
                preset_status = gr.Markdown(f"⚠ {defaults_problem}" if defaults_problem else "",
                                            elem_id="preset-status")
                with gr.Accordion("Import a kohya config", open=False, elem_id="kohya-import"):
                    with gr.Row(equal_height=True):
                        kohya_file = gr.File(label="kohya_ss GUI .json or sd-scripts .toml", type="filepath",
                                             file_types=[".json", ".toml"], elem_id="kohya-file", scale=3)
                        kohya_path = gr.Textbox(label="or its path (inside the app's folders)",
                                                elem_id="kohya-path", scale=3)
                        kohya_button = gr.Button("Import", elem_id="kohya-import-button", scale=1, min_width=90)
                    kohya_report = gr.Markdown("", elem_id="kohya-report")

        run_widgets: dict[str, Any] = {}
        queue_widgets: dict[str, Any] = {}
        with gr.Tabs(elem_id="tabs"):
            for tab_id, tab_label, sections in TABS:
                with gr.Tab(tab_label, id=tab_id, elem_id=f"tab-{tab_id}"):
                    # the Run tab: Start, status and the plan first; its settings (memory and speed, all 'auto'
                    # by default) folded away below them
                    if tab_id == "run":
                        run_widgets = _run_controls()
                        queue_widgets = build_queue_panel(presets_dir)
                    with gr.Accordion(RUN_CHOICES, open=False, elem_id="run-choices") if tab_id == "run" \
                            else contextlib.nullcontext():
                        advanced: list = []
                        for section, heading in sections:
                            if heading and len(sections) > 1:
                                gr.Markdown(f"### {heading}", elem_classes=["section-heading"])
                            render_section(section, start_values, generated, pickers=pickers,
                                           advanced_box=advanced)
                        render_advanced(advanced, start_values, generated, tab_id=tab_id, pickers=pickers)
                    if tab_id == "dataset":
                        dataset_preview = build_dataset_preview()
                    if tab_id == "run":
                        _run_results(run_widgets)
            with gr.Tab("Tools", id="tools", elem_id="tab-tools"):
                from ui.tools_tab import build_tools_tab
                build_tools_tab(config)
            with gr.Tab("Dataset tools", id="dataset-tools", elem_id="tab-dataset-tools"):
                from ui.dataset_tools_tab import build_dataset_tools_tab
                build_dataset_tools_tab(config)

        controls = generated.controls
        missing = [d for d, _ in iter_fields() if d not in controls]
        if missing:  # a section that no tab shows: a bug, never silently drop a setting
            raise RuntimeError(f"settings without a UI control (add their section to ui.schema_ui.TABS): "
                               f"{', '.join(missing)}")
        ordered = generated.ordered()
        names = [d for d, _ in ordered]
        inputs = [c for _, c in ordered]
        wire_visibility(controls, generated.groups)

        # the model, dataset and state lists; the dataset as the run will see it
        wire_pickers(demo, controls, generated.extras, config, values_to_settings_lenient)
        wire_dataset_preview(demo, dataset_preview, controls, config, values_to_settings_lenient,
                             lambda path: _allow(demo, path))

        # -- presets ------------------------------------------------------------------------------------
        def save_preset(name, *vals):
            if not (name or "").strip():
                return "✗ Type a name for the preset first.", gr.skip()
            try:
                settings = values_to_settings(dict(zip(names, vals)))
                path = preset_store.save_preset(presets_dir, name, settings)
            except SettingsError as exc:
                return settings_error_markdown(exc, "Cannot save the preset"), gr.skip()
            except OSError as exc:
                return f"✗ Could not save the preset: {exc}", gr.skip()
            return (f"✓ Saved preset **{path.stem}** ({path})",
                    gr.update(choices=preset_store.preset_choices(presets_dir), value=path.stem))

        def apply(settings: Settings, message: str):
            values = settings_to_values(settings)
            return [message] + [values[n] for n in names]

        def load_preset(name):
            if not (name or "").strip():
                return ["✗ Choose a preset to load."] + [gr.skip()] * len(names)
            try:
                settings = preset_store.load_preset(presets_dir, name)
            except SettingsError as exc:
                return [settings_error_markdown(exc, "Cannot load the preset")] + [gr.skip()] * len(names)
            return apply(settings, f"✓ Loaded preset **{name}**")

        def load_defaults():
            settings, problem = preset_store.load_defaults(config.path("training_defaults"))
            return apply(settings, f"⚠ {problem}" if problem else "✓ Defaults restored")

        def import_kohya(upload, typed, *vals):
            """Into the current settings (their architecture where the file does not say); the report lists every
            key: mapped, or why not."""
            current = values_to_settings_lenient(dict(zip(names, vals)))
            try:
                settings, report = preset_store.import_kohya_config(config, upload, typed, current)
            except SettingsError as exc:
                return [settings_error_markdown(exc, "Cannot import")] + [gr.skip()] * len(names)
            except OSError as exc:
                return [f"✗ Cannot read the file: {exc}"] + [gr.skip()] * len(names)
            return apply(settings, report.markdown())

        kohya_button.click(import_kohya, inputs=[kohya_file, kohya_path] + inputs,
                           outputs=[kohya_report] + inputs)
        preset_save.click(save_preset, inputs=[preset_name] + inputs, outputs=[preset_status, preset_name])
        preset_load.click(load_preset, inputs=[preset_name], outputs=[preset_status] + inputs)
        preset_reset.click(load_defaults, outputs=[preset_status] + inputs)

        # -- run ----------------------------------------------------------------------------------------
        w = run_widgets

        # the plan for the current values, refreshed whenever a setting it depends on changes
        plan_inputs = [d for d in names if d.split(".")[0] in PLAN_SECTIONS or d in PLAN_FIELDS]

        def show_plan(*vals):
            warmup.wait()
            return plan_markdown(values_to_settings_lenient(dict(zip(plan_inputs, vals))), config)

        plan_components = [controls[d] for d in plan_inputs]
        for component in plan_components:
            # a text field re-plans when it is left or submitted, not per keystroke (a new adapter shape
            # means a new trace of the model for the estimate)
            events = ([component.blur, component.submit] if isinstance(component, gr.Textbox)
                      else [component.change])
            for event in events:
                event(show_plan, inputs=plan_components, outputs=w["plan"], queue=False, show_progress="hidden")
        demo.load(show_plan, inputs=plan_components, outputs=w["plan"], queue=False)
        # presets saved since the page was built (another tab, before a restart) are listed on every load
        demo.load(lambda: gr.update(choices=preset_store.preset_choices(presets_dir)), outputs=preset_name,
                  queue=False)

        def start(*vals):
            if controller.running:
                return (f"✗ The run {run_label(controller.state.snapshot())} is in progress; wait for it to end or "
                        "stop it first.")
            try:
                settings = values_to_settings(dict(zip(names, vals)))
            except SettingsError as exc:
                return settings_error_markdown(exc)
            problems = check_consistency(settings)
            if problems:
                return errors_markdown("Fix these settings first", problems)
            warmup.wait()
            ok, message = controller.start(settings)
            return "" if ok else f"✗ {message}"  # started: the shared status line says so in every tab

        def ask_to_stop():
            """Stop reaches every tab's run: first say which run it is and ask."""
            label = run_label(controller.state.snapshot())
            if not controller.running:
                return gr.update(visible=False), "", "Nothing is running."
            queued = " The queue pauses after it (Run queue goes on)." if queue_runner.current else ""
            return (gr.update(visible=True), f"Stop the run {label}? It saves what was trained so far.{queued}", "")

        def stop():
            label = run_label(controller.state.snapshot())
            return gr.update(visible=False), f"■ {controller.stop()} {label}".strip()

        w["start"].click(start, inputs=inputs, outputs=w["notice"], concurrency_limit=None)
        w["stop"].click(ask_to_stop, outputs=[w["confirm_row"], w["confirm_text"], w["notice"]], queue=False)
        w["confirm"].click(stop, outputs=[w["confirm_row"], w["notice"]], queue=False)
        w["cancel"].click(lambda: gr.update(visible=False), outputs=w["confirm_row"], queue=False)

        poll_outputs = [w["status"], w["progress"], w["loss"], w["gallery"], w["log"], w["memory"],
                        w["outputs"], w["download"], w["start"], w["stop"], w["seen"]]

        def poll(seen: dict | None):
            if not controller.running:
                use = memory_use()
                if use:
                    controller.state.set_memory(use)
            snap = controller.state.snapshot()
            return _poll_updates(demo, snap, seen or {})

        w["timer"].tick(poll, inputs=[w["seen"]], outputs=poll_outputs, show_progress="hidden",
                        concurrency_limit=None)
        queue_handlers = wire_queue_panel(demo, queue_widgets, w["timer"], queue_runner, names, inputs,
                                          presets_dir)

        demo.load(None, js=FOLLOW_LOG_JS)
        demo.load(None, js=help_more_js())

    demo.studio_controls = controls          # dotted name → component (used by tests and scripts)
    demo.studio_run_widgets = w              # the Run tab's widgets by name
    demo.studio_controller = controller
    demo.studio_queue = queue_runner         # the job queue and its runner (started by launch)
    demo.studio_queue_handlers = queue_handlers
    demo.studio_groups = generated.groups    # (layout piece, fields): shown while any of its fields is
    return demo


# settings the plan and its memory estimate read: whole sections, and single fields of others
PLAN_SECTIONS = ("memory", "network", "distributed")
PLAN_FIELDS = ("model.architecture", "model.model_path", "model.config_path", "dataset.shuffle_caption",
               "dataset.resolution", "dataset.subsets", "schedule.train_batch_size", "optimizer.optimizer_type")


def values_to_settings_lenient(values: dict) -> Settings:
    """Defaults with every given value that validates: the plan preview must not fail on a half-typed field."""
    from core.settings import set_value
    settings = Settings()
    for dotted, value in values.items():
        try:
            set_value(settings, dotted, value)
        except SettingsError:
            pass
    return settings


@functools.lru_cache(maxsize=1)
def _hardware_profile():
    from core.hardware import detect_hardware
    return detect_hardware()


def _warm_plan(config: AppConfig) -> None:
    try:
        from core.settings import load_settings
        plan_markdown(load_settings(config.path("training_defaults")), config)
    except Exception:  # only a warm-up: the page computes (and reports) the plan itself
        pass


def plan_markdown(settings: Settings, config: AppConfig | None = None) -> str:
    """What the run would use on this machine (core.plan) and its memory estimate, before Start."""
    import architectures
    from core.plan import estimate_config_dir, make_plan
    config_dir = None
    if config is not None:
        try:
            config_dir = estimate_config_dir(
                config.resolve(settings.model.model_path, "models_dir", "model.model_path")
                if settings.model.model_path else None,
                config.resolve(settings.model.config_path, "models_dir", "model.config_path")
                if settings.model.config_path else None)
        except SettingsError as exc:  # a path outside the app's folders: said here, refused at Start
            return f"**Plan**  \n✗ {exc}"
    arch = architectures.get(settings.model.architecture)
    refusals = "".join(f"✗ **Cannot start**: {p}  \n" for p in arch.check_settings(settings))
    try:
        plan = make_plan(_hardware_profile(), settings, arch, config_dir)
    except ValueError as exc:
        return f"**Plan**  \n{refusals}✗ {exc}"
    lines = plan.summary().splitlines()
    head = refusals
    if plan.estimate is not None:
        where = "VRAM" if plan.device == "cuda" else "RAM"
        verdict = ("✓ fits" if plan.fits else "✗ **does not fit**: lower the resolution or batch size, or let "
                   "the memory choices below be 'auto'")
        head += f"**{where} estimate ≈ {plan.estimate.total_gb:.1f} GB of {plan.budget_gb:.1f} GB** {verdict}  \n"
    return (f"**Plan** (every 'auto' can be overridden under *{RUN_CHOICES}*)  \n" + head + lines[0] +
            "".join(f"  \n{r.strip()}" for r in lines[1:]))


#: the Run tab's folded settings (the plan text points there)
RUN_CHOICES = "Memory and speed choices (each 'auto' follows the plan)"


def _run_controls() -> dict[str, Any]:
    """The top of the Run tab: Start / Stop, this tab's notices, status and progress, the plan beside them."""
    w: dict[str, Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Row(equal_height=True):
                w["start"] = gr.Button("▶  Start training", variant="primary", elem_id="run-start", scale=2)
                w["stop"] = gr.Button("■  Stop", variant="stop", elem_id="run-stop", interactive=False, scale=1)
            # this tab's own answers (a refused Start, Stop requested): the shared status never overwrites them
            w["notice"] = gr.Markdown("", elem_id="run-notice")
            with gr.Row(visible=False, elem_id="run-stop-confirm-row") as w["confirm_row"]:
                w["confirm_text"] = gr.Markdown("", elem_id="run-stop-confirm-text")
                w["confirm"] = gr.Button("Yes, stop it", variant="stop", elem_id="run-stop-confirm", scale=0)
                w["cancel"] = gr.Button("Keep training", elem_id="run-stop-cancel", scale=0)
            w["status"] = gr.Markdown("○ Ready.", elem_id="run-status")
            w["progress"] = gr.HTML(progress_html(_idle_snapshot()), elem_id="run-progress", js_on_load=None)
        with gr.Column(scale=2):
            w["plan"] = gr.Markdown("", elem_id="run-plan")
    return w


def _run_results(w: dict[str, Any]) -> None:
    """The rest of the Run tab: loss chart, previews, log, memory in use, saved files."""
    with gr.Row():
        w["loss"] = gr.LinePlot(None, x="step", y="loss", color="series",
                                title="Loss", x_title="step", y_title="loss", height=300,
                                x_lim=[0, MIN_STEP_AXIS], x_axis_format="d",
                                elem_id="run-loss", scale=3,
                                color_map={"loss": "#94a3b8", "smoothed": "#4f46e5", "validation": "#f59e0b"})
        w["gallery"] = gr.Gallery(label="Previews (newest first)", columns=3, height=300,
                                  elem_id="run-gallery", scale=2, interactive=False, object_fit="contain")
    with gr.Row():
        w["log"] = gr.Textbox(label="Log", lines=12, max_lines=12, interactive=False, autoscroll=True,
                              elem_id="run-log", scale=3)
        with gr.Column(scale=2):
            w["memory"] = gr.Markdown(memory_text(_idle_snapshot()), elem_id="run-memory")
            w["outputs"] = gr.Markdown("No files saved yet.", elem_id="run-outputs")
            w["download"] = gr.File(label="Download the final adapter", visible=False, interactive=False,
                                    elem_id="run-download")
    w["timer"] = gr.Timer(1.0)
    w["seen"] = gr.State({})


def _idle_snapshot() -> Snapshot:
    from ui.run_state import RunState
    return RunState().snapshot()


def _allow(demo: gr.Blocks, path: str) -> None:
    """Let the page show one file the trainer wrote for display (a preview, the final adapter).  Only that
    file: the folder beside it (other runs, state folders, optimizer state) stays unreachable over HTTP."""
    file = str(Path(path).resolve())
    allowed = list(getattr(demo, "allowed_paths", None) or [])
    if file not in allowed:
        allowed.append(file)
        demo.allowed_paths = allowed


def _poll_updates(demo: gr.Blocks, s: Snapshot, seen: dict) -> list:
    """Updates for the Run widgets; parts whose version did not change are skipped."""
    v = s.versions
    running = s.running
    changed = {k for k in v if seen.get(k) != v[k]}
    skip = gr.skip

    status = status_text(s) if "status" in changed else skip()
    progress = progress_html(s) if changed & {"progress", "status", "run"} else skip()
    loss = gr.update(value=loss_frame(s), x_lim=loss_axis(s)) if "losses" in changed else skip()
    if "samples" in changed:
        items = samples_for_gallery(s)
        for p, _ in items:
            _allow(demo, p)
        gallery = items
    else:
        gallery = skip()
    log = "\n".join(s.log[-200:]) if "log" in changed else skip()
    memory = memory_text(s) if "memory" in changed else skip()
    if "outputs" in changed:
        outputs = outputs_text(s)
        if s.final and Path(s.final).is_file() and not running:
            _allow(demo, s.final)
            download = gr.update(value=s.final, visible=True)
        else:
            download = gr.update(value=None, visible=False)
    else:
        outputs = download = skip()
    if "run" in changed:
        start_btn = gr.update(interactive=not running)
        stop_btn = gr.update(interactive=running)
    else:
        start_btn = stop_btn = skip()
    return [status, progress, loss, gallery, log, memory, outputs, download, start_btn, stop_btn, dict(v)]


def launch(config: AppConfig, *, prevent_thread_lock: bool = False, quiet: bool = False) -> gr.Blocks:
    """Build and serve the app as config.json says (port 0: any free port). Returns the running Blocks."""
    demo = build_app(config)
    demo.studio_queue.start()
    port = config.port or _free_port(config.host)
    demo.queue(default_concurrency_limit=4)
    demo.launch(server_name=config.host, server_port=port, share=config.share,
                auth=list(config.auth) if config.auth else None, prevent_thread_lock=True,
                allowed_paths=[], show_error=True, quiet=quiet,
                theme=gr.themes.Soft(primary_hue="indigo"), css=CSS)
    # the first plan imports diffusers and traces the model on the meta device (seconds of CPU): started once
    # the server answers, because Gradio's launch checks that it can reach its own URL within 3 s and refuses
    # to start when not, which a 2-core machine busy with this warm-up could miss
    warmup.run_in_background(lambda: _warm_plan(config))
    if not prevent_thread_lock:
        demo.block_thread()
    return demo
