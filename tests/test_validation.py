"""The validation loss (dataset.validation_split, validation_seed, schedule.validate_every_n_steps): held-out images,
fixed noise levels and noise so that successive values are comparable, no effect on what is trained, the values in
the events, the result, the chart and the resumable state (tiny SD1.5 and FLUX.1)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import core
from core.dataset import DatasetError, ImageItem, split_validation
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings
from tests.tiny_models_dit import build_tiny_dit
from tests.tiny_models_dit import settings_paths as dit_paths
from ui.run_state import RunState, loss_frame


def _items(n: int, reg: int = 0) -> list[ImageItem]:
    return [ImageItem(path=Path(f"/d/{i}.png"), caption=str(i), repeats=1, width=64, height=64, is_reg=i >= n)
            for i in range(n + reg)]


def test_split_holds_out_a_share_of_the_training_images_by_seed():
    items = _items(10, reg=3)
    train, held = split_validation(items, 0.2, seed=1)
    assert len(held) == 2 and not any(i.is_reg for i in held)
    assert len(train) == 11 and not set(map(id, train)) & set(map(id, held))
    assert [i.caption for i in split_validation(items, 0.2, seed=1)[1]] == [i.caption for i in held]
    assert split_validation(items, 0.0, seed=1) == (items, [])
    assert len(split_validation(_items(3), 0.01, seed=0)[1]) == 1          # at least one
    with pytest.raises(DatasetError, match="would hold out all 1 training image"):
        split_validation(_items(1), 0.5, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    return {"data": build_tiny_dataset(root / "data", n=4), "sd15": build_tiny_sd15(root / "sd15"),
            "flux": build_tiny_dit("flux1_dev", root / "flux")}


def _run(tiny, tmp_path, arch_id="sd15", **overrides):
    paths = {"model.model_path": str(tiny["sd15"])} if arch_id == "sd15" else {**dit_paths(tiny["flux"]),
                                                                                "model.t5_max_length": 24}
    s, config = tiny_train_settings(arch_id, paths, tiny["data"], tmp_path,
                                    **{"dataset__validation_split": 0.5, "schedule__max_train_steps": 4,
                                       "dataset__enable_buckets": False, **overrides})
    events = []
    return core.train(s, on_event=events.append, config=config), events


def test_validation_every_n_steps_is_comparable_and_reported(tiny, tmp_path):
    # learning rate 0: the adapter stays as initialised, so fixed noise and levels give the same value each time
    result, events = _run(tiny, tmp_path / "a", schedule__validate_every_n_steps=2, optimizer__learning_rate=0.0)
    measured = [(e["step"], e["loss"]) for e in events if e["type"] == "validation"]
    assert [st for st, _ in measured] == [2, 4] and result.validation == measured
    assert math.isfinite(measured[0][1]) and measured[0][1] > 0 and measured[0][1] == measured[1][1]
    with safe_open(str(result.final), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "2"                 # 2 of the 4 images held out
    # trained, the value moves
    result, events = _run(tiny, tmp_path / "b", schedule__validate_every_n_steps=2, optimizer__learning_rate=5e-2)
    values = [e["loss"] for e in events if e["type"] == "validation"]
    assert len(values) == 2 and values[0] != values[1]


def test_measuring_draws_nothing_from_the_training_streams(tiny, tmp_path):
    often, _ = _run(tiny, tmp_path / "often", schedule__validate_every_n_steps=1, optimizer__learning_rate=1e-2)
    once, _ = _run(tiny, tmp_path / "once", schedule__validate_every_n_steps=0, optimizer__learning_rate=1e-2)
    assert [st for st, _ in often.validation] == [1, 2, 3, 4] and [st for st, _ in once.validation] == [2, 4]
    a, b = load_file(str(often.final)), load_file(str(once.final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_flow_matching_family_and_the_chart(tiny, tmp_path):
    result, events = _run(tiny, tmp_path, arch_id="flux1_dev", schedule__max_train_steps=2,
                          schedule__validate_every_n_steps=1)
    assert [st for st, _ in result.validation] == [1, 2] and all(math.isfinite(v) for _, v in result.validation)
    state = RunState()
    state.reset("Starting")
    for e in events:
        state.handle(e)
    frame = loss_frame(state.snapshot())
    assert sorted(set(frame["series"])) == ["loss", "smoothed", "validation"]
    assert list(frame[frame["series"] == "validation"]["step"]) == [1, 2]


def test_resume_keeps_the_validation_curve(tiny, tmp_path):
    first, _ = _run(tiny, tmp_path, schedule__max_train_steps=2, schedule__validate_every_n_steps=1,
                    saving__save_every_n_steps=2, saving__save_state=True, optimizer__learning_rate=1e-2)
    state_dir = first.state_dir
    assert state_dir is not None and [st for st, _ in first.validation] == [1, 2]
    second, events = _run(tiny, tmp_path, schedule__max_train_steps=3, schedule__validate_every_n_steps=1,
                          saving__resume_from=str(state_dir), optimizer__learning_rate=1e-2)
    assert [st for st, _ in second.validation] == [1, 2, 3] and second.validation[:2] == first.validation
    assert [e["step"] for e in events if e["type"] == "validation" and e.get("resumed")] == [1, 2]
