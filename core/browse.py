"""What the UI shows before a run starts: the dataset folders to pick from, what a dataset holds (images,
captions, buckets, a few thumbnails), and the states a run can resume from.

Everything here reads the app's folders only (paths go through ``AppConfig.resolve``) and loads no model.
Thumbnails are small copies the app writes into its own folder: the web server shows those, never the user's
images themselves.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from core import dataset as ds_mod
from core.config import AppConfig

THUMBNAIL_SIDE = 160


def dataset_folders(config: AppConfig) -> list[str]:
    """The folders in the datasets folder (names relative to it), sorted; hidden folders left out."""
    root = config.path("datasets_dir")
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass
class BucketRow:
    width: int
    height: int
    images: int
    thumbnails: list[Path] = field(default_factory=list)


@dataclass
class DatasetPreview:
    """A dataset as the trainer will read it, or what stops it (``problem``)."""
    problem: str = ""
    images: int = 0
    captioned: int = 0          # with their own caption file (the others use the default caption)
    samples_per_epoch: int = 0  # images × repeats
    folders: list[str] = field(default_factory=list)
    buckets: list[BucketRow] = field(default_factory=list)

    def markdown(self) -> str:
        if self.problem:
            return "✗ " + self.problem.replace("\n", "  \n")
        default = self.images - self.captioned
        lines = [f"**{self.images} images**, {self.captioned} with a caption file"
                 + (f", {default} use the default caption" if default else "")
                 + f"; {self.samples_per_epoch} samples per epoch with repeats.",
                 "", "| Bucket | Images |", "|---|---|"]
        lines += [f"| {b.width}×{b.height} | {b.images} |" for b in self.buckets]
        return "\n".join(lines)

    def gallery(self) -> list[tuple[str, str]]:
        """(thumbnail, label) for the Dataset tab's gallery, bucket by bucket."""
        return [(str(t), f"{b.width}×{b.height}") for b in self.buckets for t in b.thumbnails]


def preview_dataset(settings, config: AppConfig, thumbnails_dir: Path, per_bucket: int = 3) -> DatasetPreview:
    """Scan the run's image folders and bucket them by the dataset settings, as the trainer does at start;
    ``per_bucket`` thumbnails of each bucket are written into ``thumbnails_dir``.  Problems (a missing folder,
    unreadable images, missing captions, a path outside the app's folders) come back as ``problem``."""
    d = settings.dataset
    try:
        folders = [(f, config.resolve(f.path, "datasets_dir", f.setting)) for f in d.folders()]
        if not folders:
            return DatasetPreview(problem="Choose the folder with your training images (Dataset → Image folder).")
        items = ds_mod.scan_folders(folders)
        counts = ds_mod.assign_buckets(items, d)
    except (ds_mod.DatasetError, ValueError) as exc:
        return DatasetPreview(problem=str(exc))
    ext = d.caption_extension if d.caption_extension.startswith(".") else "." + d.caption_extension
    preview = DatasetPreview(images=len(items), samples_per_epoch=sum(it.repeats for it in items),
                             captioned=sum((it.path.parent / (it.path.stem + ext)).is_file() for it in items),
                             folders=[str(root) for _, root in folders])
    for (w, h), n in counts.items():
        row = BucketRow(w, h, n)
        for it in [it for it in items if it.bucket == (w, h)][:per_bucket]:
            row.thumbnails.append(thumbnail(it.path, thumbnails_dir))
        preview.buckets.append(row)
    return preview


def thumbnail(image: Path, folder: Path, side: int = THUMBNAIL_SIDE) -> Path:
    """A small JPEG copy of ``image`` in ``folder``, named by the image's path, size and time (reused while the
    image is unchanged)."""
    stat = image.stat()
    key = hashlib.sha1(f"{image.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{side}".encode()).hexdigest()[:20]
    out = folder / f"{key}.jpg"
    if not out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(image) as im:
            im = ds_mod._to_rgb(ImageOps.exif_transpose(im))
            im.thumbnail((side, side))
            tmp = out.with_suffix(".tmp")
            im.save(tmp, "JPEG", quality=85)
            tmp.replace(out)
    return out


@dataclass
class StateFolder:
    path: Path
    step: int
    saved_at: float

    def label(self) -> str:
        return f"step {self.step} · {time.strftime('%Y-%m-%d %H:%M', time.localtime(self.saved_at))} · {self.path.name}"


def resume_states(settings, config: AppConfig) -> list[StateFolder]:
    """The state folders in the run's output folder (``saving.output_dir``, or the output name in the outputs
    folder), newest first.  A folder without a readable ``train_state.json`` is not a state."""
    from core.trainer import STATE_INFIX
    s = settings.saving
    try:
        out_dir = config.resolve(s.output_dir or s.output_name, "outputs_dir", "saving.output_dir")
    except ValueError:
        return []
    if not out_dir.is_dir():
        return []
    states = []
    for p in out_dir.iterdir():
        info = p / "train_state.json"
        if STATE_INFIX not in p.name or not info.is_file():
            continue
        try:
            step = int(json.loads(info.read_text(encoding="utf-8"))["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        states.append(StateFolder(p, step, info.stat().st_mtime))
    return sorted(states, key=lambda st: (st.saved_at, st.step), reverse=True)


def resume_choices(settings, config: AppConfig) -> list[tuple[str, str]]:
    """(label, value) pairs for the resume picker: the value is the folder relative to the outputs folder."""
    root = config.path("outputs_dir").resolve()
    out = []
    for st in resume_states(settings, config):
        try:
            value = str(st.path.resolve().relative_to(root))
        except ValueError:
            value = str(st.path)
        out.append((st.label(), value))
    return out
