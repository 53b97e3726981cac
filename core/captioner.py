"""Captioning a dataset folder with a local image-captioning model: BLIP (``BlipForConditionalGeneration``) or
Florence-2 (``Florence2ForConditionalGeneration``, the transformers-native release, e.g.
florence-community/Florence-2-large).

The model is a folder the user put in the models folder (``config.json``, weights, processor and tokenizer
files, as ``save_pretrained`` writes them).  It is always loaded with ``local_files_only=True`` and never with
remote code: nothing is downloaded and no code from the model folder runs.  It runs on the GPU when torch sees
one (in float16), on the CPU otherwise.

Images that already have a caption are skipped unless ``overwrite`` is on; each new caption is written
atomically beside its image as soon as its batch is done, so an interrupted run keeps what it wrote.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from core import captions as cap
from core import dataset as ds_mod

#: architecture (config.json "architectures") → kind
ARCHITECTURES = {"BlipForConditionalGeneration": "blip", "Florence2ForConditionalGeneration": "florence2"}
#: config.json "model_type" → kind, for a config without "architectures"
MODEL_TYPES = {"blip": "blip", "florence2": "florence2"}
LABELS = {"blip": "BLIP", "florence2": "Florence-2"}
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
DEFAULT_TASK = "<MORE_DETAILED_CAPTION>"
NUM_BEAMS = 3
MAX_NEW_TOKENS = 1024
MAX_BATCH = 256
_SUPPORTED_TEXT = ("BLIP (architecture BlipForConditionalGeneration, e.g. Salesforce/blip-image-captioning-large) "
                   "or Florence-2 (Florence2ForConditionalGeneration in the transformers-native release, e.g. "
                   "florence-community/Florence-2-large)")


class CaptionerError(ValueError):
    """A problem with the captioning model or the options; the message says what is wrong and what to change."""


def _read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CaptionerError(f"{folder} has no config.json, so it is not a model folder. Choose the folder of a "
                             f"captioning model: {_SUPPORTED_TEXT}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaptionerError(f"{path} cannot be read ({exc}); copy the model folder again.") from None
    if not isinstance(data, dict):
        raise CaptionerError(f"{path} is not a model config (a JSON object); copy the model folder again.")
    return data


def captioner_kind(folder: Path) -> str:
    """"blip" or "florence2" for a supported captioning model folder; CaptionerError saying what the folder is
    and what is needed otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaptionerError(f"{folder} is not a folder. Choose the folder of a captioning model: "
                             f"{_SUPPORTED_TEXT}.")
    data = _read_config(folder)
    archs = data.get("architectures") or []
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    model_type = data.get("model_type")
    kinds = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
    if not archs and model_type in MODEL_TYPES:
        kinds = [MODEL_TYPES[model_type]]
    if not kinds:
        what = ", ".join(archs) if archs else f"model_type {model_type!r}" if model_type else "no architecture"
        raise CaptionerError(f"{folder.name} is not a supported captioning model (its config.json says {what}). "
                             f"Choose a {_SUPPORTED_TEXT}.")
    kind = kinds[0]
    if kind == "florence2" and (data.get("auto_map") or
                                (data.get("text_config") or {}).get("model_type") == "florence2_language"):
        raise CaptionerError(f"{folder.name} is the original Florence-2 release, which needs code from the model "
                             "folder to run (this app never runs such code). Use the transformers-native "
                             "release instead, e.g. florence-community/Florence-2-large or -base.")
    return kind


def find_captioners(models_dir: Path) -> list[tuple[str, str]]:
    """(label, folder relative to ``models_dir``) for every supported captioning model in ``models_dir`` or one
    folder below it, sorted; hidden folders left out."""
    root = Path(models_dir)
    found = []
    if not root.is_dir():
        return found

    def folders(p: Path):
        try:
            return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
        except OSError:
            return []

    for child in folders(root):
        for folder in [child] + ([] if (child / "config.json").is_file() else folders(child)):
            try:
                kind = captioner_kind(folder)
            except CaptionerError:
                continue
            rel = folder.relative_to(root).as_posix()
            found.append((f"{rel} ({LABELS[kind]})", rel))
    return found


def pick_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


class Captioner:
    """A loaded captioning model: ``caption(images)`` gives one caption per PIL image."""

    def __init__(self, folder: Path, device: str | None = None, task: str = DEFAULT_TASK):
        import torch

        self.folder = Path(folder)
        self.kind = captioner_kind(self.folder)
        if task not in FLORENCE_TASKS:
            raise CaptionerError(f"Florence-2 task must be one of {', '.join(FLORENCE_TASKS)}, not {task!r}.")
        self.task = task
        self.device = device or pick_device()
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        from transformers import AutoProcessor
        if self.kind == "blip":
            from transformers import BlipForConditionalGeneration as model_class
        else:
            from transformers import Florence2ForConditionalGeneration as model_class
        try:
            self.processor = AutoProcessor.from_pretrained(self.folder, local_files_only=True)
        except Exception as exc:
            raise CaptionerError(f"Cannot load the processor of {self.folder.name} ({exc.__class__.__name__}: "
                                 f"{exc}). The folder needs the processor and tokenizer files "
                                 "(preprocessor_config.json or processor_config.json, tokenizer files) as the "
                                 "model's download has them.") from None
        try:
            self.model = model_class.from_pretrained(self.folder, local_files_only=True, dtype=self.dtype)
        except Exception as exc:
            raise CaptionerError(f"Cannot load the {LABELS[self.kind]} model {self.folder.name} "
                                 f"({exc.__class__.__name__}: {exc}). Copy the whole model folder again "
                                 "(config.json and the weights).") from None
        self.model.to(self.device).eval()
        text_config = getattr(self.model.config, "text_config", None)
        positions = getattr(text_config, "max_position_embeddings", None)
        #: the most new tokens the text decoder can write (its position table, less the start token)
        self.max_new_tokens = max(1, positions - 2) if isinstance(positions, int) else MAX_NEW_TOKENS

    def caption(self, images: list, max_new_tokens: int) -> list[str]:
        import torch

        if self.kind == "blip":
            inputs = self.processor(images=images, return_tensors="pt")
        else:
            inputs = self.processor(text=[self.task] * len(images), images=images, return_tensors="pt")
        inputs = inputs.to(self.device, self.dtype)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=min(max_new_tokens, self.max_new_tokens),
                                      num_beams=NUM_BEAMS, do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def close(self) -> None:
        import torch
        del self.model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


@dataclass
class CaptionSummary:
    captioned: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)  # "name: why"
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        out = (f"captioned {self.captioned}, skipped {self.skipped} that already had captions, "
               f"{len(self.failed)} failed")
        if self.failed:
            out += ":\n" + ds_mod._name_list(self.failed)
        return "\n".join([out] + self.notes)


def with_prefix(prefix: str, text: str) -> str:
    """``text`` after ``prefix`` (e.g. a trigger word), joined with ", "."""
    prefix = (prefix or "").strip().rstrip(",").strip()
    return f"{prefix}, {text}" if prefix else text


def caption_folder(folder: Path, model_dir: Path, *, prefix: str = "", max_new_tokens: int = 128,
                   batch_size: int = 4, overwrite: bool = False, task: str = DEFAULT_TASK,
                   device: str | None = None, progress: Callable[[int, int], None] | None = None
                   ) -> CaptionSummary:
    """Caption every image of ``folder`` (subfolders included) with the model in ``model_dir``.

    Images with a caption are skipped (counted) unless ``overwrite``; unreadable images and empty model output
    are counted as failed, by name.  ``progress(done, total)`` follows the images to caption.  The model is
    checked before anything else and only loaded when there is something to caption."""
    folder = Path(folder)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise CaptionerError(f"Max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, "
                             f"not {max_new_tokens!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        raise CaptionerError(f"Batch size must be a whole number from 1 to {MAX_BATCH}, not {batch_size!r}.")
    captioner_kind(model_dir)
    images = cap.dataset_images(folder)
    summary = CaptionSummary()
    todo = []
    for image in images:
        if not overwrite and cap.has_caption(image):
            summary.skipped += 1
        else:
            todo.append(image)
    if not todo:
        return summary
    if progress:
        progress(0, len(todo))
    model = Captioner(model_dir, device=device, task=task)
    if max_new_tokens > model.max_new_tokens:
        summary.notes.append(f"(max new tokens lowered to {model.max_new_tokens}, the most this model can write)")
    try:
        done = 0
        for start in range(0, len(todo), batch_size):
            batch, pixels = [], []
            for image in todo[start:start + batch_size]:
                try:
                    pixels.append(cap.load_rgb(image))
                    batch.append(image)
                except cap.CaptionError as exc:
                    summary.failed.append(str(exc).replace(str(image), image.relative_to(folder).as_posix(), 1))
            if batch:
                try:
                    texts = model.caption(pixels, max_new_tokens)
                except Exception as exc:
                    oom = "out of memory" in str(exc).lower()
                    raise CaptionerError(
                        f"Captioning stopped at {batch[0].relative_to(folder).as_posix()} "
                        f"({exc.__class__.__name__}: {exc}). "
                        + ("Lower the batch size. " if oom else "")
                        + f"{summary.captioned} caption(s) were written before that.") from None
                for image, text in zip(batch, texts):
                    if not text:
                        summary.failed.append(f"{image.relative_to(folder).as_posix()}: the model gave no text")
                        continue
                    cap.write_caption(image, with_prefix(prefix, text))
                    summary.captioned += 1
            done += len(todo[start:start + batch_size])
            if progress:
                progress(done, len(todo))
    finally:
        model.close()
    return summary


__all__ = ["CaptionerError", "Captioner", "CaptionSummary", "captioner_kind", "find_captioners",
           "caption_folder", "with_prefix", "pick_device", "FLORENCE_TASKS", "DEFAULT_TASK", "LABELS"]
