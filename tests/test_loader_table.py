"""The README's table "which tools load the file" (family × algorithm), computed here and compared with the README.

Every cell is measured on the tiny real-class model of the family: an adapter of the algorithm is built on the
family's layers, moved off its initial values as training does, and written with the family's export (the files
training writes).  Then:

* **ComfyUI**: every key stem is one ComfyUI maps for the family and every tensor one of its weight adapters reads
  (``tests/test_adapters_algorithms.py``: ``SUFFIXES`` / ``COMFY_READS``, written from comfy/lora.py and
  comfy/weight_adapter/*); ComfyUI's formulas (``comfy_merged_weight``) applied to the layers give the trained
  model's output.
* **diffusers**: ``load_lora_weights`` on the family's diffusers pipeline (on the file's ``.diffusers`` side file
  where the family writes one; FLUX.3 LoKr through the transformer's ``load_lora_adapter``, the only loader that
  takes it in diffusers 0.42.1) gives the trained model's output.

* **Forge†** is not run here (it needs its own CUDA install and launcher).  Its loader, read at
  lllyasviel/stable-diffusion-webui-forge dfdcbab6, takes ComfyUI's keys and formulas: backend/patcher/lora.py maps
  ``lora_unet_<key>`` onto every weight of its models, which keep the original layouts (backend/nn/unet.py,
  mmditx.py, flux.py), and packages_3rdparty/comfyui_lora_collection/lora.py with ``merge_lora_to_weight`` applies
  LoRA/LoCon, LoHa, LoKr, GLoRA and full diffs (DoRA included) as ComfyUI does; it has no OFT/BOFT ("TODO: OFT") or
  (IA)³, and its engines are SD 1.5/2, SDXL, SD3.5, FLUX.1 and Chroma.  So a cell says Forge† where the ComfyUI
  measurement passed, the family has a Forge engine and every tensor is one Forge reads.

``python -m tests.test_loader_table`` rewrites the README section from a fresh measurement.
"""
from __future__ import annotations

import copy
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import architectures
import core
from core.adapters import AdapterOptions, build_network
from core.adapters.fused import FusedLinear
from tests.test_adapters_algorithms import COMFY_READS, SUFFIXES, comfy_key_names, comfy_merged_weight
from tests.test_fresh_process import _diffusers_pipeline, _model_inputs
from tests.tiny_models import build_tiny_sd15, build_tiny_sdxl
from tests.tiny_models_dit import build_tiny_dit
from tests.tiny_models_flux2 import build_tiny_flux2
from tests.tiny_models_flux3 import build_tiny_flux3

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- loader-table:begin -->", "<!-- loader-table:end -->"
FAMILIES = {  # row label → (architecture measured, builder of its tiny diffusers folder, network settings)
    "SD 1.5": ("sd15", build_tiny_sd15, {}),
    "SDXL": ("sdxl", build_tiny_sdxl, {}),
    "SD3 / SD3.5": ("sd35_medium", lambda d: build_tiny_dit("sd35_medium", d)["model"], {}),
    # diffusers 0.42.1's kohya FLUX.1 converter hard-codes the full width (3072) to split single blocks' linear1,
    # which the tiny model cannot have: double blocks here; tests/test_dit_train_e2e.py loads single blocks at
    # full width, and tests/test_dit_matrix.py checks ComfyUI's formulas on them
    "FLUX.1": ("flux1_dev", lambda d: build_tiny_dit("flux1_dev", d)["model"], {"flux_blocks": "double"}),
    "FLUX.2": ("flux2_klein_4b", lambda d: build_tiny_flux2("flux2_klein_4b", d)["model"], {}),
    "FLUX.3": ("flux3_klein", lambda d: build_tiny_flux3("flux3_klein", d)["model"], {}),
}
ALGORITHMS = {  # column label → (network.algorithm, rank, adapter options)
    "LoRA": ("lora", 4, {}), "LoRA + DoRA": ("lora", 4, {"dora": True}), "LoCon": ("locon", 4, {}),
    "LoHa": ("loha", 4, {}), "LoKr": ("lokr", 4, {}), "(IA)³": ("ia3", 4, {}), "Diag-OFT": ("diag-oft", 4, {}),
    "BOFT": ("boft", 32, {}), "GLoRA": ("glora", 4, {}), "full diff": ("full", 4, {}),
}
SETTING = {"factor": "lokr_factor"}
FORGE_FAMILIES = {"SD 1.5", "SDXL", "SD3 / SD3.5", "FLUX.1"}
FORGE_READS = set().union(*(SUFFIXES[a] for a in ("lora", "locon", "loha", "lokr", "glora", "full")))


def _comfy_names(arch, comps) -> set[str]:
    if getattr(arch, "to_original_layout", None) is None:   # SD1.5 / SDXL: kohya names of the UNet's layers
        return comfy_key_names(arch.id, comps)
    original = arch.to_original_layout(comps.denoiser.state_dict(), comps.denoiser.config)
    return {"lora_unet_" + k[:-len(".weight")].replace(".", "_") for k in original if k.endswith(".weight")}


def _offered(arch_id: str, algo: str, opts: dict) -> bool:
    """Whether the family trains this algorithm at all: its settings check adds no refusal to plain LoRA's."""
    def problems(algorithm, options):
        s = core.Settings()
        s.model.architecture = arch_id
        s.network.algorithm = algorithm
        for k, v in options.items():
            setattr(s.network, SETTING.get(k, k), v)
        return architectures.get(arch_id).check_settings(s)
    return problems(algo, opts) == problems("lora", {})


def _with_weights(comps, targets: dict, new: dict[str, torch.Tensor], bias_deltas: dict[str, torch.Tensor]):
    """A copy of ``comps`` whose denoiser has ``new`` (target name → weight) in place of those layers' weights and
    ``bias_deltas`` added to their biases."""
    denoiser = copy.deepcopy(comps.denoiser)
    modules = dict(denoiser.named_modules())
    original = dict(comps.denoiser.named_modules())
    path_of = {id(m): p for p, m in original.items()}
    for name, w in new.items():
        layer = targets[name]
        parts = layer.parts if isinstance(layer, FusedLinear) else [layer]
        row = 0
        for part in parts:
            rows = part.weight.shape[0]
            copy_of = modules[path_of[id(part)]]
            copy_of.weight.data = w[row:row + rows].reshape(part.weight.shape).clone()
            if name in bias_deltas:
                copy_of.bias.data = copy_of.bias.data + bias_deltas[name][row:row + rows]
            row += rows
    return replace(comps, denoiser=denoiser)


def _diffusers_loads(arch_id, folder, files, paths, comps, inputs, ours) -> bool:
    from diffusers.utils import logging as dlogging
    loadable = paths.get(".diffusers", paths[""])
    pipe, denoiser = _diffusers_pipeline(arch_id, folder)
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        try:
            pipe.load_lora_weights(str(loadable))
        except Exception:
            if ".diffusers" not in files:
                return False
            denoiser.load_lora_adapter(str(loadable), prefix="transformer")
        with torch.no_grad():
            theirs = architectures.get(arch_id).predict(replace(comps, denoiser=denoiser), *inputs)
    except Exception:
        return False
    finally:
        dlogging.set_verbosity(level)
    return bool(torch.allclose(theirs, ours, atol=1e-4, rtol=1e-3))


def measure(root: Path) -> dict[str, dict[str, str]]:
    """Row label → column label → cell text."""
    table: dict[str, dict[str, str]] = {}
    for row, (arch_id, build, network) in FAMILIES.items():
        folder = build(root / arch_id)
        arch = architectures.get(arch_id)
        comps = arch.load(folder, None, torch.float32)
        s = core.Settings()
        s.model.architecture = arch_id
        for k, v in network.items():
            setattr(s.network, k, v)
        arch.configure_objective(comps, s)
        inputs = _model_inputs(arch_id, arch, comps)
        with torch.no_grad():
            base = arch.predict(comps, *inputs)
        names = _comfy_names(arch, comps)
        table[row] = {}
        for col, (algo, rank, opts) in ALGORITHMS.items():
            if not _offered(arch_id, algo, opts):
                table[row][col] = "not offered"
                continue
            preset = "full" if algo == "locon" and "full" in arch.adapter_presets else "attn_mlp"
            targets = arch.adapter_targets(comps, preset, False)
            net = build_network(targets, algo, rank, 2.0, 0.0, AdapterOptions(**opts))
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.03 * torch.randn(p.shape, generator=g))
            net.apply_to()
            net.eval()
            with torch.no_grad():
                ours = arch.predict(comps, *inputs)
            net.restore()
            assert (ours - base).abs().max() > 1e-3, (row, col)
            files = arch.export_adapter(comps, net.export_state_dict(torch.float32))
            paths = {}
            for suffix, tensors in files.items():
                paths[suffix] = root / f"{arch_id}-{algo}-{len(opts)}{suffix}.safetensors"
                save_file(tensors, str(paths[suffix]))
            sd = files[""]
            stems = {k.split(".", 1)[0] for k in sd}
            loaders = []
            if stems <= names and {k.split(".", 1)[1] for k in sd} <= COMFY_READS:
                by_name = {t.name: t.module for t in targets}
                merged = {n: comfy_merged_weight(sd, n, by_name[n].weight.detach().float()) for n in stems}
                with torch.no_grad():
                    comfy = arch.predict(_with_weights(comps, by_name, merged, {n: sd[f"{n}.diff_b"] for n in stems
                                                                                if f"{n}.diff_b" in sd}), *inputs)
                if torch.allclose(comfy, ours, atol=1e-4, rtol=1e-3):
                    loaders.append("ComfyUI")
                    if row in FORGE_FAMILIES and {k.split(".", 1)[1] for k in sd} <= FORGE_READS:
                        loaders.append("Forge†")
            if _diffusers_loads(arch_id, folder, files, paths, comps, inputs, ours):
                loaders.append("diffusers" + (" (`.diffusers` file)" if ".diffusers" in files else ""))
            table[row][col] = ", ".join(loaders) or "neither"
    return table


def render(table: dict[str, dict[str, str]]) -> str:
    cols = list(ALGORITHMS)
    lines = ["| Family | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cells[c] for c in cols) + " |" for row, cells in table.items()]
    return "\n".join(lines)


def readme_table() -> str:
    text = README.read_text()
    m = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, re.S)
    assert m, f"README.md lacks the {BEGIN} … {END} section"
    return m.group(1).rstrip("\n")


def test_readme_loader_table_is_what_the_loaders_do(tmp_path):
    measured = render(measure(tmp_path))
    assert readme_table() == measured, ("README.md's loader table is out of date; run "
                                        "`.venv/bin/python -m tests.test_loader_table` to rewrite it:\n" + measured)


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        new = render(measure(Path(d)))
    text = README.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    README.write_text(text[:start] + "\n" + new + "\n" + text[end:])
    print(new)
    sys.exit(0)
