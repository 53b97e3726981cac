"""What the page says: every setting a message names is followed by where its control is; multi-line messages
stay lines; the loss chart's step axis has whole-step ticks."""
from __future__ import annotations

import pytest

from core.settings import Settings, SettingsError, check_consistency, field_ui, iter_fields
from ui.app import errors_markdown, settings_error_markdown
from ui.run_state import MIN_STEP_AXIS, RunState, field_place, loss_axis, status_text, with_places
from ui.schema_ui import TABS


def test_every_setting_has_a_place_on_the_page():
    tab_of = {section: label for _, label, sections in TABS for section, _ in sections}
    for dotted, _ in iter_fields():
        place = field_place(dotted)
        ui = field_ui(dotted)
        assert place.startswith(tab_of[dotted.split(".")[0]] + " → ") and place.endswith(ui["label"]), dotted
        assert ("→ Advanced →" in place) == ui["advanced"], dotted
    assert field_place("memory.gradient_checkpointing") == \
        "Run → Memory and speed choices → Gradient checkpointing"


def test_with_places_names_each_setting_once_and_leaves_other_dotted_words():
    text = ("Lower dataset.resolution or `schedule.train_batch_size`; dataset.resolution again. "
            "model.safetensors and 1.5 stay")
    out = with_places(text)
    assert out.startswith("Lower `dataset.resolution` (**Dataset → Resolution**) or "
                          "`schedule.train_batch_size` (**Optimizer → Batch size**);")
    assert out.count("Dataset → Resolution") == 1 and "model.safetensors and 1.5 stay" in out


def test_refusals_name_the_place_of_every_setting():
    s = Settings()   # no dataset, no model: Start is refused
    problems = check_consistency(s)
    assert problems
    md = errors_markdown("Fix these settings first", problems)
    lines = md.splitlines()
    assert lines[0] == "✗ **Fix these settings first**" and len(lines) == len(problems) + 1
    assert "`dataset.path` (**Dataset → " in md and "`model.model_path` (**Model → " in md
    md = settings_error_markdown(SettingsError("Cannot start:\n  schedule.log_every_n_steps must be at least 1"))
    assert md.splitlines() == ["✗ **Cannot start**", "- `schedule.log_every_n_steps` "
                               "(**Optimizer → Advanced → Report loss every N steps**) must be at least 1"]


def test_a_failed_run_shows_its_message_as_lines_with_places():
    state = RunState()
    state.reset("Starting", run_name="demo")
    state.finish(error=SettingsError("Cannot start:\n  network.ti_token: no caption has it\n  other problem"))
    text = status_text(state.snapshot())
    first, _, rest = text.partition("\n\n")
    assert first.startswith("✗ ") and "Failed: Cannot start:" in first
    assert rest.splitlines() == ["- `network.ti_token` (**Network → Token**): no caption has it", "- other problem"]


@pytest.mark.parametrize("steps, last", [(0, 0), (2, 2), (10, 10), (1000, 1000)])
def test_the_loss_axis_is_at_least_as_many_steps_wide_as_a_chart_has_ticks(steps, last):
    state = RunState()
    state.reset("Training")
    state.handle({"type": "progress", "step": steps, "total_steps": steps,
                  "step_losses": [(i, 1.0) for i in range(1, steps + 1)]})
    lo, hi = loss_axis(state.snapshot())
    assert lo == 0 and hi == max(last, MIN_STEP_AXIS)
