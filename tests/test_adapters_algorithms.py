"""Every adapter algorithm on tiny SD1.5 and SDXL models: it trains, its file carries kohya key names with the
LyCORIS suffixes the community loaders read, the file loads back into a fresh model with the same output,
LyCORIS' own module loader and a ComfyUI-style weight merge reproduce the trained layers, diffusers loads
LoRA and LoCon files exactly, and the trainer writes the right metadata and resumes exactly."""
from __future__ import annotations

import copy
import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import architectures
import core
from architectures.base import Components
from architectures.ldm_keys import unet_module_to_ldm, unet_state_dict_to_ldm
from core.adapters import AdapterOptions, build_network, network_args, network_module
from core.settings import Settings, check_consistency
from tests.tiny_models import _build, build_tiny_dataset, build_tiny_sd15, build_tiny_sdxl, tiny_train_settings

# Suffixes each format may carry, and what ComfyUI's loaders read (comfy/lora.py + comfy/weight_adapter/*):
# LoRA/LoCon lora_up/down/mid, LoHa hada_*, LoKr lokr_*, GLoRA a1/a2/b1/b2, (B)OFT oft_blocks + rescale,
# full diff/diff_b, plus alpha and dora_scale.  (IA)³ is not read by ComfyUI (A1111 reads weight + on_input).
SUFFIXES = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
    "locon": {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha",
             "dora_scale"},
    "glora": {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"},
    "diag-oft": {"oft_blocks", "rescale", "alpha"},
    "boft": {"oft_blocks", "rescale", "alpha"},
    "full": {"diff", "diff_b"},
    "ia3": {"weight", "on_input"},
}
COMFY_READS = set().union(*(v for k, v in SUFFIXES.items() if k != "ia3"))
REQUIRED = {  # every module of the format has these
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"}, "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}, "lokr": {"alpha"},
    "glora": {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}, "diag-oft": {"oft_blocks", "alpha"},
    "boft": {"oft_blocks", "alpha"}, "full": {"diff"}, "ia3": {"weight", "on_input"},
}

# (arch, algorithm, target, rank, options): every algorithm on SD1.5 with its main options, a spread on SDXL
CASES = [
    ("sd15", "lora", "attn_mlp", 4, dict(rank_dropout=0.25, module_dropout=0.1, loraplus_lr_ratio=4.0)),
    ("sd15", "locon", "full", 4, dict(conv_rank=2, conv_alpha=1.0)),
    ("sd15", "locon", "full", 4, dict(use_tucker=True, dora=True, rs_lora=True)),
    ("sd15", "locon", "full", 4, dict(use_scalar=True, dora=True, dora_on_output=True)),
    ("sd15", "loha", "full", 4, dict(rank_dropout=0.1)),
    ("sd15", "loha", "full", 4, dict(use_tucker=True, dora=True, use_scalar=True)),
    ("sd15", "lokr", "full", 2, dict(factor=4)),
    ("sd15", "lokr", "full", 2, dict(decompose_both=True, use_tucker=True, dora=True)),
    ("sd15", "lokr", "attn_mlp", 4, dict(full_matrix=True)),
    ("sd15", "ia3", "full-lin", 4, {}),
    ("sd15", "diag-oft", "full", 4, dict(rescale=True)),
    ("sd15", "boft", "full", 4, {}),
    ("sd15", "glora", "full", 4, dict(use_scalar=True)),
    ("sd15", "full", "full", 4, dict(module_dropout=0.1)),
    ("sdxl", "locon", "full", 4, dict(dora=True)),
    ("sdxl", "loha", "attn_mlp", 4, dict(rs_lora=True)),
    ("sdxl", "lokr", "full", 2, dict(decompose_both=True)),
    ("sdxl", "ia3", "attn", 4, {}),
    ("sdxl", "diag-oft", "attn_mlp", 4, {}),
    ("sdxl", "boft", "full-lin", 4, dict(rescale=True)),
    ("sdxl", "glora", "attn_mlp", 4, {}),
    ("sdxl", "full", "attn", 4, {}),
]


def case_id(case):
    arch, algo, target, rank, opts = case
    return "-".join([arch, algo, target] + [k for k, v in opts.items() if v is True])


# -- fixtures --------------------------------------------------------------------------------------------

_MODELS: dict[str, dict] = {}


def fresh_components(arch_id: str) -> Components:
    """An independent copy of the tiny model (built once per session)."""
    if arch_id not in _MODELS:
        _MODELS[arch_id] = _build(arch_id)
    m = copy.deepcopy(_MODELS[arch_id])
    for module in [m["unet"], *m["text_encoders"]]:
        module.requires_grad_(False)
    return Components(m["unet"], m["vae"], m["text_encoders"], [None] * len(m["text_encoders"]), None)


def inputs(arch_id: str, comps: Components):
    g = torch.Generator().manual_seed(0)
    te_width = sum(te.config.hidden_size for te in comps.text_encoders)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([50, 700])
    ids = [torch.randint(0, 1000, (2, 77), generator=g) for _ in comps.text_encoders]
    target = torch.randn(2, 4, 16, 16, generator=g)
    assert te_width == comps.denoiser.config.cross_attention_dim
    return latents, t, ids, target


def run_model(arch_id: str, comps: Components, latents, t, ids) -> torch.Tensor:
    """Text encoders (so text-encoder adapters count) and UNet, as the families condition."""
    arch = architectures.get(arch_id)
    cond = arch.encode_text(comps, ids, 1)
    batch = {"original_sizes": [(32, 32)] * 2, "crop_coords": [(0, 0)] * 2, "target_sizes": [(32, 32)] * 2}
    return arch.predict(comps, latents, t, cond, batch)


def make_network(arch_id, comps, algo, target, rank, opts):
    arch = architectures.get(arch_id)
    options = AdapterOptions(**opts)
    return build_network(arch.adapter_targets(comps, target, True), algo, rank, rank / 2, 0.0, options)


def train_steps(net, arch_id, comps, latents, t, ids, target, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(net.param_groups(lr, lr), lr=lr, weight_decay=0.0)
    net.train()
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(run_model(arch_id, comps, latents, t, ids), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    net.eval()


# -- reference loaders -----------------------------------------------------------------------------------

def comfy_merged_weight(sd: dict, name: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight ComfyUI's loaders compute from a file at strength 1 (comfy/lora.py, comfy/weight_adapter/*):
    written from their formulas, independently of core.adapters."""
    def get(suffix):
        return sd.get(f"{name}.{suffix}")
    w = weight.float().clone()
    alpha = get("alpha")
    alpha = None if alpha is None else float(alpha)
    dora = get("dora_scale")

    def finish(diff, scale):
        if dora is None:
            return w + diff.reshape(w.shape) * scale
        calc = w + diff.reshape(w.shape) * scale
        assert dora.shape[0] == 1, "ComfyUI normalises output-axis DoRA by the base weight"
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1) + torch.finfo(w.dtype).eps
        return calc * (dora.float() / norm)

    if get("lora_up.weight") is not None:
        up, down, mid = get("lora_up.weight").float(), get("lora_down.weight").float(), get("lora_mid.weight")
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        if mid is not None:  # Tucker: fold the k×k core into the down side
            down = torch.einsum("r i, o r k l -> o i k l", down.flatten(1), mid.float())
        return finish(up.flatten(1) @ down.flatten(1), scale)
    if get("hada_w1_a") is not None:
        w1a, w1b, w2a, w2b = (get(s).float() for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        scale = alpha / w1b.shape[0]
        if get("hada_t1") is not None:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", get("hada_t1").float(), w1b, w1a)
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", get("hada_t2").float(), w2b, w2a)
        else:
            m1, m2 = w1a @ w1b, w2a @ w2b
        return finish(m1 * m2, scale)
    if any(get(s) is not None for s in ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a")):
        dim = None
        if get("lokr_w1") is not None:
            w1 = get("lokr_w1").float()
        else:
            w1, dim = get("lokr_w1_a").float() @ get("lokr_w1_b").float(), get("lokr_w1_b").shape[0]
        if get("lokr_w2") is not None:
            w2 = get("lokr_w2").float()
        else:
            dim = get("lokr_w2_b").shape[0]
            if get("lokr_t2") is not None:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", get("lokr_t2").float(), get("lokr_w2_b").float(),
                                  get("lokr_w2_a").float())
            else:
                w2 = get("lokr_w2_a").float() @ get("lokr_w2_b").float()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        # ComfyUI passes the Tucker rebuild to torch.kron as einsum returns it (non-contiguous), which raises:
        # LoKr + Tucker layers fail to load there (ComfyUI issue 11245).  The maths, made contiguous:
        return finish(torch.kron(w1, w2.contiguous()), scale)
    if get("a1.weight") is not None:
        a1, a2, b1, b2 = (get(s).float().flatten(1) for s in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
        wa = torch.einsum("o i ..., i j -> o j ...", torch.einsum("o i ..., i j -> o j ...", w, a1), a2)
        return finish(wa + (b1 @ b2).reshape(w.shape), alpha / a2.shape[0])
    if get("oft_blocks") is not None:
        blocks = get("oft_blocks").float()
        q = blocks - blocks.transpose(-1, -2)
        if alpha:
            q = q * min(1.0, alpha / (float(torch.norm(q)) + 1e-8))
        eye = torch.eye(blocks.shape[-1])
        r = (eye + q) @ torch.linalg.inv(eye - q)
        if blocks.dim() == 3:  # Diag-OFT (ComfyUI ignores rescale here)
            n, b, _ = blocks.shape
            return torch.einsum("k n m, k n ... -> k m ...", r, w.view(n, b, *w.shape[1:])).reshape(w.shape)
        inp, b = w, blocks.shape[-1]  # BOFT butterfly
        for i in range(blocks.shape[0]):
            k = 2 ** i * (b // 2)
            inp = inp.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            inp = torch.einsum("b i j, b j ... -> b i ...", r[i], inp)
            inp = inp.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        if get("rescale") is not None:
            inp = inp * get("rescale").float()
        return inp
    if get("diff") is not None:
        return w + get("diff").float()
    raise AssertionError(f"{name}: no format ComfyUI reads")


def comfy_key_names(arch_id: str, comps: Components) -> set[str]:
    """The kohya key stems ComfyUI maps for this model: SD1.5 UNet with diffusers module names, SDXL UNet with
    the original (LDM) names, text encoders with the ``text_model`` level."""
    arch = architectures.get(arch_id)
    unet_sd = comps.denoiser.state_dict()
    config = dict(comps.denoiser.config)
    if arch_id == "sd15":
        paths = [k[:-len(".weight")] for k in unet_sd if k.endswith(".weight")]
        ok = []
        for p in paths:
            try:
                unet_module_to_ldm(p, config)
                ok.append(p)
            except ValueError:
                pass
        names = {"lora_unet_" + p.replace(".", "_") for p in ok}
    else:
        names = {"lora_unet_" + k[:-len(".weight")].replace(".", "_")
                 for k in unet_state_dict_to_ldm(unet_sd, config) if k.endswith(".weight")}
    for te, prefix in zip(comps.text_encoders, arch.te_prefixes):
        for k in te.state_dict():
            k = k if k.startswith("text_model.") else "text_model." + k
            if k.endswith(".weight"):
                names.add(f"{prefix}_{k[:-len('.weight')].replace('.', '_')}")
    return names


def lycoris_layer_output(name: str, sd: dict, layer: nn.Module, x: torch.Tensor, rank: int, opts: dict):
    """The layer's output with the module LyCORIS builds from the file's tensors: its own loader, or for LoKr
    its module built with the same options (LyCORIS' loader guesses the factorisation from the shapes and
    gets 4-channel layers such as conv_in wrong with decompose_both)."""
    from lycoris.modules import IA3Module, LokrModule, get_module, make_module
    module_sd = {k: v for k, v in sd.items() if k.startswith(name + ".")}
    cls, params = get_module(module_sd, name)
    assert cls is not None, name
    clone = copy.deepcopy(layer)
    if cls is IA3Module:  # its loader passes on_input too, which make_module_from_state_dict does not take
        lyco = IA3Module.make_module_from_state_dict(name, clone, params[0])
    elif cls is LokrModule:
        lyco = LokrModule(name, clone, 1, rank, float(module_sd[name + ".alpha"]),
                          use_tucker=opts.get("use_tucker", False), decompose_both=opts.get("decompose_both", False),
                          factor=opts.get("factor", -1), full_matrix=opts.get("full_matrix", False),
                          weight_decompose=opts.get("dora", False), wd_on_out=opts.get("dora_on_output", False))
        lyco.load_state_dict({k[len(name) + 1:]: v for k, v in module_sd.items()})
    else:
        lyco = make_module(cls, params, name, clone)
    lyco.eval()
    lyco.apply_to()
    with torch.no_grad():
        return clone(x)


def layer_input(module: nn.Module, arch_id: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if isinstance(module, nn.Conv2d):
        return torch.randn(2, module.in_channels, 8, 8, generator=g)
    return torch.randn(2, 5, module.in_features, generator=g)


# -- the algorithms --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_algorithm_trains_exports_and_reloads(case, tmp_path):
    arch_id, algo, target, rank, opts = case
    comps = fresh_components(arch_id)
    latents, t, ids, target_out = inputs(arch_id, comps)
    with torch.no_grad():
        before = run_model(arch_id, comps, latents, t, ids)

    net = make_network(arch_id, comps, algo, target, rank, opts)
    net.apply_to()
    net.eval()
    with torch.no_grad():  # a fresh adapter leaves the model as it was
        torch.testing.assert_close(run_model(arch_id, comps, latents, t, ids), before, atol=1e-5, rtol=1e-5)
    train_steps(net, arch_id, comps, latents, t, ids, target_out)
    with torch.no_grad():
        trained = run_model(arch_id, comps, latents, t, ids)
    assert (trained - before).abs().max() > 1e-3, "training did not change the output"

    # the community file: kohya names, the format's suffixes, nothing LyCORIS-prefixed
    path = tmp_path / "adapter.safetensors"
    save_file(net.export_state_dict(torch.float32), str(path))
    sd = load_file(str(path))
    assert not any("lycoris" in k for k in sd)
    stems: dict[str, set] = {}
    for key in sd:
        stem, suffix = key.split(".", 1)
        stems.setdefault(stem, set()).add(suffix)
    assert stems.keys() == set(net.adapters.keys())
    prefixes = ("lora_unet_", "lora_te_") if arch_id == "sd15" else ("lora_unet_", "lora_te1_", "lora_te2_")
    for p in prefixes:
        assert any(s.startswith(p) for s in stems), p
    assert all(s.startswith(prefixes) for s in stems)
    for stem, suffixes in stems.items():
        assert suffixes <= SUFFIXES[algo], (stem, suffixes - SUFFIXES[algo])
        assert REQUIRED[algo] <= suffixes, (stem, REQUIRED[algo] - suffixes)
        assert ("dora_scale" in suffixes) == bool(opts.get("dora")), stem
    # names ComfyUI maps for this model, and only suffixes it reads (IA3: not a ComfyUI format)
    assert set(stems) <= comfy_key_names(arch_id, comps), set(stems) - comfy_key_names(arch_id, comps)
    if algo != "ia3":
        assert set().union(*stems.values()) <= COMFY_READS

    # a fresh model + a network built from the same settings + the file = the same output
    comps2 = fresh_components(arch_id)
    net2 = make_network(arch_id, comps2, algo, target, rank, opts)
    net2.load_export_state_dict(sd)
    net2.apply_to()
    net2.eval()
    with torch.no_grad():
        torch.testing.assert_close(run_model(arch_id, comps2, latents, t, ids), trained, atol=2e-5, rtol=1e-5)

    # per layer: ComfyUI's merge formulas and LyCORIS' own module loader reproduce what we trained
    for name, module in net.adapters.items():
        layer = module.base
        x = layer_input(layer, arch_id)
        with torch.no_grad():
            ours = layer(x)
            w = layer.weight
            # ComfyUI reads no (IA)³, normalises output-axis DoRA differently, ignores Diag-OFT's rescale
            if algo != "ia3" and not opts.get("dora_on_output") and not (algo == "diag-oft" and opts.get("rescale")):
                merged = comfy_merged_weight(sd, name, w)
                if algo == "full" and layer.bias is not None:
                    expected = module.op(x, merged, layer.bias + sd[f"{name}.diff_b"], **module.kw)
                else:
                    expected = module.op(x, merged, layer.bias, **module.kw)
                torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        # LyCORIS cannot read per-input-channel DoRA (it assumes (out, 1)); its scalar-less LoCon is LoRA
        if not (opts.get("dora") and not opts.get("dora_on_output")):
            module.restore()
            try:
                lyco = lycoris_layer_output(name, sd, layer, x, module.rank if hasattr(module, "rank") else rank,
                                            opts)
            finally:
                module.apply_to()
            torch.testing.assert_close(lyco, ours, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    net.restore()
    net2.restore()


def test_loraplus_groups_and_rs_lora_alpha(tmp_path):
    comps = fresh_components("sd15")
    arch = architectures.get("sd15")
    targets = arch.adapter_targets(comps, "attn", False)
    net = build_network(targets, "lora", 8, 4.0, 0.0, AdapterOptions(loraplus_lr_ratio=16.0, rs_lora=True))
    groups = {g["name"]: g for g in net.param_groups(1e-4, 0)}
    assert set(groups) == {"unet", "unet_plus"} and groups["unet_plus"]["lr"] == pytest.approx(1.6e-3)
    up_ids = {id(m.lora_up.weight) for m in net.adapters.values()}
    assert {id(p) for p in groups["unet_plus"]["params"]} == up_ids
    assert not up_ids & {id(p) for p in groups["unet"]["params"]}
    # rs-LoRA: scale alpha/√rank; the file's alpha makes alpha_file/rank that scale for every loader
    m = next(iter(net.adapters.values()))
    assert m.scale == pytest.approx(4.0 / 8 ** 0.5)
    for dtype in (torch.float16, torch.bfloat16):  # a rounded alpha still loads (and is adopted)
        sd = net.export_state_dict(dtype)
        assert float(sd[m.name + ".alpha"]) / 8 == pytest.approx(m.scale, rel=4e-3)
        other = build_network(arch.adapter_targets(fresh_components("sd15"), "attn", False), "lora", 8, 4.0, 0.0,
                              AdapterOptions(rs_lora=True))
        other.load_export_state_dict(sd)
        o = other.adapters[m.name]
        assert o.scale == pytest.approx(float(sd[m.name + ".alpha"]) / 8)
    with pytest.raises(ValueError, match="alpha"):
        build_network(arch.adapter_targets(fresh_components("sd15"), "attn", False), "lora", 8, 8.0) \
            .load_export_state_dict(net.export_state_dict())
    with pytest.raises(ValueError, match="shape"):
        build_network(arch.adapter_targets(fresh_components("sd15"), "attn", False), "lora", 4, 2.0) \
            .load_export_state_dict({k: v for k, v in net.export_state_dict().items() if not k.endswith("alpha")})


def test_presets_include_and_exclude():
    for arch_id in ("sd15", "sdxl"):
        arch = architectures.get(arch_id)
        comps = fresh_components(arch_id)

        def kxk(ts):
            return [t for t in ts if isinstance(t.module, nn.Conv2d) and t.module.kernel_size != (1, 1)]
        attn, attn_mlp = arch.adapter_targets(comps, "attn", False), arch.adapter_targets(comps, "attn_mlp", False)
        full, full_lin = arch.adapter_targets(comps, "full", False), arch.adapter_targets(comps, "full-lin", False)
        names = {k: {t.name for t in v} for k, v in
                 dict(attn=attn, attn_mlp=attn_mlp, full=full, full_lin=full_lin).items()}
        assert names["attn"] < names["attn_mlp"] < names["full_lin"] < names["full"]
        assert not kxk(attn_mlp) and not kxk(full_lin) and kxk(full)
        kinds = {t.path.split(".")[-1] for t in kxk(full)}
        assert {"conv1", "conv2", "conv", "conv_in", "conv_out"} <= kinds, kinds
        assert {"time_emb_proj", "linear_1"} <= {t.path.split(".")[-1] for t in full_lin}
        # include adds layers beyond the preset (by path or key), exclude removes them
        sel = arch.select_adapter_targets(comps, "attn", False, include="conv_in, *resnets.0.conv1",
                                          exclude="attn2\n")
        paths = {t.path for t in sel}
        assert "conv_in" in paths and any(p.endswith("resnets.0.conv1") for p in paths)
        assert not any(".attn2." in p for p in paths) and any(".attn1." in p for p in paths)
        key = next(t.name for t in attn if ".attn1.to_q" in t.path)
        assert key not in {t.name for t in arch.select_adapter_targets(comps, "attn", False, exclude=key)}
        with pytest.raises(ValueError, match="no layer"):
            arch.select_adapter_targets(comps, "attn", False, include="atn1_typo")
        te = arch.select_adapter_targets(comps, "attn", True, exclude="*mlp*")
        assert any(t.part == "te1" for t in te) and not any("mlp" in t.name for t in te)
    # plain LoRA cannot take 3x3 convolutions: the settings check says so before the run
    with pytest.raises(ValueError, match="LoCon"):
        build_network(full, "lora", 4, 4.0)
    s = Settings()
    s.network.target = "full"
    assert any("LoCon" in p for p in check_consistency(s))
    s.network.algorithm = "locon"
    assert not any("network.target" in p for p in check_consistency(s))


def test_settings_show_only_what_applies_and_metadata_args():
    s = Settings()
    for algo, visible, hidden in [
        ("lora", ["rank", "alpha", "dora", "loraplus_lr_ratio", "rank_dropout"], ["lokr_factor", "oft_rescale"]),
        ("lokr", ["rank", "alpha", "lokr_factor", "decompose_both", "full_matrix", "dora"], ["loraplus_lr_ratio"]),
        ("ia3", ["module_dropout"], ["rank", "alpha", "dora", "rank_dropout", "use_scalar"]),
        ("boft", ["rank", "oft_rescale"], ["alpha", "dora", "lokr_factor"]),
        ("full", [], ["rank", "alpha", "dora", "conv_rank"]),
    ]:
        s.network.algorithm = algo
        for f in visible:
            assert s.applies(f"network.{f}"), (algo, f)
        for f in hidden:
            assert not s.applies(f"network.{f}"), (algo, f)
    s.network.algorithm = "loha"
    assert not s.applies("network.conv_rank") and not s.applies("network.dora_on_output")
    s.network.target = "full"
    s.network.dora = True
    assert s.applies("network.conv_rank") and s.applies("network.use_tucker") and s.applies("network.dora_on_output")

    n = Settings().network
    assert network_module("lora", AdapterOptions()) == "networks.lora"
    assert network_module("lora", AdapterOptions(dora=True)) == "lycoris.kohya"
    assert network_args(n) == {"algo": "lora", "target": "attn_mlp"}
    n.algorithm, n.target, n.lokr_factor, n.conv_rank, n.decompose_both = "lokr", "full", 8, 4, True
    n.loraplus_lr_ratio = 16.0  # does not apply to LoKr: not written, not used
    args = network_args(n)
    assert args["algo"] == "lokr" and args["preset"] == "full" and args["factor"] == "8"
    assert args["conv_dim"] == "4" and args["decompose_both"] == "True" and "loraplus_lr_ratio" not in args
    assert AdapterOptions.from_settings(n).loraplus_lr_ratio == 0.0


# -- diffusers ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_algos")
    models = {"sd15": build_tiny_sd15(root / "sd15", "diffusers"), "sdxl": build_tiny_sdxl(root / "sdxl", "diffusers")}
    data = root / "data"
    build_tiny_dataset(data, n=4)
    return {"models": models, "data": data}


@pytest.mark.parametrize("arch_id", ["sd15", "sdxl"])
@pytest.mark.parametrize("algo,target", [("lora", "full-lin"), ("locon", "full")])
def test_diffusers_loads_lora_and_locon_exactly(tiny, tmp_path, arch_id, algo, target):
    from diffusers import DiffusionPipeline
    arch = architectures.get(arch_id)
    comps = arch.load(tiny["models"][arch_id], None, torch.float32)
    net = build_network(arch.adapter_targets(comps, target, True), algo, 4, 2.0, 0.0,
                        AdapterOptions(conv_rank=2, conv_alpha=1.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path / "adapter.safetensors"
    sd = net.export_state_dict(torch.float32)
    save_file(sd, str(path))
    net.apply_to()

    pipe = DiffusionPipeline.from_pretrained(tiny["models"][arch_id], local_files_only=True)
    pipe.load_lora_weights(str(path))
    theirs_tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch_id == "sdxl" else [])
    n_peft = sum(1 for m in [pipe.unet, *theirs_tes] for _, mod in m.named_modules()
                 if hasattr(mod, "lora_A") and mod.lora_A)
    assert n_peft == len(net.adapters) > 50  # every module in the file was consumed
    if algo == "locon":
        convs = [mod.base_layer for mod in pipe.unet.modules()
                 if hasattr(mod, "lora_A") and isinstance(getattr(mod, "base_layer", None), nn.Conv2d)]
        assert any(c.kernel_size == (3, 3) for c in convs)  # 3x3 LoCon layers are wrapped too
    theirs = Components(pipe.unet, pipe.vae, theirs_tes, comps.tokenizers, None)
    tokens = arch.tokenize(comps, ["a red square"])
    latents, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    batch = {"original_sizes": [(64, 64)], "crop_coords": [(0, 0)], "target_sizes": [(64, 64)]}
    with torch.no_grad():
        ours_cond, theirs_cond = arch.encode_text(comps, tokens, 1), arch.encode_text(theirs, tokens, 1)
        for k in ours_cond:
            torch.testing.assert_close(ours_cond[k], theirs_cond[k], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(arch.predict(comps, latents, t, ours_cond, batch),
                                   arch.predict(theirs, latents, t, theirs_cond, batch), atol=1e-5, rtol=1e-4)


# -- the trainer -------------------------------------------------------------------------------------------

def make_settings(tiny, arch, tmp_path, **overrides):
    return tiny_train_settings(arch, {"model.model_path": str(tiny["models"][arch])}, tiny["data"], tmp_path,
                               **overrides)


def test_trainer_writes_lycoris_file_and_metadata(tiny, tmp_path):
    s, config = make_settings(tiny, "sdxl", tmp_path, network__algorithm="lokr", network__target="full",
                              network__lokr_factor=4, network__rank=2, network__conv_rank=2, network__dora=True,
                              network__train_text_encoder=True, network__exclude="attn1.to_k",
                              saving__save_precision="float")
    result = core.train(s, config=config)
    sd = load_file(str(result.final))
    assert any(k.endswith(".lokr_w1") for k in sd) and any(k.endswith(".dora_scale") for k in sd)
    assert any(k.startswith("lora_unet_input_blocks_0_0.") for k in sd)  # conv_in, LDM name
    assert not any("attn1_to_k." in k for k in sd) and not any("lycoris" in k for k in sd)
    with safe_open(str(result.final), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "lycoris.kohya" and md["ss_network_dim"] == "2"
    args = json.loads(md["ss_network_args"])
    assert args["algo"] == "lokr" and args["dora_wd"] == "True" and args["factor"] == "4"
    assert args["preset"] == "full" and args["conv_dim"] == "2" and args["exclude"] == "attn1.to_k"
    # the trainer's own view: a fresh model + the settings + the file gives what the run ended with
    arch = architectures.get("sdxl")
    comps = arch.load(tiny["models"]["sdxl"], None, torch.float32)
    n = s.network
    targets = arch.select_adapter_targets(comps, n.target, True, exclude=n.exclude)
    net = build_network(targets, n.algorithm, n.rank, n.alpha, n.dropout, AdapterOptions.from_settings(n))
    net.load_export_state_dict(sd)
    assert len(net.adapters) == len({k.split(".")[0] for k in sd})


def test_resume_is_exact_with_lycoris_options(tiny, tmp_path):
    """LoHa with a learned scalar and rank/module dropout: the state keeps what the file folds away."""
    common = dict(network__algorithm="loha", network__use_scalar=True, network__rank_dropout=0.2,
                  network__module_dropout=0.2, schedule__max_train_steps=4, saving__save_every_n_steps=2,
                  saving__save_precision="float")
    s, config = make_settings(tiny, "sd15", tmp_path / "full", **common)
    full = core.train(s, config=config)

    stop = threading.Event()

    def on_event(e):
        if e["type"] == "progress" and e["step"] == 2:
            stop.set()
    s2, config2 = make_settings(tiny, "sd15", tmp_path / "split", **common)
    first = core.train(s2, on_event=on_event, stop_event=stop, config=config2)
    assert first.stopped and first.steps == 2
    assert any(k.endswith(".scalar") for k in load_file(str(first.state_dir / "adapter.safetensors")))
    s2.saving.resume_from = str(first.state_dir)
    second = core.train(s2, config=config2)
    a, b = load_file(str(full.final)), load_file(str(second.final))
    assert a.keys() == b.keys() and not any(k.endswith(".scalar") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_every_algorithm_the_settings_name_has_a_module():
    from core.adapters.network import ALGORITHMS
    from core.settings import ADAPTER_ALGORITHMS
    assert tuple(ALGORITHMS) == ADAPTER_ALGORITHMS
