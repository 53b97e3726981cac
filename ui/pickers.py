"""The pickers of the generated settings (models, datasets, resumable states) and the Dataset tab's preview.

No logic here: the lists and the preview come from ``core.browse`` / ``ui.schema_ui.list_models``; this file
wires them to the controls.  Lists are read again on every page load and with each ↻ button, so a model or a
dataset copied in while the app runs shows up without a restart; the resume list follows the output name.
"""
from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from core.browse import dataset_folders, preview_dataset, resume_choices
from core.config import AppConfig
from core.settings import SettingsError, field_ui
from ui.schema_ui import list_models

#: what the resume list depends on: the run's output folder
STATE_INPUTS = ("saving.output_name", "saving.output_dir")


def picker_sources(config: AppConfig, settings) -> dict[str, Callable[[], list]]:
    """Widget kind → its choices when the page is built (``settings``: the values it starts with)."""
    return {"model": lambda: list_models(config.path("models_dir")),
            "dataset": lambda: dataset_folders(config),
            "state": lambda: resume_choices(settings, config)}


def wire_pickers(demo: gr.Blocks, controls: dict[str, Any], extras: dict[str, Any], config: AppConfig,
                 lenient_settings: Callable[[dict], Any]) -> None:
    """↻ buttons, page loads and (for states) output-name changes refresh each picker's choices."""
    state_inputs = [controls[d] for d in STATE_INPUTS]

    def states(*vals):
        return gr.update(choices=resume_choices(lenient_settings(dict(zip(STATE_INPUTS, vals))), config))

    plain = {"model": lambda: list_models(config.path("models_dir")), "dataset": lambda: dataset_folders(config)}
    for dotted, control in controls.items():
        widget = field_ui(dotted)["widget"]
        button = extras.get(f"refresh:{dotted}")
        if widget == "state":
            events = [demo.load] + ([button.click] if button else []) + [c.blur for c in state_inputs] + \
                [c.submit for c in state_inputs]
            for event in events:
                event(states, inputs=state_inputs, outputs=control, queue=False, show_progress="hidden")
        elif widget in plain:
            fn = plain[widget]
            for event in [demo.load] + ([button.click] if button else []):
                event(lambda fn=fn: gr.update(choices=fn()), outputs=control, queue=False, show_progress="hidden")


def build_dataset_preview() -> dict[str, Any]:
    """The Dataset tab's check of the chosen folders: counts, the bucket table and a few images per bucket."""
    with gr.Accordion("What the run will see", open=True, elem_id="dataset-preview"):
        with gr.Row(equal_height=True):
            summary = gr.Markdown("Choose the image folder to see its images, captions and buckets.",
                                  elem_id="dataset-summary")
            check = gr.Button("↻ Check", size="md", scale=0, min_width=110, elem_id="dataset-check")
        gallery = gr.Gallery(label="A few images of each bucket", columns=8, height=220, elem_id="dataset-gallery",
                             show_label=True, allow_preview=True, object_fit="contain", visible=False)
    return {"summary": summary, "check": check, "gallery": gallery}


def wire_dataset_preview(demo: gr.Blocks, widgets: dict[str, Any], controls: dict[str, Any], config: AppConfig,
                         lenient_settings: Callable[[dict], Any], allow: Callable[[str], None]) -> None:
    """Re-check when a dataset setting changes (a text field when it is left), with ↻ and on page load."""
    names = [d for d in controls if d.startswith("dataset.")]
    inputs = [controls[d] for d in names]
    thumbnails = config.path("outputs_dir") / ".thumbnails"

    def show(*vals):
        try:
            settings = lenient_settings(dict(zip(names, vals)))
        except SettingsError as exc:
            return f"✗ {exc}", gr.update(value=[], visible=False)
        preview = preview_dataset(settings, config, thumbnails)
        shown = preview.gallery()
        for path, _ in shown:
            allow(path)
        return preview.markdown(), gr.update(value=shown, visible=bool(shown))

    outputs = [widgets["summary"], widgets["gallery"]]
    events = [demo.load, widgets["check"].click]
    for d, c in zip(names, inputs):
        events += [c.blur, c.submit] if isinstance(c, gr.Textbox) else [c.change]
    for event in events:
        event(show, inputs=inputs, outputs=outputs, show_progress="hidden")
