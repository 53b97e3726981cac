"""Every adapter algorithm on every SD3 / SD3.5 / FLUX.1 / FLUX.2 architecture (tiny real-class models).

Adapters train on the layers of the original checkpoint layout (a fused qkv is one layer), so:

* every key of the saved file names a layer of the original (SAI MMDiT / BFL) layout: what ComfyUI maps;
* the file's tensors, applied to the original weights with ComfyUI's formulas (``comfy_merged_weight``, written
  independently of core.adapters) and converted back to diffusers, give the output of the trained model;
* the file loads back into a fresh network with the same output;
* each algorithm also trains through ``core.train`` (one architecture each, all architectures covered).
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import architectures
import core
from architectures.dit_keys import _to_diffusers, flux_layout, sd3_layout
from architectures.flux2_keys import flux2_layout
from core.adapters import AdapterOptions, build_network
from tests.test_adapters_algorithms import comfy_merged_weight
from tests.tiny_models import build_tiny_dataset, tiny_train_settings
from tests.tiny_models_dit import build_tiny_dit
from tests.tiny_models_dit import settings_paths as dit_paths
from tests.tiny_models_flux2 import build_tiny_flux2
from tests.tiny_models_flux2 import settings_paths as flux2_paths

ARCH_IDS = ["sd3", "sd35_medium", "sd35_large", "flux1_dev", "flux1_schnell", "flux2_dev", "flux2_klein_4b",
            "flux2_klein_9b", "flux2_klein_base_4b", "flux2_klein_base_9b"]
LAYOUTS = {"sd3": sd3_layout, "flux1": flux_layout, "flux2": flux2_layout}
# (algorithm, rank, options): every algorithm, DoRA on each that takes it, LoKr's shapes.  Diag-OFT without
# rescale and no (IA)³ merge: ComfyUI ignores Diag-OFT's rescale and does not read (IA)³ (checked by reload).
ALGORITHMS = [
    ("lora", 4, {}), ("lora", 4, {"dora": True}), ("locon", 4, {}), ("loha", 4, {}), ("loha", 4, {"dora": True}),
    ("lokr", 4, {}), ("lokr", 2, {"factor": 4, "decompose_both": True}), ("lokr", 4, {"full_matrix": True}),
    ("lokr", 4, {"dora": True}), ("ia3", 4, {}), ("diag-oft", 4, {}), ("boft", 32, {}), ("glora", 4, {}),
    ("full", 4, {}),
]


SETTING = {"factor": "lokr_factor"}   # AdapterOptions name → network setting where they differ


def _algo_id(a) -> str:
    algo, _, opts = a
    return "-".join([algo, *(k if v is True else f"{k}{v}" for k, v in opts.items())])


def _family(arch_id: str) -> str:
    return "sd3" if arch_id.startswith("sd3") else arch_id.split("_")[0]


def _build(arch_id: str, folder):
    if arch_id.startswith("flux2"):
        paths = build_tiny_flux2(arch_id, folder, "diffusers")
        return paths, flux2_paths(paths)
    paths = build_tiny_dit(arch_id, folder, "diffusers")
    return paths, {**dit_paths(paths), "model.t5_max_length": 24}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_matrix")
    return {"root": root, "data": build_tiny_dataset(root / "data", n=2),
            "models": {a: _build(a, root / a) for a in ARCH_IDS}}


@pytest.fixture(scope="module")
def loaded(tiny):
    cache = {}

    def get(arch_id):
        if arch_id not in cache:
            arch = architectures.get(arch_id)
            paths, _ = tiny["models"][arch_id]
            comps = arch.load(paths["model"], None, torch.float32)
            s = core.Settings()
            s.model.architecture = arch_id
            s.model.t5_max_length = 24
            arch.configure_objective(comps, s)
            g = torch.Generator().manual_seed(0)
            shape = (1, 16, 8, 8) if _family(arch_id) != "flux2" else (1, 32, 4, 6)
            with torch.no_grad():
                cond = arch.encode_text(comps, arch.tokenize(comps, ["a red square"]), 1)
            cache[arch_id] = (arch, comps, (torch.randn(*shape, generator=g), torch.tensor([0.6]), cond, {}))
        return cache[arch_id]
    return get


def _trained_like(net, seed: int) -> None:
    """Every adapter parameter moved off its initial value, as training does (a zero side hides wrong rows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=g))


def _original_stems(arch, comps) -> dict[str, str]:
    """Community stem → original module path, for every weight of the original layout (what ComfyUI maps)."""
    original = arch.to_original_layout(comps.denoiser.state_dict(), comps.denoiser.config)
    return {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k[:-len(".weight")]
            for k in original if k.endswith(".weight")}


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=[_algo_id(a) for a in ALGORITHMS])
@pytest.mark.parametrize("arch_id", ARCH_IDS)
def test_every_algorithm_saves_the_original_layout_exactly(loaded, arch_id, algorithm):
    algo, rank, opts = algorithm
    arch, comps, inputs = loaded(arch_id)
    tr = comps.denoiser
    base_sd = {k: v.clone() for k, v in tr.state_dict().items()}
    targets = arch.adapter_targets(comps, "attn_mlp", False)
    net = build_network(targets, algo, rank, 2.0, 0.0, AdapterOptions(**opts))
    _trained_like(net, seed=len(arch_id))
    net.apply_to()
    net.eval()
    with torch.no_grad():
        ours = arch.predict(comps, *inputs)
    net.restore()
    with torch.no_grad():
        base = arch.predict(comps, *inputs)
    assert (ours - base).abs().max() > 1e-3

    files = arch.export_adapter(comps, net.export_state_dict(torch.float32))
    sd = files[""]
    stems = _original_stems(arch, comps)
    names = {k.split(".", 1)[0] for k in sd}
    assert names <= set(stems), sorted(names - set(stems))[:5]
    assert any(n.endswith("qkv") or n.endswith("linear1") for n in names)   # fused layers trained whole

    # reloaded into a fresh network: the same output
    fresh = build_network(arch.adapter_targets(comps, "attn_mlp", False), algo, rank, 2.0, 0.0, AdapterOptions(**opts))
    fresh.load_export_state_dict(sd)
    fresh.apply_to()
    fresh.eval()
    with torch.no_grad():
        reloaded = arch.predict(comps, *inputs)
    fresh.restore()
    torch.testing.assert_close(reloaded, ours, atol=1e-5, rtol=1e-5)

    if algo == "ia3":   # ComfyUI does not read (IA)³ (A1111 does): the reload above is its check
        return
    # ComfyUI's formulas on the original weights, converted back: the trained model
    layout = LAYOUTS[_family(arch_id)](tr.config)
    original = arch.to_original_layout(base_sd, tr.config)
    for name in names:
        key = stems[name]
        original[f"{key}.weight"] = comfy_merged_weight(sd, name, original[f"{key}.weight"])
        if f"{name}.diff_b" in sd:
            original[f"{key}.bias"] = original[f"{key}.bias"] + sd[f"{name}.diff_b"]
    tr.load_state_dict(_to_diffusers(original, layout, arch_id))
    try:
        with torch.no_grad():
            theirs = arch.predict(comps, *inputs)
    finally:
        tr.load_state_dict(base_sd)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-3)


# each algorithm through the trainer, the architectures taken in turn so that every one is trained too
TRAINED = list(zip(ALGORITHMS, itertools.cycle(ARCH_IDS)))


@pytest.mark.parametrize("algorithm,arch_id", TRAINED, ids=[f"{_algo_id(a)}-{b}" for a, b in TRAINED])
def test_every_algorithm_trains_through_core_train(tiny, loaded, tmp_path, algorithm, arch_id):
    assert set(ARCH_IDS) <= {b for _, b in TRAINED}
    algo, rank, opts = algorithm
    _, fields = tiny["models"][arch_id]
    events = []
    s, config = tiny_train_settings(arch_id, fields, tiny["data"], tmp_path, network__algorithm=algo,
                                    network__rank=rank, network__target="attn_mlp", schedule__max_train_steps=2,
                                    optimizer__learning_rate=1e-2,
                                    **{f"network__{SETTING.get(k, k)}": v for k, v in opts.items()})
    result = core.train(s, on_event=events.append, config=config)
    losses = [e["loss"] for e in events if e["type"] == "progress"]
    assert result.steps == 2 and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    sd = load_file(str(result.final))
    assert all(torch.isfinite(v).all() for v in sd.values())
    arch, comps, inputs = loaded(arch_id)
    assert {k.split(".", 1)[0] for k in sd} <= set(_original_stems(arch, comps))
    with safe_open(str(result.final), "pt") as f:
        md = f.metadata()
    plain = algo == "lora" and not opts.get("dora")   # sd-scripts: LoCon and the rest are LyCORIS
    assert (md["ss_network_module"] == "lycoris.kohya") != plain
    # the saved file changes the model: it trained
    net = build_network(arch.adapter_targets(comps, "attn_mlp", False), algo, rank, s.network.alpha, 0.0,
                        AdapterOptions.from_settings(s.network))
    net.load_export_state_dict(sd)
    with torch.no_grad():
        base = arch.predict(comps, *inputs)
        net.apply_to()
        net.eval()
        trained = arch.predict(comps, *inputs)
        net.restore()
    assert (trained - base).abs().max() > 1e-6


# -- tools ------------------------------------------------------------------------------------------------------

def _transformer_from_file(arch_id: str, comps, path, model_folder):
    """The transformer a merged single file holds, read back the way users' tools read it: diffusers'
    ``from_single_file`` with the model's config (FLUX.1 through our BFL table: diffusers' converter hard-codes
    the full width; tests/test_dit_keys.py checks the table against it at full width)."""
    tr = comps.denoiser
    if _family(arch_id) == "flux1":
        from architectures.dit_keys import flux_bfl_to_diffusers
        out = type(tr).from_config(tr.config)
        out.load_state_dict(flux_bfl_to_diffusers(load_file(str(path)), tr.config))
        return out
    return type(tr).from_single_file(str(path), config=str(model_folder), subfolder="transformer",
                                     local_files_only=True, torch_dtype=torch.float32)


MERGES = [("sd35_medium", ("loha", 4, {"dora": True})), ("flux1_schnell", ("lokr", 4, {})),
          ("flux2_klein_4b", ("lokr", 2, {"factor": 4, "decompose_both": True})), ("sd3", ("boft", 32, {}))]


@pytest.mark.parametrize("arch_id,algorithm", MERGES, ids=[f"{a}-{_algo_id(b)}" for a, b in MERGES])
def test_merge_writes_the_trained_transformer_as_the_original_single_file(tiny, loaded, tmp_path, arch_id, algorithm):
    from safetensors.torch import save_file

    from core.tools import merge_adapters
    algo, rank, opts = algorithm
    arch, comps, inputs = loaded(arch_id)
    net = build_network(arch.adapter_targets(comps, "attn_mlp", False), algo, rank, 2.0, 0.0, AdapterOptions(**opts))
    _trained_like(net, seed=7)
    adapter = tmp_path / "adapter.safetensors"
    save_file(arch.export_adapter(comps, net.export_state_dict(torch.float32))[""], str(adapter))
    net.apply_to()
    net.eval()
    with torch.no_grad():
        ours = arch.predict(comps, *inputs)
    net.restore()

    paths, _ = tiny["models"][arch_id]
    merged = merge_adapters(arch_id, paths["model"], [(adapter, 1.0)], tmp_path / "merged.safetensors",
                            save_dtype="fp32")
    assert set(load_file(str(merged))) == {arch.original_prefix + k for k in
                                           arch.to_original_layout(comps.denoiser.state_dict(), comps.denoiser.config)}
    tr = _transformer_from_file(arch_id, comps, merged, paths["model"])
    with torch.no_grad():
        theirs = arch.predict(replace(comps, denoiser=tr), *inputs)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-3)
