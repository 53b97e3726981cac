"""core.hardware (real detection + precision decisions) and run.py's installer logic (no network)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import run  # noqa: E402  (the installer; standard library only)
from core.hardware import (GpuInfo, HardwareProfile, PrecisionError, choose_precision, choose_tf32,  # noqa: E402
                           current_memory_use, detect_hardware)


# ---------------------------------------------------------------------------------------------------
# real detection on this machine
# ---------------------------------------------------------------------------------------------------
def test_detect_hardware_on_this_machine():
    import torch

    p = detect_hardware()
    assert p.torch_version == torch.__version__
    assert p.cuda_version == torch.version.cuda
    assert p.cpu_cores >= 1 and p.cpu_name
    assert p.ram_total_gb > 0.5 and 0 < p.ram_available_gb <= p.ram_total_gb
    expected_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert len(p.gpus) == expected_gpus
    for g in p.gpus:
        assert g.total_vram_gb > 0 and 0 <= g.free_vram_gb <= g.total_vram_gb + 0.01
        assert g.supports_bf16 == (g.compute_capability >= (8, 0))
    text = p.summary()
    assert "CPU:" in text and "RAM:" in text and p.torch_version in text
    assert ("GPU 0:" in text) if p.gpus else ("GPU: none" in text)
    assert choose_precision(p, "auto") == (("bf16" if p.cpu_bf16 else "no") if not p.gpus
                                           else ("bf16" if p.gpus[0].supports_bf16 else "fp16"))
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else None
    if flags is not None and "flags" in flags:  # Linux x86: the kernel's flags decide
        assert p.cpu_bf16 == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert f"bf16 {'yes' if p.cpu_bf16 else 'no'}" in text.splitlines()[len(p.gpus) or 1]
    assert choose_tf32(p, "auto") == bool(p.gpus and p.gpus[0].supports_tf32)


def test_current_memory_use():
    m = current_memory_use()
    assert set(m) >= {"vram_gb", "peak_vram_gb", "ram_gb"}
    assert m["ram_gb"] > 0
    import torch
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        assert m["vram_gb"] is None and m["peak_vram_gb"] is None


# ---------------------------------------------------------------------------------------------------
# precision over synthetic machines
# ---------------------------------------------------------------------------------------------------
def machine(*gpus: tuple[str, tuple[int, int]], cpu_bf16: bool = False) -> HardwareProfile:
    """``cpu_bf16``: the CPU has bf16 instructions (AVX512-BF16 / AMX)."""
    return HardwareProfile(
        gpus=[GpuInfo.from_capability(i, name, 16.0, 15.0, cc) for i, (name, cc) in enumerate(gpus)],
        cpu_cores=8, cpu_name="Test CPU", ram_total_gb=32.0, ram_available_gb=30.0,
        torch_version="2.13.0", cuda_version="12.8" if gpus else None, cpu_bf16=cpu_bf16)


CPU = machine()
CPU_BF16 = machine(cpu_bf16=True)
T4_ON_BF16_CPU = machine(("Tesla T4", (7, 5)), cpu_bf16=True)
GTX1080 = machine(("GTX 1080", (6, 1)))
V100 = machine(("Tesla V100", (7, 0)))
T4 = machine(("Tesla T4", (7, 5)))
A100 = machine(("A100", (8, 0)))
RTX3090 = machine(("RTX 3090", (8, 6)))
H100 = machine(("H100", (9, 0)))
RTX5090 = machine(("RTX 5090", (12, 0)))
ERR = PrecisionError

PRECISION_TABLE = [
    # profile,  auto,   bf16,   fp16,   no
    (CPU,       "no",   "bf16", "fp16", "no"),
    (CPU_BF16,  "bf16", "bf16", "fp16", "no"),
    (T4_ON_BF16_CPU, "fp16", ERR, "fp16", "no"),
    (GTX1080,   "fp16", ERR,    "fp16", "no"),
    (V100,      "fp16", ERR,    "fp16", "no"),
    (T4,        "fp16", ERR,    "fp16", "no"),
    (A100,      "bf16", "bf16", "fp16", "no"),
    (RTX3090,   "bf16", "bf16", "fp16", "no"),
    (H100,      "bf16", "bf16", "fp16", "no"),
    (RTX5090,   "bf16", "bf16", "fp16", "no"),
]


@pytest.mark.parametrize("profile,auto,bf16,fp16,no", PRECISION_TABLE,
                         ids=[(p.gpus[0].name if p.gpus else "cpu") + ("+cpu-bf16" if p.cpu_bf16 else "")
                              for p, *_ in PRECISION_TABLE])
def test_choose_precision_table(profile, auto, bf16, fp16, no):
    for requested, expected in (("auto", auto), ("bf16", bf16), ("fp16", fp16), ("no", no)):
        if expected is ERR:
            with pytest.raises(PrecisionError, match="compute capability 8.0"):
                choose_precision(profile, requested)
        else:
            assert choose_precision(profile, requested) == expected, requested


def test_precision_error_is_a_value_error_and_names_the_gpu():
    with pytest.raises(ValueError, match="Tesla T4 has 7.5"):
        choose_precision(T4, "bf16")


def test_choose_precision_rejects_unknown_and_picks_the_requested_gpu():
    with pytest.raises(ValueError):
        choose_precision(CPU, "fp8")
    mixed = machine(("Tesla T4", (7, 5)), ("A100", (8, 0)))
    assert choose_precision(mixed, "auto") == "fp16"
    assert choose_precision(mixed, "auto", gpu_index=1) == "bf16"
    with pytest.raises(ValueError):
        choose_precision(mixed, "auto", gpu_index=5)


@pytest.mark.parametrize("profile,auto", [(CPU, False), (V100, False), (T4, False), (A100, True), (H100, True)])
def test_choose_tf32(profile, auto):
    assert choose_tf32(profile, "auto") is auto
    assert choose_tf32(profile, "on") is True and choose_tf32(profile, True) is True
    assert choose_tf32(profile, "off") is False and choose_tf32(profile, False) is False
    with pytest.raises(ValueError):
        choose_tf32(profile, "maybe")


def test_summary_says_whether_the_cpu_has_bf16():
    assert "CPU: Test CPU, 8 cores, bf16 yes (AVX512-BF16 / AMX)" in CPU_BF16.summary()
    assert "CPU: Test CPU, 8 cores, bf16 no" in CPU.summary()


def test_summary_of_a_synthetic_gpu_machine():
    p = machine(("NVIDIA A100-SXM4-80GB", (8, 0)))
    p.driver_version = "570.86"
    text = p.summary()
    assert "GPU 0: NVIDIA A100-SXM4-80GB, 16.0 GB VRAM (15.0 GB free), compute capability 8.0" in text
    assert "bf16 yes" in text and "CUDA 12.8" in text and "driver 570.86" in text


# ---------------------------------------------------------------------------------------------------
# packages.jsonc parsing
# ---------------------------------------------------------------------------------------------------
def test_jsonc_comments_strings_and_trailing_commas():
    text = r'''
    // leading comment
    {
      "url": "https://example.org/a//b", // a URL keeps its slashes
      "quote": "say \"hi\" // not a comment",
      /* block
         comment */ "list": [1, 2, 3,],
      "slash_star": "/* kept */",
      "backslash": "C:\\dir\\",
      "nested": {"a": [ ], "b": {},},
      "commented_tail": [1, // don't "quote" me
                         2, /* , ] */
      ],
      "comma_in_string": [",", "]"],
    }
    '''
    assert run.parse_jsonc(text) == {
        "url": "https://example.org/a//b", "quote": 'say "hi" // not a comment', "list": [1, 2, 3],
        "slash_star": "/* kept */", "backslash": "C:\\dir\\", "nested": {"a": [], "b": {}},
        "commented_tail": [1, 2], "comma_in_string": [",", "]"]}


def test_jsonc_errors_keep_line_numbers():
    with pytest.raises(ValueError) as e:
        run.parse_jsonc('{\n// c\n/* x\n y */\n"a": 1\n"b": 2}')
    assert "line 6" in str(e.value)
    with pytest.raises(ValueError):
        run.parse_jsonc('{"a": 1} /* open')


def test_packages_jsonc_of_the_project():
    from packaging.requirements import Requirement

    spec = run.load_spec(ROOT / "packages.jsonc")
    assert run.python_ok(spec, (3, 11)) and not run.python_ok(spec, (3, 9))
    assert spec["torch"]["cpu"]["version"] == "2.13.0"
    assert {w["cuda"] for w in spec["torch"]["cuda"]["wheels"]} >= {"12.6", "12.8"}
    cpu = run.select_requirements(spec, ("app",), "cpu")
    cuda = run.select_requirements(spec, ("app",), "cuda")
    names = lambda reqs: {Requirement(r).name.lower() for r in reqs}  # noqa: E731
    for r in cpu + cuda + run.select_requirements(spec, ("test",), "cpu"):
        Requirement(r)                                   # every entry is a valid pip requirement
    assert names(cpu) >= {"diffusers", "transformers", "peft", "lycoris-lora", "accelerate", "gradio",
                          "safetensors", "psutil", "nvidia-ml-py", "pillow", "prodigyopt", "pandas", "pydantic"}
    assert "bitsandbytes" not in names(cpu) and "bitsandbytes" in names(cuda)
    assert "torch" not in names(cpu)                     # torch is installed by its own step
    assert names(run.select_requirements(spec, ("test",), "cpu")) >= {"pytest", "playwright", "pytest-timeout"}
    assert "pytest" not in names(cpu)


def test_spec_validation_messages():
    base = {"torch": {"cpu": {"version": "2.13.0"}}, "groups": {"app": ["a>=1"]}}
    run.validate_spec(base)
    bad = [
        {"groups": {"app": []}},
        {**base, "groups": {"test": []}},
        {**base, "groups": {"app": [{"platforms": ["cuda"]}]}},
        {**base, "groups": {"app": [{"requirement": "x", "platforms": ["rocm"]}]}},
        {**base, "torch": {"cpu": {"version": "1"}, "cuda": {"version": "2", "wheels": []}}},
    ]
    for spec in bad:
        with pytest.raises(run.InstallError):
            run.validate_spec(spec)
    with pytest.raises(run.InstallError, match="no group"):
        run.select_requirements(base, ("app", "docs"), "cpu")


def test_select_requirements_platforms_and_order():
    spec = {"groups": {"app": ["a", {"requirement": "b", "platforms": ["cuda"]},
                                {"requirement": "c", "platforms": ["cpu"]}, {"requirement": "d"}],
                       "test": ["a", "t"]}}
    assert run.select_requirements(spec, ("app", "test"), "cpu") == ["a", "c", "d", "t"]
    assert run.select_requirements(spec, ("app",), "cuda") == ["a", "b", "d"]


# ---------------------------------------------------------------------------------------------------
# nvidia-smi parsing and the torch choice
# ---------------------------------------------------------------------------------------------------
SMI_BANNER = """
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_parse_nvidia_smi():
    assert run.parse_nvidia_smi_header(SMI_BANNER) == ("550.54.15", (12, 4))
    assert run.parse_nvidia_smi_header("garbage") == (None, None)
    gpus = run.parse_gpu_query("NVIDIA GeForce RTX 3090, 8.6\nTesla V100-SXM2-16GB, 7.0\n\n")
    assert [(g.name, g.compute_capability) for g in gpus] == [("NVIDIA GeForce RTX 3090", (8, 6)),
                                                              ("Tesla V100-SXM2-16GB", (7, 0))]
    assert [(g.name, g.compute_capability) for g in run.parse_gpu_query("Quadro K620\n")] == [("Quadro K620", None)]
    assert run.parse_gpu_query("GPU X, [N/A]\n")[0].compute_capability is None


TORCH_SPEC = {
    "cpu": {"version": "2.13.0", "index_url": "https://download.pytorch.org/whl/cpu"},
    "cuda": {"version": "2.11.0", "wheels": [
        {"cuda": "12.8", "index_url": "https://download.pytorch.org/whl/cu128", "min_compute_capability": "7.5"},
        {"cuda": "12.6", "index_url": "https://download.pytorch.org/whl/cu126", "min_compute_capability": "5.0",
         "max_compute_capability": "9.0"},
    ]},
}


def nv(cuda, *ccs):
    return run.NvidiaFacts("999.0", cuda, [run.GpuFacts(f"GPU{i}", cc) for i, cc in enumerate(ccs or [(8, 6)])])


CHOICES = [
    # facts,                          platform,  kind,   requirement,             index tail,  warns
    (None,                            "linux",   "cpu",  "torch==2.13.0+cpu",     "/cpu",      False),
    (None,                            "win32",   "cpu",  "torch==2.13.0+cpu",     "/cpu",      False),
    (None,                            "darwin",  "cpu",  "torch==2.13.0",         None,        False),
    (nv((13, 0)),                     "darwin",  "cpu",  "torch==2.13.0",         None,        False),
    (run.NvidiaFacts("1", (12, 8)),   "linux",   "cpu",  "torch==2.13.0+cpu",     "/cpu",      False),  # no GPUs
    (nv((13, 0)),                     "linux",   "cuda", "torch==2.11.0+cu128",   "/cu128",    False),
    (nv((12, 8)),                     "linux",   "cuda", "torch==2.11.0+cu128",   "/cu128",    False),
    (nv((12, 9)),                     "win32",   "cuda", "torch==2.11.0+cu128",   "/cu128",    False),
    (nv((12, 7)),                     "linux",   "cuda", "torch==2.11.0+cu126",   "/cu126",    False),
    (nv((12, 6)),                     "linux",   "cuda", "torch==2.11.0+cu126",   "/cu126",    False),
    (nv((12, 4)),                     "linux",   "cuda", "torch==2.11.0+cu126",   "/cu126",    True),   # minor compat
    (nv((12, 0)),                     "linux",   "cuda", "torch==2.11.0+cu126",   "/cu126",    True),
    (nv((11, 8)),                     "linux",   "cpu",  "torch==2.13.0+cpu",     "/cpu",      True),   # driver too old
    (nv((13, 0), (6, 1)),             "linux",   "cuda", "torch==2.11.0+cu126",   "/cu126",    False),  # Pascal
    (nv((13, 0), (7, 0), (8, 6)),     "linux",   "cuda", "torch==2.11.0+cu126",   "/cu126",    False),  # mixed
    (nv((12, 8), (12, 0)),            "linux",   "cuda", "torch==2.11.0+cu128",   "/cu128",    False),  # Blackwell
    (nv((12, 6), (12, 0)),            "linux",   "cuda", "torch==2.11.0+cu128",   "/cu128",    True),
    (nv((12, 8), (6, 1), (12, 0)),    "linux",   "cpu",  "torch==2.13.0+cpu",     "/cpu",      True),   # no build fits both
    (nv((12, 8), (3, 5)),             "linux",   "cpu",  "torch==2.13.0+cpu",     "/cpu",      True),   # Kepler
    (nv(None),                        "linux",   "cuda", "torch==2.11.0+cu126",   "/cu126",    True),   # unknown driver
    (nv(None, (12, 0)),               "linux",   "cuda", "torch==2.11.0+cu128",   "/cu128",    True),
    (run.NvidiaFacts("1", (12, 8), [run.GpuFacts("old smi", None)]),
                                      "linux",   "cuda", "torch==2.11.0+cu128",   "/cu128",    False),  # no cc known
]


@pytest.mark.parametrize("facts,platform,kind,requirement,index_tail,warns", CHOICES)
def test_choose_torch(facts, platform, kind, requirement, index_tail, warns):
    c = run.choose_torch(TORCH_SPEC, facts, platform)
    assert (c.kind, c.requirement) == (kind, requirement)
    assert (c.index_url is None) if index_tail is None else c.index_url.endswith(index_tail)
    assert bool(c.warning) is warns, c.warning
    if kind == "cuda":
        assert c.requirement.endswith("+cu" + c.cuda.replace(".", ""))


def test_choose_torch_without_cuda_section():
    c = run.choose_torch({"cpu": {"version": "2.13.0"}}, nv((12, 8)), "linux")
    assert c.kind == "cpu" and c.warning


@pytest.mark.parametrize("installed,cuda,choice_args,fits", [
    ("2.13.0+cpu", None, (None, "linux"), True),
    ("2.13.0", "13.0", (None, "linux"), True),          # a CUDA build of the pinned release runs on the CPU
    ("2.12.1+cpu", None, (None, "linux"), False),
    ("2.11.0+cu128", "12.8", (nv((12, 8)), "linux"), True),
    ("2.11.0+cu126", "12.6", (nv((12, 8)), "linux"), False),
    ("2.11.0+cpu", None, (nv((12, 8)), "linux"), False),
    ("2.13.0+cu128", "12.8", (nv((12, 8)), "linux"), False),
])
def test_torch_fits(installed, cuda, choice_args, fits):
    assert run.torch_fits(installed, cuda, run.choose_torch(TORCH_SPEC, *choice_args)) is fits


def test_torch_fits_keeps_a_cuda_build_that_runs_on_the_gpus():
    choice = run.choose_torch(TORCH_SPEC, nv((13, 0), (9, 0)), "linux")          # cu128 chosen
    assert run.torch_fits("2.11.0+cu130", "13.0", choice, gpu_works=True)
    assert not run.torch_fits("2.11.0+cu130", "13.0", choice, gpu_works=False)
    assert not run.torch_fits("2.11.0+cu128", "12.8", choice, gpu_works=False)  # e.g. no kernels for the GPU
    assert not run.torch_fits("2.11.0+cpu", None, choice, gpu_works=None)
    assert not run.torch_fits("2.12.1+cu128", "12.8", choice, gpu_works=True)   # not the pinned release


# ---------------------------------------------------------------------------------------------------
# the stamp: nothing is installed when nothing changed
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """A project with packages.jsonc and an existing venv (its python is this interpreter)."""
    spec_file = tmp_path / "packages.jsonc"
    spec_file.write_text(json.dumps({"torch": TORCH_SPEC, "groups": {"app": ["a"], "test": ["t"]}}))
    venv = tmp_path / ".venv"
    py = run.venv_python(venv)
    py.parent.mkdir(parents=True)
    py.symlink_to(sys.executable)
    (venv / "pyvenv.cfg").write_text("home = /x\nversion = 3.11.7\n")
    calls = []
    monkeypatch.setattr(run, "detect_nvidia", lambda: None)
    monkeypatch.setattr(run, "ensure_venv", lambda d: run.venv_python(d))
    monkeypatch.setattr(run, "install_torch", lambda p, c: calls.append(("torch", c.requirement)) or "2.13.0+cpu")
    monkeypatch.setattr(run, "install_packages", lambda p, reqs, tv: calls.append(("packages", tuple(reqs))))
    return spec_file, venv, calls


def test_ensure_environment_installs_once_then_skips(fake_env):
    spec_file, venv, calls = fake_env
    py = run.ensure_environment(("app",), venv_dir=venv, packages_file=spec_file)
    assert py == run.venv_python(venv)
    assert calls == [("torch", "torch==2.13.0+cpu"), ("packages", ("a",))]
    stamp = json.loads((venv / run.STAMP_NAME).read_text())
    assert stamp["groups"] == ["app"] and stamp["torch"] == "2.13.0+cpu"

    calls.clear()
    run.ensure_environment(("app",), venv_dir=venv, packages_file=spec_file)
    assert calls == []                                   # unchanged: nothing at all

    run.ensure_environment(("app", "test"), venv_dir=venv, packages_file=spec_file)
    assert calls == [("torch", "torch==2.13.0+cpu"), ("packages", ("a", "t"))]
    calls.clear()
    run.ensure_environment(("test",), venv_dir=venv, packages_file=spec_file)
    run.ensure_environment(("app",), venv_dir=venv, packages_file=spec_file)
    assert calls == []                                   # app+test recorded, so either is up to date


def test_changes_that_trigger_a_reinstall(fake_env, monkeypatch):
    spec_file, venv, calls = fake_env
    run.ensure_environment(("app",), venv_dir=venv, packages_file=spec_file)
    calls.clear()
    spec_file.write_text(spec_file.read_text() + "\n// a comment changes the hash too\n")
    run.ensure_environment(("app",), venv_dir=venv, packages_file=spec_file)
    assert len(calls) == 2
    calls.clear()
    monkeypatch.setattr(run, "detect_nvidia", lambda: nv((12, 8)))         # a GPU appeared
    run.ensure_environment(("app",), venv_dir=venv, packages_file=spec_file)
    assert calls[0] == ("torch", "torch==2.11.0+cu128")
    calls.clear()
    (venv / "pyvenv.cfg").write_text("home = /x\nversion = 3.12.1\n")   # another Python
    run.ensure_environment(("app",), venv_dir=venv, packages_file=spec_file)
    assert len(calls) == 2


def test_environment_key_parts():
    c = run.choose_torch(TORCH_SPEC, None, "linux")
    g = run.choose_torch(TORCH_SPEC, nv((12, 8)), "linux")
    k = run.environment_key("spec", c, "3.11.7")
    assert k == run.environment_key("spec", c, "3.11.7")
    assert len({k, run.environment_key("spec2", c, "3.11.7"), run.environment_key("spec", g, "3.11.7"),
                run.environment_key("spec", c, "3.12.0")}) == 4


# ---------------------------------------------------------------------------------------------------
# install_torch's steps (pip replaced by a recorder)
# ---------------------------------------------------------------------------------------------------
class FakePip:
    def __init__(self, monkeypatch, torch_states, fail=()):
        self.calls, self.states, self.fail = [], list(torch_states), set(fail)
        monkeypatch.setattr(run, "pip", self.pip)
        monkeypatch.setattr(run, "installed_torch", lambda py: self.states.pop(0) if len(self.states) > 1
                            else self.states[0])

    def pip(self, py, args, capture=False):
        self.calls.append(args)
        rc = 1 if any(f in " ".join(args) for f in self.fail) else 0
        return run.subprocess.CompletedProcess(args, rc, "", "")


CPU_CHOICE = run.choose_torch(TORCH_SPEC, None, "linux")
CUDA_CHOICE = run.choose_torch(TORCH_SPEC, nv((12, 8), (8, 6)), "linux")


def test_install_torch_keeps_a_fitting_torch(monkeypatch):
    fake = FakePip(monkeypatch, [("2.13.0+cpu", None, None)])
    assert run.install_torch(Path("py"), CPU_CHOICE) == "2.13.0+cpu"
    assert fake.calls == []
    fake = FakePip(monkeypatch, [("2.11.0+cu130", "13.0", True)])
    assert run.install_torch(Path("py"), CUDA_CHOICE) == "2.11.0+cu130"
    assert fake.calls == []


def test_install_torch_local_sources_first(monkeypatch):
    fake = FakePip(monkeypatch, [None, ("2.13.0+cpu", None, None)])
    assert run.install_torch(Path("py"), CPU_CHOICE) == "2.13.0+cpu"
    assert fake.calls == [["install", "--no-index", "--no-deps", "torch==2.13.0+cpu"],
                          ["install", "torch==2.13.0+cpu"]]           # then its dependencies


def test_install_torch_falls_back_to_the_pytorch_index(monkeypatch):
    fake = FakePip(monkeypatch, [("2.12.1+cpu", None, None), ("2.11.0+cu128", "12.8", True)], fail=["--no-index"])
    assert run.install_torch(Path("py"), CUDA_CHOICE) == "2.11.0+cu128"
    assert fake.calls[1] == ["install", "torch==2.11.0+cu128", "--index-url", "https://download.pytorch.org/whl/cu128"]


def test_install_torch_failure_says_how_to_retry(monkeypatch):
    FakePip(monkeypatch, [None], fail=["install"])
    with pytest.raises(run.InstallError) as e:
        run.install_torch(Path("py"), CPU_CHOICE)
    msg = str(e.value)
    assert "download.pytorch.org/whl/cpu" in msg and "run the same command again" in msg and ".venv" in msg
