"""The UI is generated from the settings schema and stays in sync with it.

- every schema field has exactly one control, with the stable elem_id ``setting-<section>-<name>``;
- every control's value round-trips into the typed settings (through the component's own pre/postprocess);
- training.json holds exactly the schema's keys and defaults;
- show_if visibility: the function the UI uses agrees with ``Settings.applies`` and is wired live;
- Start/presets report invalid settings by field name, never with a traceback.
"""
from __future__ import annotations

import itertools
import json
import threading
from collections import Counter
from pathlib import Path
from typing import get_args

import gradio as gr
import pytest

from core.config import AppConfig
from core.settings import (Settings, SettingsError, SubsetSettings, default_training_json, field_range, field_ui,
                           iter_fields, save_settings)
from ui.app import build_app
from ui.run_state import RunController, RunState
from ui.schema_ui import (PICKERS, SettingsTable, dotted_from_elem_id, elem_id, field_visible, governing_fields,
                          help_more, settings_to_values, split_help, values_to_settings, visible_fields)

ROOT = Path(__file__).resolve().parent.parent
FIELDS = dict(iter_fields())


def _config(tmp_path: Path, **kw) -> AppConfig:
    for d in ("models", "datasets", "outputs", "presets"):
        (tmp_path / d).mkdir(exist_ok=True)
    return AppConfig(models_dir=str(tmp_path / "models"), datasets_dir=str(tmp_path / "datasets"),
                     outputs_dir=str(tmp_path / "outputs"), presets_dir=str(tmp_path / "presets"), **kw)


@pytest.fixture
def app(tmp_path):
    config = _config(tmp_path)
    demo = build_app(config)
    return demo, config


def setting_components(demo: gr.Blocks) -> dict[str, list]:
    found: dict[str, list] = {}
    for block in demo.blocks.values():
        eid = getattr(block, "elem_id", None)
        dotted = dotted_from_elem_id(eid) if isinstance(eid, str) else None
        if dotted:
            found.setdefault(dotted, []).append(block)
    return found


def handler(demo: gr.Blocks, elem: str, event: str):
    """The BlockFunction triggered by ``event`` on the component with elem_id ``elem``."""
    ids = {b._id for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem}
    fns = [f for f in demo.fns.values() if any(t[0] in ids and t[1] == event for t in f.targets)
           # the Run tab's plan and the Dataset tab's preview listen to many settings; each is tested on its own
           and not all(getattr(o, "elem_id", None) in ("run-plan", "dataset-summary", "dataset-gallery")
                       for o in f.outputs)]
    assert len(fns) == 1, f"expected one {event} handler on #{elem}, found {len(fns)}"
    return fns[0]


def roundtrip(component, value):
    """What a function receives from this component after it displayed ``value`` (server → page → server)."""
    return component.preprocess(component.postprocess(value))


# a non-default value of every field of a table's item (a list-of-objects setting)
TABLE_ITEMS = {SubsetSettings: {"image_dir": "portraits", "num_repeats": 7, "caption_extension": ".caption",
                                "keep_tokens": 2, "shuffle_caption": False, "flip_aug": True,
                                "caption_dropout_rate": 0.25, "is_reg": True, "resolution": 768}}


def other_value(dotted: str, info):
    """A valid value different from the default, of the field's type."""
    ui = field_ui(dotted)
    default = info.default
    if ui["choices"]:
        others = [c for c in ui["choices"] if c != default]
        return others[-1] if others else default
    if info.annotation is bool:
        return not default
    if ui["widget"] == "table":   # an object setting every field, and one leaving the optional ones unset
        item = get_args(info.annotation)[0]
        full = TABLE_ITEMS[item]
        assert set(full) == set(item.model_fields), f"give every field of {item.__name__} a value in TABLE_ITEMS"
        assert all(full[name] != f.default for name, f in item.model_fields.items()), item
        return [item(**full), item(**{k: v for k, v in full.items() if item.model_fields[k].is_required()})]
    lo, hi = field_range(info)
    if info.annotation is int:
        cand = (lo or 0) + (ui["step"] or 1) * 2
        return int(min(cand, hi) if hi is not None else cand) if cand != default else int(cand + (ui["step"] or 1))
    if info.annotation is float:
        cand = 0.25 if (lo is not None and hi is not None and hi <= 1) else 0.0125
        return cand if cand != default else cand * 2
    return f"value for {dotted}"


# -- one control per field ------------------------------------------------------------------------------

def test_every_field_has_exactly_one_control(app):
    demo, _ = app
    found = setting_components(demo)
    counts = Counter({d: len(v) for d, v in found.items()})
    missing = [d for d in FIELDS if d not in found]
    assert not missing, f"schema fields without a UI control: {missing}"
    dupes = [d for d, n in counts.items() if n != 1]
    assert not dupes, f"fields with more than one control: {dupes}"
    unknown = [d for d in found if d not in FIELDS]
    assert not unknown, f"controls named like settings that are not in the schema: {unknown}"
    assert demo.studio_controls.keys() == FIELDS.keys()
    for dotted, comps in found.items():
        assert comps[0] is demo.studio_controls[dotted]
        assert comps[0].elem_id == elem_id(dotted)


def test_control_kind_follows_the_declaration(app):
    demo, config = app
    for dotted, info in FIELDS.items():
        comp = demo.studio_controls[dotted]
        ui = field_ui(dotted)
        assert comp.label == ui["label"], dotted
        if ui["widget"] == "table":   # a list of objects: one column per field of the item, help above it
            item = get_args(info.annotation)[0]
            assert isinstance(comp, SettingsTable) and comp.headers == list(item.model_fields), dotted
            assert comp.interactive and comp.type == "array", dotted
            section, name = dotted.split(".")
            help_md = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == f"help-{section}-{name}"]
            assert len(help_md) == 1 and help_md[0].value == ui["help"], dotted
            continue
        if ui["help"]:   # the first sentence on the control, the rest behind "more" (help_more_js)
            short, rest = split_help(ui["help"])
            assert short in (comp.info or "") and help_more().get(comp.elem_id, "") == rest, dotted
            assert (short + " " + rest).strip() == ui["help"].strip(), dotted
        lo, hi = field_range(info)
        if ui["widget"] in PICKERS:
            assert isinstance(comp, gr.Dropdown) and comp.allow_custom_value, dotted
        elif ui["widget"] == "textarea":
            assert isinstance(comp, gr.Textbox) and comp.lines > 1, dotted
        elif ui["widget"] == "path":
            assert isinstance(comp, gr.Textbox), dotted
        elif ui["choices"]:
            assert isinstance(comp, (gr.Dropdown, gr.Radio)), dotted
            assert [c[1] for c in comp.choices] == list(ui["choices"]), dotted
        elif info.annotation is bool:
            assert isinstance(comp, gr.Checkbox), dotted
        elif info.annotation in (int, float):
            assert isinstance(comp, (gr.Number, gr.Slider)), dotted
            assert (comp.minimum, comp.maximum) == (lo, hi), dotted
            if info.annotation is int:
                assert comp.precision == 0, dotted
        else:
            assert isinstance(comp, gr.Textbox), dotted


def test_advanced_fields_sit_in_a_closed_advanced_accordion(app):
    demo, _ = app
    parent_of = {}
    for block in demo.blocks.values():
        for child in getattr(block, "children", []) or []:
            parent_of[child._id] = block

    def in_advanced(comp):
        b = parent_of.get(comp._id)
        while b is not None:
            if isinstance(b, gr.Accordion) and b.label == "Advanced":
                assert b.open is False
                return True
            b = parent_of.get(b._id)
        return False

    for dotted in FIELDS:
        assert in_advanced(demo.studio_controls[dotted]) == field_ui(dotted)["advanced"], dotted


# -- values ---------------------------------------------------------------------------------------------

def test_controls_start_with_the_training_defaults(tmp_path):
    defaults = Settings()
    defaults.network.rank = 8
    defaults.optimizer.lr_scheduler = "cosine_with_restarts"
    save_settings(defaults, tmp_path / "mine.json")
    demo = build_app(_config(tmp_path, training_defaults=str(tmp_path / "mine.json")))
    values = {d: c.preprocess(c.value) for d, c in demo.studio_controls.items()}
    assert values_to_settings(values) == defaults
    assert demo.studio_controls["optimizer.lr_scheduler_num_cycles"].visible is True


def test_every_control_value_round_trips_into_settings(app):
    demo, _ = app
    expected = Settings()
    values = {}
    for dotted, info in FIELDS.items():
        comp = demo.studio_controls[dotted]
        new = other_value(dotted, info)
        values[dotted] = roundtrip(comp, new)
        section, name = dotted.split(".")
        setattr(getattr(expected, section), name, new)
    got = values_to_settings(values)
    assert got == expected
    for dotted, info in FIELDS.items():   # and every one really differs from the default
        if field_ui(dotted)["choices"] and len(field_ui(dotted)["choices"]) == 1:
            continue
        assert got.get(dotted) != info.default, dotted
    # settings → controls → settings is the identity as well
    shown = settings_to_values(got)
    assert values_to_settings({d: roundtrip(demo.studio_controls[d], v) for d, v in shown.items()}) == got


REGENERATE = ("training.json is generated from the schema; regenerate it: "
              ".venv/bin/python -c \"import core.settings as s; s.write_training_json()\"")


def test_training_json_is_exactly_the_schema_defaults():
    data = json.loads(default_training_json().read_text(encoding="utf-8"))
    schema_keys = {}
    for dotted in FIELDS:
        section, name = dotted.split(".")
        schema_keys.setdefault(section, []).append(name)
    assert list(data) == list(schema_keys), f"sections differ from the schema. {REGENERATE}"
    for section, names in schema_keys.items():
        assert list(data[section]) == names, f"keys of {section} differ from the schema. {REGENERATE}"
    assert data == Settings().to_dict(), f"values differ from the schema defaults. {REGENERATE}"
    assert (ROOT / "training.json") == default_training_json()


# -- visibility -----------------------------------------------------------------------------------------

def _governing_values(governing: str) -> list:
    info = FIELDS[governing]
    ui = field_ui(governing)
    if ui["choices"]:
        return list(ui["choices"])
    if info.annotation is bool:
        return [True, False]
    raise AssertionError(f"show_if on {governing}: only choice and bool fields can govern visibility")


def test_visibility_matches_settings_applies():
    """For every field with show_if, every combination of its governing values: the UI's visibility rule
    equals Settings.applies (the rule the trainer uses)."""
    assert governing_fields(), "the schema has show_if conditions"
    for dotted in FIELDS:
        conditions = field_ui(dotted)["show_if"]
        if not conditions:
            continue
        governing = sorted(conditions)
        for combo in itertools.product(*(_governing_values(g) for g in governing)):
            s = Settings()
            for g, value in zip(governing, combo):
                section, name = g.split(".")
                setattr(getattr(s, section), name, value)
            vis = visible_fields(settings_to_values(s))
            assert vis[dotted] == s.applies(dotted), (dotted, combo)
            assert vis[dotted] == all(v in conditions[g] for g, v in zip(governing, combo)), (dotted, combo)
            for other in FIELDS:   # and nothing else disagrees under these values either
                assert vis[other] == s.applies(other), (other, combo)


def test_visibility_examples():
    assert field_visible("optimizer.lr_scheduler_num_cycles", {"optimizer.lr_scheduler": "cosine_with_restarts"})
    assert not field_visible("optimizer.lr_scheduler_num_cycles", {"optimizer.lr_scheduler": "cosine"})
    assert not field_visible("dataset.min_bucket_reso", {"dataset.enable_buckets": False})
    assert field_visible("dataset.resolution", {})


def test_visibility_is_wired_live(app):
    demo, _ = app
    controls = demo.studio_controls
    defaults = settings_to_values(Settings())
    fields_of = {c._id: [d] for d, c in controls.items()}            # a control: its own field
    fields_of.update({comp._id: fields for comp, fields in demo.studio_groups})  # rows, refresh buttons

    def shown(fields, values):
        return any(field_visible(f, values) for f in fields)

    for dotted, comp in controls.items():
        assert comp.visible == field_visible(dotted, defaults), dotted
    for comp, fields in demo.studio_groups:
        assert comp.visible == shown(fields, defaults), fields
    for governing, dependents in governing_fields().items():
        fn = handler(demo, elem_id(governing), "change")
        out_ids = {c._id for c in fn.outputs}
        assert {controls[d]._id for d in dependents} <= out_ids
        # every row/button holding a dependent is updated too, so no empty row stays behind
        assert {comp._id for comp, fields in demo.studio_groups if set(fields) & set(dependents)} <= out_ids
        input_names = [dotted_from_elem_id(c.elem_id) for c in fn.inputs]
        for value in _governing_values(governing):
            current = dict(defaults, **{governing: value})
            updates = fn.fn(*[current[n] for n in input_names])
            for comp, upd in zip(fn.outputs, updates):
                assert upd["visible"] == shown(fields_of[comp._id], current), (governing, value, comp)


# -- presets and start ----------------------------------------------------------------------------------

def _ordered_inputs(fn):
    return [dotted_from_elem_id(c.elem_id) for c in fn.inputs]


def test_presets_save_and_load_through_the_app(app):
    demo, config = app
    save = handler(demo, "preset-save", "click")
    load = handler(demo, "preset-load", "click")
    values = settings_to_values(Settings())
    values["network.rank"] = 32
    values["dataset.path"] = "my_images"
    names = _ordered_inputs(save)[1:]
    status, dropdown = save.fn("portrait v1", *[values[n] for n in names])
    assert "Saved" in status and dropdown["value"] == "portrait v1"
    assert ("portrait v1", "portrait v1") in dropdown["choices"]
    assert (config.path("presets_dir") / "portrait v1.json").is_file()

    out = load.fn("portrait v1")
    loaded = dict(zip([dotted_from_elem_id(c.elem_id) for c in load.outputs[1:]], out[1:]))
    assert "Loaded" in out[0]
    assert loaded["network.rank"] == 32 and loaded["dataset.path"] == "my_images"


def test_the_preset_list_holds_the_examples_and_is_read_again_on_every_page_load(app):
    from ui.presets import EXAMPLES
    demo, config = app
    refresh = [f for f in demo.fns.values() if any(t[1] == "load" for t in f.targets)
               and [getattr(o, "elem_id", None) for o in f.outputs] == ["preset-name"]]
    assert len(refresh) == 1
    (config.path("presets_dir") / "made elsewhere.json").write_text(json.dumps(Settings().to_dict()))
    choices = refresh[0].fn()["choices"]
    shipped = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    assert choices[0] == ("made elsewhere", "made elsewhere")       # saved in another tab: listed on reload
    assert [c for c in choices if c[0].endswith(" (example)")] == [(f"{n} (example)", n) for n in shipped]
    out = handler(demo, "preset-load", "click").fn("sd15_lora")       # a shipped example loads by its name
    assert out[0] == "✓ Loaded preset **sd15_lora**"


def test_loading_an_invalid_preset_names_the_fields(app):
    demo, config = app
    (config.path("presets_dir") / "broken.json").write_text(json.dumps(
        {"network": {"rank": 0}, "optimizer": {"optimizer_type": "Adam9"}, "dataset": {"pathh": "x"}}))
    out = handler(demo, "preset-load", "click").fn("broken")
    msg = out[0]
    assert "network.rank" in msg and "optimizer.optimizer_type" in msg and "dataset.pathh" in msg
    assert "Traceback" not in msg
    assert all(o == gr.skip() for o in out[1:]), "an invalid preset must leave the controls unchanged"


def test_start_reports_invalid_settings_by_field(app):
    demo, _ = app
    start = handler(demo, "run-start", "click")
    names = _ordered_inputs(start)
    values = settings_to_values(Settings())
    values["network.rank"] = 0
    values["schedule.train_batch_size"] = None           # an emptied number box
    msg = start.fn(*[values[n] for n in names])
    assert "network.rank" in msg and "Network" in msg and "schedule.train_batch_size" in msg
    assert "Traceback" not in msg
    values = settings_to_values(Settings())              # valid but incomplete: consistency check
    msg = start.fn(*[values[n] for n in names])
    assert "dataset.path" in msg and "model.model_path" in msg
    assert not demo.studio_controller.running


# -- run state ------------------------------------------------------------------------------------------

def test_run_state_follows_trainer_events(tmp_path):
    st = RunState()
    st.reset("Starting")
    img = tmp_path / "s.png"
    img.write_bytes(b"png")
    for ev in [{"type": "status", "message": "Loading"},
               {"type": "progress", "step": 1, "total_steps": 4, "epoch": 1, "total_epochs": 1, "loss": 0.5,
                "lr": 1e-4, "elapsed_s": 1.0, "eta_s": 3.0, "it_per_s": 1.0, "vram_gb": 1.5, "ram_gb": 3.0},
               {"type": "sample", "step": 2, "paths": [str(img)], "prompts": ["a cat"]},
               {"type": "saved", "step": 4, "path": str(tmp_path / "a.safetensors"), "kind": "adapter"},
               {"type": "saved", "step": 4, "path": str(tmp_path / "state-4"), "kind": "state"},
               {"type": "done", "outputs": [str(tmp_path / "a.safetensors")],
                "final": str(tmp_path / "a.safetensors"), "stopped": False, "peak_vram_gb": 2.0}]:
        st.handle(ev)
    s = st.snapshot()
    assert (s.step, s.total_steps, s.phase) == (1, 4, "finished")
    assert s.losses == [(1, 0.5)] and s.samples == [(str(img), "step 2: a cat")]
    assert s.outputs == [str(tmp_path / "a.safetensors")] and s.final == str(tmp_path / "a.safetensors")
    assert s.peak_vram_gb == 2.0
    assert any("Loading" in line for line in s.log)


def test_controller_runs_one_at_a_time_stops_and_reports_errors():
    started = threading.Event()

    def slow_train(settings, on_event=None, stop_event=None, config=None):
        on_event({"type": "status", "message": "Training"})
        started.set()
        stop_event.wait(10)
        on_event({"type": "done", "outputs": [], "final": None, "stopped": stop_event.is_set()})

    c = RunController(train_fn=slow_train)
    assert c.start(Settings())[0]
    assert started.wait(5)
    ok, msg = c.start(Settings())
    assert not ok and "already" in msg
    c.stop()
    assert c.wait(10)
    assert c.state.snapshot().phase == "stopped"

    def failing_train(settings, on_event=None, stop_event=None, config=None):
        raise SettingsError("model.model_path: not a diffusers folder or .safetensors file")

    c = RunController(train_fn=failing_train)
    c.start(Settings())
    assert c.wait(10)
    s = c.state.snapshot()
    assert s.phase == "failed" and "model.model_path" in s.status and "Traceback" not in s.status


def test_model_dropdown_lists_the_models_folder(tmp_path):
    from ui.schema_ui import list_models
    models = tmp_path / "models"
    (models / "my-sd15" / "unet").mkdir(parents=True)
    (models / "my-sd15" / "model_index.json").write_text("{}")
    (models / "my-sd15" / "unet" / "config.json").write_text("{}")
    (models / "my-sd15" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (models / "dreamshaper.safetensors").write_bytes(b"x")
    (models / "sdxl").mkdir()
    (models / "sdxl" / "juggernaut.safetensors").write_bytes(b"x")
    (models / "notes.txt").write_text("x")
    assert list_models(models) == ["dreamshaper.safetensors", "my-sd15", "sdxl/juggernaut.safetensors"]
    demo = build_app(_config(tmp_path))
    comp = demo.studio_controls["model.model_path"]
    assert [c[1] for c in comp.choices] == list_models(models)
    refresh = handler(demo, "refresh-model-model_path", "click")
    (models / "new.safetensors").write_bytes(b"x")
    assert "new.safetensors" in [c if isinstance(c, str) else c[1] for c in refresh.fn()["choices"]]


def test_every_section_is_on_exactly_one_tab():
    from core.settings import SECTIONS
    from ui.schema_ui import TABS
    placed = Counter(section for _, _, sections in TABS for section, _ in sections)
    assert set(placed) == set(SECTIONS) and all(n == 1 for n in placed.values()), placed


def test_run_tab_shows_the_plan_for_the_current_values():
    """The plan shown before Start is core.plan's, and follows the memory overrides."""
    from core.settings import Settings
    from ui.app import plan_markdown, values_to_settings_lenient

    auto = plan_markdown(Settings())
    assert auto.startswith("**Plan**") and "precision" in auto and "gradient checkpointing" in auto
    forced = plan_markdown(values_to_settings_lenient({"memory.gradient_checkpointing": "on",
                                                      "network.rank": "not a number"}))
    assert "gradient checkpointing on" in forced
    conflict = plan_markdown(values_to_settings_lenient({"memory.cache_text_encoder_outputs": "on",
                                                        "dataset.shuffle_caption": True}))
    assert "✗" in conflict and "shuffled" in conflict


def test_the_subsets_table_reads_what_the_page_sends(app):
    """Cells come back as the page holds them: numbers, texts for the optional checkboxes, empty cells (unset) and
    an added but untouched row (dropped)."""
    from gradio.components.dataframe import DataframeData
    demo, _ = app
    table = demo.studio_controls["dataset.subsets"]
    row = {h: "" for h in table.headers} | {"is_reg": False}
    sent = DataframeData(headers=table.headers, data=[
        [v for v in (row | {"image_dir": "faces", "num_repeats": 4.0, "shuffle_caption": "true",
                            "caption_dropout_rate": 0.1}).values()],
        [v for v in (row | {"image_dir": "cls", "is_reg": True, "resolution": "768"}).values()],
        list(row.values())])
    values = settings_to_values(Settings()) | {"dataset.subsets": table.preprocess(sent)}
    assert values_to_settings(values).dataset.subsets == [
        SubsetSettings(image_dir="faces", num_repeats=4, shuffle_caption=True, caption_dropout_rate=0.1),
        SubsetSettings(image_dir="cls", is_reg=True, resolution=768)]
    bad = DataframeData(headers=table.headers, data=[list((row | {"image_dir": "x", "num_repeats": 0}).values())])
    start = handler(demo, "run-start", "click")
    names = _ordered_inputs(start)
    msg = start.fn(*[(values | {"dataset.subsets": table.preprocess(bad)})[n] for n in names])
    assert "dataset.subsets" in msg and "num_repeats" in msg and "Traceback" not in msg


def test_a_kohya_config_is_imported_into_the_current_settings(app):
    demo, config = app
    importer = handler(demo, "kohya-import-button", "click")
    names = _ordered_inputs(importer)[2:]
    values = settings_to_values(Settings()) | {"model.architecture": "sdxl", "sampling.prompts": "kept"}
    (config.path("presets_dir") / "job.toml").write_text('network_dim = 12\noptimizer_type = "CAME"\n'
                                                        'resolution = "768,768"\n', encoding="utf-8")
    out = importer.fn(None, "job.toml", *[values[n] for n in names])
    shown = dict(zip([dotted_from_elem_id(c.elem_id) for c in importer.outputs[1:]], out[1:]))
    assert shown["network.rank"] == 12 and shown["dataset.resolution"] == 768
    assert shown["model.architecture"] == "sdxl" and shown["sampling.prompts"] == "kept"   # the rest stays
    assert "`network_dim` | `network.rank`" in out[0] and "CAME" in out[0]
    (config.path("presets_dir") / "junk.txt").write_text("[not toml", encoding="utf-8")
    for typed, expected in (("junk.txt", "neither a kohya_ss GUI config"), ("/etc/passwd", "outside the folders"),
                            ("", "Upload a kohya_ss GUI config")):
        out = importer.fn(None, typed, *[values[n] for n in names])
        assert expected in out[0] and "Traceback" not in out[0], typed
        assert all(o == gr.skip() for o in out[1:]), "a failed import leaves the controls unchanged"


@pytest.mark.parametrize("text,short,rest", [
    ("One sentence only.", "One sentence only.", ""),
    ("Keep e.g. this part together. And the rest of a long help text that goes on for a while.",
     "Keep e.g. this part together.", "And the rest of a long help text that goes on for a while."),
    ("Short. Tail that is long enough to be hidden behind the more link.", "Short. Tail that is long enough to be "
     "hidden behind the more link.", ""),   # a first sentence too short to stand alone
    ("A first sentence of some length. Tiny tail.", "A first sentence of some length. Tiny tail.", ""),
    ("Scale 0.5 means half the size. Then a remainder of at least forty characters.",
     "Scale 0.5 means half the size.",
     "Then a remainder of at least forty characters."),
])
def test_split_help(text, short, rest):
    assert split_help(text) == (short, rest)
