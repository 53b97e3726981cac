"""DreamBooth prior preservation: regularization (class) images from dataset.reg_path, cycled per epoch to
as many samples as the training images give, weighted by dataset.prior_loss_weight in the loss."""
from __future__ import annotations

import contextlib
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import core
import core.trainer as trainer_mod
from architectures.base import Noised
from core.dataset import (BucketBatchSampler, DatasetError, ImageItem, TrainingDataset, assign_buckets,
                          reg_samples, scan_dataset)
from core.settings import DatasetSettings
from tests.test_train_e2e import make_settings
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15

REG_CAPTION = "a photo of a shape"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_dreambooth")
    data = root / "data"
    build_tiny_dataset(data, n=4)
    return {"models": {"sd15": build_tiny_sd15(root / "sd15", "diffusers")}, "data": data, "root": root}


def make_reg_folder(folder: Path, n: int = 3, subfolder: str = "2_shape") -> Path:
    """n tiny class images with their own captions in ``folder/subfolder``; returns ``folder``."""
    build_tiny_dataset(folder / subfolder, n=n)
    for i, cap in enumerate(sorted((folder / subfolder).glob("*.txt"))):
        cap.write_text(f"{REG_CAPTION}, {i}\n", encoding="utf-8")
    return folder


def items_of(spec, reg=False, start=0):
    """spec: list of (bucket, repeats)."""
    return [ImageItem(path=Path(f"/{'reg' if reg else 'x'}/{start + i}.png"), caption=str(i), repeats=r,
                      width=b[0], height=b[1], bucket=b, is_reg=reg) for i, (b, r) in enumerate(spec)]


# -- the per-epoch rule ----------------------------------------------------------------------------------

def test_reg_samples_cycle_to_the_training_count():
    sq = (64, 64)
    train = items_of([(sq, 2), (sq, 1), (sq, 4)])  # T = 7
    reg = items_of([(sq, 1)] * 3, reg=True, start=3)  # pool a b c
    assert Counter(reg_samples(train + reg)) == {3: 3, 4: 2, 5: 2}
    # repeats: the pool is round-robin (x y x), every image once before any twice
    reg = items_of([(sq, 2), (sq, 1)], reg=True, start=2)
    assert reg_samples(items_of([(sq, 2), (sq, 2)]) + reg) == [2, 3, 2, 2]
    # more reg samples than training samples: the first T of the pool, every epoch the same ones
    reg = items_of([(sq, 1)] * 5, reg=True, start=1)
    assert reg_samples(items_of([(sq, 2)]) + reg) == [1, 2]
    assert reg_samples(train) == []


def test_sampler_mixes_reg_in_the_right_proportion_single_bucket_batches():
    rng = random.Random(3)
    buckets = [(64, 64), (96, 32), (32, 96)]
    train = items_of([(rng.choice(buckets), rng.choice([1, 2, 5])) for _ in range(17)])
    reg = items_of([(rng.choice(buckets), rng.choice([1, 3])) for _ in range(6)], reg=True, start=len(train))
    items = train + reg
    total = sum(it.repeats for it in train)
    expected_reg = Counter(reg_samples(items))
    assert sum(expected_reg.values()) == total
    s = BucketBatchSampler(items, batch_size=3, seed=5)
    lengths = set()
    for epoch in range(4):
        s.set_epoch(epoch)
        batches = list(s)
        lengths.add(len(batches))
        assert len(batches) == len(s)
        assert all(len({items[i].bucket for i in b}) == 1 for b in batches)
        counts = Counter(i for b in batches for i in b)
        assert {i: counts[i] for i in range(len(train))} == {i: it.repeats for i, it in enumerate(train)}
        assert Counter({i: c for i, c in counts.items() if items[i].is_reg}) == expected_reg
        # the proportion: as many reg samples as training samples
        assert sum(c for i, c in counts.items() if items[i].is_reg) == total
    assert lengths == {len(s)}
    expected_len = sum(math.ceil((sum(it.repeats for it in train if it.bucket == b)
                                  + sum(c for i, c in expected_reg.items() if items[i].bucket == b)) / 3)
                       for b in buckets)
    assert len(s) == expected_len
    # deterministic given (seed, epoch); the order changes between epochs
    again = BucketBatchSampler(items, batch_size=3, seed=5)
    assert again.batches(2) == s.batches(2) and s.batches(1) != s.batches(2)


# -- scanning and batches --------------------------------------------------------------------------------

def ds_settings(**kw) -> DatasetSettings:
    base = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
    return DatasetSettings(**(base | kw))


def test_reg_scan_marks_items_and_uses_reg_repeats(tmp_path):
    reg = make_reg_folder(tmp_path / "reg", n=2, subfolder="3_shape")
    build_tiny_dataset(reg / "plain", n=1)
    items = scan_dataset(ds_settings(reg_num_repeats=2, num_repeats=7), reg, reg=True)
    assert all(it.is_reg for it in items)
    assert sorted(it.repeats for it in items) == [2, 3, 3]
    assert not any(it.is_reg for it in scan_dataset(ds_settings(), tmp_path / "reg" / "plain"))


def test_get_batch_loss_weights_are_the_prior_loss_weight_for_reg(tiny, tmp_path):
    ds = ds_settings(prior_loss_weight=0.25)
    items = scan_dataset(ds, tiny["data"]) + scan_dataset(ds, make_reg_folder(tmp_path / "reg"), reg=True)
    assign_buckets(items, ds)
    sampler = BucketBatchSampler(items, 2, seed=1)
    data = TrainingDataset(items, ds, None, seed=1)
    seen = Counter()
    for k, indices in enumerate(sampler.batches(0)):
        batch = data.get_batch(indices, 0, k)
        assert batch["loss_weights"] == [0.25 if items[i].is_reg else 1.0 for i in indices]
        seen.update(items[i].is_reg for i in indices)
    assert seen == {True: 4, False: 4}


class ZeroPredictor:
    """A family stand-in that predicts zeros toward a fixed target, so that only diffusion_loss's own weighting
    (per-sample weights, masks) decides the loss."""

    def __init__(self, target: torch.Tensor):
        self.target = target

    def noisy_input_and_target(self, components, latents, noise, settings, input_noise=None, level=None):
        b = latents.shape[0]
        return Noised(latents, torch.zeros(b), self.target, torch.ones(b), torch.zeros(b), torch.zeros(b))

    def predict(self, components, noisy, timesteps, cond, batch):
        return torch.zeros_like(self.target)

    def loss(self, batch: dict) -> float:
        latents = torch.zeros_like(self.target)
        return trainer_mod.diffusion_loss(self, None, latents, {}, batch, core.load_settings(), torch.float32,
                                          contextlib.nullcontext).item()


def test_diffusion_loss_multiplies_the_per_sample_loss_by_the_weights():
    arch = ZeroPredictor(torch.stack([torch.full((4, 2, 2), 1.0), torch.full((4, 2, 2), 2.0)]))  # MSE 1 and 4
    assert arch.loss({"captions": ["a", "b"]}) == pytest.approx((1 + 4) / 2)
    assert arch.loss({"loss_weights": [1.0, 0.5]}) == pytest.approx((1 + 0.5 * 4) / 2)


# -- real tiny runs --------------------------------------------------------------------------------------

def record_batches(monkeypatch) -> list[tuple[list, list]]:
    """(paths, loss weights) of every batch the trainer computes a loss for (the real loss still runs)."""
    seen: list[tuple[list, list]] = []
    real_loss = trainer_mod.diffusion_loss

    def spy(arch, components, latents, cond, batch, *rest, **kw):
        seen.append((list(batch["paths"]), list(batch["loss_weights"])))
        return real_loss(arch, components, latents, cond, batch, *rest, **kw)

    monkeypatch.setattr(trainer_mod, "diffusion_loss", spy)
    return seen


def test_tiny_run_with_reg_images_trains_weights_and_saves(tiny, tmp_path, monkeypatch):
    make_reg_folder(tmp_path / "reg")  # relative reg_path: inside the datasets folder (tmp_path here)
    seen = record_batches(monkeypatch)
    events = []
    s, config = make_settings(tiny, "sd15", tmp_path, dataset__reg_path="reg", dataset__prior_loss_weight=0.5,
                              dataset__cache_latents="disk", schedule__max_train_epochs=1,
                              schedule__train_batch_size=2)
    result = core.train(s, on_event=events.append, config=config)

    logs = [e["message"] for e in events if e["type"] == "log"]
    assert any("3 regularization images (6 with repeats), cycled to 4 per epoch" in m for m in logs)
    plan_log = next(m for m in logs if m.startswith("Plan"))
    assert "text-encoder cache on" in plan_log  # reg captions were cached too, or the step would fail
    assert list((tmp_path / "reg").rglob("*.latents.safetensors"))  # reg latents cached
    reg_dir = (tmp_path / "reg").resolve()
    pairs = [(Path(p).resolve(), w) for paths, weights in seen for p, w in zip(paths, weights)]
    assert sum(1 for p, _ in pairs if reg_dir in p.parents) == 4 and len(pairs) == 8
    assert all(w == (0.5 if reg_dir in p.parents else 1.0) for p, w in pairs)
    assert result.final.exists() and result.steps == len(seen)
    with safe_open(str(result.final), framework="pt") as f:
        md = f.metadata()
    assert md["ss_num_train_images"] == "4" and md["ss_num_reg_images"] == "3"
    assert md["ss_prior_loss_weight"] == "0.5"
    assert "2_shape" not in json.loads(md["ss_tag_frequency"])  # train folders only


def test_missing_reg_folder_is_a_clear_error(tiny, tmp_path):
    s, config = make_settings(tiny, "sd15", tmp_path, dataset__reg_path="no_such_folder")
    with pytest.raises(DatasetError, match=r"regularization folder \(dataset.reg_path\) .*no_such_folder "
                                           r"does not exist"):
        core.train(s, config=config)


def test_missing_reg_captions_are_listed(tiny, tmp_path):
    reg = make_reg_folder(tmp_path / "reg")
    victim = sorted(reg.rglob("*.txt"))[1]
    victim.unlink()
    s, config = make_settings(tiny, "sd15", tmp_path, dataset__reg_path=str(reg))
    with pytest.raises(DatasetError, match=r"(?s)regularization images .*no caption file.*" + victim.stem):
        core.train(s, config=config)


def test_reg_folder_inside_the_training_folder_is_refused(tiny, tmp_path):
    s, config = make_settings(tiny, "sd15", tmp_path, dataset__reg_path=str(tiny["data"] / "reg"))
    with pytest.raises(DatasetError, match="inside the training folder"):
        core.train(s, config=config)
