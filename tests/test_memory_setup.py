"""The plan's memory choices applied by the trainer's own setup path (core.memory_setup), on tiny models:
a quantized frozen base trains through core.train; block swapping (CPU-simulated transfers) and streamed text
encoders give the same results as without; the plan's estimate reaches the Run tab's memory line."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import architectures
import core
from core.hardware import HardwareProfile
from core.memory_setup import repeated_layers, setup_denoiser, text_encoder_on_device
from core.plan import make_plan
from core.settings import Settings
from core.trainer import diffusion_loss
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings, train_twice_with_disk_cache
from tests.tiny_models_dit import build_tiny_dit, load_kwargs

pytest.importorskip("optimum.quanto")


def load_flux(arch, paths):
    return arch.load(paths["model"], paths.get("config_dir"), torch.float32, **load_kwargs(paths))


def cpu_profile() -> HardwareProfile:
    return HardwareProfile(gpus=[], cpu_cores=2, cpu_name="test CPU", ram_total_gb=24.0, ram_available_gb=20.0,
                           torch_version=torch.__version__, cuda_version=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_setup")
    return {"sd15": build_tiny_sd15(root / "sd15"), "data": build_tiny_dataset(root / "data", n=4),
            "flux": build_tiny_dit("flux1_dev", root / "flux", "diffusers"), "root": root}


def test_quantized_base_lora_trains_through_core_train(tiny, tmp_path):
    events = []
    s, config = tiny_train_settings("sd15", {"model.model_path": str(tiny["sd15"])}, tiny["data"], tmp_path,
                                    memory__quantize_base="qint8", schedule__max_train_steps=6)
    result = core.train(s, on_event=events.append, config=config)
    logs = [e["message"] for e in events if e["type"] == "log"]
    assert any("quantized (qint8)" in m for m in logs), logs
    # every caption cached and no previews: the text encoders are dropped before training
    assert any(m.startswith("Text encoders unloaded after caching") for m in logs), logs
    losses = [e["loss"] for e in events if e["type"] == "progress"]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    tensors = load_file(result.final)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(u.abs().sum() > 0 for u in ups)          # every up matrix left its zero init
    plan_events = [e for e in events if e["type"] == "plan"]
    assert len(plan_events) == 1 and "base qint8" not in plan_events[0]["summary"]  # CPU summary line
    assert plan_events[0]["estimate_gb"] is not None and plan_events[0]["estimate_gb"] > 0


def _train_steps(arch, components, settings, plan, steps: int = 3):
    torch.manual_seed(0)                      # the adapters' initialisation
    setup = setup_denoiser(arch, components, settings, plan, torch.device("cpu"), log=lambda m: None)
    opt = torch.optim.AdamW([p for g in setup.network.param_groups(1e-2, 0) for p in g["params"]], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    noisy, _, cond, batch = arch.probe_inputs(components.denoiser, 64, 2, torch.float32, device="cpu")
    latents = torch.randn(noisy.shape, generator=gen)
    cond = {k: torch.randn(v.shape, generator=gen) for k, v in cond.items()}
    torch.manual_seed(0)
    for _ in range(steps):
        with setup.step_context():
            loss = diffusion_loss(arch, components, latents, cond, batch, settings, torch.float32,
                                  lambda: torch.autocast("cpu", enabled=False))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = {k: v.detach().clone() for k, v in setup.network.state_dict().items()}
    loads = setup.swapper.loads if setup.swapper is not None else 0
    setup.network.restore()
    setup.release()
    return state, loads


@pytest.mark.parametrize("checkpointing,quantize", [(False, "none"), (True, "none"), (True, "qint8")])
def test_block_swapping_in_the_trainer_setup_matches_no_swapping(tiny, checkpointing, quantize):
    """setup_denoiser with swapped blocks (simulated transfers on the CPU: an offloaded block holds empty
    placeholders, so a block used without being streamed in fails) trains to the same adapter weights."""
    arch = architectures.get("flux1_dev")
    s = Settings()
    s.model.architecture = "flux1_dev"
    s.network.rank, s.network.alpha = 4, 4.0
    base = make_plan(cpu_profile(), s, arch, tiny["flux"]["model"])
    results = {}
    for swap in (0, 3):
        comps = load_flux(arch, tiny["flux"])
        arch.configure_objective(comps, s)
        comps.denoiser.requires_grad_(False)
        plan = dataclasses.replace(base, blocks_to_swap=swap, gradient_checkpointing=checkpointing,
                                   compile="off", quantize_base=quantize)
        results[swap] = _train_steps(arch, comps, s, plan)
    (plain, _), (swapped, loads) = results[0], results[3]
    assert loads > 0, "no block was streamed in: the swap path did not run"
    assert plain.keys() == swapped.keys()
    for k in plain:
        torch.testing.assert_close(swapped[k], plain[k], rtol=0, atol=1e-6, msg=k)
    assert any((v != 0).any() for k, v in plain.items() if "up" in k)  # the adapters did train


def test_streamed_text_encoder_encodes_the_same(tiny):
    arch = architectures.get("flux1_dev")
    comps = load_flux(arch, tiny["flux"])
    s = Settings()
    s.model.architecture = "flux1_dev"
    s.model.t5_max_length = 24
    arch.configure_objective(comps, s)
    captions = ["a red square", "two blue circles on grey"]
    with torch.no_grad():
        expected = arch.encode_text(comps, arch.tokenize(comps, captions), 1)
        t5 = comps.text_encoders[1].requires_grad_(False)   # frozen, as the trainer has it
        assert repeated_layers(t5) is not None and len(repeated_layers(t5)) >= 2
        with text_encoder_on_device(t5, "stream", torch.device("cpu"), torch.float32):
            # while streamed, a layer's weights are empty placeholders unless it is running
            assert any(p.numel() == 0 for p in repeated_layers(t5).parameters())
            got = arch.encode_text(comps, arch.tokenize(comps, captions), 1)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)
    assert all(p.numel() > 0 for p in t5.parameters())              # whole again afterwards


def test_the_estimate_reaches_the_run_tabs_memory_line(tiny, tmp_path):
    from ui.run_state import RunState, memory_text
    state = RunState()
    state.reset("Starting")
    s, config = tiny_train_settings("sd15", {"model.model_path": str(tiny["sd15"])}, tiny["data"], tmp_path,
                                    schedule__max_train_steps=1)
    core.train(s, on_event=state.handle, config=config)
    snap = state.snapshot()
    assert snap.estimate_gb is not None and snap.estimate_gb > 0
    assert snap.estimate_device == "cpu"
    assert f"(training tensors estimated {snap.estimate_gb:.2f} GB)" in memory_text(snap)
    on_gpu = dataclasses.replace(snap, estimate_device="cuda", vram_gb=1.5, peak_vram_gb=2.0, estimate_gb=2.25)
    assert "1.50 GB (peak 2.00 GB, estimated 2.25 GB)" in memory_text(on_gpu)


def test_text_encoder_outputs_are_reused_from_the_disk_cache(tiny, tmp_path):
    """cache_latents='disk' keeps the text-encoder outputs beside the images: a rerun reads them instead of
    encoding, and trains exactly as the first run did."""
    runs = train_twice_with_disk_cache("sd15", {"model.model_path": str(tiny["sd15"])}, tiny["data"], tmp_path)
    files = list((tmp_path / "data" / ".cache").glob("text-*/*.safetensors"))
    assert len(files) == 4                                       # one per caption of the 4 images
    (first, _), (second, _) = runs
    assert any(m.startswith("Caching text-encoder outputs (4 captions)") for m in first)
    assert not any(m.startswith("Caching text-encoder outputs") for m in second)
    assert any("4 caption(s) read from the disk cache" in m for m in second)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, rtol=0, atol=0, msg=k)


def test_text_cache_survives_an_unwritable_disk(tmp_path):
    """Disk full or a read-only folder: the outputs stay in memory and the reason is kept for the log."""
    from core.text_cache import TextCache
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")     # makes every write fail
    cache = TextCache("disk", blocker, {"arch": "sd15"}, pin=False)
    assert cache.load_existing(["a cat"]) == ["a cat"]
    cache.add("a cat", {"encoder_hidden_states": torch.ones(1, 3, 4)})
    assert cache.disk_error and cache.mode == "memory"
    got = cache.batch(["a cat", "a cat"], torch.device("cpu"))
    assert got["encoder_hidden_states"].shape == (2, 3, 4)
