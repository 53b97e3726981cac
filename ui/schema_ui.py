"""Settings schema → Gradio controls.

Nothing here knows about individual settings: every control is generated from a field declaration in
``core.settings`` (its type, default, ge/le range and the ``json_schema_extra["ui"]`` metadata).  A field
added to the schema gets a control automatically; ``tests/test_ui_sync.py`` fails if one is missing.

Conventions:
- every control has ``elem_id = "setting-<section>-<name>"`` (see :func:`elem_id`);
- ``widget``: "textarea" → multi-line Textbox, "path" → Textbox, a picker ("model", "dataset", "state") →
  Dropdown of what the app's folders hold, with a refresh button (custom values allowed), "table" → a :class:`SettingsTable` for a list of objects (one row each, its help
  in a Markdown above), otherwise the type decides: Literal choices → Radio (≤ 3 short choices) or
  Dropdown, bool → Checkbox, float in 0…1 → Slider, int/float → Number with the field's range;
- ``advanced`` fields go into a closed "Advanced" accordion of their tab;
- ``show_if`` fields are hidden, live, while their condition does not hold (:func:`visible_fields`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, get_args, get_origin

import gradio as gr
from gradio.components.dataframe import DataframeData
from pydantic import BaseModel

from core.settings import (Settings, SettingsError, field_range, field_ui, iter_fields, settings_from_dict,
                           show_conditions)

# Which settings sections each tab shows, with a heading per section (None: no heading).
# The Run tab also holds the run controls (see ui/app.py).
TABS: list[tuple[str, str, list[tuple[str, str | None]]]] = [
    # (tab id, tab label, [(section, heading)])
    ("dataset", "Dataset", [("dataset", None)]),
    ("model", "Model", [("model", None)]),
    ("network", "Network", [("network", None)]),
    ("optimizer", "Optimizer", [("optimizer", "Optimizer"), ("schedule", "Steps & schedule")]),
    ("output", "Saving & previews", [("saving", "Saving"), ("sampling", "Preview images")]),
    ("run", "Run", [("memory", "Memory & speed"), ("distributed", "Several GPUs")]),
]

#: widgets that pick from what the app's folders hold: the models, the datasets, a run's resumable states
PICKERS = ("model", "dataset", "state")
WIDE_WIDGETS = {"textarea", "path", "table", *PICKERS}
CONTROLS_PER_ROW = 3


def elem_id(dotted: str) -> str:
    section, name = dotted.split(".")
    return f"setting-{section}-{name}"


def dotted_from_elem_id(eid: str) -> str | None:
    if not eid or not eid.startswith("setting-"):
        return None
    section, _, name = eid[len("setting-"):].partition("-")
    return f"{section}.{name}"


def field_infos() -> dict[str, Any]:
    return dict(iter_fields())


def _annotation_kind(info) -> str:
    ann = info.annotation
    if get_origin(ann) is list:
        return "list"
    if ann is bool:
        return "bool"
    if ann is int:
        return "int"
    if ann is float:
        return "float"
    return "str"


# -- visibility (show_if) -------------------------------------------------------------------------------

def governing_fields() -> dict[str, list[str]]:
    """governing field → the fields whose show_if names it."""
    out: dict[str, list[str]] = {}
    for dotted, _ in iter_fields():
        for other in dict.fromkeys(k for c in show_conditions(field_ui(dotted)) for k in c):
            out.setdefault(other, []).append(dotted)
    return out


def field_visible(dotted: str, values: Mapping[str, Any]) -> bool:
    """Whether a control is shown for the current (possibly not yet valid) control values.

    Same rule as ``Settings.applies``: every condition of one of its show_if sets holds.  A governing value that
    is missing from ``values`` counts as not matching.
    """
    return any(all(values.get(other) in allowed for other, allowed in conditions.items())
               for conditions in show_conditions(field_ui(dotted)))


def visible_fields(values: Mapping[str, Any]) -> dict[str, bool]:
    """dotted name → visible, for every field, from control values keyed by dotted name."""
    return {dotted: field_visible(dotted, values) for dotted, _ in iter_fields()}


# -- values: controls ↔ settings ------------------------------------------------------------------------

def settings_to_values(settings: Settings) -> dict[str, Any]:
    """dotted name → the value its control shows."""
    return {dotted: settings.get(dotted) for dotted, _ in iter_fields()}


def values_to_dict(values: Mapping[str, Any]) -> dict:
    """Control values keyed by dotted name → the nested dict ``settings_from_dict`` takes.

    Only what a control hands back differently from the schema's types is normalised here (an emptied
    text box gives None → ""; a whole float from a Number stays a number).  Everything else, ranges
    included, is validated by the schema, so errors name the field.
    """
    infos = field_infos()
    data: dict[str, dict] = {}
    for dotted, value in values.items():
        section, name = dotted.split(".")
        kind = _annotation_kind(infos[dotted])
        if kind == "str" and value is None:
            value = ""
        elif kind == "list" and value is None:
            value = []
        elif kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        data.setdefault(section, {})[name] = value
    return data


def values_to_settings(values: Mapping[str, Any]) -> Settings:
    """Raises SettingsError (naming each bad field) when a value is invalid."""
    return settings_from_dict(values_to_dict(values))


# -- model folder ---------------------------------------------------------------------------------------

def list_models(models_dir: Path) -> list[str]:
    """Base models in the models folder, as paths relative to it: diffusers folders (with model_index.json)
    and .safetensors checkpoints, up to two levels deep."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    found: set[str] = set()
    for depth_glob in ("*", "*/*"):
        for p in models_dir.glob(depth_glob):
            if p.name.startswith("."):
                continue
            if p.is_dir() and (p / "model_index.json").is_file():
                found.add(p.relative_to(models_dir).as_posix())
            elif p.is_file() and p.suffix.lower() == ".safetensors":
                rel = p.relative_to(models_dir)
                # skip files that are part of a diffusers folder (unet/diffusion_pytorch_model.safetensors)
                if not (p.parent / "config.json").exists() and not (p.parent.parent / "model_index.json").exists():
                    found.add(rel.as_posix())
    return sorted(found, key=str.lower)


# -- generation -----------------------------------------------------------------------------------------

class FieldNumber(gr.Number):
    """A Number that leaves range checking to the settings schema, so that an out-of-range value is reported
    with the field's name instead of Gradio's anonymous "Value 0 is less than minimum value 1"."""
    is_template = True

    def preprocess(self, payload):
        if payload is None:
            return None
        return self.round_to_precision(payload, self.precision)


def _column_type(annotation) -> str:
    """A table column's Dataframe datatype.  A bool that may be unset is a text column (empty, true or false):
    a checkbox cannot show "unset"."""
    if annotation is bool:
        return "bool"
    return "number" if set(get_args(annotation) or [annotation]) - {type(None)} <= {int, float} else "str"


def _blank(cell) -> bool:
    return cell is None or (isinstance(cell, str) and not cell.strip()) or (isinstance(cell, float)
                                                                            and math.isnan(cell))


class SettingsTable(gr.Dataframe):
    """A list-of-objects setting as a table: one row per object, one column per field of the item model, headed
    by the field's name (the names of sd-scripts' dataset config).  Shows a list of models or dicts; hands back a
    list of dicts without the empty cells (an unset option) and empty rows (nothing but unticked boxes, as a
    newly added row).  Converting and checking the cells
    is left to the settings schema, so an error names the field."""
    is_template = True

    def postprocess(self, value):
        rows = [item.model_dump() if isinstance(item, BaseModel) else dict(item) for item in value or []]
        return super().postprocess([["" if row.get(h) is None else row[h] for h in self.headers] for row in rows])

    def preprocess(self, payload):
        if isinstance(payload, dict):  # the page's JSON (also the component's initial ``value``)
            payload = DataframeData.model_validate(payload)
        headers = payload.headers or self.headers
        rows = [{h: cell for h, cell in zip(headers, row) if not _blank(cell)} for row in super().preprocess(payload)]
        return [row for row in rows if any(cell is not False for cell in row.values())]


def _float_step(default: float) -> float:
    if default and default > 0:
        return min(1.0, 10 ** math.floor(math.log10(default)))
    return 0.01


def _range_text(lo, hi, kind: str) -> str:
    def fmt(v):
        if v is None:
            return ""
        if kind == "int" or float(v).is_integer():
            v = int(v)
            return f"{v:,}".replace(",", " ") if abs(v) >= 100000 else str(v)
        return f"{v:g}"
    if lo is None and hi is None:
        return ""
    return f"{fmt(lo)} … {fmt(hi)}"


_ABBREVIATIONS = ("e.g", "i.e", "etc", "vs", "approx")


def split_help(text: str, min_short: int = 25, min_rest: int = 40) -> tuple[str, str]:
    """(first sentence, the rest) of a help text: the control shows the first sentence, the rest is behind
    "more".  Short help (or a short remainder) stays whole."""
    text = (text or "").strip()
    start = 0
    while True:
        i = text.find(". ", start)
        if i < 0:
            return text, ""
        word = text[:i].rsplit(" ", 1)[-1].lower()
        if i + 1 >= min_short and word not in _ABBREVIATIONS and not word[-1:].isdigit():
            rest = text[i + 2:].strip()
            return (text[:i + 1], rest) if len(rest) >= min_rest else (text, "")
        start = i + 2


def help_more() -> dict[str, str]:
    """elem_id → the help that is behind "more" for every setting whose help is longer than a sentence."""
    out = {}
    for dotted, _ in iter_fields():
        _, rest = split_help(field_ui(dotted)["help"])
        if rest:
            out[elem_id(dotted)] = rest
    return out


# Adds a "more" link after the first sentence of each long help text; it shows the rest in place.  Controls
# appear in the page when first shown (a tab, a setting that applies): a MutationObserver catches those.
HELP_MORE_JS = """
() => {
  const more = %s;
  const apply = () => {
    for (const [id, rest] of Object.entries(more)) {
      const box = document.getElementById(id);
      if (!box || box.__helpMore) continue;
      const info = [...box.querySelectorAll('span, div, p')].find(
        e => e.children.length === 0 && e.textContent.trim().length > 0 && e.textContent.trim().endsWith('…'));
      if (!info) continue;
      box.__helpMore = true;
      const base = info.textContent;
      const a = document.createElement('a');
      a.textContent = ' more';
      a.href = '#';
      a.className = 'help-more';
      a.addEventListener('click', ev => {
        ev.preventDefault(); ev.stopPropagation();
        info.textContent = base.replace(/ …$/, ' ' + rest);
      }, {once: true});
      info.appendChild(a);
    }
  };
  apply();
  new MutationObserver(apply).observe(document.body, {childList: true, subtree: true});
}
"""


def help_more_js() -> str:
    import json
    return HELP_MORE_JS % json.dumps(help_more(), ensure_ascii=False)


def make_control(dotted: str, info, value: Any, *, visible: bool = True,
                 options: Iterable = ()) -> gr.components.Component:
    """One control for one schema field (not yet wired to anything)."""
    ui = field_ui(dotted)
    kind = _annotation_kind(info)
    lo, hi = field_range(info)
    label = ui["label"]
    short, rest = split_help(ui["help"])
    help_text = (short + (" …" if rest else "")) or None
    common = dict(label=label, elem_id=elem_id(dotted), visible=visible, elem_classes=["setting"])
    widget = ui["widget"]
    choices = ui["choices"]

    if widget in PICKERS:  # ``options``: names, or (label, value) pairs
        return gr.Dropdown(choices=list(options), value=value, allow_custom_value=True, filterable=True,
                           info=help_text, scale=8, **common)
    if widget == "table":
        item_fields = get_args(info.annotation)[0].model_fields
        return SettingsTable(value=value, headers=list(item_fields), type="array", interactive=True,
                             datatype=[_column_type(f.annotation) for f in item_fields.values()],
                             show_row_numbers=True, **common)
    if widget in ("textarea", "path") or (kind == "str" and not choices):
        lines = 4 if widget == "textarea" else 1
        return gr.Textbox(value=value, lines=lines, max_lines=12 if lines > 1 else 1, info=help_text,
                          placeholder=_placeholder(dotted, widget), **common)
    if choices and ui.get("choice_labels"):
        # (label, value) pairs: the user reads "Stable Diffusion XL", the settings hold "sdxl"
        pairs = [(ui["choice_labels"].get(c, str(c)), c) for c in choices]
        return gr.Dropdown(choices=pairs, value=value, info=help_text, filterable=False, **common)
    if choices:
        short = len(choices) <= 3 and all(len(str(c)) <= 12 for c in choices)
        if short:
            return gr.Radio(choices=list(choices), value=value, info=help_text, **common)
        return gr.Dropdown(choices=list(choices), value=value, info=help_text, filterable=False, **common)
    if kind == "bool":
        return gr.Checkbox(value=value, info=help_text, **common)
    if kind == "float" and lo == 0.0 and hi == 1.0:
        return gr.Slider(minimum=0.0, maximum=1.0, step=ui["step"] or 0.01, value=value, info=help_text,
                         **common)
    rng = _range_text(lo, hi, kind)
    info_text = " ".join(t for t in (short, f"({rng})" if rng else "", "…" if rest else "") if t) or None
    if kind == "int":
        return FieldNumber(value=value, precision=0, minimum=lo, maximum=hi, step=ui["step"] or 1,
                           info=info_text, **common)
    return FieldNumber(value=value, minimum=lo, maximum=hi, step=ui["step"] or _float_step(info.default),
                       info=info_text, **common)


def _placeholder(dotted: str, widget: str | None) -> str | None:
    if widget == "textarea":
        return "one per line"
    if widget == "path":
        return "/path/to/folder"
    return None


@dataclass
class GeneratedControls:
    """What :func:`render_section` produced: controls keyed by dotted name, in schema order."""
    controls: dict[str, gr.components.Component] = field(default_factory=dict)
    extras: dict[str, gr.components.Component] = field(default_factory=dict)   # e.g. refresh buttons
    # Layout pieces shown while any of their fields is shown (rows, a model field's refresh button), so a
    # hidden option leaves no empty row behind.
    groups: list[tuple[Any, list[str]]] = field(default_factory=list)

    def ordered(self) -> list[tuple[str, gr.components.Component]]:
        order = [d for d, _ in iter_fields()]
        return sorted(self.controls.items(), key=lambda kv: order.index(kv[0]))


def _layout(fields: list[tuple[str, Any]], values: Mapping[str, Any], visible: Mapping[str, bool],
            out: GeneratedControls, pickers: Mapping[str, Callable[[], list]]) -> None:
    """Lay fields out: wide widgets on their own row, the rest packed a few per row."""
    row: list[tuple[str, Any]] = []

    def flush():
        if not row:
            return
        names = [d for d, _ in row]
        with gr.Row(equal_height=False, visible=any(visible[d] for d in names)) as r:
            for d, inf in row:
                out.controls[d] = make_control(d, inf, values[d], visible=visible[d])
            for _ in range(CONTROLS_PER_ROW - len(row)):   # keep column widths equal across rows
                gr.Column(min_width=160, elem_classes=["setting-spacer"])
        out.groups.append((r, names))
        row.clear()

    for dotted, info in fields:
        widget = field_ui(dotted)["widget"]
        if widget in WIDE_WIDGETS:
            flush()
            section, name = dotted.split(".")
            if widget == "table":  # a Dataframe shows no help text of its own
                help_text = gr.Markdown(field_ui(dotted)["help"], visible=visible[dotted],
                                        elem_id=f"help-{section}-{name}")
                out.groups.append((help_text, [dotted]))
            with gr.Row(equal_height=False, visible=visible[dotted]) as r:
                options = pickers[widget]() if widget in pickers else ()
                out.controls[dotted] = make_control(dotted, info, values[dotted], visible=visible[dotted],
                                                    options=options)
                if widget in PICKERS:
                    button = gr.Button("↻ Refresh", size="md", scale=0, min_width=110, visible=visible[dotted],
                                       elem_id=f"refresh-{section}-{name}", elem_classes=["refresh-btn"])
                    out.extras[f"refresh:{dotted}"] = button
                    out.groups.append((button, [dotted]))
            out.groups.append((r, [dotted]))
        else:
            row.append((dotted, info))
            if len(row) == CONTROLS_PER_ROW:
                flush()
    flush()


def render_section(section: str, values: Mapping[str, Any], out: GeneratedControls, *,
                   pickers: Mapping[str, Callable[[], list]] | None = None, advanced_box: list | None = None
                   ) -> None:
    """Render the basic fields of a section here; its advanced fields are collected into ``advanced_box``
    (rendered later, in the tab's Advanced accordion) or rendered here when no box is given."""
    fields = [(d, inf) for d, inf in iter_fields() if d.split(".")[0] == section]
    visible = visible_fields(values)
    basic = [(d, inf) for d, inf in fields if not field_ui(d)["advanced"]]
    advanced = [(d, inf) for d, inf in fields if field_ui(d)["advanced"]]
    _layout(basic, values, visible, out, pickers or {})
    if advanced_box is None:
        _layout(advanced, values, visible, out, pickers or {})
    else:
        advanced_box.extend(advanced)


def render_advanced(fields: list[tuple[str, Any]], values: Mapping[str, Any], out: GeneratedControls, *,
                    tab_id: str, pickers: Mapping[str, Callable[[], list]] | None = None) -> None:
    if not fields:
        return
    with gr.Accordion("Advanced", open=False, elem_id=f"advanced-{tab_id}"):
        _layout(fields, values, visible_fields(values), out, pickers or {})


def wire_visibility(controls: Mapping[str, gr.components.Component],
                    groups: Iterable[tuple[Any, list[str]]] = ()) -> list:
    """Hide/show dependent controls whenever a governing value changes (also when a preset is loaded).

    ``groups`` are (layout piece, fields) pairs shown while any of their fields is shown.  Returns, per
    governing field, the (component, fields) targets it updates (for tests)."""
    groups = list(groups)
    wired = []
    for governing, dependents in governing_fields().items():
        targets = [(controls[d], [d]) for d in dependents]
        targets += [(comp, fields) for comp, fields in groups if any(f in dependents for f in fields)]
        names = sorted({g for _, fields in targets for f in fields for c in show_conditions(field_ui(f)) for g in c})
        inputs = [controls[n] for n in names]

        def update(*vals, _names=names, _targets=targets):
            current = dict(zip(_names, vals))
            return [gr.update(visible=any(field_visible(f, current) for f in fields)) for _, fields in _targets]

        controls[governing].change(update, inputs=inputs, outputs=[comp for comp, _ in targets],
                                   queue=False, show_progress="hidden")
        wired.append((governing, targets))
    return wired


def describe_error(exc: Exception) -> str:
    if isinstance(exc, SettingsError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
