"""What the Run tab shows of a failed run: a message of several lines stays one line per problem, and errors
that say what to change (settings, dataset, model file) put no traceback in the log; a bug does."""
from __future__ import annotations

from pathlib import Path

from core.dataset import DatasetError
from core.settings import Settings, SettingsError
from ui.run_state import RunController, status_text


def _fail(tmp_path: Path, exc: BaseException):
    def train(settings, on_event=None, stop_event=None, config=None):
        raise exc
    controller = RunController(train_fn=train)
    ok, _ = controller.start(Settings())
    assert ok
    controller._thread.join(10)
    return controller.state.snapshot()


def test_a_multi_line_error_is_a_list_and_a_user_error_has_no_traceback(tmp_path):
    snap = _fail(tmp_path, SettingsError("Cannot start:\n  dataset.path: choose a folder\n  network.rank: too big"))
    text = status_text(snap)
    assert text.splitlines()[0].endswith("Failed: Cannot start:")
    assert ("- `dataset.path` (**Dataset → Image folder**): choose a folder\n"
            "- `network.rank` (**Network → Rank (dim)**): too big") in text
    snap = _fail(tmp_path, DatasetError("2 image(s) have no caption file (.txt)"))
    assert snap.error == "2 image(s) have no caption file (.txt)"
    assert not any("Traceback" in line for line in snap.log)


def test_a_bug_shows_its_type_and_logs_its_traceback(tmp_path):
    snap = _fail(tmp_path, KeyError("latents"))
    assert snap.error == "KeyError: 'latents'"
    assert any("Traceback (most recent call last)" in line for line in snap.log)
