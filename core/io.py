"""Writing files so that an interrupted run or a full disk never leaves a half-written or clobbered file."""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable


def _new_temp_file(folder: Path, name: str) -> Path:
    """An empty, new hidden file beside ``name``, created with mode 0666 less the umask (what any other new
    file of the user gets: a ComfyUI server running as another user can read the result); mkstemp's 0600
    would follow the file into place."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path.parent, path.name)
    mode = tmp.stat().st_mode & 0o777
    try:
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) make their file 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        os_error = _as_os_error(exc, path.parent)
        if os_error is not None and os_error is not exc:
            raise os_error from exc
        raise
    return path


def _as_os_error(exc: BaseException, folder: Path) -> OSError | None:
    """The OS error behind a writer's failure: safetensors reports "I/O error: … (os error 28)", torch.save a
    bare "unexpected pos" when the disk is full.  None when it was something else."""
    if isinstance(exc, OSError):
        return exc
    if not isinstance(exc, Exception):
        return None
    found = re.search(r"os error (\d+)", str(exc))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    try:
        full = shutil.disk_usage(folder).free < 2**20
    except OSError:
        full = False
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if full else None


def atomic_write_text(path: Path, text: str) -> Path:
    return _atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


class NonFiniteError(ValueError):
    """Tensors about to be saved hold NaN or infinite values; nothing was written."""


def non_finite_keys(tensors: dict) -> list[str]:
    """The keys of the floating-point tensors that hold a NaN or an infinity (one device read per device)."""
    import torch
    by_device: dict = {}
    for k, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point():
            by_device.setdefault(t.device, []).append((k, t))
    bad = set()
    for items in by_device.values():
        ok = torch.stack([torch.isfinite(t).all() for _, t in items]).cpu()
        bad |= {k for (k, _), fine in zip(items, ok.tolist()) if not fine}
    return [k for k in tensors if k in bad]


def check_finite(tensors: dict, what: str) -> None:
    """Raise NonFiniteError naming the first bad tensor: a file of NaN weights is never written."""
    bad = non_finite_keys(tensors)
    if bad:
        raise NonFiniteError(f"{what}: {len(bad)} of {len(tensors)} tensors hold NaN or infinite values "
                             f"(first: {bad[0]}); nothing was written")


def atomic_save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Every tensor is checked finite first (NonFiniteError otherwise)."""
    from safetensors.torch import save_file
    check_finite(tensors, str(path))
    return _atomic(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def atomic_torch_save(path: Path, obj) -> Path:
    import torch
    return _atomic(path, lambda p: torch.save(obj, p))


def atomic_save_image(path: Path, image) -> Path:
    return _atomic(path, lambda p: image.save(p, format="PNG"))


def _first_free(stem: str, taken: Callable[[str], bool]) -> str:
    """``stem`` or ``stem-1``, ``stem-2`` …: the first name ``taken`` says is free."""
    candidate, i = stem, 0
    while taken(candidate):
        i += 1
        candidate = f"{stem}-{i}"
    return candidate


def unused_path(path: Path) -> Path:
    """``path`` if free, else ``name-1.ext``, ``name-2.ext`` …: a user's file is never overwritten."""
    path = Path(path)
    return path.with_name(_first_free(path.stem, lambda s: path.with_name(s + path.suffix).exists()) + path.suffix)


def unused_stem(folder: Path, stem: str, run: bool = False) -> str:
    """``stem`` or ``stem-1``, ``stem-2`` …: the first that names nothing in ``folder`` yet, so no file of
    another save is replaced.  A save's stem is taken by ``stem.*`` and ``stem_diffusers``; a run's stem
    (``run=True``) also by its intermediate saves, state folders and previews (``stem-step…``,
    ``stem-state-…``, ``samples/stem-step…``)."""
    import glob

    def taken(candidate: str) -> bool:
        c = glob.escape(candidate)
        patterns = [f"{c}.*", f"{c}_diffusers"]
        if run:
            patterns += [f"{c}-step*", f"{c}-state-*", f"samples/{c}-step*"]
        return any(next(Path(folder).glob(p), None) is not None for p in patterns)

    return _first_free(stem, taken)
