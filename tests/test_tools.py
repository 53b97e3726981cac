"""core.tools on tiny SD1.5 / SDXL models: merge into a single-file checkpoint reproduces base + adapter,
resize is lossless at full rank and reports retained energy below it, extract recovers a planted low-rank
difference, summary describes a file, no output ever overwrites an existing file; the Tools tab's handlers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import architectures
from architectures.ldm_keys import save_single_file
from core.adapters import AdapterOptions, build_network
from core.tools import adapter_summary, extract_lora, merge_adapters, resize_lora
from tests.tiny_models import build_tiny_sd15, build_tiny_sdxl, tiny_config_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools_models")
    out = {}
    for arch_id, builder in (("sd15", build_tiny_sd15), ("sdxl", build_tiny_sdxl)):
        folder = root / arch_id
        out[arch_id] = (builder(folder, layout="single_file"), tiny_config_dir(arch_id, folder))
    return out


def load(arch_id, path, config_dir):
    return architectures.get(arch_id).load(path, config_dir, torch.float32)


def run_model(arch_id, comps, seed=0):
    arch = architectures.get(arch_id)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    ids = [torch.randint(0, 1000, (2, 77), generator=g) for _ in comps.text_encoders]
    batch = {"original_sizes": [(32, 32)] * 2, "crop_coords": [(0, 0)] * 2, "target_sizes": [(32, 32)] * 2}
    with torch.no_grad():
        cond = arch.encode_text(comps, ids, 1)
        return arch.predict(comps, latents, torch.tensor([50, 700]), cond, batch)


def random_network(arch_id, comps, algo, target, rank, alpha, seed=1, scale=0.05, **opts):
    arch = architectures.get(arch_id)
    net = build_network(arch.adapter_targets(comps, target, True), algo, rank, alpha, 0.0, AdapterOptions(**opts))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(p * (1 + noise) if name.endswith("dora_scale") else noise)
    net.eval()
    return net


def save_network(net, path, metadata=None):
    save_file(net.export_state_dict(torch.float32), str(path), metadata=metadata or {"ss_network_dim": str(net.rank)})
    return path


# -- merge -------------------------------------------------------------------------------------------------
def test_merge_sd15_locon_matches_base_plus_adapter(models, tmp_path):
    path, cfg = models["sd15"]
    comps = load("sd15", path, cfg)
    net = random_network("sd15", comps, "locon", "full", 4, 2.0, conv_rank=2, conv_alpha=1.0)
    adapter = save_network(net, tmp_path / "a.safetensors")
    net.set_multiplier(0.7)
    net.apply_to()
    expected = run_model("sd15", comps)
    net.restore()
    base_out = run_model("sd15", comps)
    merged = merge_adapters("sd15", path, [(adapter, 0.7)], tmp_path / "merged.safetensors", cfg, save_dtype="fp32")
    got = run_model("sd15", load("sd15", merged, cfg))
    assert (expected - base_out).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # never overwrite: a second merge to the same name goes beside it
    before = merged.read_bytes()
    again = merge_adapters("sd15", path, [(adapter, 0.7)], merged, cfg, save_dtype="fp16")
    assert again != merged and again.exists() and merged.read_bytes() == before
    with safe_open(str(again), framework="pt") as f:
        assert f.get_tensor(f.keys()[0]).dtype == torch.float16


def test_merge_sdxl_two_adapters(models, tmp_path):
    path, cfg = models["sdxl"]
    comps = load("sdxl", path, cfg)
    a = random_network("sdxl", comps, "lora", "attn_mlp", 4, 2.0, seed=2)
    b = random_network("sdxl", comps, "loha", "attn", 2, 2.0, seed=3, scale=0.2, dora=True)
    fa, fb = save_network(a, tmp_path / "a.safetensors"), save_network(b, tmp_path / "b.safetensors")
    a.set_multiplier(1.0)
    b.set_multiplier(-0.5)
    a.apply_to()
    b.apply_to()
    expected = run_model("sdxl", comps)
    b.restore()
    a.restore()
    merged = merge_adapters("sdxl", path, [(fa, 1.0), (fb, -0.5)], tmp_path / "m.safetensors", cfg, "fp32")
    torch.testing.assert_close(run_model("sdxl", load("sdxl", merged, cfg)), expected, atol=1e-4, rtol=1e-4)


def test_merge_errors(models, tmp_path):
    path, cfg = models["sd15"]
    with pytest.raises(ValueError, match="does not exist"):
        merge_adapters("sd15", path, [(tmp_path / "x.safetensors", 1.0)], tmp_path / "o.safetensors", cfg)
    # an SDXL adapter does not fit the SD1.5 model
    sdxl_path, sdxl_cfg = models["sdxl"]
    f = save_network(random_network("sdxl", load("sdxl", sdxl_path, sdxl_cfg), "lora", "attn", 2, 1.0),
                     tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match="match no layer"):
        merge_adapters("sd15", path, [(f, 1.0)], tmp_path / "o.safetensors", cfg)
    assert not (tmp_path / "o.safetensors").exists()


# -- resize ------------------------------------------------------------------------------------------------
def test_resize(models, tmp_path):
    path, cfg = models["sd15"]
    comps = load("sd15", path, cfg)
    arch = architectures.get("sd15")
    targets = arch.adapter_targets(comps, "full", True)
    net = random_network("sd15", comps, "locon", "full", 4, 2.0)
    src = save_network(net, tmp_path / "src.safetensors",
                       {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_output_name": "src"})
    net.apply_to()
    expected = run_model("sd15", comps)
    net.restore()

    full, report = resize_lora(src, tmp_path / "full.safetensors", "fixed", 4)
    assert report["mean_retained"] == pytest.approx(1.0, abs=1e-6)
    net4 = build_network(targets, "locon", 4, 2.0)
    net4.load_export_state_dict(load_file(str(full)))
    net4.eval()
    net4.apply_to()
    torch.testing.assert_close(run_model("sd15", comps), expected, atol=1e-5, rtol=1e-5)
    net4.restore()

    low, report = resize_lora(src, tmp_path / "low.safetensors", "fixed", 2)
    assert 0 < report["mean_retained"] < 1
    assert all(m["new_rank"] == 2 for m in report["modules"].values())
    net2 = build_network(targets, "locon", 2, 1.0)  # alpha rescaled: 2/4 * 2
    net2.load_export_state_dict(load_file(str(low)))
    with safe_open(str(low), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_output_name"] == "src"

    dyn, report = resize_lora(src, tmp_path / "dyn.safetensors", "sv_fro", 0.9)
    assert all(0.9 - 1e-9 <= m["retained"] <= 1 for m in report["modules"].values())
    if len(report["ranks"]) > 1:
        with safe_open(str(dyn), framework="pt") as f:
            assert f.metadata()["ss_network_dim"] == "Dynamic"
    _, report = resize_lora(src, tmp_path / "ratio.safetensors", "sv_ratio", 1.0)
    assert all(m["new_rank"] >= 1 for m in report["modules"].values())

    # never overwrite
    before = low.read_bytes()
    again, _ = resize_lora(src, low, "fixed", 1)
    assert again != low and low.read_bytes() == before

    loha = save_network(random_network("sd15", comps, "loha", "attn", 2, 1.0), tmp_path / "loha.safetensors")
    with pytest.raises(ValueError, match="plain LoRA / LoCon"):
        resize_lora(loha, tmp_path / "r.safetensors", "fixed", 1)
    with pytest.raises(ValueError, match="mode"):
        resize_lora(src, tmp_path / "r.safetensors", "bogus", 1)


# -- extract -----------------------------------------------------------------------------------------------
def test_extract_recovers_planted_difference(models, tmp_path):
    path, cfg = models["sd15"]
    arch = architectures.get("sd15")
    comps = load("sd15", path, cfg)
    targets = {t.name: t.module for t in arch.adapter_targets(comps, "full", True)}
    g = torch.Generator().manual_seed(7)
    linear = [n for n, m in targets.items() if isinstance(m, torch.nn.Linear)]
    convs = [n for n, m in targets.items() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    planted = {}
    with torch.no_grad():
        for name in linear[:3] + [n for n in linear if n.startswith("lora_te")][:1] + convs[:1]:
            w = targets[name].weight
            d = (torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w[0].numel(), generator=g)) * 0.01
            planted[name] = d.reshape(w.shape)
            w.add_(planted[name])
    tuned = save_single_file({"unet": comps.denoiser, "vae": comps.vae, "text_encoders": comps.text_encoders},
                             tmp_path / "tuned.safetensors", "sd15")
    out = extract_lora("sd15", path, tuned, tmp_path / "x.safetensors", rank=2, config_dir=cfg, conv_rank=2,
                       save_dtype="fp32")
    sd = load_file(str(out))
    stems = {k.split(".")[0] for k in sd}
    assert stems == set(planted)
    for name, d in planted.items():
        up, down = sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"]
        r = down.shape[0]
        rec = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(d.shape) * float(sd[f"{name}.alpha"]) / r
        assert ((rec - d).norm() / d.norm()) < 1e-4, name
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    # loads as a network with the family's names
    net = build_network([t for t in arch.adapter_targets(comps, "full", True) if t.name in planted], "locon",
                        2, 2.0)
    net.load_export_state_dict(sd)
    s = adapter_summary(out)
    assert s["algorithm"] == "locon" and s["ranks"] == {2: len(planted)}
    assert s["modules_per_prefix"] == {"lora_te": 1, "lora_unet": len(planted) - 1}
    again = extract_lora("sd15", path, tuned, out, rank=2, config_dir=cfg, conv_rank=2)
    assert again != out


# -- summary -----------------------------------------------------------------------------------------------
def test_summary(models, tmp_path):
    path, cfg = models["sdxl"]
    comps = load("sdxl", path, cfg)
    net = random_network("sdxl", comps, "lora", "attn", 4, 2.0)
    f = save_network(net, tmp_path / "s.safetensors", {"ss_network_dim": "4", "modelspec.title": "t", "x": "y"})
    s = adapter_summary(f)
    assert s["algorithm"] == "lora" and s["ranks"] == {4: len(net.adapters)} and s["alphas"] == {2.0: len(net.adapters)}
    assert s["modules"] == len(net.adapters)
    assert set(s["modules_per_prefix"]) == {"lora_unet", "lora_te1", "lora_te2"}
    assert s["metadata"] == {"ss_network_dim": "4", "modelspec.title": "t"} and s["file_size"] == f.stat().st_size
    loha = save_network(random_network("sdxl", comps, "lokr", "attn", 2, 1.0), tmp_path / "k.safetensors")
    assert adapter_summary(loha)["algorithm"] == "lokr"
    with pytest.raises(ValueError):
        adapter_summary(tmp_path / "missing.safetensors")


# -- UI ----------------------------------------------------------------------------------------------------
def test_tools_tab_handlers(models, tmp_path):
    from ui import tools_tab
    path, cfg = models["sd15"]
    comps = load("sd15", path, cfg)
    f = save_network(random_network("sd15", comps, "lora", "attn", 4, 2.0), tmp_path / "u.safetensors")
    text = tools_tab.summary_handler(str(f))
    assert "algorithm: lora" in text
    assert "error" in tools_tab.summary_handler(str(tmp_path / "nope.safetensors")).lower()
    text = tools_tab.resize_handler(str(f), str(tmp_path / "r.safetensors"), "fixed", "2")
    assert "retained" in text and (tmp_path / "r.safetensors").exists()
    assert "error" in tools_tab.resize_handler(str(f), str(tmp_path / "r2.safetensors"), "fixed", "abc").lower()
    text = tools_tab.merge_handler("sd15", str(path), f"{f}:0.5", str(tmp_path / "m.safetensors"), str(cfg), "fp16")
    assert (tmp_path / "m.safetensors").exists(), text
    assert "Traceback" not in tools_tab.merge_handler("sd15", str(path), "", str(tmp_path / "m2.safetensors"), "", "fp16")
    text = tools_tab.extract_handler("sd15", str(path), str(tmp_path / "m.safetensors"), str(tmp_path / "e.safetensors"),
                                     "4", "", str(cfg))
    assert (tmp_path / "e.safetensors").exists(), text


ALGO_CASES = [("locon", "full", dict(use_tucker=True, dora=True, rs_lora=True)), ("loha", "full", dict(use_tucker=True)),
              ("lokr", "full", dict(decompose_both=True, dora=True)), ("lokr", "attn_mlp", dict(full_matrix=True)),
              ("ia3", "full-lin", {}), ("diag-oft", "full", dict(rescale=True)), ("boft", "full", {}),
              ("glora", "full", {}), ("full", "full", {})]


@pytest.mark.parametrize("algo,target,opts", ALGO_CASES, ids=[f"{a}-{t}" for a, t, _ in ALGO_CASES])
def test_merge_reads_every_algorithm(models, algo, target, opts):
    """Merge rebuilds each module from the file alone (algorithm and options from names and shapes) and gets
    the trained network's ΔW."""
    from core import tools
    path, cfg = models["sd15"]
    comps = load("sd15", path, cfg)
    net = random_network("sd15", comps, algo, target, 4 if algo != "lokr" else 2, 2.0, **opts)
    layers = tools._layer_map(architectures.get("sd15"), comps)
    for stem, t in tools._group(net.export_state_dict(torch.float32)).items():
        m = tools._build_module(stem, layers[stem], t)
        with torch.no_grad():
            torch.testing.assert_close(m.effective_delta(), net.adapters[stem].effective_delta(), atol=1e-6, rtol=0)


def test_tools_tab_in_app(models, tmp_path):
    """The app has the Tools tab; its Inspect button runs the summary handler and shows errors as text."""
    from core.config import AppConfig
    from ui.app import build_app
    for d in ("models", "datasets", "outputs", "presets"):
        (tmp_path / d).mkdir()
    config = AppConfig(models_dir=str(tmp_path / "models"), datasets_dir=str(tmp_path / "datasets"),
                       outputs_dir=str(tmp_path / "outputs"), presets_dir=str(tmp_path / "presets"))
    demo = build_app(config)
    ids = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    for eid in ("tab-tools", "tools-summary-run", "tools-merge-run", "tools-resize-run", "tools-extract-run"):
        assert eid in ids, eid
    button = ids["tools-summary-run"]._id
    fns = [f for f in demo.fns.values() if any(t[0] == button and t[1] == "click" for t in f.targets)]
    assert len(fns) == 1
    out = fns[0].fn("missing.safetensors")
    assert out.startswith("✗ Error") and "Traceback" not in out


def test_extract_sdxl_names(models, tmp_path):
    """SDXL: LDM UNet names and lora_te1/lora_te2, planted rank-3 differences recovered at rank 3."""
    path, cfg = models["sdxl"]
    arch = architectures.get("sdxl")
    comps = load("sdxl", path, cfg)
    targets = {t.name: t.module for t in arch.adapter_targets(comps, "attn_mlp", True)}
    names = [next(n for n in targets if n.startswith(p)) for p in ("lora_unet_input_blocks", "lora_te1_", "lora_te2_")]
    g = torch.Generator().manual_seed(3)
    planted = {}
    with torch.no_grad():
        for name in names:
            w = targets[name].weight
            planted[name] = (torch.randn(w.shape[0], 3, generator=g) @ torch.randn(3, w.shape[1], generator=g)) * 0.01
            w.add_(planted[name])
    tuned = save_single_file({"unet": comps.denoiser, "vae": comps.vae, "text_encoders": comps.text_encoders},
                             tmp_path / "tuned.safetensors", "sdxl")
    sd = load_file(str(extract_lora("sdxl", path, tuned, tmp_path / "x.safetensors", 3, cfg, save_dtype="fp32")))
    assert {k.split(".")[0] for k in sd} == set(names)
    for name, d in planted.items():
        rec = sd[f"{name}.lora_up.weight"] @ sd[f"{name}.lora_down.weight"]
        assert (rec - d).norm() / d.norm() < 1e-4
