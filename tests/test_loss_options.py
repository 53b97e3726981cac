"""sd-scripts' loss and noise options: the math of core.loss, how each family draws and weights noise levels with
them, and training runs that use them (SD1.5 and FLUX.1, tiny models)."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import architectures
import core
from architectures.sd_unet import ddpm_loss_weight
from core.loss import conditional_loss, huber_threshold, multires_noise, remap_level
from core.settings import Settings, check_consistency
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings
from tests.tiny_models_dit import build_tiny_dit
from tests.tiny_models_dit import settings_paths as dit_paths


def test_pseudo_huber_losses_have_their_limits():
    pred = torch.zeros(2, 3, dtype=torch.float64)
    target = torch.tensor([[1e-3, -2e-3, 5e-4], [50.0, -80.0, 120.0]], dtype=torch.float64)
    c = torch.tensor([0.1, 0.1], dtype=torch.float64)
    l2 = conditional_loss(pred, target, "l2")
    torch.testing.assert_close(l2, target ** 2)
    huber = conditional_loss(pred, target, "huber", c)
    torch.testing.assert_close(huber[0], target[0] ** 2, rtol=1e-3, atol=0)        # ≈ d² near 0
    torch.testing.assert_close(huber[1], 2 * 0.1 * target[1].abs(), rtol=1e-2, atol=0)   # ≈ 2c|d| far away
    smooth = conditional_loss(pred, target, "smooth_l1", c)
    torch.testing.assert_close(smooth[0], target[0] ** 2 / 0.1, rtol=1e-3, atol=0)  # ≈ d²/c near 0
    torch.testing.assert_close(smooth[1], 2 * target[1].abs(), rtol=1e-2, atol=0)
    # one threshold per sample, broadcast over the sample's elements
    per = conditional_loss(torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2), "huber", torch.tensor([0.1, 1.0]))
    assert per[0].unique().numel() == 1 and per[1].unique().numel() == 1 and per[0, 0, 0, 0] < per[1, 0, 0, 0]
    with pytest.raises(ValueError, match="loss_type"):
        conditional_loss(pred, target, "l1", c)


def test_huber_threshold_schedules():
    level = torch.tensor([0.0, 0.5, 1.0])
    ratio = torch.tensor([0.0, 1.0, 1e6])
    torch.testing.assert_close(huber_threshold("constant", 0.1, 2.0, level, ratio), torch.full((3,), 0.2))
    torch.testing.assert_close(huber_threshold("exponential", 0.1, 1.0, level, ratio),
                               torch.tensor([1.0, math.sqrt(0.1), 0.1]))
    snr = huber_threshold("snr", 0.1, 1.0, level, ratio)
    torch.testing.assert_close(snr[[0, 1]], torch.tensor([1.0, 0.9 / 4 + 0.1]))
    assert abs(float(snr[2]) - 0.1) < 1e-6
    with pytest.raises(ValueError, match="huber_schedule"):
        huber_threshold("linear", 0.1, 1.0, level, ratio)


def test_multires_noise_is_unit_noise_with_coarse_structure():
    torch.manual_seed(0)
    noise = torch.randn(4, 4, 64, 64)
    out = multires_noise(noise, 6, 0.8)
    assert out.shape == noise.shape and abs(float(out.std()) - 1) < 1e-4

    def neighbour_correlation(x):
        return float(torch.corrcoef(torch.stack([x[..., :, :-1].flatten(), x[..., :, 1:].flatten()]))[0, 1])
    assert abs(neighbour_correlation(noise)) < 0.02 < 0.2 < neighbour_correlation(out)
    torch.testing.assert_close(multires_noise(noise, 0, 0.3), noise / noise.std())


def test_remap_level():
    level = torch.tensor([0.0, 0.5, 1.0])
    assert remap_level(level, 0, 1000) is level
    torch.testing.assert_close(remap_level(level, 200, 600), torch.tensor([0.2, 0.4, 0.6]))


def test_ddpm_loss_weights():
    snr = torch.tensor([0.01, 1.0, 4.0, 1e5])
    s = Settings().schedule
    torch.testing.assert_close(ddpm_loss_weight(snr, s, False), torch.ones(4))
    s.debiased_estimation_loss = True
    torch.testing.assert_close(ddpm_loss_weight(snr, s, False), snr.clamp(max=1000).rsqrt())
    torch.testing.assert_close(ddpm_loss_weight(snr, s, True), 1 / (snr.clamp(max=1000) + 1))
    s.debiased_estimation_loss = False
    s.scale_v_pred_loss_like_noise_pred = True
    torch.testing.assert_close(ddpm_loss_weight(snr, s, True), snr / (snr + 1))
    torch.testing.assert_close(ddpm_loss_weight(snr, s, False), torch.ones(4))   # ε-prediction: no effect
    s.min_snr_gamma = 5.0
    torch.testing.assert_close(ddpm_loss_weight(snr, s, True), torch.clamp(snr, max=5.0) / (snr + 1) * snr / (snr + 1))


def test_min_timestep_above_max_is_refused_where_to_change_it():
    s = Settings()
    s.schedule.min_timestep, s.schedule.max_timestep = 500, 400
    assert any("schedule.min_timestep (500) must be below schedule.max_timestep (400)" in p
               for p in check_consistency(s))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss_options")
    return {"data": build_tiny_dataset(root / "data", n=2), "sd15": build_tiny_sd15(root / "sd15"),
            "flux": build_tiny_dit("flux1_dev", root / "flux")}


def _noised(arch_id, folder, **schedule):
    arch = architectures.get(arch_id)
    comps = arch.load(folder, None, torch.float32)
    s = Settings()
    s.model.architecture = arch_id
    for k, v in schedule.items():
        setattr(s.schedule, k, v)
    arch.configure_objective(comps, s)
    shape = (64, 4, 8, 8) if arch_id == "sd15" else (64, 16, 8, 8)
    torch.manual_seed(0)
    latents, noise = torch.randn(shape), torch.randn(shape)
    extra = noise + 0.5 * torch.randn(shape)
    torch.manual_seed(1)
    plain = arch.noisy_input_and_target(comps, latents, noise, s)
    torch.manual_seed(1)
    perturbed = arch.noisy_input_and_target(comps, latents, noise, s, extra)
    return plain, perturbed


def test_each_family_trains_the_chosen_noise_levels_and_perturbs_only_the_input(tiny):
    plain, perturbed = _noised("sd15", tiny["sd15"], min_timestep=200, max_timestep=300)
    assert 200 <= int(plain.timesteps.min()) and int(plain.timesteps.max()) < 300
    torch.testing.assert_close(plain.level, plain.timesteps.float() / 1000)
    assert torch.equal(perturbed.timesteps, plain.timesteps) and torch.equal(perturbed.target, plain.target)
    assert not torch.allclose(perturbed.noisy, plain.noisy)

    plain, perturbed = _noised("flux1_dev", tiny["flux"]["model"], min_timestep=600, max_timestep=900,
                               timestep_sampling="uniform")
    assert 0.6 <= float(plain.timesteps.min()) and float(plain.timesteps.max()) <= 0.9
    torch.testing.assert_close(plain.noise_to_signal, plain.level / (1 - plain.level))
    assert torch.equal(perturbed.target, plain.target) and not torch.allclose(perturbed.noisy, plain.noisy)


@pytest.mark.parametrize("arch_id,options", [
    ("sd15", dict(loss_type="huber", huber_schedule="snr", multires_noise_iterations=4, ip_noise_gamma=0.1,
                  min_timestep=100, max_timestep=900, debiased_estimation_loss=True)),
    ("flux1_dev", dict(loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.2, multires_noise_iterations=3,
                       ip_noise_gamma=0.05, min_timestep=50, max_timestep=950))])
def test_training_with_the_options(tiny, tmp_path, arch_id, options):
    paths = {"model.model_path": str(tiny["sd15"])} if arch_id == "sd15" else {**dit_paths(tiny["flux"]),
                                                                                "model.t5_max_length": 24}
    s, config = tiny_train_settings(arch_id, paths, tiny["data"], tmp_path, schedule__max_train_steps=2,
                                    optimizer__learning_rate=1e-2,
                                    **{f"schedule__{k}": v for k, v in options.items()})
    events = []
    result = core.train(s, on_event=events.append, config=config)
    losses = [e["loss"] for e in events if e["type"] == "progress"]
    assert result.steps == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    sd = load_file(str(result.final))
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in sd.items())
