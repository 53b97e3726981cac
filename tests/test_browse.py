"""core.browse: the dataset picker's folders, the dataset preview (counts, buckets, thumbnails in the app's own
folder) and the resume picker's states, on real folders and a real state written by a tiny training run."""
from __future__ import annotations

import os
import shutil

from PIL import Image

import core
from core.browse import dataset_folders, preview_dataset, resume_choices, resume_states
from core.config import AppConfig
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings


def _config(tmp_path) -> AppConfig:
    for name in ("datasets", "outputs", "models"):
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return AppConfig(datasets_dir=str(tmp_path / "datasets"), outputs_dir=str(tmp_path / "outputs"),
                     models_dir=str(tmp_path / "models"))


def _settings(**dataset):
    s = core.Settings()
    s.dataset.resolution, s.dataset.min_bucket_reso, s.dataset.max_bucket_reso = 64, 32, 128
    s.dataset.bucket_reso_steps, s.dataset.enable_buckets = 32, True
    for k, v in dataset.items():
        setattr(s.dataset, k, v)
    return s


def test_dataset_folders_lists_the_datasets_folder(tmp_path):
    config = _config(tmp_path)
    build_tiny_dataset(tmp_path / "datasets" / "squares", n=2)
    (tmp_path / "datasets" / "cats").mkdir()
    (tmp_path / "datasets" / ".cache").mkdir()
    (tmp_path / "datasets" / "notes.txt").write_text("x")
    assert dataset_folders(config) == ["cats", "squares"]


def test_preview_counts_buckets_and_thumbnails(tmp_path):
    config = _config(tmp_path)
    data = build_tiny_dataset(tmp_path / "datasets" / "shapes", n=5)   # 3 square, 2 tall (64 × 96 px)
    (data / "img_004.txt").unlink()
    s = _settings(path="shapes", default_caption="a shape", num_repeats=3, resolution=96)
    thumbs = tmp_path / "outputs" / ".thumbnails"
    p = preview_dataset(s, config, thumbs, per_bucket=2)
    assert not p.problem
    assert (p.images, p.captioned, p.samples_per_epoch) == (5, 4, 15)
    assert [(b.width, b.height, b.images) for b in p.buckets] == [(64, 128, 2), (96, 96, 3)]
    assert [len(b.thumbnails) for b in p.buckets] == [2, 2]
    for b in p.buckets:
        for t in b.thumbnails:
            assert t.parent == thumbs and t.suffix == ".jpg"
            with Image.open(t) as im:
                assert max(im.size) <= 160
    md = p.markdown()
    assert "**5 images**, 4 with a caption file, 1 use the default caption" in md and "| 64×128 | 2 |" in md
    assert [label for _, label in p.gallery()] == ["64×128", "64×128", "96×96", "96×96"]
    # the same image gives the same thumbnail file; a changed image a new one
    again = preview_dataset(s, config, thumbs, per_bucket=2)
    assert again.buckets[0].thumbnails == p.buckets[0].thumbnails


def test_preview_reports_what_stops_the_run(tmp_path):
    config = _config(tmp_path)
    data = build_tiny_dataset(tmp_path / "datasets" / "shapes", n=3)
    (data / "img_001.txt").unlink()
    (data / "broken.png").write_bytes(b"not an image")
    p = preview_dataset(_settings(path="shapes"), config, tmp_path / "thumbs")
    assert p.problem and "cannot be read" in p.problem and "broken.png" in p.problem
    assert "no caption file" in p.problem and "img_001.png" in p.problem
    assert p.markdown().startswith("✗ ")
    assert "does not exist" in preview_dataset(_settings(path="nothing"), config, tmp_path / "t").problem
    outside = preview_dataset(_settings(path=str(tmp_path.parent)), config, tmp_path / "t").problem
    assert "dataset.path" in outside
    assert "Image folder" in preview_dataset(_settings(path=""), config, tmp_path / "t").problem
    assert not (tmp_path / "t").exists()


def test_resume_states_newest_first_from_a_real_run(tmp_path):
    data = build_tiny_dataset(tmp_path / "data", n=2)
    model = build_tiny_sd15(tmp_path / "sd15")
    s, config = tiny_train_settings("sd15", {"model.model_path": str(model)}, data, tmp_path,
                                    schedule__max_train_steps=2, saving__save_every_n_steps=1,
                                    saving__save_state=True, saving__save_last_n=0)
    core.train(s, config=config)
    states = resume_states(s, config)
    assert [st.step for st in states] == [2, 1]
    out = config.path("outputs_dir") / s.saving.output_name
    assert all(st.path.parent == out for st in states)
    # newest first by the time the state was written, not by name
    older = states[0].path / "train_state.json"
    os.utime(older, (1_000_000_000, 1_000_000_000))
    assert [st.step for st in resume_states(s, config)] == [1, 2]
    choices = resume_choices(s, config)
    assert choices[0][0].startswith("step 1 · ") and choices[0][1] == f"{s.saving.output_name}/{states[1].path.name}"
    # what the picker offers is what the trainer resumes from
    s.saving.resume_from, s.schedule.max_train_steps = choices[0][1], 3
    result = core.train(s, config=config)
    assert result.steps == 3
    # not a state: no train_state.json, or an unreadable one
    junk = out / f"{s.saving.output_name}-state-000009"
    junk.mkdir()
    (junk / "train_state.json").write_text("{")
    shutil.copytree(states[1].path, out / "copy-without-infix")
    assert all(st.step != 9 for st in resume_states(s, config))
    assert resume_states(s, _config(tmp_path / "elsewhere")) == []
