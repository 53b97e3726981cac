"""The product run as users run it: every architecture, every layout of its tiny test model, trained in a FRESH
Python process that imported nothing before ``core`` (``import core; core.train(core.load_settings(...))``).

Why a fresh process: a library can capture global state at its first import (diffusers and transformers keep a
table of ``torch.nn.init`` functions filled at import and write it back around every ``from_pretrained``; see
FIELD_NOTES "Pitfall: libraries capture torch.nn.init at import").  Anything the product does before that first
import then decides how every later layer is initialised, for the rest of the process — adapters came out NaN or
untrained only in a fresh process.  Inside this pytest process those libraries were imported long ago by other
tests, so only child processes can show such a bug.

The parent builds the tiny models and writes a settings JSON and a config JSON per case; each child runs
``CHILD_SCRIPT`` (two at a time) and prints what it saved as one JSON line.  The parent then checks every file
the run wrote (finite; lora_up / lora_B trained away from zero; lora_down / lora_A initialised, not ``torch.empty``
garbage; the family's metadata), and for the diffusers-layout run of every architecture loads the file with
diffusers and compares the denoiser's output with the trainer's own view of the adapter.  Each case also runs on the
code of commit ``BASELINE`` (extracted with ``git archive``), and every saved tensor must be bit-identical to it.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import architectures
import core
from core.adapters import build_network
from tests.test_dit_train_e2e import _inputs as dit_inputs
from tests.test_dit_train_e2e import _peft_modules, layers_covered
from tests.test_flux2 import _inputs as flux2_inputs
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, build_tiny_sdxl, tiny_config_dir, \
    tiny_single_file, tiny_train_settings
from tests.tiny_models_dit import build_tiny_dit
from tests.tiny_models_dit import settings_paths as dit_settings_paths
from tests.tiny_models_flux2 import build_tiny_flux2
from tests.tiny_models_flux2 import settings_paths as flux2_settings_paths
from tests.tiny_models_flux3 import FLUX3_IDS, build_tiny_flux3

ROOT = Path(__file__).resolve().parent.parent
# the whole module's runs happen in one fixture, inside the first test: more than the suite's 600 s per test
pytestmark = pytest.mark.timeout(1800)

SD_IDS = ("sd15", "sdxl")
SD3_IDS = ("sd3", "sd35_medium", "sd35_large")
FLUX1_IDS = ("flux1_dev", "flux1_schnell")
FLUX2_IDS = ("flux2_dev", "flux2_klein_4b", "flux2_klein_9b", "flux2_klein_base_4b", "flux2_klein_base_9b")
LAYOUTS = {**{a: ("diffusers", "single_file") for a in SD_IDS + SD3_IDS},
           **{a: ("diffusers", "bfl") for a in FLUX1_IDS + FLUX2_IDS + FLUX3_IDS}}
CASES = [(arch_id, layout) for arch_id, layouts in LAYOUTS.items() for layout in layouts]
STEPS = 3
CHILD_TIMEOUT_S = 300     # one child takes 10-30 s on a 2-core box
PARALLEL = 2
# Every case's saved tensors must equal, bit for bit, what the code of this commit saves on the same seed and
# machine: refactors that are meant not to change behaviour are held to it.  Move it (in a commit that says
# why) when a change alters saved tensors on purpose.
BASELINE = "50591e8f6e2c653c2159e79729c24a70725e3489"
BASELINE_LAYOUT = "diffusers"   # one layout per family is compared (CI time); loading is not what a refactor moves

# What a user's script does, and nothing else: no torch, diffusers or tests module is imported before core.
# argv: repository root, settings JSON, config JSON (the app itself reads no environment or arguments).
CHILD_SCRIPT = """
import json, sys, time
start = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import core
from core.config import load_config
settings = core.load_settings(sys.argv[2])
result = core.train(settings, config=load_config(sys.argv[3]))
print("FRESH_PROCESS_RESULT " + json.dumps({
    "final": str(result.final), "outputs": [str(p) for p in result.outputs], "steps": result.steps,
    "state_dir": str(result.state_dir) if result.state_dir else None, "seconds": time.perf_counter() - start,
    "cpu_seconds": time.process_time()}))
"""

# The same run by the code of BASELINE: settings added since are unknown to it and dropped (their defaults keep
# the old behaviour).
BASELINE_CHILD_SCRIPT = CHILD_SCRIPT.replace("settings = core.load_settings(sys.argv[2])", """
from core.settings import SECTIONS, settings_from_dict
data = json.load(open(sys.argv[2], encoding="utf-8"))
settings = settings_from_dict({section: {k: v for k, v in values.items() if k in SECTIONS[section].model_fields}
                               for section, values in data.items() if section in SECTIONS})""")
assert BASELINE_CHILD_SCRIPT != CHILD_SCRIPT


@dataclass
class Run:
    arch_id: str
    layout: str
    paths: dict          # what the builder returned: {"model": …, "config_dir": …, …}
    settings: object     # the Settings the child loaded (the parent's copy, for the comparisons)
    returncode: int | None = None
    stderr: str = ""
    wall_s: float = 0.0
    result: dict = field(default_factory=dict)


def _build(arch_id: str, layout: str, folder: Path) -> tuple[dict, dict]:
    """Builds the tiny model; returns (paths, model.* settings)."""
    if arch_id in SD_IDS:
        builder = build_tiny_sd15 if arch_id == "sd15" else build_tiny_sdxl
        if layout == "diffusers":
            path = builder(folder, "diffusers")
            return {"model": path}, {"model.model_path": str(path)}
        builder(folder, "single_file")
        paths = {"model": tiny_single_file(arch_id, folder), "config_dir": tiny_config_dir(arch_id, folder)}
        return paths, {"model.model_path": str(paths["model"]), "model.config_path": str(paths["config_dir"])}
    if arch_id in FLUX2_IDS + FLUX3_IDS:
        paths = (build_tiny_flux2 if arch_id in FLUX2_IDS else build_tiny_flux3)(arch_id, folder, layout)
        return paths, flux2_settings_paths(paths)
    paths = build_tiny_dit(arch_id, folder, layout)
    return paths, {**dit_settings_paths(paths), "model.t5_max_length": 24}   # the tiny T5: short texts


def _selected_cases(request) -> list[tuple[str, str]]:
    """The cases the selected tests of this module need (all of them in a full run; ``-k sd15`` runs two)."""
    wanted = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and "arch_id" in params:
            wanted.add((params["arch_id"], params.get("layout", "diffusers")))
    return [case for case in CASES if case in wanted]


def _launch(run: Run, case_dir: Path, code_root: Path = ROOT, script: str = CHILD_SCRIPT) -> Run:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", script, str(code_root), str(case_dir / "settings.json"),
                               str(case_dir / "config.json")], cwd=str(code_root), capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S)
        run.returncode, run.stderr = proc.returncode, proc.stderr
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FRESH_PROCESS_RESULT ")]
        if lines:
            run.result = json.loads(lines[-1].split(" ", 1)[1])
    except subprocess.TimeoutExpired as exc:
        run.returncode = -1
        run.stderr = f"timed out after {CHILD_TIMEOUT_S} s\n{exc.stderr or ''}"
    run.wall_s = time.perf_counter() - start
    return run


def _baseline_knows(code_root: Path, arch_id: str) -> bool:
    """Whether the family existed at BASELINE (a family added since has nothing to compare with)."""
    return any(f'id = "{arch_id}"' in p.read_text(encoding="utf-8") for p in (code_root / "architectures").glob("*.py"))


def _baseline_code(folder: Path) -> tuple[Path | None, str]:
    """The code of BASELINE extracted into ``folder`` (core/, architectures/ and the JSON defaults), or why not."""
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE, "core", "architectures",
                                  "training.json", "config.json"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"git archive failed: {exc}"
    if archive.returncode != 0:
        return None, f"commit {BASELINE[:10]} is not in this clone: {archive.stderr.decode(errors='replace').strip()}"
    folder.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder, ""


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> dict[tuple[str, str], Run]:
    """Every selected case run by today's code, and (key ``(arch_id, layout, "baseline")``) by BASELINE's."""
    root = tmp_path_factory.mktemp("fresh")
    data = build_tiny_dataset(root / "data", n=4)
    baseline_root, why = _baseline_code(root / "baseline_code")
    if baseline_root is None:
        print(f"\nno baseline runs: {why}")
    prepared = []
    for arch_id, layout in _selected_cases(request):
        case_dir = root / f"{arch_id}_{layout}"
        paths, model_fields = _build(arch_id, layout, case_dir / "model")
        overrides = dict(schedule__max_train_steps=STEPS, optimizer__learning_rate=1e-2, saving__save_state=True,
                         memory__cpu_threads=1)
        if arch_id in FLUX1_IDS and layout == "diffusers":
            # diffusers 0.42.1's kohya FLUX.1 converter hard-codes width 3072 for the single blocks
            overrides["network__flux_blocks"] = "double"
        for code_root, run_dir in ((ROOT, case_dir), (baseline_root, case_dir / "baseline")):
            if code_root is None or not (code_root == ROOT or layout == BASELINE_LAYOUT
                                         and _baseline_knows(code_root, arch_id)):
                continue
            run_data = run_dir / "data"            # each run its own copy: nothing shared between two children
            shutil.copytree(data, run_data)
            s, config = tiny_train_settings(arch_id, model_fields, run_data, run_dir, **overrides)
            core.save_settings(s, run_dir / "settings.json")
            (run_dir / "config.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
            script = CHILD_SCRIPT if code_root == ROOT else BASELINE_CHILD_SCRIPT
            prepared.append((Run(arch_id, layout, paths, s), run_dir, code_root, script))
    start = time.perf_counter()
    with ThreadPoolExecutor(PARALLEL) as pool:
        done = list(pool.map(lambda args: (args[2] != ROOT, _launch(*args)), prepared))
    total = time.perf_counter() - start
    print(f"\n{len(done)} fresh-process runs, {PARALLEL} at a time: {total:.1f} s in all")
    for is_baseline, r in done:
        print(f"  {r.arch_id:22s} {r.layout:12s} {'baseline' if is_baseline else 'today':9s} {r.wall_s:6.1f} s "
              f"(in the child {r.result.get('seconds', 0):.1f} s, CPU {r.result.get('cpu_seconds', 0):.1f} s)")
    out = {(r.arch_id, r.layout) + (("baseline",) if is_baseline else ()): r for is_baseline, r in done}
    out["baseline_missing"] = why
    return out


def _finished(runs, arch_id, layout) -> Run:
    r = runs[(arch_id, layout)]
    if r.returncode != 0 or not r.result:
        tail = "\n".join(r.stderr.splitlines()[-40:])
        pytest.fail(f"the fresh process for {arch_id} ({layout}) failed (exit {r.returncode}):\n{tail}")
    return r


def _never_gets_a_gradient(arch_id: str, key: str, tensors: dict) -> bool:
    """SD3's last joint block is ``context_pre_only``: its context queries (``add_q_proj``) produce outputs nobody
    reads, so an adapter there keeps its zero up/B (in the fused kohya qkv it is the q third, beside trained k, v)."""
    if arch_id not in SD3_IDS:
        return False
    blocks = {int(m.group(1)) for k in tensors for m in [re.search(r"transformer_blocks[._](\d+)[._]", k)] if m}
    m = re.search(r"transformer_blocks[._](\d+)[._]attn[._]add_q_proj[._]", key)
    return bool(m) and int(m.group(1)) == max(blocks)


def _saved_files(r: Run) -> list[Path]:
    folder = Path(r.result["final"]).parent
    return sorted(folder.rglob("*.safetensors"))


# -- every file every run saved ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch_id,layout", CASES)
def test_fresh_process_saves_trained_finite_files(runs, arch_id, layout):
    r = _finished(runs, arch_id, layout)
    assert r.result["steps"] == STEPS
    final, state_dir = Path(r.result["final"]), Path(r.result["state_dir"])
    files = _saved_files(r)
    state_file = state_dir / "adapter.safetensors"
    assert final in files and state_file in files, files
    assert {Path(p) for p in r.result["outputs"]} <= set(files)
    if arch_id in SD3_IDS + FLUX3_IDS:   # diffusers reads no kohya keys there: a PEFT-layout side file beside it
        assert final.with_name(final.stem + ".diffusers.safetensors") in files
    arch = architectures.get(arch_id)
    problems = [f"{path.relative_to(final.parent)}: {p}" for path in files
                for p in _file_problems(arch_id, arch, path, metadata=path.parent != state_dir)]
    assert not problems, "\n".join(problems)


def _file_problems(arch_id, arch, path: Path, metadata: bool) -> list[str]:
    tensors = load_file(str(path))
    ups = {k: v.float() for k, v in tensors.items() if k.endswith((".lora_up.weight", ".lora_B.weight"))}
    downs = {k: v.float() for k, v in tensors.items() if k.endswith((".lora_down.weight", ".lora_A.weight"))}
    if not ups or len(ups) != len(downs):
        return [f"{len(ups)} up/B and {len(downs)} down/A tensors"]
    problems = []
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v.float()).all())]
    if bad:
        problems.append(f"{len(bad)}/{len(tensors)} tensors not finite, e.g. {bad[:3]}")
    untrained = [k for k, v in ups.items()
                 if float(v.norm()) == 0 and not _never_gets_a_gradient(arch_id, k, tensors)]
    if untrained:
        problems.append(f"{len(untrained)}/{len(ups)} up/B tensors never left their zero init, e.g. {untrained[:3]}")
    # kaiming-uniform initialised and trained a few steps: |x| well below 1; torch.empty memory is ~1e38 or 0
    garbage = [k for k, v in downs.items() if not 0 < float(v.abs().max()) < 10]
    if garbage:
        problems.append(f"{len(garbage)}/{len(downs)} down/A tensors uninitialised (0 or |x| >= 10), "
                        f"e.g. {garbage[:3]}")
    if metadata:   # the state's internal adapter carries no metadata
        with safe_open(str(path), "pt") as f:
            md = f.metadata() or {}
        for key, want in (("modelspec.architecture", arch.modelspec_architecture),
                          ("ss_base_model_version", arch.ss_base_model_version)):
            if md.get(key) != want:
                problems.append(f"metadata {key} is {md.get(key)!r}, not {want!r}")
    return problems


@pytest.mark.parametrize("arch_id,layout", [c for c in CASES if c[1] == BASELINE_LAYOUT])
def test_fresh_process_saves_what_the_baseline_saved(runs, arch_id, layout):
    """Same seed, same machine: every tensor of every file equals what BASELINE's code saved, bit for bit."""
    if runs["baseline_missing"]:
        pytest.skip(runs["baseline_missing"])
    if (arch_id, layout, "baseline") not in runs:
        pytest.skip(f"{arch_id} was added after the baseline commit {BASELINE[:10]}")
    today, before = _finished(runs, arch_id, layout), runs[(arch_id, layout, "baseline")]
    if before.returncode != 0 or not before.result:
        pytest.fail(f"BASELINE's code failed on {arch_id} ({layout}) (exit {before.returncode}):\n"
                    + "\n".join(before.stderr.splitlines()[-40:]))
    ours, theirs = (Path(r.result["final"]).parent for r in (today, before))
    names = sorted(str(p.relative_to(ours)) for p in _saved_files(today))
    assert names == sorted(str(p.relative_to(theirs)) for p in _saved_files(before))
    differ = []
    for name in names:
        a, b = load_file(str(ours / name)), load_file(str(theirs / name))
        if a.keys() != b.keys():
            differ.append(f"{name}: keys differ ({sorted(a.keys() ^ b.keys())[:4]})")
            continue
        differ += [f"{name}: {k} (largest difference {float((a[k].float() - b[k].float()).abs().max()):.3g})"
                   for k in sorted(a) if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensor(s) differ from BASELINE's:\n" + "\n".join(differ[:20])


# -- diffusers loads what the fresh process saved, with the trainer's outputs ---------------------------------------

def _model_inputs(arch_id, arch, comps):
    """(latents, timesteps, conditioning, batch extras) for one denoiser call."""
    if arch_id in FLUX2_IDS:
        return (*flux2_inputs(arch, comps), {})
    if arch_id in SD3_IDS + FLUX1_IDS:
        return (*dit_inputs(arch, comps), {})
    if arch_id in FLUX3_IDS:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            cond = arch.encode_text(comps, arch.tokenize(comps, ["a red square"]), 1)
        return torch.randn(1, 32, 4, 6, generator=g), torch.tensor([0.6]), cond, {}
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, comps.denoiser.config.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        cond = arch.encode_text(comps, arch.tokenize(comps, ["a red square"]), 1)
    batch = {"original_sizes": [(64, 64)], "crop_coords": [(0, 0)], "target_sizes": [(64, 64)]}
    return latents, torch.tensor([500]), cond, batch


def _diffusers_pipeline(arch_id: str, folder: Path):
    """(pipeline, its denoiser): the model folder loaded by diffusers itself.  FLUX.2: the transformer alone in its
    pipeline class, as tests/test_flux2.py does (``Flux2Pipeline.from_pretrained`` stops at the folder's Pixtral
    processor, which transformers only offers as a placeholder without torchvision); FLUX.3: the transformer in
    its modular pipeline (the Qwen3-VL processor needs torchvision too)."""
    from diffusers import (DiffusionPipeline, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel,
                           Flux3Transformer2DModel)
    if arch_id in FLUX3_IDS:
        from diffusers.modular_pipelines.flux3 import Flux3AutoBlocks
        transformer = Flux3Transformer2DModel.from_pretrained(str(folder), subfolder="transformer",
                                                              local_files_only=True)
        pipe = Flux3AutoBlocks().init_pipeline()
        pipe.update_components(transformer=transformer)
        return pipe, transformer
    if arch_id not in FLUX2_IDS:
        pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
        return pipe, pipe.unet if arch_id in SD_IDS else pipe.transformer
    transformer = Flux2Transformer2DModel.from_pretrained(str(folder), subfolder="transformer", local_files_only=True)
    cls = Flux2Pipeline if arch_id == "flux2_dev" else Flux2KleinPipeline
    return cls(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer), transformer


@pytest.mark.parametrize("arch_id", list(LAYOUTS))
def test_diffusers_loads_the_fresh_process_file(runs, arch_id):
    r = _finished(runs, arch_id, "diffusers")
    s = r.settings
    final = Path(r.result["final"])
    # where diffusers reads no kohya keys (SD3, FLUX.3) the family writes a side file in diffusers/PEFT layout
    side = final.with_name(final.stem + ".diffusers.safetensors")
    loadable = side if side.exists() else final
    assert side.exists() == (arch_id in SD3_IDS + FLUX3_IDS)

    # the trainer's own view: base + the unfused adapter from the state folder
    arch = architectures.get(arch_id)
    comps = arch.load(r.paths["model"], r.paths.get("config_dir"), torch.float32)
    arch.configure_objective(comps, s)
    net = build_network(arch.adapter_targets(comps, s.network.target, False), "lora", s.network.rank, s.network.alpha)
    net.load_export_state_dict(load_file(str(Path(r.result["state_dir"]) / "adapter.safetensors")))
    n_ours = layers_covered(net)
    assert len(net.adapters) == sum(1 for part in net.parts.values() if part == "unet") > 5

    pipe, denoiser = _diffusers_pipeline(arch_id, r.paths["model"])
    pipe.load_lora_weights(str(loadable))
    assert _peft_modules(denoiser) == n_ours, (_peft_modules(denoiser), n_ours)   # every key placed, none dropped

    latents, t, cond, batch = _model_inputs(arch_id, arch, comps)
    theirs_comps = replace(comps, denoiser=denoiser)
    net.apply_to()
    try:
        with torch.no_grad():
            ours = arch.predict(comps, latents, t, cond, batch)
    finally:
        net.restore()
    with torch.no_grad():
        base = arch.predict(comps, latents, t, cond, batch)
        theirs = arch.predict(theirs_comps, latents, t, cond, batch)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-3)
    assert (ours - base).abs().max() > 1e-4, "the trained adapter does not change the output"
