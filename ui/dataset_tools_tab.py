"""The Dataset tools tab: a caption editor (gallery of a dataset folder's images with their captions, edit one,
add / remove / replace a tag in all of them) and captioning with a local BLIP or Florence-2 model.

No logic here: every button calls ``core.captions`` / ``core.captioner`` and shows its result or its error as
text (never a traceback).  The handlers are plain functions that tests and scripts can call directly; every
path the user gives stays inside the app's folders (``AppConfig.resolve``)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import gradio as gr

from core import captioner as captioner_mod
from core import captions
from core.browse import dataset_folders
from core.config import AppConfig
from ui import warmup

TAG_OPERATIONS = ("add", "remove", "replace")


def _error(e: BaseException) -> str:
    return f"✗ {e}" if str(e) else f"✗ Error: {type(e).__name__}"


def _md(text: str) -> str:
    """Plain text for a gr.Markdown: its line breaks kept, nothing in it (file names, tags, "<CAPTION>") read as
    markup."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = re.sub(r"([\\`*_\[\]#|~])", r"\\\1", text)
    return text.replace("\n", "  \n")


def thumbnails_dir(config: AppConfig) -> Path:
    """Where the gallery's small copies of the images go (shared with the Dataset tab's preview)."""
    return config.path("outputs_dir") / ".thumbnails"


def load_folder_handler(folder: str, config: AppConfig) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(status, gallery items, image names relative to the folder) for the chosen dataset folder."""
    try:
        view = captions.folder_view(captions.open_folder(config, folder), thumbnails_dir(config))
    except Exception as e:  # shown as text in the UI, never as a traceback
        return _error(e), [], []
    return ("⚠ " if view.problems else "") + view.summary(), view.gallery, view.names


def select_handler(folder: str, name: str, config: AppConfig) -> tuple[str, str]:
    """(caption text, status) of image ``name`` (relative to the folder)."""
    try:
        image = captions.image_in_folder(captions.open_folder(config, folder), name)
        return captions.read_caption(image), f"Editing the caption of {name}."
    except Exception as e:
        return "", _error(e)


def save_caption_handler(folder: str, name: str, text: str, config: AppConfig) -> str:
    try:
        image = captions.image_in_folder(captions.open_folder(config, folder), name)
        path = captions.write_caption(image, text)
    except Exception as e:
        return _error(e)
    return f"✓ Saved {path.name}."


def tag_handler(folder: str, operation: str, tags: str, replacement: str, position: str,
                config: AppConfig) -> str:
    """Add (at ``position``), remove or replace (with ``replacement``) tags in every caption of the folder."""
    try:
        root = captions.open_folder(config, folder)
        if operation == "add":
            report = captions.bulk_add(root, tags, position)
        elif operation == "remove":
            report = captions.bulk_remove(root, tags)
        elif operation == "replace":
            report = captions.bulk_replace(root, tags, replacement)
        else:
            raise ValueError(f"unknown tag operation {operation!r}; use one of {', '.join(TAG_OPERATIONS)}")
    except Exception as e:
        return _error(e)
    return report.message()


def captioner_choices(config: AppConfig) -> list[tuple[str, str]]:
    return captioner_mod.find_captioners(config.path("models_dir"))


def caption_handler(folder: str, model: str, prefix: str, max_new_tokens, batch_size, overwrite: bool,
                    task: str, config: AppConfig,
                    progress: Callable[[int, int], None] | None = None) -> str:
    """Caption the folder's images with the model folder ``model`` (a name in the models folder, or a path
    inside the app's folders); the summary, or what is wrong."""
    try:
        text = (model or "").strip().strip('"')
        if not text:
            raise captioner_mod.CaptionerError("Choose a captioning model first (a BLIP or Florence-2 folder in "
                                               f"{config.path('models_dir')}).")
        model_dir = config.resolve(text, "models_dir", "Captioning model")
        captioner_mod.captioner_kind(model_dir)  # before waiting for anything: a wrong folder is told at once
        root = captions.open_folder(config, folder)
        try:
            tokens, batch = int(float(max_new_tokens)), int(float(batch_size))
        except (TypeError, ValueError, OverflowError):
            raise captioner_mod.CaptionerError("Max new tokens and batch size must be whole numbers.") from None
        warmup.wait()  # loads transformers: not while the start-up warm-up imports it
        summary = captioner_mod.caption_folder(root, model_dir, prefix=prefix or "", max_new_tokens=tokens,
                                               batch_size=batch, overwrite=bool(overwrite),
                                               task=task or captioner_mod.DEFAULT_TASK, progress=progress)
    except Exception as e:
        return _error(e)
    return ("⚠ " if summary.failed else "✓ ") + summary.text()[:1].upper() + summary.text()[1:]


def build_dataset_tools_tab(config: AppConfig) -> None:
    """Renders the tab's contents (call inside a ``gr.Tab``)."""
    from gradio.context import Context
    demo = Context.root_block  # the Blocks being built: lets the page show the thumbnails

    def allow(items: list[tuple[str, str]]) -> None:
        if demo is None:
            return
        from ui.app import _allow
        for path, _ in items:
            _allow(demo, path)

    text = dict(lines=1, max_lines=1)
    folders = dataset_folders(config)

    gr.Markdown(f"Dataset folders are those in {config.path('datasets_dir')} (or type a path inside the app's "
                "folders). Captions are the .txt files beside the images.")
    with gr.Row(equal_height=True):
        folder = gr.Dropdown(folders, value=folders[0] if folders else None, allow_custom_value=True,
                             label="Dataset folder", elem_id="dtools-folder", scale=4)
        refresh = gr.Button("↻", elem_id="dtools-refresh", scale=0, min_width=50, elem_classes=["refresh-btn"])
        load = gr.Button("Load", elem_id="dtools-load", scale=0, min_width=90)
    status = gr.Markdown("", elem_id="dtools-status")
    names = gr.State([])

    gr.Markdown("### Captions")
    gallery = gr.Gallery(label="Images (select one to edit its caption)", columns=6, height=420,
                         elem_id="dtools-gallery", allow_preview=False, object_fit="contain")
    with gr.Row(equal_height=True):
        selected = gr.Textbox(label="Selected image", interactive=False, elem_id="dtools-selected", scale=1,
                              **text)
        caption = gr.Textbox(label="Caption", lines=3, elem_id="dtools-caption", scale=4)
        save = gr.Button("Save caption", elem_id="dtools-save", scale=0, min_width=120)
    save_status = gr.Markdown("", elem_id="dtools-save-status")

    gr.Markdown("### Tags in every caption of the folder")
    with gr.Row(equal_height=True):
        tags = gr.Textbox(label="Tag(s), comma-separated", elem_id="dtools-tags", scale=3, **text)
        replacement = gr.Textbox(label="Replace with (for Replace)", elem_id="dtools-replacement", scale=3, **text)
        position = gr.Radio(list(captions.POSITIONS), value="end", label="Add at", elem_id="dtools-position")
    with gr.Row():
        add_btn = gr.Button("Add", elem_id="dtools-add")
        remove_btn = gr.Button("Remove", elem_id="dtools-remove")
        replace_btn = gr.Button("Replace", elem_id="dtools-replace")
    tag_status = gr.Markdown("", elem_id="dtools-tag-status")

    gr.Markdown("### Caption the images with a local model")
    gr.Markdown(f"A BLIP or Florence-2 (transformers-native) model folder in {config.path('models_dir')}. "
                "Nothing is downloaded.")
    models = captioner_choices(config)
    with gr.Row(equal_height=True):
        model = gr.Dropdown(models, value=models[0][1] if models else None, allow_custom_value=True,
                            label="Captioning model", elem_id="dtools-model", scale=4)
        model_refresh = gr.Button("↻", elem_id="dtools-model-refresh", scale=0, min_width=50,
                                  elem_classes=["refresh-btn"])
        task = gr.Dropdown(list(captioner_mod.FLORENCE_TASKS), value=captioner_mod.DEFAULT_TASK,
                           label="Florence-2 task", elem_id="dtools-task", scale=2)
    with gr.Row(equal_height=True):
        prefix = gr.Textbox(label="Prefix (e.g. a trigger word)", elem_id="dtools-prefix", scale=3, **text)
        max_tokens = gr.Number(value=128, precision=0, minimum=1, maximum=captioner_mod.MAX_NEW_TOKENS,
                               label="Max new tokens", elem_id="dtools-max-tokens")
        batch = gr.Number(value=4, precision=0, minimum=1, maximum=captioner_mod.MAX_BATCH, label="Batch size",
                          elem_id="dtools-batch")
        overwrite = gr.Checkbox(value=False, label="Overwrite existing captions", elem_id="dtools-overwrite")
    run = gr.Button("Caption images", variant="primary", elem_id="dtools-caption-run")
    run_status = gr.Markdown("", elem_id="dtools-caption-status")

    # -- wiring ------------------------------------------------------------------------------------------------
    def show(folder_value):
        msg, items, found = load_folder_handler(folder_value, config)
        allow(items)
        return _md(msg), items, found, "", "", ""

    shown = [status, gallery, names, selected, caption, save_status]
    load.click(show, [folder], shown)
    folder.change(show, [folder], shown)  # also a typed path, once entered

    def refresh_folders(current):
        choices = dataset_folders(config)
        return gr.update(choices=choices, value=current)
    refresh.click(refresh_folders, [folder], folder, queue=False, show_progress="hidden")
    def refresh_models(current):
        return gr.update(choices=captioner_choices(config), value=current)
    model_refresh.click(refresh_models, [model], model, queue=False, show_progress="hidden")
    if demo is not None:  # lists read again on every page load: folders copied in while the app runs show up
        demo.load(refresh_folders, [folder], folder, queue=False, show_progress="hidden")
        demo.load(refresh_models, [model], model, queue=False, show_progress="hidden")

    def pick(folder_value, found, evt: gr.SelectData):
        index = evt.index if isinstance(evt.index, int) else (evt.index or [0])[0]
        if not isinstance(index, int) or not 0 <= index < len(found):
            return "", "", "✗ Load the folder again and select the image."
        text_value, msg = select_handler(folder_value, found[index], config)
        return found[index], text_value, _md(msg)
    gallery.select(pick, [folder, names], [selected, caption, save_status])

    def save_and_show(folder_value, name, text_value):
        msg = save_caption_handler(folder_value, name, text_value, config)
        if not msg.startswith("✓"):
            return _md(msg), gr.skip(), gr.skip()
        _, items, found = load_folder_handler(folder_value, config)
        allow(items)
        return _md(msg), items, found
    save.click(save_and_show, [folder, selected, caption], [save_status, gallery, names])

    def tags_and_show(operation):
        def go(folder_value, tag_text, replacement_text, where):
            msg = tag_handler(folder_value, operation, tag_text, replacement_text, where, config)
            if not msg.startswith("✓"):
                return _md(msg), gr.skip(), gr.skip(), gr.skip()
            listing, items, found = load_folder_handler(folder_value, config)
            allow(items)
            return _md(msg), _md(listing), items, found
        return go
    tag_inputs = [folder, tags, replacement, position]
    tag_outputs = [tag_status, status, gallery, names]
    add_btn.click(tags_and_show("add"), tag_inputs, tag_outputs)
    remove_btn.click(tags_and_show("remove"), tag_inputs, tag_outputs)
    replace_btn.click(tags_and_show("replace"), tag_inputs, tag_outputs)

    def caption_all(folder_value, model_value, prefix_value, tokens, batch_value, overwrite_value, task_value,
                    progress=gr.Progress()):
        def report(done: int, total: int) -> None:
            progress((done, total), desc="Captioning", unit="images")
        msg = caption_handler(folder_value, model_value, prefix_value, tokens, batch_value, overwrite_value,
                              task_value, config, progress=report)
        listing, items, found = load_folder_handler(folder_value, config)
        allow(items)
        return _md(msg), _md(listing), items, found
    run.click(caption_all, [folder, model, prefix, max_tokens, batch, overwrite, task],
              [run_status, status, gallery, names])


__all__ = ["build_dataset_tools_tab", "load_folder_handler", "select_handler", "save_caption_handler",
           "tag_handler", "caption_handler", "captioner_choices", "thumbnails_dir"]
