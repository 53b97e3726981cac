"""Flow-matching maths (architectures/flow_matching.py): interpolation and target, timestep sampling (moments,
shift formula, FLUX's resolution-dependent shift), loss weighting, FLUX latent packing and position ids."""
from __future__ import annotations

import math

import pytest
import torch

from architectures import flow_matching as fm

N = 200_000


def draw(method: str, **kw) -> torch.Tensor:
    return fm.sample_sigmas(method, N, generator=torch.Generator().manual_seed(0), **kw)


def test_noisy_latents_and_velocity_target():
    x = torch.randn(3, 16, 4, 4)
    eps = torch.randn_like(x)
    s = torch.tensor([0.0, 0.25, 1.0])
    noisy = fm.noisy_latents(x, eps, s)
    torch.testing.assert_close(noisy[0], x[0])
    torch.testing.assert_close(noisy[1], 0.75 * x[1] + 0.25 * eps[1])
    torch.testing.assert_close(noisy[2], eps[2])
    v = fm.velocity_target(x, eps)
    torch.testing.assert_close(v, eps - x)
    # the model's x0 estimate from the exact velocity is the clean latent
    torch.testing.assert_close(noisy - s.view(-1, 1, 1, 1) * v, x)


def test_uniform_moments():
    u = draw("uniform")
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert u.min() > 0 and u.max() < 1


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.7), (-1.0, 2.0)])
def test_logit_normal_moments(mean, std):
    u = draw("logit_normal", logit_mean=mean, logit_std=std)
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean() - mean) < 0.02 and abs(logit.std() - std) < 0.02
    assert abs(u.median() - torch.sigmoid(torch.tensor(mean))) < 0.01


def test_sigmoid_is_logit_normal_with_zero_mean():
    u = draw("sigmoid", sigmoid_scale=1.7)
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1.7) < 0.02


def test_mode_sampling():
    # scale 0 is the uniform distribution (u = 1 - r)
    u0 = draw("mode", mode_scale=0.0)
    assert abs(u0.mean() - 0.5) < 0.005 and abs(u0.var() - 1 / 12) < 0.002
    # the SD3 paper's density: u = 1 - r - s (cos²(πr/2) - 1 + r); its mean is 1/2 - s(1/2 - 1/2) = 1/2 …
    u = draw("mode", mode_scale=1.29)
    r = torch.rand(N, generator=torch.Generator().manual_seed(0))
    expected = 1 - r - 1.29 * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    torch.testing.assert_close(u, expected.clamp(fm.SIGMA_EPS, 1 - fm.SIGMA_EPS))
    assert abs(u.mean() - 0.5) < 0.005
    # … and positive scales put more mass in the middle than uniform does
    assert ((u - 0.5).abs() < 0.25).float().mean() > ((u0 - 0.5).abs() < 0.25).float().mean() + 0.05


def test_shift_formula():
    s = torch.linspace(0, 1, 11)
    torch.testing.assert_close(fm.shift_sigmas(s, 1.0), s)
    shifted = fm.shift_sigmas(s, 3.0)
    torch.testing.assert_close(shifted, 3 * s / (1 + 2 * s))
    assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted[1:-1] > s[1:-1])
    torch.testing.assert_close(fm.shift_sigmas(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))
    # shift then sample: the same as shifting the sigmoid samples
    u = draw("shift", shift=3.0, sigmoid_scale=1.0)
    torch.testing.assert_close(u, fm.shift_sigmas(draw("sigmoid"), 3.0).clamp(fm.SIGMA_EPS, 1 - fm.SIGMA_EPS))
    assert u.mean() > 0.6


def test_flux_resolution_dependent_shift():
    assert fm.flux_mu(256) == pytest.approx(0.5)
    assert fm.flux_mu(4096) == pytest.approx(1.15)
    assert fm.flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)   # 512 px images
    s = torch.tensor([0.2, 0.5, 0.8])
    mu = fm.flux_mu(4096)  # 1024 px
    # BFL's time_shift: e^mu / (e^mu + (1/t - 1))
    expected = math.exp(mu) / (math.exp(mu) + (1 / s - 1))
    torch.testing.assert_close(fm.flux_time_shift(s, mu), expected)
    small, large = draw("flux_shift", image_seq_len=256), draw("flux_shift", image_seq_len=4096)
    assert large.mean() > small.mean() > 0.5
    with pytest.raises(ValueError, match="token count"):
        fm.sample_sigmas("flux_shift", 2)


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="logit_normal"):
        fm.sample_sigmas("lognormal", 2)
    with pytest.raises(ValueError, match="cosmap"):
        fm.loss_weights("snr", torch.ones(2))


def test_loss_weighting():
    s = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(fm.loss_weights("none", s), torch.ones(3))
    torch.testing.assert_close(fm.loss_weights("sigma_sqrt", s), s ** -2)
    cos = fm.loss_weights("cosmap", s)
    torch.testing.assert_close(cos, 2 / (math.pi * (1 - 2 * s + 2 * s ** 2)))
    assert cos[1] == cos.max() and cos[0] == pytest.approx(cos[2].item())  # symmetric, peak at 0.5
    # the same as diffusers' training helper
    from diffusers.training_utils import compute_loss_weighting_for_sd3
    for method in ("sigma_sqrt", "cosmap"):
        torch.testing.assert_close(fm.loss_weights(method, s), compute_loss_weighting_for_sd3(method, s).float())


def test_packing_matches_diffusers_and_round_trips():
    from diffusers import FluxPipeline
    x = torch.randn(2, 16, 6, 8)
    packed = fm.pack_latents(x)
    assert packed.shape == (2, 12, 64)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 8))
    torch.testing.assert_close(fm.unpack_latents(packed, 6, 8), x)
    # diffusers unpacks from pixel sizes (vae factor 8)
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 48, 64, 8), x)
    torch.testing.assert_close(fm.image_position_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
    assert fm.text_position_ids(5).shape == (5, 3) and not fm.text_position_ids(5).any()
    with pytest.raises(ValueError, match="even"):
        fm.pack_latents(torch.zeros(1, 16, 5, 8))
