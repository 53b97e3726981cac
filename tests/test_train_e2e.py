"""End to end on tiny SD1.5 and SDXL models: the Python API trains, saves a community-format adapter that
diffusers loads with the same outputs, writes previews, and resumes exactly."""
from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import architectures
import core
from core.adapters import build_network
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, build_tiny_sdxl, tiny_train_settings

BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    models = {arch: BUILDERS[arch](root / arch, "diffusers") for arch in BUILDERS}
    data = root / "data"
    build_tiny_dataset(data, n=4)
    return {"models": models, "data": data, "root": root}


def make_settings(tiny, arch, tmp_path, **overrides):
    overrides.setdefault("schedule__max_train_steps", 6)
    return tiny_train_settings(arch, {"model.model_path": str(tiny["models"][arch])}, tiny["data"], tmp_path,
                               **overrides)


def adapted_model(arch_id, model_path, adapter_file, network_settings):
    """The trainer's own view of base + adapter: load the base, build the network, load the saved file."""
    arch = architectures.get(arch_id)
    comps = arch.load(model_path, None, torch.float32)
    net = build_network(arch.adapter_targets(comps, network_settings.target, network_settings.train_text_encoder),
                        "lora", network_settings.rank, network_settings.alpha)
    net.load_export_state_dict(load_file(str(adapter_file)))
    net.apply_to()
    return arch, comps, net


@pytest.mark.parametrize("arch_id", ["sd15", "sdxl"])
def test_train_save_preview_and_diffusers_round_trip(tiny, tmp_path, arch_id):
    events = []
    s, config = make_settings(tiny, arch_id, tmp_path, network__train_text_encoder=True,
                              sampling__sample_every_n_steps=3, sampling__prompts="a red square\na blue circle",
                              schedule__max_train_steps=12, schedule__train_batch_size=2)
    result = core.train(s, on_event=events.append, config=config)

    losses = [e["loss"] for e in events if e["type"] == "progress"]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert [e for e in events if e["type"] == "done"][0]["final"] == str(result.final)
    samples = [p for e in events if e["type"] == "sample" for p in e["paths"]]
    assert len(samples) == 8 and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in samples)
    # the status names each preview while it renders, then training again (the page never keeps a stale line)
    statuses = [e["message"] for e in events if e["type"] == "status"]
    training = next(m for m in statuses if m.startswith("Training:"))
    after = statuses[statuses.index(training):]
    assert after[:3] == [training, "Preview images at step 3", training], after
    assert [e.get("again") for e in events if e["type"] == "status" and e["message"] == training] == [None] + [True] * 4

    # community keys and metadata
    sd = load_file(str(result.final))
    arch = architectures.get(arch_id)
    unet_prefix = "lora_unet_input_blocks_" if arch_id == "sdxl" else "lora_unet_down_blocks_"
    te_prefixes = ("lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_") \
        if arch_id == "sdxl" else ("lora_te_text_model_encoder_layers_",)
    assert any(k.startswith(unet_prefix) for k in sd)
    for prefix in te_prefixes:
        assert any(k.startswith(prefix) for k in sd), prefix
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    with safe_open(str(result.final), "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == arch.ss_base_model_version
    assert md["modelspec.architecture"] == arch.modelspec_architecture
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert md["ss_network_alpha"] == "2.0" and md["ss_steps"] == "12"
    assert json.loads(md["ss_tag_frequency"])

    # diffusers loads the file: every module the file names gets a LoRA, and the outputs match ours
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(tiny["models"][arch_id], local_files_only=True)
    pipe.load_lora_weights(str(result.final))
    n_file_modules = len({k.split(".")[0] for k in sd})
    n_peft_modules = sum(1 for m in [pipe.unet, *[getattr(pipe, n) for n in ("text_encoder", "text_encoder_2")
                                                   if getattr(pipe, n, None) is not None]]
                         for _, mod in m.named_modules() if hasattr(mod, "lora_A") and mod.lora_A)
    assert n_peft_modules == n_file_modules > 10, (n_peft_modules, n_file_modules)

    _, comps, _ = adapted_model(arch_id, tiny["models"][arch_id], result.final, s.network)
    torch.manual_seed(0)
    tokens = arch.tokenize(comps, ["a red square"])
    with torch.no_grad():
        ours_text = arch.encode_text(comps, tokens, 1)
        theirs_tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch_id == "sdxl" else [])
        for te_ours, te_theirs, ids in zip(comps.text_encoders, theirs_tes, tokens):
            torch.testing.assert_close(te_ours(ids).last_hidden_state, te_theirs(ids).last_hidden_state,
                                       atol=2e-4, rtol=1e-3)
        latents = torch.randn(1, comps.denoiser.config.in_channels, 8, 8)
        t = torch.tensor([500])
        batch = {"original_sizes": [(64, 64)], "crop_coords": [(0, 0)], "target_sizes": [(64, 64)]}
        ours = arch.predict(comps, latents, t, ours_text, batch)
        theirs_comps = architectures.base.Components(pipe.unet, pipe.vae, theirs_tes, comps.tokenizers, None)
        theirs = arch.predict(theirs_comps, latents, t, ours_text, batch)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-3)
    # and the adapter actually changed the model
    pipe.unload_lora_weights()
    with torch.no_grad():
        base = arch.predict(theirs_comps, latents, t, ours_text, batch)
    assert (base - ours).abs().max() > 1e-4


def test_loss_goes_down_on_a_fixed_batch(tiny, tmp_path):
    """Training lowers the loss measured on fixed noise and timesteps (the real step, not a stub)."""
    s, config = make_settings(tiny, "sd15", tmp_path, schedule__max_train_steps=40, optimizer__learning_rate=3e-3,
                              dataset__enable_buckets=False, network__rank=8, network__alpha=8.0)
    arch = architectures.get("sd15")
    comps = arch.load(tiny["models"]["sd15"], None, torch.float32)
    from core import dataset as ds_mod
    items = ds_mod.scan_dataset(s.dataset, tiny["data"])
    ds_mod.assign_buckets(items, s.dataset)
    pixels = torch.stack([ds_mod.load_image(i.path, i.bucket)[0] for i in items])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = arch.encode_latents(comps, pixels)
        cond = arch.encode_text(comps, arch.tokenize(comps, [i.caption for i in items]), 1)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.linspace(50, 950, len(items)).long()

    def fixed_loss(adapter_file=None):
        c = comps
        net = None
        if adapter_file:
            net = build_network(arch.adapter_targets(c, s.network.target, False), "lora", s.network.rank,
                                s.network.alpha)
            net.load_export_state_dict(load_file(str(adapter_file)))
            net.apply_to()
        with torch.no_grad():
            noisy = c.noise_scheduler.add_noise(latents, noise, t)
            pred = arch.predict(c, noisy, t, cond, {})
        if net:
            net.restore()
        return torch.nn.functional.mse_loss(pred, noise).item()

    before = fixed_loss()
    result = core.train(s, config=config)
    after = fixed_loss(result.final)
    print(f"fixed-batch loss before {before:.4f} after {after:.4f}")
    assert after < before * 0.97, (before, after)


def test_resume_continues_from_step_k_with_same_optimizer_state(tiny, tmp_path):
    common = dict(schedule__max_train_steps=8, saving__save_every_n_steps=4, saving__save_precision="float",
                  dataset__flip_aug=True, dataset__shuffle_caption=True)
    s, config = make_settings(tiny, "sd15", tmp_path / "full", **common)
    full = core.train(s, config=config)

    # a run stopped after 4 steps, then resumed from its state folder
    stop = threading.Event()

    def on_event(e):
        if e["type"] == "progress" and e["step"] == 4:
            stop.set()
    s2, config2 = make_settings(tiny, "sd15", tmp_path / "split", **common)
    first = core.train(s2, on_event=on_event, stop_event=stop, config=config2)
    assert first.stopped and first.steps == 4 and first.state_dir.name == "tiny_sd15-state-000004"
    state_opt = torch.load(first.state_dir / "optimizer.pt", weights_only=True)
    full_state_4 = torch.load(full.final.parent / "tiny_sd15-state-000004" / "optimizer.pt", weights_only=True)
    for k, v in full_state_4["state"].items():
        torch.testing.assert_close(state_opt["state"][k]["exp_avg"], v["exp_avg"])

    s2.saving.resume_from = str(first.state_dir)
    events = []
    second = core.train(s2, on_event=events.append, config=config2)
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps == [5, 6, 7, 8]
    a, b = load_file(str(full.final)), load_file(str(second.final))
    assert a.keys() == b.keys()
    for k in a:
        # exact on the CPU; on a GPU, bf16 and cuBLAS's non-deterministic kernels differ by ~1e-4 (H100)
        tol = dict(atol=1e-6, rtol=1e-5) if not torch.cuda.is_available() else dict(atol=1e-3, rtol=1e-2)
        torch.testing.assert_close(a[k], b[k], **tol)


def test_bad_inputs_get_clear_errors(tiny, tmp_path):
    s, config = make_settings(tiny, "sdxl", tmp_path)
    s.model.model_path = str(tiny["models"]["sd15"])
    errors = []
    with pytest.raises(architectures.ModelLoadError, match="(?i)sd(xl|1)"):
        core.train(s, on_event=errors.append, config=config)
    assert errors and errors[-1]["type"] == "error"

    s, config = make_settings(tiny, "sd15", tmp_path)
    s.dataset.path = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        core.train(s, config=config)
