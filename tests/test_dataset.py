"""Tests for core.dataset on real files in tmp_path."""
from __future__ import annotations

import math
import os
import random
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from core.dataset import (Augment, BucketBatchSampler, DatasetError, ImageItem, LatentCache, TrainingDataset,
                          assign_buckets, choose_bucket, crop_geometry, load_image, make_buckets,
                          process_caption, scan_dataset)
from core.settings import DatasetSettings


def ds_settings(**kw) -> DatasetSettings:
    base = dict(resolution=128, min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=32)
    base.update(kw)
    return DatasetSettings(**base)


def make_image(path: Path, w: int, h: int, caption: str | None = None, color=None, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        rng = np.random.default_rng(zlib.crc32(path.name.encode()))
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        im = Image.fromarray(arr, "RGB")
        if mode != "RGB":
            im = im.convert(mode)
    else:
        im = Image.new(mode, (w, h), color)
    im.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


class CountingEncoder:
    """A stand-in VAE: 8× average pool plus a fourth channel; counts the images it encodes."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 4 and x.shape[1] == 3
        self.calls += 1
        self.images += x.shape[0]
        p = F.avg_pool2d(x, 8)
        return torch.cat([p, p.mean(1, keepdim=True)], 1)


# -- scanning --------------------------------------------------------------------------------------------

def test_scan_repeats_from_folder_names_and_captions(tmp_path):
    make_image(tmp_path / "10_dog" / "a.png", 64, 48, "dog,\n  brown  \n\n")
    make_image(tmp_path / "10_dog" / "deep" / "b.jpg", 40, 40, "dog b")
    make_image(tmp_path / "plain" / "c.webp", 40, 40, "c")
    make_image(tmp_path / "d.BMP", 30, 20, "d")
    (tmp_path / "notes.txt").write_text("not a caption of anything")
    make_image(tmp_path / ".cache" / "hidden.png", 8, 8, "hidden")  # hidden folders are skipped
    items = scan_dataset(ds_settings(num_repeats=3), tmp_path)
    by_name = {it.path.name: it for it in items}
    assert set(by_name) == {"a.png", "b.jpg", "c.webp", "d.BMP"}
    assert by_name["a.png"].repeats == 10 and by_name["b.jpg"].repeats == 10
    assert by_name["c.webp"].repeats == 3 and by_name["d.BMP"].repeats == 3
    assert by_name["a.png"].caption == "dog, brown"
    assert (by_name["a.png"].width, by_name["a.png"].height) == (64, 48)
    assert by_name["a.png"].bucket is None
    assert all(it.augment == Augment.of(ds_settings()) and it.resolution == 128 for it in items)
    # stable order
    assert [it.path for it in items] == [it.path for it in scan_dataset(ds_settings(num_repeats=3), tmp_path)]


def test_scan_exif_rotation_swaps_size(tmp_path):
    im = Image.new("RGB", (60, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°
    im.save(tmp_path / "r.jpg", exif=exif.tobytes())
    (tmp_path / "r.txt").write_text("r")
    (item,) = scan_dataset(ds_settings(), tmp_path)
    assert (item.width, item.height) == (20, 60)
    t, _, orig = load_image(item.path, (32, 64))
    assert orig == (60, 20) and t.shape == (3, 64, 32)


def test_missing_captions_listed_or_default_used(tmp_path):
    make_image(tmp_path / "ok.png", 16, 16, "fine")
    for i in range(13):
        make_image(tmp_path / f"nocap{i:02d}.png", 16, 16)
    with pytest.raises(DatasetError) as e:
        scan_dataset(ds_settings(), tmp_path)
    msg = str(e.value)
    assert "13 image(s) have no caption file (.txt)" in msg
    assert "nocap00.png" in msg and "nocap09.png" in msg and "nocap10.png" not in msg
    assert "and 3 more" in msg and "ok.png" not in msg
    items = scan_dataset(ds_settings(default_caption="  a photo of sks  "), tmp_path)
    caps = {it.path.name: it.caption for it in items}
    assert caps["ok.png"] == "fine" and caps["nocap05.png"] == "a photo of sks" and len(caps) == 14


def test_caption_extension_without_dot(tmp_path):
    make_image(tmp_path / "a.png", 16, 16)
    (tmp_path / "a.caption").write_text("from caption file", encoding="utf-8")
    (item,) = scan_dataset(ds_settings(caption_extension="caption"), tmp_path)
    assert item.caption == "from caption file"


def test_corrupt_image_named(tmp_path):
    make_image(tmp_path / "good.png", 16, 16, "g")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (tmp_path / "broken.txt").write_text("b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "empty.jpg").write_bytes(b"")
    (tmp_path / "sub" / "empty.txt").write_text("e")
    with pytest.raises(DatasetError) as e:
        scan_dataset(ds_settings(), tmp_path)
    msg = str(e.value)
    assert "2 image(s) cannot be read" in msg
    assert "broken.png" in msg and os.path.join("sub", "empty.jpg") in msg and "good.png" not in msg


def test_truncated_image_caught_by_fill(tmp_path):
    p = make_image(tmp_path / "t.png", 64, 64, "t")
    data = p.read_bytes()
    items = scan_dataset(ds_settings(), tmp_path)
    assign_buckets(items, ds_settings())
    p.write_bytes(data[: len(data) // 2])  # truncated after the scan
    for mode in ("memory", "off"):
        with pytest.raises(DatasetError, match="t.png"):
            LatentCache(mode, CountingEncoder(), "test").fill(items, False, 2)


def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(ds_settings(), tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="No images"):
        scan_dataset(ds_settings(), tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        scan_dataset(ds_settings(), tmp_path / "readme.txt")


# -- buckets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("res,lo,hi,step", [(512, 256, 1024, 64), (1024, 512, 2048, 64), (512, 256, 1024, 32),
                                            (768, 320, 1536, 64), (128, 64, 256, 8), (576, 256, 1024, 128)])
def test_make_buckets_properties(res, lo, hi, step):
    buckets = make_buckets(res, lo, hi, step)
    assert buckets == sorted(set(buckets))
    sides = range(math.ceil(lo / step) * step, hi + 1, step)
    valid = {(w, h) for w in sides for h in sides if w * h <= res * res}
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert lo <= w <= hi and lo <= h <= hi
        assert w * h <= res * res
        assert (h, w) in buckets  # symmetric
        # as large as possible in at least one direction (or the largest square)
        assert (w, h + step) not in valid or (w + step, h) not in valid or w == h
    # brute force: exactly the tallest-per-width rectangles and their transposes, plus the largest square
    tallest = {(w, max(h for x, h in valid if x == w)) for w in sides if any(x == w for x, _ in valid)}
    square = max((w, h) for w, h in valid if w == h)
    assert set(buckets) == tallest | {(h, w) for w, h in tallest} | {square}
    ratios = [math.log(w / h) for w, h in buckets]
    assert len(set(round(r, 9) for r in ratios)) == len(buckets)  # one bucket per aspect ratio
    # aspect coverage: every reachable ratio, no big holes between neighbours
    assert max(ratios) == pytest.approx(max(math.log(w / h) for w, h in valid))
    assert min(ratios) == pytest.approx(-max(ratios))
    srt = sorted(ratios)
    assert max(b - a for a, b in zip(srt, srt[1:])) < 0.6


def test_make_buckets_known_set():
    # sd-scripts' list for 512 / 256…1024 / 64
    half = [(256, 1024), (256, 832), (256, 896), (256, 960), (320, 704), (320, 768), (384, 640), (448, 576)]
    assert make_buckets(512, 256, 1024, 64) == sorted(half + [(512, 512)] + [(h, w) for w, h in half])
    with pytest.raises(DatasetError, match="No bucket fits"):
        make_buckets(128, 256, 1024, 64)


def test_choose_bucket_closest_aspect():
    buckets = make_buckets(512, 256, 1024, 64)
    assert choose_bucket(1000, 1000, buckets, 512, 64, False) == (512, 512)
    assert choose_bucket(3000, 2000, buckets, 512, 64, False) == (640, 384)  # 1.5 → 1.667 beats 1.286
    assert choose_bucket(2000, 3000, buckets, 512, 64, False) == (384, 640)
    assert choose_bucket(5000, 500, buckets, 512, 64, False) == (1024, 256)  # beyond the range: the widest
    for w, h in [(123, 457), (800, 600), (1920, 1080), (333, 333)]:
        b = choose_bucket(w, h, buckets, 512, 64, False)
        err = abs(math.log(b[0] / b[1]) - math.log(w / h))
        assert all(err <= abs(math.log(x / y) - math.log(w / h)) + 1e-12 for x, y in buckets)
    # upscaling is allowed without no_upscale
    assert choose_bucket(100, 100, buckets, 512, 64, False) == (512, 512)


def test_choose_bucket_no_upscale():
    buckets = make_buckets(512, 256, 1024, 64)
    # a large image keeps the normal bucket
    assert choose_bucket(3000, 2000, buckets, 512, 64, True) == (640, 384)
    # small images get their own bucket, rounded down to the step, never larger than the image
    assert choose_bucket(300, 200, buckets, 512, 64, True) == (256, 192)
    assert choose_bucket(600, 400, buckets, 512, 64, True) == (576, 384)
    for w, h in [(130, 70), (500, 500), (1100, 200), (700, 450), (2000, 150)]:
        bw, bh = choose_bucket(w, h, buckets, 512, 64, True)
        assert bw <= w and bh <= h and bw % 64 == 0 and bh % 64 == 0
        assert bw * bh <= 512 * 512 and max(bw, bh) <= 1024
    with pytest.raises(DatasetError, match="smaller than the bucket step"):
        choose_bucket(50, 300, buckets, 512, 64, True)


def test_assign_buckets_modes(tmp_path):
    make_image(tmp_path / "wide.png", 200, 100, "w")
    make_image(tmp_path / "tall.png", 100, 200, "t")
    items = scan_dataset(ds_settings(), tmp_path)
    counts = assign_buckets(items, ds_settings())
    assert sum(counts.values()) == 2 and len(counts) == 2
    assert all(it.bucket[0] % 32 == 0 and it.bucket[1] % 32 == 0 for it in items)
    counts = assign_buckets(items, ds_settings(enable_buckets=False))
    assert counts == {(128, 128): 2}


# -- loading ---------------------------------------------------------------------------------------------

def test_load_image_shape_range_and_flip(tmp_path):
    arr = np.zeros((60, 90, 3), dtype=np.uint8)
    arr[:, :45] = 255  # left half white, right half black
    p = tmp_path / "half.png"
    Image.fromarray(arr).save(p)
    t, crop, orig = load_image(p, (64, 32))
    assert t.shape == (3, 32, 64) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1 and t.max() == 1 and t.min() == -1
    assert orig == (60, 90)
    assert t[:, :, :20].mean() > 0.9 and t[:, :, -20:].mean() < -0.9
    tf, crop_f, _ = load_image(p, (64, 32), flip=True)
    assert torch.equal(tf, t.flip(-1))
    rw, rh, top, left = crop_geometry(90, 60, (64, 32))
    assert crop == (top, left) and crop_f == (top, rw - 64 - left)
    assert crop_geometry(90, 60, (64, 32), flip=True)[2:] == crop_f


def test_load_image_crop_centre_and_alpha(tmp_path):
    # a tall image into a square: scaled to width, centre-cropped vertically
    p = make_image(tmp_path / "tall.png", 50, 101)
    t, (top, left), orig = load_image(p, (32, 32))
    assert t.shape == (3, 32, 32) and left == 0 and top == (65 - 32) // 2 and orig == (101, 50)
    # transparent pixels become white
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 20, 40))
    rgba.save(tmp_path / "a.png")
    t, _, _ = load_image(tmp_path / "a.png", (40, 40))
    assert torch.allclose(t[:, :, 30], torch.ones(3, 40))
    assert torch.allclose(t[0, :, 5], torch.ones(40)) and torch.allclose(t[1, :, 5], -torch.ones(40))
    # grayscale and palette images come out as 3 channels
    make_image(tmp_path / "g.png", 16, 16, mode="L")
    make_image(tmp_path / "p.png", 16, 16, mode="P")
    assert load_image(tmp_path / "g.png", (16, 16))[0].shape == (3, 16, 16)
    assert load_image(tmp_path / "p.png", (16, 16))[0].shape == (3, 16, 16)


# -- captions --------------------------------------------------------------------------------------------

def test_process_caption_keep_shuffle_dropout():
    cap = "sks, dog, red, grass, sunny, park"
    rng = random.Random(0)
    assert process_caption(cap, False, 0, 0.0, rng) == cap
    firsts, thirds = Counter(), Counter()
    for _ in range(2000):
        out = process_caption(cap, True, 2, 0.0, rng)
        parts = out.split(", ")
        assert parts[:2] == ["sks", "dog"] and sorted(parts) == sorted(p.strip() for p in cap.split(","))
        thirds[parts[2]] += 1
        firsts[process_caption(cap, True, 0, 0.0, rng).split(", ")[0]] += 1
    assert set(thirds) == {"red", "grass", "sunny", "park"}
    assert all(350 < c < 650 for c in thirds.values())  # ~500 each
    assert len(firsts) == 6 and all(200 < c < 470 for c in firsts.values())  # ~333 each
    drops = sum(process_caption(cap, True, 1, 0.3, rng) == "" for _ in range(4000))
    assert 1000 < drops < 1400  # ~1200
    assert all(process_caption(cap, False, 0, 1.0, rng) == "" for _ in range(10))
    assert process_caption(cap, True, 0, 0.0, random.Random(5)) == process_caption(cap, True, 0, 0.0,
                                                                                   random.Random(5))


# -- sampler ---------------------------------------------------------------------------------------------

def fake_items(spec):
    """spec: list of (bucket, repeats)."""
    return [ImageItem(path=Path(f"/x/{i}.png"), caption=str(i), repeats=r, width=b[0], height=b[1], bucket=b)
            for i, (b, r) in enumerate(spec)]


def test_sampler_single_bucket_batches_and_repeats():
    rng = random.Random(1)
    buckets = [(64, 64), (96, 32), (32, 96)]
    items = fake_items([(rng.choice(buckets), rng.choice([1, 2, 5])) for _ in range(40)])
    s = BucketBatchSampler(items, batch_size=4, seed=7)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        assert all(1 <= len(b) <= 4 for b in batches)
        assert all(len({items[i].bucket for i in b}) == 1 for b in batches)
        counts = Counter(i for b in batches for i in b)
        assert counts == {i: it.repeats for i, it in enumerate(items)}
    expected = sum(math.ceil(sum(it.repeats for it in items if it.bucket == b) / 4) for b in buckets)
    assert len(s) == expected


def test_sampler_deterministic_and_resumable():
    items = fake_items([((64, 64), 3)] * 10 + [((96, 32), 2)] * 7)
    a = BucketBatchSampler(items, 3, seed=11)
    b = BucketBatchSampler(items, 3, seed=11)
    c = BucketBatchSampler(items, 3, seed=12)
    assert a.batches(0) == b.batches(0) and a.batches(4) == b.batches(4)
    assert a.batches(0) != a.batches(1)
    assert a.batches(0) != c.batches(0)
    a.set_epoch(2)
    full = list(a)
    b.set_epoch(2, start_batch=5)
    assert list(b) == full[5:]
    with pytest.raises(ValueError, match="assign_buckets"):
        BucketBatchSampler([ImageItem(Path("a.png"), "", 1, 8, 8)], 1, 0)


# -- latent cache ----------------------------------------------------------------------------------------

@pytest.fixture
def small_dataset(tmp_path):
    make_image(tmp_path / "img" / "2_cat" / "a.png", 200, 100, "cat, a")
    make_image(tmp_path / "img" / "2_cat" / "b.png", 100, 200, "cat, b")
    make_image(tmp_path / "img" / "c.jpg", 120, 120, "c")
    make_image(tmp_path / "img" / "d.png", 90, 72, "d")
    make_image(tmp_path / "img" / "e.png", 210, 105, "e, wide")
    ds = ds_settings(resolution=96, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32,
                     bucket_no_upscale=True, flip_aug=True)
    items = scan_dataset(ds, tmp_path / "img")
    counts = assign_buckets(items, ds)
    assert counts == {(64, 64): 1, (64, 128): 1, (96, 96): 1, (128, 64): 2}
    return ds, items


def user_files(root: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and ".cache" not in p.parts}


def test_disk_cache_reused_and_invalidated(small_dataset):
    ds, items = small_dataset
    root = items[0].path.parent
    before = user_files(root)
    enc = CountingEncoder()
    progress = []
    cache = LatentCache("disk", enc, "test-vae")
    assert cache.fill(items, True, batch_size=2, progress=lambda d, t: progress.append((d, t))) == 10
    assert enc.images == 10 and progress[-1] == (10, 10)
    assert enc.calls == 8  # one call per (bucket, flip): the two (128, 64) images share theirs
    path = cache.cache_path(items[0], True)
    assert path.parent.name == ".cache" and path.parent.parent == items[0].path.parent and path.is_file()
    for it in items:
        lat = cache.get(it, False)
        assert lat.shape == (4, it.bucket[1] // 8, it.bucket[0] // 8) and lat.device.type == "cpu"
    assert enc.images == 10  # get served from disk

    # a new cache object (a later run) reuses the files
    enc2 = CountingEncoder()
    cache2 = LatentCache("disk", enc2, "test-vae")
    assert cache2.fill(items, True, 2) == 0 and enc2.images == 0
    assert torch.equal(cache2.get(items[1], True), cache.get(items[1], True))

    # touching one image recomputes only that image (both flips)
    st = items[1].path.stat()
    os.utime(items[1].path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert cache2.fill(items, True, 2) == 2 and enc2.images == 2
    # rewriting an image with new content (same mtime second or not) is noticed through size/mtime
    make_image(items[3].path, 95, 70)
    assert cache2.fill(items, False, 2) == 1
    # another encoder tag never reuses
    enc3 = CountingEncoder()
    assert LatentCache("disk", enc3, "other vae").fill(items, False, 4) == 5
    # a changed bucket recomputes
    items[2].bucket = (64, 64) if items[2].bucket != (64, 64) else (96, 96)
    assert cache2.fill(items, False, 2) == 1
    # the user's files are untouched (apart from what this test itself did to items 1 and 3)
    after = user_files(root)
    assert set(after) == set(before)
    assert all(after[p][0] == before[p][0] for p in before if p != items[3].path)
    assert all(after[p] == before[p] for p in before if p not in (items[1].path, items[3].path))


def test_disk_cache_refuses_foreign_file(small_dataset):
    ds, items = small_dataset
    cache = LatentCache("disk", CountingEncoder(), "t")
    foreign = cache.cache_path(items[0], False)
    from safetensors.torch import save_file
    foreign.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(1)}, str(foreign), metadata={"mine": "yes"})
    with pytest.raises(DatasetError, match="not a latent cache file"):
        cache.get(items[0], False)


def test_memory_and_off_cache(small_dataset):
    ds, items = small_dataset
    enc = CountingEncoder()
    mem = LatentCache("memory", enc, "t")
    assert mem.fill(items, False, 3) == 5 and enc.images == 5
    assert mem.fill(items, False, 3) == 0
    a = mem.get(items[0], False)
    assert enc.images == 5
    b = mem.get(items[0], True)  # not filled: encoded on demand, then kept
    mem.get(items[0], True)
    assert enc.images == 6 and not torch.equal(a, b)
    assert not any((it.path.parent / ".cache").exists() for it in items)
    off_enc = CountingEncoder()
    off = LatentCache("off", off_enc, "t")
    assert off.fill(items, True, 2) == 0 and off_enc.images == 0
    off.get(items[0], False)
    off.get(items[0], False)
    assert off_enc.images == 2
    assert torch.allclose(off.get(items[0], False), a)


# -- training batches ------------------------------------------------------------------------------------

def test_training_dataset_batches(small_dataset):
    ds, items = small_dataset
    ds = ds.model_copy(update={"shuffle_caption": True, "keep_tokens": 1})
    items = [replace(it, augment=Augment.of(ds)) for it in items]   # as scanned with these options
    cache = LatentCache("memory", CountingEncoder(), "t")
    cache.fill(items, ds.flip_aug, 2)
    data = TrainingDataset(items, ds, cache, seed=3)
    sampler = BucketBatchSampler(items, 2, seed=3)
    flips = []
    for epoch in range(4):
        for i, idx in enumerate(sampler.batches(epoch)):
            batch = data.get_batch(idx, epoch, i)
            bw, bh = items[idx[0]].bucket
            assert batch["latents"].shape == (len(idx), 4, bh // 8, bw // 8)
            assert batch["target_sizes"] == [(bh, bw)] * len(idx)
            assert batch["original_sizes"] == [(items[j].height, items[j].width) for j in idx]
            for k, j in enumerate(idx):
                flip = batch["flips"][k]
                assert batch["crop_coords"][k] == crop_geometry(items[j].width, items[j].height,
                                                                items[j].bucket, flip)[2:]
                assert torch.equal(batch["latents"][k], cache.get(items[j], flip))
                # SDXL's micro-conditioning as one tensor: original size, crop, target size
                assert batch["size_conditioning"][k].tolist() == [*batch["original_sizes"][k],
                                                                  *batch["crop_coords"][k], bh, bw]
                flips.append(flip)
            for j, cap in zip(idx, batch["captions"]):
                assert cap.split(", ")[0] == items[j].caption.split(",")[0]
            again = data.get_batch(idx, epoch, i)
            assert again["captions"] == batch["captions"] and again["flips"] == batch["flips"]
    assert any(flips) and not all(flips)

    # caching off: pixels, same geometry as load_image
    off = TrainingDataset(items, ds, LatentCache("off", CountingEncoder(), "t"), seed=3)
    idx = sampler.batches(0)[0]
    batch = off.get_batch(idx, 0, 0)
    bw, bh = items[idx[0]].bucket
    assert "latents" not in batch and batch["pixels"].shape == (len(idx), 3, bh, bw)
    for k, j in enumerate(idx):
        t, crop, orig = load_image(items[j].path, items[j].bucket, batch["flips"][k])
        assert torch.equal(batch["pixels"][k], t) and batch["crop_coords"][k] == crop
    first_of = {}
    for j, it in enumerate(items):
        first_of.setdefault(it.bucket, j)
    with pytest.raises(ValueError, match="one bucket"):
        data.get_batch(list(first_of.values())[:2], 0, 0)


def test_the_bucket_range_follows_the_resolution():
    """Training at 64 or 1536 px needs no edit of the bucket range (256 … 1024 by default): it widens to reach."""
    from core.dataset import assign_buckets, bucket_sides
    from core.settings import Settings, check_consistency
    s = Settings()
    for res, want in ((64, (64, 1024)), (512, (256, 1024)), (1536, (256, 1536))):
        s.dataset.resolution = res
        assert bucket_sides(s.dataset, res) == want
        assert not [p for p in check_consistency(s) if "bucket" in p]
        items = [ImageItem(path=Path(f"/x/{res}.png"), caption="c", repeats=1, width=2000, height=2000)]
        assign_buckets(items, s.dataset)
        assert items[0].bucket == (res, res)
