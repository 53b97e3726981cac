"""Masked loss (dataset.masked_loss, dataset.mask_path): masks from a mask folder or the alpha channel, fitted to
the bucket as the image is, applied to the loss; a missing mask is named before anything loads; a run whose masks
are black everywhere has nothing to learn (tiny SD1.5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import core
from core.dataset import DatasetError, ImageItem, attach_masks, load_mask
from tests.test_dreambooth import ZeroPredictor
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings


def _rgba(path: Path, w: int = 64, h: int = 32) -> ImageItem:
    arr = np.full((h, w, 4), 200, dtype=np.uint8)
    arr[..., 3] = 255
    arr[:, : w // 2, 3] = 0                      # left half transparent
    Image.fromarray(arr, "RGBA").save(path)
    return ImageItem(path=path, caption="x", repeats=1, width=w, height=h)


def test_alpha_masks_follow_the_image_geometry(tmp_path):
    item = _rgba(tmp_path / "a.png")
    mask = load_mask(item, (64, 32))
    assert mask.shape == (1, 4, 8)
    assert torch.all(mask[..., :4] == 0) and torch.all(mask[..., 4:] == 1)
    assert torch.equal(load_mask(item, (64, 32), flip=True), mask.flip(-1))
    # a square bucket: scaled to cover, centre-cropped, the transparent half stays on the left
    square = load_mask(item, (32, 32))
    assert square.shape == (1, 4, 4) and square[..., 0].max() == 0 and square[..., -1].min() == 1
    Image.new("RGB", (64, 32), "red").save(tmp_path / "b.png")   # no alpha: trained everywhere
    plain = ImageItem(path=tmp_path / "b.png", caption="x", repeats=1, width=64, height=32)
    assert torch.equal(load_mask(plain, (64, 32)), torch.ones(1, 4, 8))


def test_mask_folder_files_and_missing_ones(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    (images / "5_sub").mkdir(parents=True)
    (masks / "5_sub").mkdir(parents=True)
    items = []
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), "red").save(images / "5_sub" / f"{name}.jpg")
        items.append(ImageItem(path=images / "5_sub" / f"{name}.jpg", caption="x", repeats=5, width=64, height=64))
    Image.new("L", (64, 64), 255).save(masks / "5_sub" / "a.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) have no mask in the mask folder .*\n.*5_sub/b.jpg"):
        attach_masks(items, images, masks)
    Image.new("L", (64, 64), 0).save(masks / "5_sub" / "b.webp")
    attach_masks(items, images, masks)
    assert [it.mask.name for it in items] == ["a.png", "b.webp"]
    assert load_mask(items[0], (64, 64)).min() == 1 and load_mask(items[1], (64, 64)).max() == 0


def test_the_loss_counts_only_inside_the_mask():
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, :, :, :4] = 1                        # first sample: left half; second: nothing
    assert ZeroPredictor(torch.ones(2, 4, 8, 8)).loss({"masks": masks}) == pytest.approx((0.5 + 0.0) / 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    data = build_tiny_dataset(root / "data", n=2)
    masks = root / "masks"
    masks.mkdir()
    for image in data.iterdir():
        if image.suffix == ".png":
            Image.new("L", Image.open(image).size, 0).save(masks / image.name)   # black: train nowhere
    return data, masks, build_tiny_sd15(root / "sd15")


def test_a_run_with_black_masks_learns_nothing(tiny, tmp_path):
    data, masks, model = tiny
    s, config = tiny_train_settings("sd15", {"model.model_path": str(model)}, data, tmp_path,
                                    dataset__masked_loss=True, dataset__mask_path=str(masks),
                                    schedule__max_train_steps=2, optimizer__learning_rate=1e-2)
    config.allowed_roots.append(str(masks))
    events = []
    result = core.train(s, on_event=events.append, config=config)
    assert [e["loss"] for e in events if e["type"] == "progress"] == [0.0, 0.0]
    sd = load_file(str(result.final))
    assert all(not v.any() for k, v in sd.items() if k.endswith("lora_up.weight"))   # zero gradients: untouched


def test_a_missing_mask_is_named_before_anything_loads(tiny, tmp_path):
    data, masks, model = tiny
    empty = tmp_path / "no_masks"
    empty.mkdir()
    s, config = tiny_train_settings("sd15", {"model.model_path": str(model)}, data, tmp_path,
                                    dataset__masked_loss=True, dataset__mask_path=str(empty))
    config.allowed_roots.append(str(empty))
    events = []
    with pytest.raises(DatasetError, match="have no mask in the mask folder"):
        core.train(s, on_event=events.append, config=config)
    assert not any(e["type"] == "plan" for e in events)
