"""The run's logs (core.run_log): a training run writes TensorBoard event files that TensorBoard's own reader loads,
with the loss of every reported step, the learning rate and the previews; no logs when asked for none; W&B is
refused before anything loads when its package is missing."""
from __future__ import annotations

import importlib.util

import pytest

import core
from core.run_log import log_problems
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_log")
    return build_tiny_dataset(root / "data", n=2), build_tiny_sd15(root / "sd15")


def _settings(tiny, tmp_path, **overrides):
    data, model = tiny
    return tiny_train_settings("sd15", {"model.model_path": str(model)}, data, tmp_path,
                               **{"schedule__max_train_steps": 3, **overrides})


def test_a_run_writes_tensorboard_logs_that_tensorboard_reads(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    s, config = _settings(tiny, tmp_path, sampling__sample_every_n_steps=3, sampling__prompts="a red square",
                          sampling__steps=2)
    events = []
    result = core.train(s, on_event=events.append, config=config)
    runs = list((result.final.parent / "logs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("tiny_sd15-")
    acc = EventAccumulator(str(runs[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    progress = [e for e in events if e["type"] == "progress"]
    losses = acc.Scalars("loss/current")
    assert [x.step for x in losses] == [e["step"] for e in progress] == [1, 2, 3]
    assert [x.value for x in losses] == pytest.approx([e["loss"] for e in progress])
    assert [x.value for x in acc.Scalars("lr/group0")] == pytest.approx([e["lr"] for e in progress])
    assert len(acc.Scalars("loss/smoothed")) == 3 and acc.Tags()["images"] == ["preview/0"]
    assert acc.Images("preview/0")[0].step == 3 and acc.Images("preview/0")[0].width == 64
    assert "settings/text_summary" in acc.Tags()["tensors"]


def test_no_logs_when_asked_for_none(tiny, tmp_path):
    s, config = _settings(tiny, tmp_path, saving__log_with="none", schedule__max_train_steps=1)
    result = core.train(s, config=config)
    assert not (result.final.parent / "logs").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_its_package_is_refused_before_anything_loads(tiny, tmp_path):
    assert any("wandb package is not installed" in p for p in log_problems("all"))
    s, config = _settings(tiny, tmp_path, saving__log_with="wandb")
    events = []
    with pytest.raises(core.SettingsError, match="wandb package is not installed"):
        core.train(s, on_event=events.append, config=config)
    assert not any(e["type"] == "status" for e in events)   # refused before reading the dataset
    assert not (tmp_path / "outputs").exists()


def test_every_step_is_plotted_from_the_first_with_one_report_per_interval(tiny, tmp_path):
    """Report every 3 steps (one device read each): the chart and the logs still get the loss of each step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ui.run_state import RunState, loss_frame, progress_html
    s, config = _settings(tiny, tmp_path, schedule__log_every_n_steps=3, schedule__max_train_steps=4)
    events = []
    result = core.train(s, on_event=events.append, config=config)
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == [3, 4]                      # the last step reports too
    assert [st for st, _ in progress[0]["step_losses"]] == [1, 2, 3] and [st for st, _ in progress[1]["step_losses"]] == [4]
    assert progress[0]["loss"] == pytest.approx(sum(v for _, v in progress[0]["step_losses"]) / 3)
    state = RunState()
    state.reset("Starting")
    for e in events:
        state.handle(e)
    snap = state.snapshot()
    assert [st for st, _ in snap.losses] == [1, 2, 3, 4]
    assert list(loss_frame(snap)["step"])[:4] == [1, 2, 3, 4]
    assert f"loss {snap.losses[-1][1]:.4g}" in progress_html(snap)
    acc = EventAccumulator(str(next((result.final.parent / "logs").iterdir())), size_guidance={"scalars": 0})
    acc.Reload()
    assert [x.step for x in acc.Scalars("loss/current")] == [1, 2, 3, 4]
