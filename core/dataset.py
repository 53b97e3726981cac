"""Training images: finding them, aspect-ratio buckets, loading, caption augmentation, batching, latent cache.

The pieces, in the order a run uses them::

    items = scan_dataset(ds, root)                 # every image with caption, repeats and size
    bucket_counts = assign_buckets(items, ds)      # item.bucket = (w, h) it is trained at
    sampler = BucketBatchSampler(items, batch_size, seed)
    cache = LatentCache(ds.cache_latents, encode_fn, cache_tag)
    cache.fill(items, ds.flip_aug, batch_size, progress)   # before training: the loop never runs the VAE
    data = TrainingDataset(items, ds, cache, seed)
    sampler.set_epoch(epoch)
    for i, indices in enumerate(sampler):
        batch = data.get_batch(indices, epoch, i)

Everything random is seeded from (seed, epoch[, batch index]); nothing uses a global RNG, so a run resumed at
(epoch, batch index) sees the same batches, flips and captions.  Every problem with the user's data is a
``DatasetError`` whose message names the files and says what to do.
"""
from __future__ import annotations

import math
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from core.io import atomic_save_safetensors

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_DIR_NAME = ".cache"
_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
_CACHE_FORMAT = "lora-studio-latents-v1"
_LIST_LIMIT = 10

Bucket = tuple[int, int]  # (width, height)


class DatasetError(ValueError):
    """A problem with the training images or captions; the message says which files and what to do."""


@dataclass(frozen=True)
class Augment:
    """How an image's samples vary each time it is used: caption shuffle / keep tokens / dropout, flip."""
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False

    @classmethod
    def of(cls, ds) -> Augment:
        return cls(ds.shuffle_caption, ds.keep_tokens, ds.caption_dropout_rate, ds.flip_aug)


@dataclass
class ImageItem:
    """One training image.  ``width``/``height`` are after EXIF rotation; ``bucket`` is the (w, h) it is
    trained at, set by :func:`assign_buckets`.  ``augment`` and ``resolution`` are those of the folder (subset)
    it was scanned from; None takes the dataset settings' (:func:`item_augment`, :func:`assign_buckets`)."""
    path: Path
    caption: str
    repeats: int
    width: int
    height: int
    bucket: Bucket | None = None
    is_reg: bool = False  # a DreamBooth regularization (class) image: see reg_samples / BucketBatchSampler
    augment: Augment | None = None
    resolution: int | None = None
    mask: Path | None = None  # its loss mask file (masked loss with a mask folder); None: its alpha channel


def item_augment(item: ImageItem, ds) -> Augment:
    return item.augment or Augment.of(ds)


def _name_list(names: Sequence[str], limit: int = _LIST_LIMIT) -> str:
    shown = "\n".join(f"  {n}" for n in names[:limit])
    if len(names) > limit:
        shown += f"\n  … and {len(names) - limit} more"
    return shown


# -- scanning --------------------------------------------------------------------------------------------

def _walk_images(root: Path) -> Iterator[Path]:
    """Image files under root in a stable (sorted) order; hidden folders (``.cache``…) are skipped and
    symlinked folders followed once."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(dirpath) / name


def folder_repeats(rel: Path, default: int) -> int:
    """Repeats for an image at ``rel`` (relative to the dataset root): the nearest enclosing subfolder named
    ``N_name`` gives N; otherwise ``default``."""
    for part in reversed(rel.parts[:-1]):
        m = _REPEAT_DIR.match(part)
        if m:
            return int(m.group(1))
    return default


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """(w, h) after EXIF rotation, reading only the header (no pixel decoding)."""
    w, h = im.size
    raw = im.info.get("exif")
    if raw:
        try:
            exif = Image.Exif()
            exif.load(raw)
            if exif.get(0x0112) in (5, 6, 7, 8):
                return h, w
        except Exception:  # a broken EXIF block is ignored, as exif_transpose would
            pass
    return w, h


def probe_image(path: Path) -> tuple[int, int]:
    """(w, h) after EXIF rotation; raises DatasetError if the file is not a readable image.  Cheap: reads the
    header and checks the file structure (PIL ``verify``) without decoding the pixels."""
    try:
        with Image.open(path) as im:
            size = _oriented_size(im)
            im.verify()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb…)
        raise DatasetError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    if size[0] < 1 or size[1] < 1:
        raise DatasetError(f"{path}: image has no pixels ({size[0]}×{size[1]})")
    return size


def read_caption(path: Path) -> str:
    """A caption file as one line: utf-8, stripped, line breaks joined with ', ' (blank lines and commas at
    line ends dropped)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: caption is not UTF-8 text ({exc}); save it as UTF-8") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the caption ({exc})") from None
    lines = (line.strip().strip(",").strip() for line in text.splitlines())
    return ", ".join(line for line in lines if line)


def scan_dataset(ds, root: Path, reg: bool = False, progress: Callable[[int], None] | None = None,
                 label: str | None = None) -> list[ImageItem]:
    """Every image under ``root`` (png, jpg, jpeg, webp, bmp; subfolders included) with its caption, repeats
    and size, and the augmentation and resolution of ``ds``.  Raises one DatasetError listing all unreadable
    images and all images without a caption (when no default caption is set).

    ``reg=True`` scans a DreamBooth regularization folder (``ds.reg_path``) by the same rules: the items are
    marked ``is_reg`` and folders without an ``N_name`` prefix repeat ``ds.reg_num_repeats`` times.
    ``progress(images seen)`` is called for every image (the trainer stops there when asked).  ``label`` names
    the folder in messages (a subset's, from ``DatasetSettings.folders``)."""
    root = Path(root).expanduser()
    what = label or ("regularization folder (dataset.reg_path)" if reg else "dataset folder")
    if not root.exists():
        raise DatasetError(f"The {what} {root} does not exist. Choose the folder with your "
                           + ("class images, or leave it empty to train without them." if reg else
                              "training images."))
    if not root.is_dir():
        raise DatasetError(f"The {what} path {root} is a file, not a folder. Choose the folder that holds "
                           + ("your class images." if reg else "your training images."))
    ext = ds.caption_extension.strip()
    if not ext:
        raise DatasetError("dataset.caption_extension is empty; use e.g. '.txt'")
    if not ext.startswith("."):
        ext = "." + ext
    default_caption = ds.default_caption.strip()
    default_repeats = getattr(ds, "reg_num_repeats", 1) if reg else ds.num_repeats

    items: list[ImageItem] = []
    broken: list[str] = []
    uncaptioned: list[str] = []
    bad_captions: list[str] = []
    for seen, path in enumerate(_walk_images(root), 1):
        if progress:
            progress(seen)
        rel = path.relative_to(root)
        repeats = folder_repeats(rel, default_repeats)
        if repeats < 1:
            raise DatasetError(f"The folder of {rel} asks for 0 repeats; rename it to start with a number of "
                               "at least 1 (e.g. '1_name') or move the images out of the dataset.")
        try:
            w, h = probe_image(path)
        except DatasetError as exc:
            broken.append(str(exc).replace(str(path), str(rel), 1))
            continue
        cap_path = path.parent / (path.stem + ext)
        if cap_path.is_file():
            try:
                caption = read_caption(cap_path)
            except DatasetError as exc:
                bad_captions.append(str(exc))
                continue
        elif default_caption:
            caption = default_caption
        else:
            uncaptioned.append(str(rel))
            continue
        items.append(ImageItem(path=path, caption=caption, repeats=repeats, width=w, height=h, is_reg=reg,
                               augment=Augment.of(ds), resolution=ds.resolution))

    problems = []
    if broken:
        problems.append(f"{len(broken)} image(s) cannot be read; replace or remove them:\n" + _name_list(broken))
    if bad_captions:
        problems.append(f"{len(bad_captions)} caption file(s) cannot be read:\n" + _name_list(bad_captions))
    if uncaptioned:
        problems.append(f"{len(uncaptioned)} image(s) have no caption file ({ext}) and no default caption is "
                        "set. Add the caption files or set 'Caption for images without one':\n"
                        + _name_list(uncaptioned))
    if problems:
        raise DatasetError(f"Problems in the {label or ('regularization images' if reg else 'dataset')} {root}:\n"
                           + "\n".join(problems))
    if not items:
        raise DatasetError(f"No images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) found in "
                           f"{'the ' + label + ' ' if label else ''}{root} or its subfolders.")
    return items


def check_apart(folders: Sequence[tuple[object, Path]]) -> None:
    """Refuses a regularization folder that lies in a training folder (its images would be trained as training
    images too) or holds one.  ``folders``: (``ImageFolder`` of ``DatasetSettings.folders``, resolved root)."""
    for reg, reg_root in ((f, r.resolve()) for f, r in folders if f.is_reg):
        for train, train_root in ((f, r.resolve()) for f, r in folders if not f.is_reg):
            if reg_root == train_root or train_root in reg_root.parents:
                raise DatasetError(f"The regularization folder ({reg.setting}) {reg_root} lies inside the training "
                                   f"folder ({train.setting}) {train_root}, so its images would be trained as "
                                   "training images too. Move it out of the training folder.")
            if reg_root in train_root.parents:
                raise DatasetError(f"The training folder ({train.setting}) {train_root} lies inside the "
                                   f"regularization folder ({reg.setting}) {reg_root}. Keep the two folders apart.")


def scan_folders(folders: Sequence[tuple[object, Path]], progress: Callable[[int], None] | None = None
                 ) -> list[ImageItem]:
    """The images of every folder (``DatasetSettings.folders`` with their resolved roots, in that order), each
    scanned with its own settings (repeats, caption extension, augmentation, resolution) and named by its label
    in messages.  Regularization folders that overlap training folders are refused before anything is read."""
    check_apart(folders)
    items: list[ImageItem] = []
    for folder, root in folders:
        items += scan_dataset(folder.settings, root, reg=folder.is_reg, progress=progress, label=folder.label)
    return items


# -- buckets ---------------------------------------------------------------------------------------------

def make_buckets(resolution: int, min_reso: int, max_reso: int, step: int) -> list[Bucket]:
    """Aspect-ratio buckets as (w, h), sorted; the same set sd-scripts builds.

    Candidates are the rectangles whose sides are multiples of ``step`` within [min_reso, max_reso] and whose
    area is at most ``resolution``².  Rule: for every candidate width w the tallest height that fits is a
    bucket, and so is its transpose (the widest width for that height); so is the largest square.  Of
    buckets with the same aspect ratio only the largest is kept.  Hence every bucket is as large as it can be
    in at least one direction, each aspect ratio appears once, and the ratios run from the widest to the
    tallest candidate (about max_reso/min_reso either way) in steps of roughly one ``step``.
    """
    if step < 1:
        raise DatasetError(f"bucket step must be positive (got {step})")
    lo = math.ceil(min_reso / step) * step
    hi = (max_reso // step) * step
    max_area = resolution * resolution
    if lo > hi:
        raise DatasetError(f"No bucket fits: smallest side {min_reso} is above largest side {max_reso} "
                           f"(with step {step}).")
    found: set[Bucket] = set()
    side = min(hi, math.isqrt(max_area) // step * step)
    if side >= lo:
        found.add((side, side))
    for w in range(lo, hi + 1, step):
        h = min(hi, (max_area // w) // step * step)  # tallest that fits this width
        if h >= lo:
            found.update({(w, h), (h, w)})
    if not found:
        raise DatasetError(f"No bucket fits: resolution {resolution} is below the smallest bucket side "
                           f"{min_reso}.")
    best: dict[tuple[int, int], Bucket] = {}
    for w, h in found:
        g = math.gcd(w, h)
        ratio = (w // g, h // g)
        if ratio not in best or w * h > best[ratio][0] * best[ratio][1]:
            best[ratio] = (w, h)
    return sorted(best.values())


def choose_bucket(w: int, h: int, buckets: Sequence[Bucket], resolution: int, step: int,
                  no_upscale: bool) -> Bucket:
    """The bucket for a w×h image: the one with the closest aspect ratio (|log(bw/bh) − log(w/h)|, ties to the
    larger area).  With ``no_upscale``, if that bucket is wider or taller than the image, the image gets its
    own smaller bucket instead: its size scaled down to the area budget if needed, sides rounded down to
    ``step`` and capped at the largest bucket side, never larger than the image."""
    if not buckets:
        raise DatasetError("no buckets to choose from")
    target = math.log(w / h)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1], b))
    if not no_upscale or (best[0] <= w and best[1] <= h):
        return best
    scale = min(1.0, math.sqrt(resolution * resolution / (w * h)))
    cap = max(max(b) for b in buckets)
    bw = min(cap, int(w * scale) // step * step)
    bh = min(cap, int(h * scale) // step * step)
    if bw < step or bh < step:
        raise DatasetError(f"image of {w}×{h} is smaller than the bucket step {step}; remove it or turn off "
                           "'Never upscale'")
    return bw, bh


def bucket_sides(ds, resolution: int) -> tuple[int, int]:
    """(smallest, largest) bucket side for a resolution: the dataset's range, widened to reach the resolution
    (training at 64 or 1536 px needs no edit of the bucket range)."""
    return min(ds.min_bucket_reso, resolution), max(ds.max_bucket_reso, resolution)


def assign_buckets(items: Sequence[ImageItem], ds) -> dict[Bucket, int]:
    """Sets ``item.bucket`` for every item from the dataset settings and the item's own resolution (a subset's;
    None: ``ds.resolution``); returns {bucket: image count}.  Without buckets every image is trained at
    (resolution, resolution) (resized to cover, centre-cropped).  Items of different resolutions may share a
    bucket: a batch holds one bucket, so its tensors still have one shape."""
    counts: dict[Bucket, int] = defaultdict(int)
    if not ds.enable_buckets:
        for it in items:
            res = it.resolution or ds.resolution
            it.bucket = (res, res)
            counts[it.bucket] += 1
        return dict(counts)
    buckets = {res: make_buckets(res, *bucket_sides(ds, res), ds.bucket_reso_steps)
               for res in sorted({it.resolution or ds.resolution for it in items})}
    too_small = []
    for it in items:
        res = it.resolution or ds.resolution
        try:
            it.bucket = choose_bucket(it.width, it.height, buckets[res], res, ds.bucket_reso_steps,
                                      ds.bucket_no_upscale)
        except DatasetError as exc:
            too_small.append(f"{it.path}: {exc}")
            continue
        counts[it.bucket] += 1
    if too_small:
        raise DatasetError(f"{len(too_small)} image(s) are too small for any bucket:\n" + _name_list(too_small))
    return dict(sorted(counts.items()))


# -- loading ---------------------------------------------------------------------------------------------

def crop_geometry(w: int, h: int, bucket: Bucket, flip: bool = False) -> tuple[int, int, int, int]:
    """How a w×h image is fitted to ``bucket``: (resized_w, resized_h, crop_top, crop_left).  The image is
    scaled to cover the bucket and centre-cropped; with ``flip`` crop_left is measured on the mirrored image
    (resized_w − bucket_w − left), as SDXL's crop conditioning expects."""
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    top, left = (rh - bh) // 2, (rw - bw) // 2
    if flip:
        left = rw - bw - left
    return rw, rh, top, left


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im.convert("I"), dtype=np.int64)
        im = Image.fromarray(np.clip(arr >> 8 if arr.max() > 255 else arr, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB") if im.mode != "RGB" else im


def load_image(path: Path, bucket: Bucket, flip: bool = False
               ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """The image fitted to ``bucket`` (w, h) as a (3, h, w) float tensor in [-1, 1]: EXIF-rotated, RGB (alpha
    composited on white), Lanczos-resized to cover the bucket, centre-cropped, optionally mirrored.  Returns
    (tensor, (crop_top, crop_left), (orig_h, orig_w)); DatasetError names the file if it cannot be decoded."""
    try:
        with Image.open(path) as src:
            im = ImageOps.exif_transpose(src)
            im = _to_rgb(im)
    except Exception as exc:
        raise DatasetError(f"{path}: cannot decode the image ({exc.__class__.__name__}: {exc}); replace or "
                           "remove it") from None
    w, h = im.size
    bw, bh = bucket
    rw, rh, top, left = crop_geometry(w, h, bucket)
    if (rw, rh) != (w, h):
        im = im.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    im = im.crop((left, top, left + bw, top + bh))
    if flip:
        im = ImageOps.mirror(im)
        left = rw - bw - left
    arr = np.array(im, dtype=np.uint8)
    tensor = torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return tensor.contiguous(), (top, left), (h, w)


# -- loss masks ------------------------------------------------------------------------------------------

#: masks are kept at 1/8 of the bucket (the VAE's grid); the loss resamples them to the prediction's grid
MASK_SCALE = 8


def attach_masks(items: Sequence[ImageItem], image_root: Path, mask_root: Path) -> None:
    """Gives every item under ``image_root`` its mask file: the same path under ``mask_root``, any image
    extension.  One DatasetError lists every image without one."""
    missing = []
    for it in items:
        try:
            rel = it.path.relative_to(image_root)
        except ValueError:
            continue
        found = [mask_root / rel.parent / (rel.stem + e) for e in IMAGE_EXTENSIONS
                 if (mask_root / rel.parent / (rel.stem + e)).is_file()]
        if found:
            it.mask = found[0]
        else:
            missing.append(str(rel))
    if missing:
        raise DatasetError(f"{len(missing)} image(s) have no mask in the mask folder {mask_root} (dataset.mask_path; "
                           "the same name with any image extension). Add them, or clear the mask folder to use the "
                           "images' alpha channel:\n" + _name_list(missing))


def load_mask(item: ImageItem, bucket: Bucket, flip: bool = False) -> torch.Tensor:
    """The item's loss mask fitted to ``bucket`` exactly as its image is (EXIF rotation, cover, centre crop,
    mirror), averaged down to the VAE's grid: (1, h/8, w/8) in [0, 1].  From its mask file, else its alpha
    channel; all ones for an image without alpha."""
    source = item.mask or item.path
    try:
        with Image.open(source) as src:
            im = ImageOps.exif_transpose(src)
            if item.mask is not None:
                im = im.convert("L")
            elif "A" in im.getbands() or im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA").getchannel("A")
            else:
                return torch.ones(1, bucket[1] // MASK_SCALE, bucket[0] // MASK_SCALE)
    except Exception as exc:
        raise DatasetError(f"{source}: cannot decode the mask ({exc.__class__.__name__}: {exc}); replace or "
                           "remove it") from None
    bw, bh = bucket
    rw, rh, top, left = crop_geometry(item.width, item.height, bucket)
    im = im.resize((rw, rh), Image.Resampling.BILINEAR).crop((left, top, left + bw, top + bh))
    if flip:
        im = ImageOps.mirror(im)
    mask = torch.from_numpy(np.array(im, dtype=np.float32) / 255.0)[None, None]
    return torch.nn.functional.avg_pool2d(mask, MASK_SCALE)[0]


class MaskCache:
    """Every item's mask for each flip it is trained with, computed once before training (small: 1/64 of the
    image's pixels), so the loop never reads mask files."""

    def __init__(self) -> None:
        self._masks: dict[tuple[str, Bucket, bool], torch.Tensor] = {}

    def fill(self, items: Sequence[ImageItem], ds) -> None:
        for it in items:
            for flip in (False, True) if item_augment(it, ds).flip_aug else (False,):
                self._masks[(str(it.path), it.bucket, flip)] = load_mask(it, it.bucket, flip)

    def get(self, item: ImageItem, flip: bool) -> torch.Tensor:
        key = (str(item.path), item.bucket, flip)
        if key not in self._masks:
            self._masks[key] = load_mask(item, item.bucket, flip)
        return self._masks[key]


# -- captions --------------------------------------------------------------------------------------------

def process_caption(caption: str, shuffle: bool, keep_tokens: int, dropout_rate: float,
                    rng: random.Random) -> str:
    """Caption augmentation: with probability ``dropout_rate`` the empty caption; else, with ``shuffle``, the
    comma-separated parts re-joined with ', ' with the first ``keep_tokens`` left in place and the rest
    shuffled.  Without shuffle (and not dropped) the caption is returned unchanged."""
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    parts = [p.strip() for p in caption.split(",")]
    parts = [p for p in parts if p]
    keep, rest = parts[:keep_tokens], parts[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(keep + rest)


# -- batching --------------------------------------------------------------------------------------------

def split_validation(items: Sequence[ImageItem], share: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """(items to train on, held-out validation items): ``share`` of the training images (never regularization
    images; at least one), chosen by ``seed`` alone, so the same images are held out on every run and resume."""
    if share <= 0:
        return list(items), []
    train = [it for it in items if not it.is_reg]
    n = max(1, round(len(train) * share))
    if n >= len(train):
        raise DatasetError(f"dataset.validation_split {share:g} would hold out all {len(train)} training image(s), "
                           "leaving none to train on. Lower it (Dataset → Validation share) or add images.")
    held = {id(train[i]) for i in random.Random(f"validation:{seed}").sample(range(len(train)), n)}
    return [it for it in items if id(it) not in held], [it for it in train if id(it) in held]


def reg_samples(items: Sequence[ImageItem]) -> list[int]:
    """The regularization samples of every epoch (DreamBooth prior preservation, as in sd-scripts): indices of
    ``is_reg`` items, exactly as many as the training images give per epoch (T = Σ repeats of the training
    items).

    Rule: the reg *pool* is built round-robin in scan order — pass r (r = 0, 1, …) lists every reg item with
    more than r repeats — so every reg image appears once before any appears twice.  The epoch takes the first
    T entries of the pool, cycling it from the start when T is larger (entry k is ``pool[k % len(pool)]``).
    The choice is the same every epoch (only the order of the batches changes with seed and epoch), so every
    epoch has the same number of batches; with more reg samples than T the pool's tail is unused, as in
    sd-scripts.  Empty when there are no reg items."""
    reg = [i for i, it in enumerate(items) if it.is_reg]
    if not reg:
        return []
    pool: list[int] = []
    for r in range(max(items[i].repeats for i in reg)):
        pool.extend(i for i in reg if items[i].repeats > r)
    total = sum(it.repeats for it in items if not it.is_reg)
    return [pool[k % len(pool)] for k in range(total)]


class BucketBatchSampler:
    """Batches of item indices, each from one bucket only (tensor shapes never change inside a batch).

    Per epoch: every training item index appears ``item.repeats`` times and regularization items (``is_reg``)
    as :func:`reg_samples` chooses (as many reg samples as training samples); indices are grouped by bucket,
    shuffled within the bucket, cut into batches of ``batch_size`` (the last batch of a bucket may be smaller)
    and the batch order is shuffled, so reg and training images share batches of the same bucket.  The order
    is a pure function of (items, batch_size, seed, epoch): resuming at (epoch, batch k) is
    ``sampler.batches(epoch)[k:]`` or ``set_epoch(epoch, start_batch=k)`` then iterating.
    """

    def __init__(self, items: Sequence[ImageItem], batch_size: int, seed: int, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        missing = [str(it.path) for it in items if it.bucket is None]
        if missing:
            raise ValueError("items have no bucket; call assign_buckets first:\n" + _name_list(missing))
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0
        self._groups: dict[Bucket, list[int]] = defaultdict(list)
        for i, it in enumerate(items):
            if not it.is_reg:
                self._groups[it.bucket].extend([i] * it.repeats)
        for i in reg_samples(items):
            self._groups[items[i].bucket].append(i)
        self._groups = dict(sorted(self._groups.items()))
        self._len = sum(math.ceil(len(g) / batch_size) for g in self._groups.values())

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch whose order ``__iter__`` yields, starting at batch ``start_batch``."""
        self.epoch = epoch
        self.start_batch = start_batch

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` in order."""
        rng = random.Random(f"bucket-batches:{self.seed}:{epoch}")
        out: list[list[int]] = []
        for group in self._groups.values():
            group = list(group)
            if self.shuffle:
                rng.shuffle(group)
            out.extend(group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size))
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch)[self.start_batch:])

    def __len__(self) -> int:
        return self._len


# -- latent cache ----------------------------------------------------------------------------------------

def _safe_tag(tag: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", tag).strip(".-")
    if not safe:
        raise ValueError(f"cache_tag {tag!r} has no usable characters")
    return safe


class LatentCache:
    """Latents of the fitted images, so the training loop never runs the VAE.

    ``encode_fn`` maps a (B, 3, H, W) float batch in [-1, 1] on the CPU to (B, C, H/f, W/f) latents (it moves
    them to its device itself); it runs under ``torch.no_grad``.  ``cache_tag`` names the encoder (e.g.
    "sdxl-vae"): latents of another tag are never reused.

    - ``"memory"``: latents kept in RAM for the run.
    - ``"disk"``: one file per image and flip in a ``.cache`` subfolder of the image's folder,
      ``.cache/<image file name>.<tag>[.flip].latents.safetensors``, written atomically.  It is reused while
      the image's size and mtime_ns, the bucket, the flip and the tag are unchanged, and recomputed otherwise.
      The user's own files are never written.
    - ``"off"``: every ``get`` encodes (``fill`` only checks that every image decodes).
    """

    def __init__(self, mode: str, encode_fn: Callable[[torch.Tensor], torch.Tensor], cache_tag: str):
        if mode not in ("memory", "disk", "off"):
            raise ValueError(f"cache mode must be 'memory', 'disk' or 'off' (got {mode!r})")
        self.mode = mode
        self.encode_fn = encode_fn
        self.cache_tag = cache_tag
        self._file_tag = _safe_tag(cache_tag)
        self._memory: dict[tuple[str, Bucket, bool], torch.Tensor] = {}

    # keys and files
    def cache_path(self, item: ImageItem, flip: bool) -> Path:
        flip_part = ".flip" if flip else ""
        return item.path.parent / CACHE_DIR_NAME / f"{item.path.name}.{self._file_tag}{flip_part}.latents.safetensors"

    def _disk_key(self, item: ImageItem, flip: bool) -> dict[str, str]:
        st = item.path.stat()
        return {"format": _CACHE_FORMAT, "file_size": str(st.st_size), "mtime_ns": str(st.st_mtime_ns),
                "bucket": f"{item.bucket[0]}x{item.bucket[1]}", "flip": "1" if flip else "0",
                "cache_tag": self.cache_tag}

    def _read_disk(self, item: ImageItem, flip: bool) -> torch.Tensor | None:
        from safetensors import safe_open
        path = self.cache_path(item, flip)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _CACHE_FORMAT:
                    raise DatasetError(f"{path} is not a latent cache file written by this app; move it away "
                                       "so the cache can be written there")
                if meta != self._disk_key(item, flip):
                    return None
                return f.get_tensor("latents")
        except DatasetError:
            raise
        except Exception:  # an unreadable cache file of ours is simply recomputed
            return None

    def _store(self, item: ImageItem, flip: bool, latents: torch.Tensor) -> None:
        if self.mode == "memory":
            self._memory[(str(item.path), item.bucket, flip)] = latents
        elif self.mode == "disk":
            path = self.cache_path(item, flip)
            try:
                atomic_save_safetensors(path, {"latents": latents.contiguous()}, self._disk_key(item, flip))
            except OSError as exc:
                raise DatasetError(f"Cannot write the latent cache {path} ({exc}). Make the image folder "
                                   "writable or set 'Cache latents' to 'memory'.") from None

    def _lookup(self, item: ImageItem, flip: bool) -> torch.Tensor | None:
        if self.mode == "memory":
            return self._memory.get((str(item.path), item.bucket, flip))
        if self.mode == "disk":
            return self._read_disk(item, flip)
        return None

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.encode_fn(pixels)
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != pixels.shape[0]:
            raise ValueError(f"encode_fn must return a (B, C, h, w) tensor for {tuple(pixels.shape)} input; got "
                             f"{getattr(out, 'shape', type(out))}")
        return out.detach().cpu()

    # public
    def get(self, item: ImageItem, flip: bool = False) -> torch.Tensor:
        """Latents (C, h, w) on the CPU of ``item`` fitted to its bucket (mirrored when ``flip``); computed
        and stored if not cached."""
        if item.bucket is None:
            raise ValueError(f"{item.path} has no bucket; call assign_buckets first")
        found = self._lookup(item, flip)
        if found is not None:
            return found
        pixels, _, _ = load_image(item.path, item.bucket, flip)
        latents = self._encode(pixels[None])[0].clone()
        self._store(item, flip, latents)
        return latents

    def entries(self) -> dict:
        """What the "memory" mode holds, for :meth:`adopt` in another process (core.distributed)."""
        return self._memory

    def adopt(self, entries: dict) -> None:
        """Latents another process encoded with the same encoder (:meth:`entries` there)."""
        self._memory.update(entries)

    def fill(self, items: Sequence[ImageItem], flip_aug: bool, batch_size: int,
             progress: Callable[[int, int], None] | None = None) -> int:
        """Encode every (item, flip) not cached yet, batched by bucket, so training never runs the VAE.  In
        "off" mode only decodes every image.  Images that cannot be decoded are all collected into one
        DatasetError.  Calls ``progress(done, total)`` and returns the number of latents encoded."""
        flips = (False, True) if flip_aug else (False,)
        pairs = [(it, f) for it in items for f in flips]
        total = len(pairs)
        broken: list[str] = []
        if self.mode == "off":
            for n, it in enumerate(items, 1):
                try:
                    with Image.open(it.path) as im:
                        im.load()
                except Exception as exc:
                    broken.append(f"{it.path}: {exc.__class__.__name__}: {exc}")
                if progress:
                    progress(n, len(items))
            if broken:
                raise DatasetError(f"{len(broken)} image(s) cannot be decoded; replace or remove them:\n"
                                   + _name_list(broken))
            return 0
        todo: dict[tuple[Bucket, bool], list[ImageItem]] = defaultdict(list)
        done = 0
        for it, f in pairs:
            if it.bucket is None:
                raise ValueError(f"{it.path} has no bucket; call assign_buckets first")
            if self._lookup(it, f) is None:
                todo[(it.bucket, f)].append(it)
            else:
                done += 1
        if progress:
            progress(done, total)
        encoded = 0
        for (_, f), group in sorted(todo.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            for start in range(0, len(group), max(1, batch_size)):
                chunk, pixels = [], []
                for it in group[start:start + max(1, batch_size)]:
                    try:
                        pixels.append(load_image(it.path, it.bucket, f)[0])
                        chunk.append(it)
                    except DatasetError as exc:
                        if str(exc) not in broken:
                            broken.append(str(exc))
                        done += 1
                if chunk:
                    latents = self._encode(torch.stack(pixels))
                    for it, lat in zip(chunk, latents):
                        self._store(it, f, lat.clone())
                    encoded += len(chunk)
                    done += len(chunk)
                if progress:
                    progress(done, total)
        if broken:
            raise DatasetError(f"{len(broken)} image(s) cannot be decoded; replace or remove them:\n"
                               + _name_list(broken))
        return encoded


def fill_cache(cache: LatentCache, items: Sequence[ImageItem], ds, batch_size: int,
               progress: Callable[[int, int], None] | None = None) -> int:
    """:meth:`LatentCache.fill` with mirrored latents only for the items whose folder flips (:func:`item_augment`):
    one fill per flip choice, ``progress(done, total)`` counted over all of them."""
    flips = [item_augment(it, ds).flip_aug for it in items]
    total = sum(2 if f else 1 for f in flips)
    encoded = offset = 0
    for flip in sorted(set(flips)):
        group = [it for it, f in zip(items, flips) if f == flip]
        encoded += cache.fill(group, flip, batch_size,
                              progress=progress and (lambda done, _, o=offset: progress(o + done, total)))
        offset += len(group) * (2 if flip else 1)
    return encoded


# -- batches for the training loop -----------------------------------------------------------------------

class TrainingDataset:
    """Turns a batch of indices from :class:`BucketBatchSampler` into the training inputs.

    ``get_batch`` returns a dict: ``latents`` (B, C, h, w) from the cache, or ``pixels`` (B, 3, H, W) in
    [-1, 1] when the cache mode is "off" (or no cache is given); ``captions`` (processed); ``original_sizes``
    [(h, w)]; ``crop_coords`` [(top, left)]; ``target_sizes`` [(h, w) of the bucket]; ``flips`` [bool];
    ``paths`` [Path]; ``loss_weights`` [float]: 1.0 for training images, ``ds.prior_loss_weight`` for
    regularization images; ``size_conditioning`` (B, 6) float: original size, crop and target size as SDXL
    is conditioned on them (one tensor, so the step reads no host lists); ``masks`` (B, 1, h/8, w/8) with a
    :class:`MaskCache` (masked loss); ``conditioning`` (B, 3, H, W) in [0, 1] with ``conditioning`` images (a
    ControlNet's: ``core.controlnet.ConditioningImages``).  Flip and caption augmentation follow each item's own
    options (its subset's; :func:`item_augment`) and are drawn from an RNG seeded by (seed, epoch, batch_index),
    so a resumed run gets the same batches.
    """

    def __init__(self, items: Sequence[ImageItem], ds, cache: LatentCache | None, seed: int,
                 masks: MaskCache | None = None, conditioning=None):
        self.items = list(items)
        self.ds = ds
        self.cache = cache
        self.seed = seed
        self.masks = masks
        self.conditioning = conditioning

    def __len__(self) -> int:
        return len(self.items)

    def get_batch(self, indices: Sequence[int], epoch: int, batch_index: int) -> dict:
        if not indices:
            raise ValueError("empty batch")
        items = [self.items[i] for i in indices]
        buckets = {it.bucket for it in items}
        if len(buckets) != 1 or None in buckets:
            raise ValueError(f"a batch must hold one bucket; got {sorted(map(str, buckets))}")
        rng = random.Random(f"training-batch:{self.seed}:{epoch}:{batch_index}")
        ds = self.ds
        use_cache = self.cache is not None and self.cache.mode != "off"
        out = {"captions": [], "original_sizes": [], "crop_coords": [], "target_sizes": [], "flips": [],
               "paths": [], "loss_weights": []}
        prior_weight = float(getattr(ds, "prior_loss_weight", 1.0))
        tensors = []
        for it in items:
            aug = item_augment(it, ds)
            flip = bool(aug.flip_aug) and rng.random() < 0.5
            out["captions"].append(process_caption(it.caption, aug.shuffle_caption, aug.keep_tokens,
                                                   aug.caption_dropout_rate, rng))
            bw, bh = it.bucket
            if use_cache:
                tensors.append(self.cache.get(it, flip))
                _, _, top, left = crop_geometry(it.width, it.height, it.bucket, flip)
                orig = (it.height, it.width)
            else:
                pixels, (top, left), orig = load_image(it.path, it.bucket, flip)
                tensors.append(pixels)
            out["original_sizes"].append(orig)
            out["crop_coords"].append((top, left))
            out["target_sizes"].append((bh, bw))
            out["flips"].append(flip)
            out["paths"].append(it.path)
            out["loss_weights"].append(prior_weight if it.is_reg else 1.0)
        out["latents" if use_cache else "pixels"] = torch.stack(tensors)
        out["size_conditioning"] = torch.tensor(
            [[*o, *c, *t] for o, c, t in zip(out["original_sizes"], out["crop_coords"], out["target_sizes"])],
            dtype=torch.float32)
        if self.masks is not None:
            out["masks"] = torch.stack([self.masks.get(it, f) for it, f in zip(items, out["flips"])])
        if self.conditioning is not None:
            out["conditioning"] = torch.stack([self.conditioning.get(it, f) for it, f in zip(items, out["flips"])])
        return out
