"""Full fine-tuning (network.algorithm "full_finetune") on tiny SD1.5 / SDXL models on the CPU: the UNet itself
trains, the EMA follows the expected lerp, the saved original-layout checkpoint (and diffusers folder) reload
through the project's loader with identical outputs, and resume continues from step k (the DiT families:
tests/test_dit_full_finetune.py)."""
from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

import architectures
import core
from architectures.sd_loading import load_sd_components
from core.settings import SettingsError
from core.trainer import _Run
from tests.tiny_models import (build_tiny_dataset, build_tiny_sd15, build_tiny_sdxl, tiny_config_dir,
                               tiny_train_settings)

BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_fft")
    data = root / "data"
    build_tiny_dataset(data, n=4)
    models, configs = {}, {}
    for arch, build in BUILDERS.items():
        models[arch] = build(root / arch, "diffusers")
        build(root / f"single_{arch}", "single_file")
        configs[arch] = tiny_config_dir(arch, root / f"single_{arch}")
    return {"models": models, "configs": configs, "data": data}


def settings(tiny, arch, tmp_path, **overrides):
    values = dict(network__algorithm="full_finetune", schedule__max_train_steps=3, saving__save_precision="float",
                  optimizer__learning_rate=1e-3, memory__gradient_checkpointing="off", memory__compile="off")
    values.update(overrides)
    return tiny_train_settings(arch, {"model.model_path": str(tiny["models"][arch])}, tiny["data"], tmp_path,
                               **values)


def train_run(tiny, arch, tmp_path, **overrides) -> tuple[_Run, core.TrainResult, list]:
    s, config = settings(tiny, arch, tmp_path, **overrides)
    events = []
    run = _Run(s, events.append, threading.Event(), config)
    return run, run.run(), events


def unet_output(arch, unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    cross = unet.config.cross_attention_dim
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    hidden = torch.randn(2, 77, cross, generator=gen)
    kwargs = {}
    if arch == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=gen),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    unet.eval()
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), hidden, **kwargs).sample


def base_unet(tiny, arch):
    return architectures.get(arch).load(tiny["models"][arch], None, torch.float32).denoiser


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_full_finetune_trains_unet_and_checkpoint_reloads(tiny, tmp_path, arch):
    run, result, events = train_run(tiny, arch, tmp_path, saving__save_diffusers_folder=(arch == "sdxl"))
    assert result.steps == 3
    trained = run.components.denoiser
    assert next(trained.parameters()).dtype == torch.float32
    base = base_unet(tiny, arch)
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p.detach(), base.state_dict()[n])]
    assert len(changed) > len(list(trained.parameters())) // 2

    # the single file, read back by the project's own single-file loader with the tiny configs
    assert result.final.name == f"tiny_{arch}.safetensors"
    reloaded = load_sd_components(arch, result.final, tiny["configs"][arch], torch.float32)
    expected = unet_output(arch, trained)
    torch.testing.assert_close(unet_output(arch, reloaded["unet"]), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unet_output(arch, base), expected, atol=1e-5)
    if arch == "sdxl":
        folder = result.final.with_name(result.final.stem + "_diffusers")
        assert folder in result.outputs and folder.is_dir()
        from_folder = load_sd_components(arch, folder, None, torch.float32)
        torch.testing.assert_close(unet_output(arch, from_folder["unet"]), expected, atol=1e-5, rtol=1e-5)

    # a second run never overwrites the first one's checkpoint
    before = result.final.read_bytes()
    _, again, _ = train_run(tiny, arch, tmp_path, schedule__max_train_steps=1)
    assert again.final != result.final and result.final.read_bytes() == before


def test_ema_is_the_expected_lerp_and_is_what_gets_saved(tiny, tmp_path):
    decay = 0.75
    run, result, _ = train_run(tiny, "sd15", tmp_path, schedule__max_train_steps=1, network__ema=True,
                               network__ema_decay=decay, network__train_text_encoder=True)
    base = architectures.get("sd15").load(tiny["models"]["sd15"], None, torch.float32)
    starts = {f"denoiser.{n}": p for n, p in base.denoiser.named_parameters()}
    starts |= {f"te0.{n}": p for n, p in base.text_encoders[0].named_parameters()}
    live = dict(run.network.named_parameters())
    ema = run.ema.named_tensors()
    assert ema.keys() == live.keys() and any(k.startswith("te0.") for k in ema)
    differs = 0
    for name, avg in ema.items():
        p0, p1 = starts[name].detach(), live[name].detach()
        torch.testing.assert_close(avg, decay * p0 + (1 - decay) * p1, atol=1e-6, rtol=1e-5)
        differs += not torch.equal(avg, p1)
    assert differs > len(ema) // 2

    # the checkpoint holds the EMA weights
    ema_unet = base_unet(tiny, "sd15")
    ema_unet.load_state_dict({n[len("denoiser."):]: t for n, t in ema.items() if n.startswith("denoiser.")},
                             strict=False)
    reloaded = load_sd_components("sd15", result.final, tiny["configs"]["sd15"], torch.float32)
    torch.testing.assert_close(unet_output("sd15", reloaded["unet"]), unet_output("sd15", ema_unet),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unet_output("sd15", reloaded["unet"]), unet_output("sd15", run.components.denoiser),
                              atol=1e-6)
    state = load_file(str(result.state_dir / "ema.safetensors"))
    assert state.keys() == ema.keys()


def test_resume_continues_from_step_k(tiny, tmp_path):
    common = dict(schedule__max_train_steps=4, saving__save_every_n_steps=2, network__ema=True,
                  network__ema_decay=0.5)
    s, config = settings(tiny, "sd15", tmp_path / "full", **common)
    full = core.train(s, config=config)
    state = full.final.parent / "tiny_sd15-state-000002"
    assert (state / "model.safetensors").is_file() and (state / "ema.safetensors").is_file()

    s2, config2 = settings(tiny, "sd15", tmp_path / "split", saving__resume_from=str(state), **common)
    # the state lives in the other run's outputs folder: allowed here explicitly
    config2 = config2.model_copy(update={"allowed_roots": [*config2.allowed_roots, str(tmp_path / "full")]})
    events = []
    second = core.train(s2, on_event=events.append, config=config2)
    assert [e["step"] for e in events if e["type"] == "progress"] == [3, 4]
    assert second.steps == 4
    a, b = load_file(str(full.final)), load_file(str(second.final))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
