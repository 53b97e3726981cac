"""Caption files of a dataset folder: list the images with their captions, edit one caption, and add, remove or
replace tags in every caption of the folder (the Dataset tools tab).

A caption is the ``.txt`` file beside an image with the same stem, read the way training reads it
(:func:`core.dataset.read_caption`: one line, line breaks joined with ", "); the images are those training
finds (:data:`core.dataset.IMAGE_EXTENSIONS`, subfolders included, hidden folders skipped).  An image without a
caption file has the empty caption.  Every write is atomic (:func:`core.io.atomic_write_text`): an
interrupted save never leaves a half-written caption.

Tags are the comma-separated parts of a caption (kohya / booru style: ``"1girl, red hair, smiling"``); two tags
are the same when they match ignoring case and runs of spaces.  A bulk operation rewrites only the files whose
tags it changes, as one line of tags joined with ", "; it reads every caption first and writes nothing when one
of them cannot be read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageOps

from core import dataset as ds_mod
from core.config import AppConfig
from core.io import atomic_write_text

CAPTION_EXTENSION = ".txt"
POSITIONS = ("start", "end")
_LABEL_CHARS = 120  # caption text shown under a gallery thumbnail


class CaptionError(ValueError):
    """A problem with a dataset folder or its captions; the message says what is wrong and what to change."""


# -- folders and images ----------------------------------------------------------------------------------------

def open_folder(config: AppConfig, text: str) -> Path:
    """The dataset folder the user chose (a name in the datasets folder, or a path inside the app's folders),
    resolved; CaptionError when it is empty, missing or not a folder (PathNotAllowed, also a ValueError, when
    it lies outside the app's folders)."""
    text = (text or "").strip().strip('"')
    if not text:
        raise CaptionError("Choose a dataset folder first (pick one from the list, or type its path).")
    folder = config.resolve(text, "datasets_dir", "Dataset folder")
    if not folder.exists():
        raise CaptionError(f"The dataset folder {folder} does not exist. Pick one from the list, or put your "
                           f"images into a folder inside {config.path('datasets_dir')}.")
    if not folder.is_dir():
        raise CaptionError(f"{folder} is a file, not a folder. Choose the folder that holds your images.")
    return folder


def dataset_images(folder: Path) -> list[Path]:
    """The images training would read in ``folder`` (sorted, subfolders included); CaptionError when none."""
    images = list(ds_mod._walk_images(Path(folder)))
    if not images:
        kinds = ", ".join(e[1:] for e in ds_mod.IMAGE_EXTENSIONS)
        raise CaptionError(f"No images ({kinds}) in {folder} or its subfolders. Copy your images into it, or "
                           "choose another folder.")
    return images


def caption_path(image: Path, extension: str = CAPTION_EXTENSION) -> Path:
    """The caption file of ``image``: same folder, same stem, ``extension``."""
    image = Path(image)
    return image.parent / (image.stem + extension)


def image_in_folder(folder: Path, name: str) -> Path:
    """The image ``name`` (relative to ``folder``) if it is one of the folder's images; CaptionError otherwise
    (so a caption is never written beside a file that is not a training image, nor outside the folder)."""
    name = (name or "").strip()
    if not name:
        raise CaptionError("Select an image in the gallery first.")
    for image in ds_mod._walk_images(Path(folder)):
        if image.relative_to(folder).as_posix() == name:
            return image
    raise CaptionError(f"{name} is not an image of {folder}. Load the folder again and select the image.")


def read_caption(image: Path, extension: str = CAPTION_EXTENSION) -> str:
    """The caption of ``image`` as training reads it; "" when it has no caption file.  CaptionError when the
    file cannot be read (not UTF-8…)."""
    path = caption_path(image, extension)
    if not path.is_file():
        return ""
    try:
        return ds_mod.read_caption(path)
    except ds_mod.DatasetError as exc:
        raise CaptionError(str(exc)) from None


def write_caption(image: Path, text: str, extension: str = CAPTION_EXTENSION) -> Path:
    """Write ``text`` (stripped; one trailing newline) as the caption of ``image``, atomically."""
    text = (text or "").strip()
    return atomic_write_text(caption_path(image, extension), text + "\n" if text else "")


def has_caption(image: Path, extension: str = CAPTION_EXTENSION) -> bool:
    """True when ``image`` has a caption file with some text (an unreadable one counts as a caption: it is
    never overwritten silently)."""
    path = caption_path(image, extension)
    if not path.is_file():
        return False
    try:
        return bool(ds_mod.read_caption(path))
    except ds_mod.DatasetError:
        return True


@dataclass
class FolderView:
    """What the caption editor shows: (thumbnail, label) per readable image, the images' names relative to the
    folder in the same order, and the images that could not be shown."""
    folder: Path
    gallery: list[tuple[str, str]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    captioned: int = 0

    def summary(self) -> str:
        n = len(self.names)
        text = f"{n} image{'s' if n != 1 else ''} in {self.folder}, {self.captioned} with a caption."
        if self.problems:
            text += (f"\n{len(self.problems)} file(s) cannot be shown; replace or remove them:\n"
                     + ds_mod._name_list(self.problems))
        return text


def folder_view(folder: Path, thumbnails_dir: Path) -> FolderView:
    """Every image of ``folder`` with its caption, as a small thumbnail written into ``thumbnails_dir`` (the
    web page shows those copies, never the user's files).  Unreadable images and captions are listed in
    ``problems`` by name; CaptionError when the folder holds no image."""
    from core.browse import thumbnail

    folder = Path(folder)
    view = FolderView(folder)
    for image in dataset_images(folder):
        rel = image.relative_to(folder).as_posix()
        try:
            ds_mod.probe_image(image)
            thumb = thumbnail(image, thumbnails_dir)
        except ds_mod.DatasetError as exc:
            view.problems.append(str(exc).replace(str(image), rel, 1))
            continue
        except Exception as exc:  # PIL raises many types while decoding a damaged file
            view.problems.append(f"{rel}: not a readable image ({exc.__class__.__name__}: {exc})")
            continue
        try:
            caption = read_caption(image)
        except CaptionError as exc:
            view.problems.append(str(exc))
            caption = "(caption file cannot be read)"
        else:
            view.captioned += bool(caption)
        label = caption if len(caption) <= _LABEL_CHARS else caption[:_LABEL_CHARS - 1] + "…"
        view.gallery.append((str(thumb), f"{rel}: {label}" if label else f"{rel}: (no caption)"))
        view.names.append(rel)
    if not view.names and view.problems:
        raise CaptionError(f"None of the images in {folder} can be read; replace or remove them:\n"
                           + ds_mod._name_list(view.problems))
    return view


def load_rgb(image: Path) -> Image.Image:
    """The image decoded as RGB, EXIF rotation applied (what a captioning model sees); CaptionError naming the
    file when it cannot be decoded."""
    try:
        with Image.open(image) as im:
            im.load()
            return ds_mod._to_rgb(ImageOps.exif_transpose(im))
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb…)
        raise CaptionError(f"{image}: not a readable image ({exc.__class__.__name__}: {exc})") from None


# -- tags -------------------------------------------------------------------------------------------------------

def split_tags(text: str) -> list[str]:
    """The comma-separated tags of ``text``, stripped (runs of spaces made one), empty ones dropped."""
    return [" ".join(t.split()) for t in (text or "").replace("\n", ",").split(",") if t.strip()]


def join_tags(tags: Sequence[str]) -> str:
    return ", ".join(tags)


def _key(tag: str) -> str:
    return " ".join(tag.split()).casefold()


def _unique(tags: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for t in tags:
        if _key(t) not in seen:
            seen.add(_key(t))
            out.append(t)
    return out


def add_tags(tags: Sequence[str], new: Sequence[str], position: str = "end") -> list[str]:
    """``tags`` with those of ``new`` that it lacks, at the start or the end (in ``new``'s order); tags already
    there stay where they are."""
    if position not in POSITIONS:
        raise CaptionError(f"position must be one of {', '.join(POSITIONS)}, not {position!r}")
    have = {_key(t) for t in tags}
    missing = [t for t in _unique(new) if _key(t) not in have]
    return missing + list(tags) if position == "start" else list(tags) + missing


def remove_tags(tags: Sequence[str], unwanted: Sequence[str]) -> list[str]:
    """``tags`` without every tag of ``unwanted``."""
    drop = {_key(t) for t in unwanted}
    return [t for t in tags if _key(t) not in drop]


def replace_tag(tags: Sequence[str], old: str, new: Sequence[str]) -> list[str]:
    """``tags`` with ``old`` replaced by the tags of ``new`` at its place (those already present elsewhere are
    not added again)."""
    if not any(_key(t) == _key(old) for t in tags):
        return list(tags)
    present = {_key(t) for t in tags if _key(t) != _key(old)}
    fresh = [t for t in _unique(new) if _key(t) not in present]
    out: list[str] = []
    for t in tags:
        out.extend(fresh if _key(t) == _key(old) else [t])
    return _unique(out)


@dataclass
class TagReport:
    what: str       # e.g. 'added "solo" at the end'
    changed: int
    total: int

    def message(self) -> str:
        return (f"✓ {self.what[:1].upper()}{self.what[1:]}: {self.changed} of {self.total} caption file"
                f"{'s' if self.total != 1 else ''} changed, {self.total - self.changed} unchanged.")


def edit_folder_tags(folder: Path, edit: Callable[[list[str]], list[str]], what: str) -> TagReport:
    """Apply ``edit`` to the tags of every image's caption in ``folder``; files whose tags change are rewritten
    (a missing caption file counts as no tags and is created if tags are added).  All captions are read first:
    when one cannot be read, nothing is written."""
    images = dataset_images(folder)
    current, bad = [], []
    for image in images:
        try:
            current.append(split_tags(read_caption(image)))
        except CaptionError as exc:
            bad.append(str(exc))
    if bad:
        raise CaptionError(f"{len(bad)} caption file(s) cannot be read, so no caption was changed; save them as "
                           "UTF-8 text (or delete them) and try again:\n" + ds_mod._name_list(bad))
    changed = 0
    for image, tags in zip(images, current):
        new = edit(tags)
        if new != tags:
            write_caption(image, join_tags(new))
            changed += 1
    return TagReport(what, changed, len(images))


def _tags_given(text: str, what: str) -> list[str]:
    tags = split_tags(text)
    if not tags:
        raise CaptionError(f"Type the {what} first (several tags: separate them with commas).")
    return tags


def bulk_add(folder: Path, text: str, position: str = "end") -> TagReport:
    tags = _tags_given(text, "tag to add")
    if position not in POSITIONS:
        raise CaptionError(f"position must be one of {', '.join(POSITIONS)}, not {position!r}")
    return edit_folder_tags(folder, lambda t: add_tags(t, tags, position),
                            f'added "{join_tags(tags)}" at the {position}')


def bulk_remove(folder: Path, text: str) -> TagReport:
    tags = _tags_given(text, "tag to remove")
    return edit_folder_tags(folder, lambda t: remove_tags(t, tags), f'removed "{join_tags(tags)}"')


def bulk_replace(folder: Path, old_text: str, new_text: str) -> TagReport:
    old = _tags_given(old_text, "tag to replace")
    if len(old) != 1:
        raise CaptionError(f"Replace one tag at a time (got {len(old)}: {join_tags(old)}).")
    new = split_tags(new_text)
    if not new:
        raise CaptionError("Type the tag to put in its place (to delete a tag, use Remove).")
    return edit_folder_tags(folder, lambda t: replace_tag(t, old[0], new),
                            f'replaced "{old[0]}" with "{join_tags(new)}"')


__all__ = ["CaptionError", "CAPTION_EXTENSION", "POSITIONS", "open_folder", "dataset_images", "caption_path",
           "image_in_folder", "read_caption", "write_caption", "has_caption", "FolderView", "folder_view",
           "load_rgb", "split_tags", "join_tags", "add_tags", "remove_tags", "replace_tag", "TagReport",
           "edit_folder_tags", "bulk_add", "bulk_remove", "bulk_replace"]
