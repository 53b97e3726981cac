"""Datasets of several subsets (dataset.subsets, like sd-scripts' [[datasets.subsets]]): each folder scanned and
trained with its own repeats, caption handling, flip and resolution; regularization subsets weighted by the prior
loss weight; an empty list is the single-folder dataset of before."""
from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

import core
from core.config import AppConfig, PathNotAllowed
from core.dataset import (Augment, BucketBatchSampler, DatasetError, LatentCache, TrainingDataset, assign_buckets,
                          fill_cache, scan_dataset, scan_folders)
from core.plan import text_cache_blockers
from core.settings import DatasetSettings, Settings, SubsetSettings, check_consistency
from tests.test_dataset import CountingEncoder, make_image
from tests.test_dreambooth import record_batches
from tests.test_train_e2e import make_settings
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15


def dataset(**kw) -> DatasetSettings:
    base = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=256, bucket_reso_steps=32)
    return DatasetSettings(**(base | kw))


def folders_of(ds: DatasetSettings, root: Path) -> list:
    """The folders as the trainer resolves them: relative paths inside ``root`` (the datasets folder)."""
    config = AppConfig(datasets_dir=str(root))
    return [(f, config.resolve(f.path, "datasets_dir", f.setting)) for f in ds.folders()]


def folder_of(item, root: Path) -> str:
    return item.path.relative_to(root).parts[0]


@pytest.fixture
def four_folders(tmp_path):
    """main (dataset.path), faces (own repeats, shuffle with keep tokens, flip; an N_name subfolder), drop
    (caption dropout 1, its own caption extension) and reg (regularization subset)."""
    for i in range(2):
        make_image(tmp_path / "main" / f"m{i}.png", 64, 64, "main, a, b, c")
    for i in range(2):
        make_image(tmp_path / "faces" / f"f{i}.png", 64, 64, "faces, x, y, z, w")
    make_image(tmp_path / "faces" / "5_close" / "c.png", 64, 64, "faces, x, y, z, w")
    for i in range(2):
        make_image(tmp_path / "drop" / f"d{i}.png", 64, 64)
        (tmp_path / "drop" / f"d{i}.cap").write_text("dropped, caption", encoding="utf-8")
    for i in range(3):
        make_image(tmp_path / "reg" / f"r{i}.png", 64, 64, "a person")
    ds = dataset(path="main", num_repeats=2, prior_loss_weight=0.3, subsets=[
        SubsetSettings(image_dir="faces", num_repeats=3, shuffle_caption=True, keep_tokens=1, flip_aug=True),
        SubsetSettings(image_dir="drop", caption_dropout_rate=1.0, caption_extension=".cap"),
        SubsetSettings(image_dir="reg", is_reg=True, num_repeats=2)])
    items = scan_folders(folders_of(ds, tmp_path))
    assign_buckets(items, ds)
    return ds, items, tmp_path


# -- settings --------------------------------------------------------------------------------------------

def test_a_subset_inherits_what_it_leaves_unset():
    ds = dataset(num_repeats=4, reg_num_repeats=6, shuffle_caption=True, keep_tokens=2, caption_extension=".caption",
                 flip_aug=True, caption_dropout_rate=0.1, resolution=128)
    own = ds.subset_settings(SubsetSettings(image_dir="a", num_repeats=2, shuffle_caption=False, resolution=96))
    assert (own.num_repeats, own.shuffle_caption, own.resolution) == (2, False, 96)
    assert (own.keep_tokens, own.caption_extension, own.flip_aug, own.caption_dropout_rate) == (2, ".caption", True, 0.1)
    inherited = ds.subset_settings(SubsetSettings(image_dir="b"))
    assert inherited.model_dump(exclude={"subsets"}) == ds.model_dump(exclude={"subsets"})
    # a regularization subset's repeats are what the regularization scan reads; unset, the dataset's reg repeats
    assert ds.subset_settings(SubsetSettings(image_dir="r", is_reg=True, num_repeats=3)).reg_num_repeats == 3
    assert ds.subset_settings(SubsetSettings(image_dir="r", is_reg=True)).reg_num_repeats == 6


def test_folders_are_the_image_folder_the_reg_folder_and_the_subsets_in_order():
    ds = dataset(path="main", reg_path=" cls ", subsets=[SubsetSettings(image_dir="a"),
                                                        SubsetSettings(image_dir="b", is_reg=True)])
    got = [(f.setting, f.path, f.is_reg, f.label) for f in ds.folders()]
    assert got == [("dataset.path", "main", False, None), ("dataset.reg_path", "cls", True, None),
                   ("dataset.subsets[0].image_dir", "a", False, "folder of subset 1 (dataset.subsets[0].image_dir)"),
                   ("dataset.subsets[1].image_dir", "b", True,
                    "regularization folder of subset 2 (dataset.subsets[1].image_dir)")]
    assert [f.setting for f in dataset(path="main").folders()] == ["dataset.path"]


def test_consistency_checks_the_subsets():
    s = Settings()
    s.model.model_path = "m.safetensors"
    s.dataset.subsets = [SubsetSettings(image_dir="cls", is_reg=True)]
    assert any(p.startswith("dataset.path: choose") for p in check_consistency(s))   # nothing to train on
    s.dataset.subsets = [SubsetSettings(image_dir="a", resolution=2048)]
    problems = check_consistency(s)
    assert not any(p.startswith("dataset.path") for p in problems)                   # a training subset is enough
    assert not any("bucket" in p for p in problems)     # the bucket range widens to a subset's resolution too
    with pytest.raises(core.SettingsError, match=r"dataset\.subsets\.0\.num_repeats"):
        core.settings.settings_from_dict({"dataset": {"subsets": [{"image_dir": "a", "num_repeats": 0}]}})
    with pytest.raises(core.SettingsError, match=r"dataset\.subsets\.0\.image_dir"):
        core.settings.settings_from_dict({"dataset": {"subsets": [{"num_repeats": 2}]}})


def test_the_plan_reads_the_subsets():
    s = Settings()
    s.dataset.subsets = [SubsetSettings(image_dir="a", shuffle_caption=True, resolution=1024)]
    assert text_cache_blockers(s) == ["captions are shuffled every step"]
    assert s.dataset.largest_resolution() == 1024
    s.dataset.subsets = [SubsetSettings(image_dir="a", resolution=256)]
    assert text_cache_blockers(s) == [] and s.dataset.largest_resolution() == s.dataset.resolution == 512


# -- scanning and batches --------------------------------------------------------------------------------

def test_each_subset_has_its_own_repeats_per_epoch(four_folders):
    ds, items, root = four_folders
    repeats = {(folder_of(it, root), it.path.name): it.repeats for it in items}
    assert repeats == {("main", "m0.png"): 2, ("main", "m1.png"): 2,                 # the dataset's
                       ("faces", "c.png"): 5, ("faces", "f0.png"): 3, ("faces", "f1.png"): 3,  # 5_close, own
                       ("drop", "d0.png"): 2, ("drop", "d1.png"): 2,                 # inherited
                       ("reg", "r0.png"): 2, ("reg", "r1.png"): 2, ("reg", "r2.png"): 2}
    assert [it.is_reg for it in items] == [False] * 7 + [True] * 3
    sampler = BucketBatchSampler(items, batch_size=3, seed=1)
    for epoch in range(2):
        per_folder = Counter(folder_of(items[i], root) for batch in sampler.batches(epoch) for i in batch)
        # the regularization subset gives as many samples as all training subsets together
        assert per_folder == {"main": 4, "faces": 11, "drop": 4, "reg": 19}


def test_captions_and_flips_follow_each_subset(four_folders):
    ds, items, root = four_folders
    data = TrainingDataset(items, ds, None, seed=4)
    sampler = BucketBatchSampler(items, batch_size=2, seed=4)
    captions, flips, weights = defaultdict(set), defaultdict(set), defaultdict(set)
    for epoch in range(6):
        for k, batch_idx in enumerate(sampler.batches(epoch)):
            batch = data.get_batch(batch_idx, epoch, k)
            for i, cap, flip, w in zip(batch_idx, batch["captions"], batch["flips"], batch["loss_weights"]):
                name = folder_of(items[i], root)
                captions[name].add(cap)
                flips[name].add(flip)
                weights[name].add(w)
    assert captions["main"] == {"main, a, b, c"} and flips["main"] == {False}
    assert all(cap.startswith("faces, ") and sorted(cap.split(", ")) == ["faces", "w", "x", "y", "z"]
               for cap in captions["faces"]) and len(captions["faces"]) > 3        # shuffled after the kept tag
    assert flips["faces"] == {False, True}
    assert {it.caption for it in items if folder_of(it, root) == "drop"} == {"dropped, caption"}   # .cap read
    assert captions["drop"] == {""}
    assert captions["reg"] == {"a person"}
    assert weights == {"main": {1.0}, "faces": {1.0}, "drop": {1.0}, "reg": {0.3}}   # prior_loss_weight


def test_a_subset_resolution_gets_its_own_buckets(tmp_path):
    for name in ("small", "large"):
        make_image(tmp_path / name / "square.png", 256, 256, "s")
        make_image(tmp_path / name / "wide.png", 256, 128, "w")
    ds = dataset(path="small", bucket_reso_steps=32, subsets=[SubsetSettings(image_dir="large", resolution=128)])
    items = scan_folders(folders_of(ds, tmp_path))
    counts = assign_buckets(items, ds)
    buckets = {(folder_of(it, tmp_path), it.path.name): it.bucket for it in items}
    assert buckets == {("small", "square.png"): (64, 64), ("small", "wide.png"): (96, 32),
                       ("large", "square.png"): (128, 128), ("large", "wide.png"): (160, 96)}
    assert sum(counts.values()) == 4
    for batch in BucketBatchSampler(items * 3, batch_size=4, seed=0).batches(0):
        assert len({(items * 3)[i].bucket for i in batch}) == 1


def test_mirrored_latents_are_cached_only_for_flipping_subsets(four_folders):
    ds, items, root = four_folders
    enc = CountingEncoder()
    cache = LatentCache("memory", enc, "t")
    progress = []
    assert fill_cache(cache, items, ds, 4, progress=lambda d, t: progress.append((d, t))) == 13
    assert enc.images == 13 and progress[-1] == (13, 13)        # 10 images, the 3 faces ones mirrored too
    for it in items:
        cache.get(it, False)
        if folder_of(it, root) == "faces":
            cache.get(it, True)
    assert enc.images == 13


def test_a_bad_subset_folder_is_named(tmp_path):
    make_image(tmp_path / "main" / "a.png", 64, 64, "a")
    (tmp_path / "empty").mkdir()
    for bad, message in (("missing", r"The folder of subset 2 \(dataset\.subsets\[1\]\.image_dir\) .*missing does "
                                     r"not exist"),
                         ("empty", r"No images .* found in the folder of subset 2 \(dataset\.subsets\[1\]\.image_dir\)"),
                         ("main/inner", r"regularization folder \(dataset\.subsets\[1\]\.image_dir\) .*inner lies "
                                        r"inside the training folder \(dataset\.path\)")):
        ds = dataset(path="main", subsets=[SubsetSettings(image_dir="main"),
                                           SubsetSettings(image_dir=bad, is_reg=bad == "main/inner")])
        with pytest.raises(DatasetError, match=message):
            scan_folders(folders_of(ds, tmp_path))
    make_image(tmp_path / "nocap" / "x.png", 64, 64)
    ds = dataset(path="main", subsets=[SubsetSettings(image_dir="nocap", caption_extension=".tag")])
    with pytest.raises(DatasetError, match=r"(?s)Problems in the folder of subset 1 .*no caption file \(\.tag\)"):
        scan_folders(folders_of(ds, tmp_path))


def test_the_trainer_refuses_a_bad_subset_before_loading_anything(tmp_path):
    make_image(tmp_path / "data" / "a.png", 64, 64, "a")
    s = Settings()
    s.dataset.path = "data"
    s.model.model_path = "no_model_here.safetensors"     # never reached: the dataset is refused first
    config = AppConfig(datasets_dir=str(tmp_path), models_dir=str(tmp_path), outputs_dir=str(tmp_path / "out"))
    s.dataset.subsets = [SubsetSettings(image_dir=str(Path(__file__).parent))]
    with pytest.raises(PathNotAllowed, match=r"dataset\.subsets\[0\]\.image_dir: .* is outside the folders"):
        core.train(s, config=config)
    s.dataset.subsets = [SubsetSettings(image_dir="data"), SubsetSettings(image_dir="gone")]
    with pytest.raises(DatasetError, match=r"subset 2 \(dataset\.subsets\[1\]\.image_dir\) .*gone does not exist"):
        core.train(s, config=config)


# -- no subsets: the single folder of before -------------------------------------------------------------

def test_no_subsets_is_the_single_folder_dataset(tmp_path):
    make_image(tmp_path / "data" / "3_dog" / "a.png", 96, 64, "dog, brown, grass")
    make_image(tmp_path / "data" / "b.png", 64, 64, "cat, black")
    make_image(tmp_path / "cls" / "c.png", 64, 96, "a dog")
    ds = dataset(path="data", reg_path="cls", shuffle_caption=True, flip_aug=True, caption_dropout_rate=0.2)
    items = scan_folders(folders_of(ds, tmp_path))
    assert items == scan_dataset(ds, tmp_path / "data") + scan_dataset(ds, tmp_path / "cls", reg=True)
    assert all(it.augment == Augment.of(ds) and it.resolution == ds.resolution for it in items)
    assign_buckets(items, ds)
    # batches of items carrying the dataset's options equal those of items without options of their own
    bare = [type(it)(**{**it.__dict__, "augment": None, "resolution": None}) for it in items]
    assert [it.bucket for it in bare] == [it.bucket for it in items]
    sampler = BucketBatchSampler(items, 2, seed=9)
    assert sampler.batches(0) == BucketBatchSampler(bare, 2, seed=9).batches(0)
    for k, idx in enumerate(sampler.batches(1)):
        a, b = TrainingDataset(items, ds, None, 9).get_batch(idx, 1, k), TrainingDataset(bare, ds, None, 9).get_batch(idx, 1, k)
        assert a["captions"] == b["captions"] and a["flips"] == b["flips"] and a["pixels"].equal(b["pixels"])


# -- a real run ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_subsets")
    data = build_tiny_dataset(root / "data", n=4)
    return {"models": {"sd15": build_tiny_sd15(root / "sd15", "diffusers")}, "data": data, "root": root}


def test_a_run_trains_every_subset_with_its_repeats_and_weights(tiny, tmp_path, monkeypatch):
    build_tiny_dataset(tmp_path / "people", n=2)
    seen = record_batches(monkeypatch)
    events = []
    s, config = make_settings(tiny, "sd15", tmp_path, dataset__path="", dataset__prior_loss_weight=0.5,
                              dataset__subsets=[SubsetSettings(image_dir=str(tiny["data"]), num_repeats=2,
                                                               caption_dropout_rate=0.5),
                                                SubsetSettings(image_dir="people", is_reg=True, flip_aug=True)],
                              schedule__max_train_epochs=1, schedule__train_batch_size=2)
    result = core.train(s, on_event=events.append, config=config)
    logs = [e["message"] for e in events if e["type"] == "log"]
    assert any("4 images, 8 per epoch with repeats" in m for m in logs)
    assert any("2 regularization images (2 with repeats), cycled to 8 per epoch" in m for m in logs)
    people = (tmp_path / "people").resolve()
    pairs = [(Path(p).resolve(), w) for paths, weights in seen for p, w in zip(paths, weights)]
    assert len(pairs) == 16 and sum(people in p.parents for p, _ in pairs) == 8
    assert all(w == (0.5 if people in p.parents else 1.0) for p, w in pairs)
    assert result.final.exists() and result.steps == len(seen) == 8
