"""What the machine has (GPUs, CPU, RAM, torch build) and the precision choices that follow from it.

- ``detect_hardware()`` -> ``HardwareProfile``; ``profile.summary()`` is the text the UI shows.
- ``current_memory_use()`` -> ``{"vram_gb", "peak_vram_gb", "ram_gb"}`` for progress events.
- ``choose_precision(profile, "auto"|"bf16"|"fp16"|"no")`` and ``choose_tf32(profile, "auto"|"on"|"off")``
  resolve the "auto" settings of ``MemorySettings``.

GPUs are the CUDA devices *this torch build* can use (``torch.cuda``); NVML (nvidia-ml-py) adds free memory
and the driver version without creating a CUDA context.  An NVIDIA GPU that torch cannot use (e.g. a CPU
build of torch) is not in ``gpus``; ``notes`` says so.  Sizes are GiB (2**30 bytes), shown as "GB".
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field

GIB = 1024 ** 3
PRECISIONS = ("auto", "bf16", "fp16", "no")
TF32_CHOICES = ("auto", "on", "off")


class PrecisionError(ValueError):
    """The requested precision cannot run on this hardware; the message says why and what to pick."""


@dataclass
class GpuInfo:
    index: int                                # torch device index (cuda:<index>)
    name: str
    total_vram_gb: float
    free_vram_gb: float
    compute_capability: tuple[int, int]
    supports_bf16: bool
    supports_tf32: bool

    @classmethod
    def from_capability(cls, index: int, name: str, total_vram_gb: float, free_vram_gb: float,
                        compute_capability: tuple[int, int]) -> "GpuInfo":
        """bf16 and TF32 tensor-core support both start with Ampere (compute capability 8.0)."""
        cc = (int(compute_capability[0]), int(compute_capability[1]))
        return cls(index, name, float(total_vram_gb), float(free_vram_gb), cc, cc >= (8, 0), cc >= (8, 0))


@dataclass
class HardwareProfile:
    gpus: list[GpuInfo]
    cpu_cores: int                            # logical cores this process may use
    cpu_name: str
    ram_total_gb: float
    ram_available_gb: float
    torch_version: str | None
    cuda_version: str | None                  # CUDA of the torch build (None: CPU build)
    driver_version: str | None = None         # NVIDIA driver, when NVML answers
    notes: list[str] = field(default_factory=list)
    cpu_bf16: bool = False                    # bf16 matrix instructions (AVX512-BF16 or AMX) on the CPU

    def gpu(self, index: int = 0) -> GpuInfo | None:
        for g in self.gpus:
            if g.index == index:
                return g
        return None

    def summary(self) -> str:
        lines = []
        for g in self.gpus:
            lines.append(f"GPU {g.index}: {g.name}, {g.total_vram_gb:.1f} GB VRAM ({g.free_vram_gb:.1f} GB free), "
                         f"compute capability {g.compute_capability[0]}.{g.compute_capability[1]}, "
                         f"bf16 {'yes' if g.supports_bf16 else 'no'}, TF32 {'yes' if g.supports_tf32 else 'no'}")
        if not self.gpus:
            lines.append("GPU: none usable, training runs on the CPU (slow)")
        lines.append(f"CPU: {self.cpu_name}, {self.cpu_cores} cores, bf16 "
                     f"{'yes (AVX512-BF16 / AMX)' if self.cpu_bf16 else 'no'}")
        lines.append(f"RAM: {self.ram_total_gb:.1f} GB total, {self.ram_available_gb:.1f} GB available")
        if self.torch_version is None:
            lines.append("PyTorch: not installed")
        else:
            build = f"CUDA {self.cuda_version}" if self.cuda_version else "CPU build"
            drv = f", NVIDIA driver {self.driver_version}" if self.driver_version else ""
            lines.append(f"PyTorch {self.torch_version} ({build}{drv})")
        lines.extend(f"Note: {n}" for n in self.notes)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                        return value.strip()
        elif sys.platform == "darwin":
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


#: /proc/cpuinfo flags of bf16 matrix instructions: without one of them torch emulates bf16 matmuls, far
#: slower than fp32 (a 2048² matmul: 166 s in bf16 against 0.44 s in fp32 on an AVX2-only AMD EPYC, torch 2.13)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpu_bf16() -> bool:
    """Whether the CPU has bf16 matrix instructions: Linux's cpuinfo flags, else torch's own CPU probe."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return any(flag in value.split() for flag in CPU_BF16_FLAGS)
    except OSError:
        pass
    try:  # other systems: the cpuinfo library torch links (private helpers, hence the guard)
        import torch
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:
        return False


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _ram_gb() -> tuple[float, float]:
    try:
        import psutil
        vm = psutil.virtual_memory()
        return vm.total / GIB, vm.available / GIB
    except Exception:
        pass
    try:                                      # Linux without psutil
        info = {}
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                k, _, v = line.partition(":")
                info[k] = int(v.split()[0]) * 1024
        return info["MemTotal"] / GIB, info.get("MemAvailable", info["MemFree"]) / GIB
    except (OSError, KeyError, ValueError, IndexError):
        return 0.0, 0.0


def _nvml_devices() -> tuple[str | None, dict[str, tuple[float, float]], int]:
    """(driver version, {uuid without "GPU-": (total GiB, free GiB)}, NVML device count) or empties."""
    try:
        import pynvml
    except Exception:
        return None, {}, 0
    try:
        pynvml.nvmlInit()
    except Exception:
        return None, {}, 0
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        memory = {}
        count = pynvml.nvmlDeviceGetCount()
        for i in range(count):
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(h)
                uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                memory[_norm_uuid(uuid)] = (mem.total / GIB, mem.free / GIB)
            except Exception:
                continue
        return driver, memory, count
    except Exception:
        return None, {}, 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _norm_uuid(uuid) -> str:
    s = str(uuid).lower()
    for prefix in ("gpu-", "mig-"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    return s


def detect_hardware() -> HardwareProfile:
    """Look at the machine.  Never raises for missing pieces: what cannot be read is left empty."""
    total, available = _ram_gb()
    profile = HardwareProfile(gpus=[], cpu_cores=_cpu_cores(), cpu_name=_cpu_name(), ram_total_gb=total,
                              ram_available_gb=available, torch_version=None, cuda_version=None)
    driver, nvml_memory, nvml_count = _nvml_devices()
    profile.driver_version = driver
    try:
        import torch
    except Exception as e:                    # not installed or broken
        profile.notes.append(f"PyTorch cannot be imported ({e.__class__.__name__}: {e})")
        return profile
    profile.torch_version = str(torch.__version__)
    profile.cpu_bf16 = _cpu_bf16()
    profile.cuda_version = torch.version.cuda
    cuda_ok = False
    try:
        cuda_ok = torch.cuda.is_available()
    except Exception as e:
        profile.notes.append(f"CUDA initialisation failed: {e}")
    if cuda_ok:
        for i in range(torch.cuda.device_count()):
            try:
                props = torch.cuda.get_device_properties(i)
            except Exception as e:
                profile.notes.append(f"GPU {i} cannot be queried: {e}")
                continue
            total_gb = props.total_memory / GIB
            free_gb = None
            uuid = getattr(props, "uuid", None)
            if uuid is not None and _norm_uuid(uuid) in nvml_memory:
                free_gb = nvml_memory[_norm_uuid(uuid)][1]
            if free_gb is None:               # no NVML match: ask CUDA (creates a context on that GPU)
                try:
                    free_gb = torch.cuda.mem_get_info(i)[0] / GIB
                except Exception:
                    free_gb = total_gb
            profile.gpus.append(GpuInfo.from_capability(i, props.name, total_gb, free_gb,
                                                        (props.major, props.minor)))
    elif nvml_count:
        why = ("this PyTorch is a CPU build" if not torch.version.cuda
               else f"CUDA {torch.version.cuda} of this PyTorch cannot use it (driver {driver or 'unknown'})")
        profile.notes.append(f"{nvml_count} NVIDIA GPU(s) found but {why}: training runs on the CPU. "
                             f"Update the NVIDIA driver if needed and start `python3 run.py` again: it "
                             f"installs the CUDA build of PyTorch when the driver supports one.")
    if not profile.gpus:
        try:
            if torch.backends.mps.is_available():
                profile.notes.append("Apple MPS is available; this app trains on CUDA GPUs or the CPU.")
        except Exception:
            pass
    return profile


def current_memory_use(device: int | None = None) -> dict:
    """Memory in use now: ``vram_gb`` (tensors allocated by torch on the current/given CUDA device),
    ``peak_vram_gb`` (the peak of that since start or ``torch.cuda.reset_peak_memory_stats``), ``ram_gb``
    (this process's resident memory).  VRAM values are None when CUDA is not in use; never starts CUDA."""
    result = {"vram_gb": None, "peak_vram_gb": None, "ram_gb": None}
    try:
        import psutil
        result["ram_gb"] = psutil.Process().memory_info().rss / GIB
    except Exception:
        pass
    torch = sys.modules.get("torch")
    if torch is None:
        return result
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            dev = torch.cuda.current_device() if device is None else device
            result["vram_gb"] = torch.cuda.memory_allocated(dev) / GIB
            result["peak_vram_gb"] = torch.cuda.max_memory_allocated(dev) / GIB
    except Exception:
        pass
    return result


# ---------------------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------------------
def choose_precision(profile: HardwareProfile, requested: str = "auto", gpu_index: int = 0) -> str:
    """The mixed precision to train with: "bf16", "fp16" or "no".

    "auto": bf16 on GPUs with compute capability 8.0+ (Ampere and newer), fp16 (with loss scaling) on older
    GPUs; on the CPU bf16 where it has bf16 instructions (AVX512-BF16 or AMX), else "no" (fp32).  An explicit
    request wins, except bf16 on a GPU without bf16 support, which raises PrecisionError."""
    if requested not in PRECISIONS:
        raise ValueError(f"mixed precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    gpu = profile.gpu(gpu_index) if profile.gpus else None
    if profile.gpus and gpu is None:
        raise ValueError(f"there is no GPU {gpu_index}; GPUs: {', '.join(str(g.index) for g in profile.gpus)}")
    if requested == "auto":
        if gpu is None:
            return "bf16" if profile.cpu_bf16 else "no"
        return "bf16" if gpu.supports_bf16 else "fp16"
    if requested == "bf16" and gpu is not None and not gpu.supports_bf16:
        cc = gpu.compute_capability
        raise PrecisionError(f"bf16 needs an NVIDIA GPU with compute capability 8.0 or newer (Ampere, RTX 30xx "
                             f"and later); {gpu.name} has {cc[0]}.{cc[1]}.  Choose fp16 or auto.")
    return requested


def choose_tf32(profile: HardwareProfile, requested="auto", gpu_index: int = 0) -> bool:
    """Whether to allow TF32 matmuls: "auto" turns them on for GPUs that have TF32 (Ampere and newer) and
    off on the CPU; "on"/"off" (or True/False) are followed (TF32 on hardware without it has no effect)."""
    if requested is True or requested == "on":
        return True
    if requested is False or requested == "off":
        return False
    if requested != "auto":
        raise ValueError(f"tf32 must be one of {', '.join(TF32_CHOICES)}; got {requested!r}")
    gpu = profile.gpu(gpu_index) if profile.gpus else None
    return bool(gpu and gpu.supports_tf32)
