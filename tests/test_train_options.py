"""Training options each run for real on the tiny SD1.5 model: optimizers, schedulers, objectives,
memory options, a single-file checkpoint, and the messages bad input gets."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import core
from core.optim import build_optimizer, build_scheduler
from tests.test_train_e2e import make_settings
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_config_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_opts")
    data = root / "data"
    build_tiny_dataset(data, n=4)
    single = build_tiny_sd15(root / "single", "single_file")
    return {"models": {"sd15": build_tiny_sd15(root / "sd15", "diffusers")}, "data": data, "root": root,
            "single": single, "single_config": tiny_config_dir("sd15", root / "single")}


def run(tiny, tmp_path, **overrides):
    overrides.setdefault("schedule__max_train_steps", 3)
    s, config = make_settings(tiny, "sd15", tmp_path, **overrides)
    events = []
    result = core.train(s, on_event=events.append, config=config)
    losses = [e["loss"] for e in events if e["type"] == "progress"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    return result, events


@pytest.mark.parametrize("name", ["AdamW", "Lion", "Adafactor", "Prodigy", "SGD"])
def test_each_optimizer_changes_the_adapter(name):
    # small weights: Prodigy's first steps are tiny (its step size starts at d0 = 1e-6)
    start = torch.full((4, 4), 1e-3)
    p = torch.nn.Parameter(start.clone())
    opt = build_optimizer(name, [{"params": [p], "lr": 1e-2}], 1e-2, 0.0, torch.device("cpu"))
    for _ in range(2):
        (p * torch.arange(16.0).view(4, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(p.detach(), start)


def test_adamw8bit_on_cpu_says_why_not():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="NVIDIA GPU"):
        build_optimizer("AdamW8bit", [{"params": [p]}], 1e-3, 0.0, torch.device("cpu"))


@pytest.mark.parametrize("name,expected_mid", [("constant", 1.0), ("linear", 0.5), ("cosine", 0.5),
                                               ("polynomial", 0.5), ("constant_with_warmup", 1.0)])
def test_schedulers_shape_the_learning_rate(name, expected_mid):
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(name, opt, warmup_steps=0, total_steps=10, num_cycles=1, power=1.0)
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(expected_mid, abs=1e-6)


def test_cosine_with_restarts_restarts():
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler("cosine_with_restarts", opt, 0, 10, num_cycles=2, power=1.0)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and lrs[5] == pytest.approx(1.0) and lrs[4] < 0.5


def test_v_prediction_zero_snr_min_snr_noise_offset_and_checkpointing(tiny, tmp_path):
    result, events = run(tiny, tmp_path, model__prediction_type="v_prediction", model__zero_terminal_snr=True,
                         schedule__min_snr_gamma=5.0, schedule__noise_offset=0.05,
                         memory__gradient_checkpointing="on", schedule__gradient_accumulation_steps=2,
                         optimizer__lr_scheduler="cosine", optimizer__lr_warmup_steps=1)
    plan_log = next(e["message"] for e in events if e["type"] == "log" and e["message"].startswith("Plan"))
    assert "gradient checkpointing on" in plan_log
    assert result.steps == 3 and load_file(str(result.final))


def test_caption_dropout_and_clip_skip_with_cached_text(tiny, tmp_path):
    result, events = run(tiny, tmp_path, dataset__caption_dropout_rate=0.5, model__clip_skip=2)
    plan_log = next(e["message"] for e in events if e["type"] == "log" and e["message"].startswith("Plan"))
    assert "text-encoder cache on" in plan_log


def test_shuffled_captions_disable_text_cache_and_say_so(tiny, tmp_path):
    _, events = run(tiny, tmp_path, dataset__shuffle_caption=True, dataset__keep_tokens=1)
    plan_log = next(e["message"] for e in events if e["type"] == "log" and e["message"].startswith("Plan"))
    assert "not cached: captions are shuffled" in plan_log
    s, config = make_settings(tiny, "sd15", tmp_path, dataset__shuffle_caption=True,
                              memory__cache_text_encoder_outputs="on")
    with pytest.raises(ValueError, match="cache_text_encoder_outputs"):
        core.train(s, config=config)


def test_disk_latent_cache_and_no_cache(tiny, tmp_path):
    run(tiny, tmp_path / "disk", dataset__cache_latents="disk")
    assert list((tiny["data"]).rglob("*.latents.safetensors"))
    run(tiny, tmp_path / "off", dataset__cache_latents="off", dataset__flip_aug=True)


def test_single_file_checkpoint_trains_with_its_config_folder(tiny, tmp_path):
    result, _ = run(tiny, tmp_path, model__model_path=str(tiny["single"]),
                    model__config_path=str(tiny["single_config"]))
    assert result.final.exists()


def test_epochs_intermediate_saves_and_keep_last(tiny, tmp_path):
    result, events = run(tiny, tmp_path, schedule__max_train_epochs=4, saving__save_every_n_epochs=1,
                         saving__save_last_n=2, schedule__train_batch_size=4)
    saved = [e["path"] for e in events if e["type"] == "saved" and e["kind"] == "adapter"]
    out = result.final.parent
    remaining = sorted(p.name for p in out.glob("*-step*.safetensors"))
    assert len(saved) == 4 and len(remaining) == 2  # three epoch saves, two kept, plus the final
    assert len(list(out.glob("*-state-*"))) == 2
    # the result and the Run tab list only the files that still exist
    assert all(p.exists() for p in result.outputs) and len(result.outputs) == 3
    from ui.run_state import RunState
    state = RunState()
    state.reset("Starting")
    for e in events:
        state.handle(e)
    listed = state.snapshot().outputs
    assert sorted(Path(p).name for p in listed) == sorted([*remaining, result.final.name])
    assert sum(e["type"] == "deleted" for e in events) == 1


def test_existing_output_is_never_overwritten(tiny, tmp_path):
    first, _ = run(tiny, tmp_path)
    before = first.final.read_bytes()
    second, _ = run(tiny, tmp_path)
    assert second.final != first.final and first.final.read_bytes() == before


def test_missing_caption_is_reported_before_loading(tiny, tmp_path):
    data = tmp_path / "nocap"
    build_tiny_dataset(data, n=2)
    victim = sorted(data.rglob("*.txt"))[0]
    victim.unlink()
    s, config = make_settings(tiny, "sd15", tmp_path, dataset__path=str(data))
    with pytest.raises(ValueError, match=victim.stem):
        core.train(s, config=config)


def test_impossible_settings_are_named(tiny, tmp_path):
    s, config = make_settings(tiny, "sd15", tmp_path, dataset__min_bucket_reso=512, dataset__max_bucket_reso=256)
    with pytest.raises(core.SettingsError, match="min_bucket_reso"):
        core.train(s, config=config)


def test_fused_backward_pass_gives_the_same_weights_as_a_normal_step(tiny, tmp_path):
    """Adafactor stepping each parameter inside backward equals stepping them all afterwards."""
    common = dict(optimizer__optimizer_type="Adafactor", optimizer__max_grad_norm=0.0,
                  optimizer__lr_scheduler="linear", saving__save_precision="float")
    normal, _ = run(tiny, tmp_path / "normal", **common)
    fused, _ = run(tiny, tmp_path / "fused", optimizer__fused_backward_pass=True, **common)
    a, b = load_file(str(normal.final)), load_file(str(fused.final))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_up" in k)


def test_fused_backward_pass_refuses_gradient_accumulation(tiny, tmp_path):
    s, config = make_settings(tiny, "sd15", tmp_path, optimizer__optimizer_type="Adafactor",
                              optimizer__fused_backward_pass=True, schedule__gradient_accumulation_steps=2)
    with pytest.raises(core.SettingsError, match="gradient_accumulation_steps to 1"):
        core.train(s, config=config)
