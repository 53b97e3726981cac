#!/usr/bin/env python3
"""LoRA Studio: the one entry point.

    python3 run.py

1. looks at the hardware (NVIDIA GPU via nvidia-smi or NVML, otherwise CPU);
2. creates the project-local virtual environment ``.venv`` (if this is not already running in it);
3. installs the PyTorch build that fits the hardware, keeping an installed torch that already fits;
4. installs the packages listed in ``packages.jsonc``;
5. re-starts itself inside ``.venv`` and opens the UI (``ui.app.launch(config)``), settings from config.json.

Steps 2-4 are skipped entirely while nothing changed: a stamp in ``.venv`` records a hash of
packages.jsonc, the torch choice and the Python version.

The installer is importable (``ensure_environment``) and is reused by ``python3 -m tests``.  Only the
standard library is used at module level: this file runs before anything is installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV_DIR = ROOT / ".venv"
PACKAGES_FILE = ROOT / "packages.jsonc"
STAMP_NAME = "lora-studio-install.json"
INSTALLER_VERSION = 1          # bump when the install logic changes in a way that needs a reinstall
MIN_PYTHON = (3, 10)
IS_WINDOWS = sys.platform.startswith("win")


class InstallError(RuntimeError):
    """An installation step failed; the message says what and how to retry."""


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------
# packages.jsonc
# ---------------------------------------------------------------------------------------------------
def _jsonc_tokens(text: str):
    """Split JSONC into ("string" | "comment" | "code", text) pieces; the one place that knows where strings
    and comments begin and end."""
    i, n = 0, len(text)
    while i < n:
        if text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            yield "string", text[i:j + 1]
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j            # the newline stays code, so line numbers in errors stay right
            yield "comment", text[i:j]
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise ValueError("unterminated /* comment")
            yield "comment", text[i:j + 2]
            i = j + 2
        else:
            j = i
            while j < n and text[j] != '"' and not text.startswith(("//", "/*"), j):
                j += 1
            yield "code", text[i:j]
            i = j


def strip_jsonc(text: str) -> str:
    """Remove // and /* */ comments (outside strings) and trailing commas before ] or }."""
    pieces = [(kind, "\n" * piece.count("\n") if kind == "comment" else piece)
              for kind, piece in _jsonc_tokens(text)]
    out: list[str] = []
    # a comma is trailing when only whitespace and comments stand between it and the next ] or }
    for k, (kind, piece) in enumerate(pieces):
        if kind == "code" and "," in piece:
            chars = list(piece)
            for at, c in enumerate(piece):
                if c == ",":
                    rest = piece[at + 1:].strip()
                    if (rest[:1] or _next_code_char(pieces, k + 1)) in ("]", "}"):
                        chars[at] = ""
            piece = "".join(chars)
        out.append(piece)
    return "".join(out)


def _next_code_char(pieces, start: int) -> str:
    """First non-blank character after ``start`` that is not inside a comment ('' at the end)."""
    for kind, piece in pieces[start:]:
        if kind == "string":
            return '"'
        if kind == "code" and piece.strip():
            return piece.strip()[0]
    return ""


def parse_jsonc(text: str):
    return json.loads(strip_jsonc(text))


def load_spec(path: Path = PACKAGES_FILE) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InstallError(f"Cannot read {path}: {e}") from e
    try:
        spec = parse_jsonc(text)
    except ValueError as e:
        raise InstallError(f"{path.name} is not valid JSON (with comments): {e}") from e
    validate_spec(spec)
    return spec


def validate_spec(spec) -> None:
    if not isinstance(spec, dict):
        raise InstallError("packages.jsonc: the top level must be an object")
    torch = spec.get("torch")
    if not isinstance(torch, dict) or "cpu" not in torch or "version" not in torch.get("cpu", {}):
        raise InstallError('packages.jsonc: "torch" needs a "cpu" entry with a "version"')
    cuda = torch.get("cuda")
    if cuda is not None:
        if "version" not in cuda or not isinstance(cuda.get("wheels"), list) or not cuda["wheels"]:
            raise InstallError('packages.jsonc: "torch.cuda" needs a "version" and a non-empty "wheels" list')
        for w in cuda["wheels"]:
            if "cuda" not in w or "index_url" not in w:
                raise InstallError('packages.jsonc: each "torch.cuda.wheels" entry needs "cuda" and "index_url"')
    groups = spec.get("groups")
    if not isinstance(groups, dict) or "app" not in groups:
        raise InstallError('packages.jsonc: "groups" must be an object with at least an "app" list')
    for name, entries in groups.items():
        if not isinstance(entries, list):
            raise InstallError(f'packages.jsonc: group "{name}" must be a list')
        for e in entries:
            if isinstance(e, str):
                continue
            if not isinstance(e, dict) or not isinstance(e.get("requirement"), str):
                raise InstallError(f'packages.jsonc: group "{name}": each entry is a requirement string '
                                   f'or an object with a "requirement" string, got {e!r}')
            plats = e.get("platforms", [])
            if not isinstance(plats, list) or any(p not in ("cuda", "cpu") for p in plats):
                raise InstallError(f'packages.jsonc: "platforms" of {e["requirement"]!r} must be a list of '
                                   f'"cuda" / "cpu"')


def select_requirements(spec: dict, groups, kind: str) -> list[str]:
    """Requirement strings of the given groups for a torch build kind ("cpu" or "cuda")."""
    reqs: list[str] = []
    for g in groups:
        if g not in spec["groups"]:
            raise InstallError(f'packages.jsonc has no group "{g}" (groups: {", ".join(spec["groups"])})')
        for e in spec["groups"][g]:
            if isinstance(e, str):
                req = e
            else:
                plats = e.get("platforms")
                if plats and kind not in plats:
                    continue
                req = e["requirement"]
            if req not in reqs:
                reqs.append(req)
    return reqs


def python_ok(spec: dict, version=None) -> bool:
    version = tuple(version or sys.version_info[:2])
    m = re.fullmatch(r"\s*>=\s*(\d+)\.(\d+)\s*", spec.get("python", ""))
    need = (int(m.group(1)), int(m.group(2))) if m else MIN_PYTHON
    return version[:2] >= need


# ---------------------------------------------------------------------------------------------------
# Hardware: NVIDIA driver and GPUs (standard library only: nvidia-smi, else NVML through ctypes)
# ---------------------------------------------------------------------------------------------------
@dataclass
class GpuFacts:
    name: str
    compute_capability: tuple[int, int] | None = None


@dataclass
class NvidiaFacts:
    driver_version: str | None
    cuda_version: tuple[int, int] | None          # the newest CUDA the driver supports
    gpus: list[GpuFacts] = field(default_factory=list)
    source: str = ""

    def describe(self) -> str:
        names = ", ".join(g.name + (f" (compute {g.compute_capability[0]}.{g.compute_capability[1]})"
                                    if g.compute_capability else "") for g in self.gpus) or "no GPU listed"
        cuda = ".".join(map(str, self.cuda_version)) if self.cuda_version else "unknown"
        return f"{names}; driver {self.driver_version or 'unknown'}, supports CUDA {cuda}"


def parse_version_pair(text: str) -> tuple[int, int] | None:
    m = re.match(r"\s*(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_nvidia_smi_header(text: str) -> tuple[str | None, tuple[int, int] | None]:
    """(driver version, CUDA version) from the banner of plain ``nvidia-smi``."""
    drv = re.search(r"Driver Version:\s*([\d.]+)", text)
    cuda = re.search(r"CUDA Version:\s*(\d+\.\d+)", text)
    return (drv.group(1) if drv else None, parse_version_pair(cuda.group(1)) if cuda else None)


def parse_gpu_query(text: str) -> list[GpuFacts]:
    """Lines of ``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader``."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, cap = line.rpartition(",")
        if not name:                         # no comma: only the name was queried
            name, cap = cap, ""
        gpus.append(GpuFacts(name.strip(), parse_version_pair(cap.strip())))
    return gpus


def _run_quiet(cmd: list[str], timeout: float = 30) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def _nvidia_smi_facts() -> NvidiaFacts | None:
    banner = _run_quiet(["nvidia-smi"])
    if banner is None:
        return None
    driver, cuda = parse_nvidia_smi_header(banner)
    q = _run_quiet(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"])
    if q is None:                            # old drivers lack compute_cap
        q = _run_quiet(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) or ""
    gpus = parse_gpu_query(q)
    if not gpus:
        return None
    return NvidiaFacts(driver, cuda, gpus, "nvidia-smi")


def _nvml_facts() -> NvidiaFacts | None:
    import ctypes
    names = (["nvml.dll", r"C:\Program Files\NVIDIA Corporation\NVSMI\nvml.dll"] if IS_WINDOWS
             else ["libnvidia-ml.so.1", "libnvidia-ml.so"])
    lib = None
    for n in names:
        try:
            lib = ctypes.CDLL(n)
            break
        except OSError:
            continue
    if lib is None:
        return None
    try:
        if lib.nvmlInit_v2() != 0:
            return None
    except AttributeError:
        return None
    try:
        cuda_int = ctypes.c_int(0)
        cuda = None
        if lib.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(cuda_int)) == 0 and cuda_int.value:
            cuda = (cuda_int.value // 1000, (cuda_int.value % 1000) // 10)
        buf = ctypes.create_string_buffer(96)
        driver = buf.value.decode() if lib.nvmlSystemGetDriverVersion(buf, 96) == 0 else None
        count = ctypes.c_uint(0)
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        gpus = []
        for i in range(count.value):
            handle = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.byref(handle)) != 0:
                continue
            name = buf.value.decode() if lib.nvmlDeviceGetName(handle, buf, 96) == 0 else f"GPU {i}"
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            cc = ((major.value, minor.value)
                  if lib.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) == 0
                  else None)
            gpus.append(GpuFacts(name, cc))
        return NvidiaFacts(driver, cuda, gpus, "NVML") if gpus else None
    except (AttributeError, OSError, UnicodeDecodeError):
        return None
    finally:
        try:
            lib.nvmlShutdown()
        except Exception:
            pass


def detect_nvidia() -> NvidiaFacts | None:
    """The NVIDIA driver's facts, or None on a machine without a usable NVIDIA GPU."""
    if sys.platform == "darwin":
        return None
    return _nvidia_smi_facts() or _nvml_facts()


# ---------------------------------------------------------------------------------------------------
# Which torch
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorchChoice:
    kind: str                     # "cpu" or "cuda"
    version: str                  # release, e.g. "2.13.0"
    variant: str | None           # local version label: "cpu", "cu126", ... (None: PyPI's own build)
    index_url: str | None         # where pip gets it when it is not available locally; None: PyPI
    cuda: str | None = None       # "12.6" for cuda builds
    note: str = ""                # why, for the user
    warning: str = ""             # something the user should act on

    @property
    def requirement(self) -> str:
        return f"torch=={self.version}+{self.variant}" if self.variant else f"torch=={self.version}"

    @property
    def label(self) -> str:
        return f"torch {self.version}" + (f"+{self.variant}" if self.variant else "")

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.requirement}|{self.index_url}"


def choose_torch(torch_spec: dict, nvidia: NvidiaFacts | None, platform: str | None = None) -> TorchChoice:
    """Pure decision: torch build from packages.jsonc's "torch" section and the NVIDIA facts."""
    platform = platform or sys.platform
    cpu = torch_spec["cpu"]

    def cpu_choice(note: str, warning: str = "") -> TorchChoice:
        if platform == "darwin":            # PyPI's macOS wheels are the CPU/MPS build
            return TorchChoice("cpu", cpu["version"], None, None, None, note, warning)
        return TorchChoice("cpu", cpu["version"], "cpu", cpu.get("index_url"), None, note, warning)

    if platform == "darwin":
        return cpu_choice("macOS: PyPI's build (CPU / Apple MPS)")
    if nvidia is None or not nvidia.gpus:
        return cpu_choice("no NVIDIA GPU found")
    cuda_spec = torch_spec.get("cuda")
    if not cuda_spec:
        return cpu_choice("packages.jsonc lists no CUDA build", "NVIDIA GPU found but no CUDA torch is configured")
    wheels = sorted(cuda_spec["wheels"], key=lambda w: parse_version_pair(w["cuda"]) or (0, 0))
    caps = [g.compute_capability for g in nvidia.gpus if g.compute_capability]
    lowest_cc, highest_cc = (min(caps), max(caps)) if caps else (None, None)

    def fits_gpus(w) -> bool:             # the build has kernels for every GPU of the machine
        if lowest_cc is None:
            return True
        low = parse_version_pair(str(w.get("min_compute_capability", "0.0"))) or (0, 0)
        high = parse_version_pair(str(w.get("max_compute_capability", "999.0"))) or (999, 0)
        return low <= lowest_cc and highest_cc <= high

    usable = [w for w in wheels if fits_gpus(w)]
    if not usable:
        ccs = ", ".join(sorted({f"{c[0]}.{c[1]}" for c in caps}))
        return cpu_choice("no configured CUDA build supports this GPU",
                          f"no CUDA build in packages.jsonc has kernels for GPU compute capability {ccs}; "
                          f"installing the CPU build")
    drv = nvidia.cuda_version
    if drv is None:
        w = usable[0]
        return _cuda_choice(cuda_spec, w, "driver CUDA version unknown: the oldest configured CUDA build",
                            "could not read the CUDA version of the NVIDIA driver; if torch cannot use the GPU, "
                            "update the driver")
    fitting = [w for w in usable if parse_version_pair(w["cuda"]) <= drv]
    if fitting:
        w = fitting[-1]
        return _cuda_choice(cuda_spec, w, f"driver supports CUDA {drv[0]}.{drv[1]}")
    same_major = [w for w in usable if parse_version_pair(w["cuda"])[0] == drv[0]]
    if same_major:                           # CUDA minor-version compatibility within one major version
        w = same_major[0]
        return _cuda_choice(cuda_spec, w, f"driver supports CUDA {drv[0]}.{drv[1]} (minor-version compatibility)",
                            f"the NVIDIA driver supports CUDA {drv[0]}.{drv[1]}, older than the CUDA {w['cuda']} "
                            f"build; it usually works, but update the driver if torch cannot use the GPU")
    return cpu_choice(f"driver supports only CUDA {drv[0]}.{drv[1]}",
                      f"the NVIDIA driver is too old for the configured CUDA builds "
                      f"(needs CUDA {usable[0]['cuda']}+); installing the CPU build. "
                      f"Update the NVIDIA driver and run again to train on the GPU")


def _cuda_choice(cuda_spec: dict, wheel: dict, note: str, warning: str = "") -> TorchChoice:
    tag = "cu" + wheel["cuda"].replace(".", "")
    return TorchChoice("cuda", cuda_spec["version"], tag, wheel["index_url"], wheel["cuda"], note, warning)


def release_of(version: str) -> str:
    return version.split("+", 1)[0]


def torch_fits(installed_version: str, installed_cuda: str | None, choice: TorchChoice,
               gpu_works: bool | None = None) -> bool:
    """Is an installed torch good enough to keep?  The release must be the pinned one.  For the CPU any
    build runs.  For CUDA: a build that ran a kernel on every GPU (``gpu_works``) is kept whatever its
    CUDA version; without that test only the chosen CUDA version counts."""
    if release_of(installed_version) != choice.version:
        return False
    if choice.kind == "cpu":
        return True
    if installed_cuda is None or gpu_works is False:
        return False
    return gpu_works is True or parse_version_pair(installed_cuda) == parse_version_pair(choice.cuda)


# ---------------------------------------------------------------------------------------------------
# Virtual environment, pip, stamp
# ---------------------------------------------------------------------------------------------------
def venv_python(venv_dir: Path = VENV_DIR) -> Path:
    return venv_dir / ("Scripts/python.exe" if IS_WINDOWS else "bin/python")


def running_in(venv_dir: Path) -> bool:
    try:
        return Path(sys.prefix).resolve() == venv_dir.resolve()
    except OSError:
        return False


def venv_python_version(venv_dir: Path) -> str:
    cfg = venv_dir / "pyvenv.cfg"
    try:
        for line in cfg.read_text(encoding="utf-8").splitlines():
            k, _, v = line.partition("=")
            if k.strip() in ("version", "version_info"):
                return v.strip()
    except OSError:
        pass
    out = _run_quiet([str(venv_python(venv_dir)), "-c", "import sys; print(sys.version.split()[0])"])
    return (out or "unknown").strip()


def create_venv(venv_dir: Path) -> Path:
    import venv
    say(f"Creating the virtual environment {venv_dir} ...")
    try:
        venv.EnvBuilder(with_pip=True, clear=venv_dir.exists()).create(str(venv_dir))
    except (subprocess.CalledProcessError, OSError) as e:
        raise InstallError(
            f"Could not create the virtual environment in {venv_dir}: {e}\n"
            "On Debian/Ubuntu install the venv module first:  sudo apt install python3-venv\n"
            f"then delete {venv_dir} (if it exists) and run again.") from e
    py = venv_python(venv_dir)
    if not py.exists():
        raise InstallError(f"The virtual environment was created but {py} is missing; delete {venv_dir} "
                           f"and run again.")
    return py


def ensure_venv(venv_dir: Path = VENV_DIR) -> Path:
    py = venv_python(venv_dir)
    if py.exists() and _run_quiet([str(py), "-m", "pip", "--version"]) is not None:
        return py
    if py.exists():
        say(f"The virtual environment {venv_dir} is broken (no working pip); creating it again.")
    return create_venv(venv_dir)


def pip(py: Path, args: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([str(py), "-m", "pip", *args], text=True, capture_output=capture)


def pip_or_fail(py: Path, args: list[str], what: str) -> None:
    r = pip(py, args)
    if r.returncode != 0:
        shown = " ".join(f'"{a}"' if " " in a else a for a in [str(py), "-m", "pip", *args])
        raise InstallError(
            f"Installing {what} failed (pip exit code {r.returncode}); pip's messages are above.\n"
            f"The command was:\n    {shown}\n"
            "Fix the cause (network connection, disk space, a proxy, ...) and run the same command again "
            "(python3 run.py or python3 -m tests): finished steps are not repeated.  To start over, delete "
            "the .venv folder.")


_TORCH_PROBE = """
import json, torch
ok = None
if torch.version.cuda:
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        ok = n > 0 and all(float((torch.ones(2, device=f"cuda:{i}") * 2).sum()) == 4.0 for i in range(n))
    except Exception:
        ok = False
print(json.dumps([torch.__version__, torch.version.cuda, ok]))
"""


def installed_torch(py: Path) -> tuple[str, str | None, bool | None] | None:
    """(version, CUDA version of the build, ran a kernel on every GPU) of the torch in ``py``, or None."""
    out = _run_quiet([str(py), "-c", _TORCH_PROBE], timeout=300)
    if not out:
        return None
    try:
        version, cuda, ok = json.loads(out.strip().splitlines()[-1])
        return str(version), cuda, ok
    except (ValueError, IndexError, TypeError):
        return None


def install_torch(py: Path, choice: TorchChoice) -> str:
    """Make the venv hold a torch that fits ``choice``; returns the installed version string."""
    have = installed_torch(py)
    if have and torch_fits(have[0], have[1], choice, have[2]):
        say(f"  keeping the installed torch {have[0]}" + (f" (CUDA {have[1]})" if have[1] else ""))
        return have[0]
    if have:
        say(f"  installed torch {have[0]} does not fit ({choice.label} wanted); replacing it")
    # 1) the pinned build from pip's *local* sources only (find-links in pip's configuration), no index,
    #    then its small dependencies (sympy, networkx, ...) from the configured indexes; pip keeps the
    #    torch just installed because it satisfies the same requirement.
    say(f"  looking for {choice.requirement} in pip's local sources (no network) ...")
    t0 = time.monotonic()
    r = pip(py, ["install", "--no-index", "--no-deps", choice.requirement], capture=True)
    if r.returncode == 0:
        say(f"  installed {choice.requirement} from a local source ({time.monotonic() - t0:.0f} s); "
            f"now its dependencies ...")
        pip_or_fail(py, ["install", choice.requirement], "the dependencies of PyTorch")
    else:
        # 2) the download: PyTorch's index for the chosen build (PyPI itself for macOS).
        where = choice.index_url or "PyPI"
        say(f"  not available locally; downloading {choice.requirement} from {where} "
            f"(CUDA builds are several GB) ...")
        args = ["install", choice.requirement]
        if choice.index_url:
            args += ["--index-url", choice.index_url]
        pip_or_fail(py, args, f"PyTorch ({choice.requirement} from {where})")
    have = installed_torch(py)
    if not have:
        raise InstallError(f"torch was installed but cannot be imported; delete {py.parent.parent} and run again.")
    return have[0]


def install_packages(py: Path, requirements: list[str], torch_version: str) -> None:
    # The installed torch is pinned with a constraint so that no package can swap it for another build.
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "torch-constraint.txt"
        constraints.write_text(f"torch=={torch_version}\n", encoding="utf-8")
        pip_or_fail(py, ["install", f"torch=={torch_version}", *requirements, "-c", str(constraints)],
                    "the packages from packages.jsonc")


def environment_key(spec_text: str, choice: TorchChoice, python_version: str) -> str:
    h = hashlib.sha256()
    for part in (str(INSTALLER_VERSION), spec_text, choice.key, python_version):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def read_stamp(venv_dir: Path) -> dict:
    try:
        data = json.loads((venv_dir / STAMP_NAME).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_stamp(venv_dir: Path, data: dict) -> None:
    path = venv_dir / STAMP_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def ensure_environment(groups=("app",), venv_dir: Path = VENV_DIR, packages_file: Path = PACKAGES_FILE) -> Path:
    """Prepare ``venv_dir`` with torch and the packages of ``groups``; returns the venv's python.

    Does nothing but a few checks when the stamp says the same packages.jsonc, torch choice and Python
    were installed before.  Raises InstallError with a readable message when something fails."""
    groups = tuple(groups)
    spec_text = packages_file.read_text(encoding="utf-8") if packages_file.exists() else ""
    spec = load_spec(packages_file)
    if not python_ok(spec):
        raise InstallError(f"Python {spec.get('python', '>=3.10')} is needed; this is "
                           f"{sys.version.split()[0]} ({sys.executable}).")
    nvidia = detect_nvidia()
    choice = choose_torch(spec["torch"], nvidia)
    py = venv_python(venv_dir)
    stamp = read_stamp(venv_dir) if py.exists() else {}
    key = environment_key(spec_text, choice, venv_python_version(venv_dir)) if py.exists() else None
    if key and stamp.get("key") == key and set(groups) <= set(stamp.get("groups", [])):
        return py                          # nothing changed: no installing at all

    started = time.monotonic()
    say("=" * 72)
    say(f"LoRA Studio: preparing {venv_dir.name} (packages: {', '.join(groups)})")
    say("=" * 72)
    say("[1/3] Hardware: " + (f"NVIDIA {nvidia.describe()} [{nvidia.source}]" if nvidia else "no NVIDIA GPU"))
    say(f"      PyTorch build: {choice.label} ({choice.note})")
    if choice.warning:
        say(f"      WARNING: {choice.warning}")
    py = ensure_venv(venv_dir)
    key = environment_key(spec_text, choice, venv_python_version(venv_dir))
    say("[2/3] PyTorch")
    t0 = time.monotonic()
    torch_version = install_torch(py, choice)
    t_torch = time.monotonic() - t0
    reqs = select_requirements(spec, groups, choice.kind)
    say(f"[3/3] Packages: {' '.join(reqs)}")
    t0 = time.monotonic()
    install_packages(py, reqs, torch_version)
    t_pkgs = time.monotonic() - t0
    keep = set(stamp.get("groups", [])) if stamp.get("key") == key else set()
    write_stamp(venv_dir, {"key": key, "groups": sorted(keep | set(groups)), "torch": torch_version,
                           "torch_choice": choice.key, "python": venv_python_version(venv_dir),
                           "installed_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    say(f"Environment ready in {time.monotonic() - started:.0f} s (torch {t_torch:.0f} s, packages "
        f"{t_pkgs:.0f} s): torch {torch_version}.  Later starts skip this while packages.jsonc is unchanged.")
    say("=" * 72)
    return py


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------
def reexec(py: Path, script: Path) -> None:
    """Replace this process with ``py script`` (the venv's interpreter)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if IS_WINDOWS:                          # os.execv does not replace the process on Windows
        sys.exit(subprocess.call([str(py), str(script)]))
    os.execv(str(py), [str(py), str(script)])


def start_app() -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from core.config import load_config
    try:
        config = load_config(ROOT / "config.json")
    except Exception as e:                 # pydantic ValidationError / JSONDecodeError: say which file
        say(f"config.json is not valid:\n{e}")
        return 2
    try:
        from ui.app import launch
    except ModuleNotFoundError as e:
        if e.name in ("ui", "ui.app"):
            say("The user interface (ui/app.py) is missing from this copy of LoRA Studio.")
            return 1
        raise
    launch(config)
    return 0


def main() -> int:
    if sys.version_info < MIN_PYTHON:
        say(f"LoRA Studio needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; this is {sys.version.split()[0]}.")
        return 1
    try:
        py = ensure_environment(("app",))
    except InstallError as e:
        say(f"\nERROR: {e}")
        return 1
    except KeyboardInterrupt:
        say("\nInstallation interrupted.  Run `python3 run.py` again to continue.")
        return 130
    if not running_in(VENV_DIR):
        reexec(py, Path(__file__).resolve())
    return start_app()


if __name__ == "__main__":
    sys.exit(main())
