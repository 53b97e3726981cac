"""LoRA layer behaviour and the small pure functions of the training objective."""
import math

import pytest
import torch
from torch import nn

from architectures.base import AdapterTarget
from architectures.sd_unet import min_snr_weight, snr_of
from core.adapters import build_network
from core.trainer import total_steps_and_epochs
from core.settings import Settings


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Conv2d(1, 1, 1))


def test_lora_starts_as_identity_and_scales_with_alpha_over_rank():
    lin = nn.Linear(8, 16)
    x = torch.randn(3, 8)
    before = lin(x)
    net = build_network([AdapterTarget("lora_unet_a", lin, "unet")], "lora", rank=4, alpha=2.0)
    net.apply_to()
    assert torch.equal(lin(x), before)  # up is zero-initialised
    mod = net.adapters["lora_unet_a"]
    with torch.no_grad():
        mod.lora_up.weight.normal_()
    expected = before + (x @ mod.lora_down.weight.T @ mod.lora_up.weight.T) * (2.0 / 4)
    torch.testing.assert_close(lin(x), expected)
    net.restore()
    torch.testing.assert_close(lin(x), before)


def test_alpha_zero_means_alpha_equals_rank():
    net = build_network([AdapterTarget("lora_unet_a", nn.Linear(4, 4), "unet")], "lora", rank=8, alpha=0)
    m = net.adapters["lora_unet_a"]
    assert m.scale == 1.0
    assert float(net.export_state_dict()["lora_unet_a.alpha"]) == 8.0


def test_export_then_load_reproduces_outputs_and_rejects_mismatch():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    na = build_network([AdapterTarget("lora_unet_x", a, "unet")], "lora", 4, 4.0)
    nb = build_network([AdapterTarget("lora_unet_x", b, "unet")], "lora", 4, 4.0)
    with torch.no_grad():
        na.adapters["lora_unet_x"].lora_up.weight.normal_()
    na.apply_to(); nb.apply_to()
    nb.load_export_state_dict(na.export_state_dict())
    x = torch.randn(2, 8)
    torch.testing.assert_close(a(x), b(x))
    with pytest.raises(ValueError, match="does not match"):
        nb.load_export_state_dict({"lora_unet_other.lora_down.weight": torch.zeros(4, 8)})


def test_conv_1x1_lora_and_param_groups():
    conv = nn.Conv2d(3, 5, 1)
    te = nn.Linear(3, 3)
    net = build_network([AdapterTarget("lora_unet_c", conv, "unet"), AdapterTarget("lora_te_t", te, "te1")],
                        "lora", 2, 1.0)
    net.apply_to()
    assert conv(torch.randn(1, 3, 4, 4)).shape == (1, 5, 4, 4)
    groups = net.param_groups(1e-4, 5e-5)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("unet", 1e-4, 2), ("text_encoder", 5e-5, 2)]
    with pytest.raises(ValueError, match="LoCon"):
        build_network([AdapterTarget("lora_unet_k", nn.Conv2d(3, 3, 3), "unet")], "lora", 2, 1.0)


def test_min_snr_weight_formula():
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, False), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weight(snr, 5.0, True), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    # zero terminal SNR stays finite for epsilon prediction
    assert torch.isfinite(min_snr_weight(torch.tensor([0.0]), 5.0, False)).all()


def test_snr_of_matches_definition():
    acp = torch.linspace(0.99, 0.01, 10)
    t = torch.tensor([0, 9])
    torch.testing.assert_close(snr_of(acp, t), torch.tensor([0.99 / 0.01, 0.01 / 0.99]))


def test_total_steps_from_epochs_or_steps():
    s = Settings()
    s.schedule.max_train_steps = 10
    s.schedule.gradient_accumulation_steps = 2
    assert total_steps_and_epochs(s, batches_per_epoch=7) == (10, math.ceil(10 / 4))
    s.schedule.max_train_epochs = 3
    assert total_steps_and_epochs(s, batches_per_epoch=7) == (12, 3)


@pytest.mark.parametrize("options", [
    {}, {"factor": 4}, {"decompose_both": True, "rank": 2}, {"full_matrix": True}, {"use_scalar": True},
    {"rank_dropout": 0.3, "dropout": 0.2}, {"factor": 16}])
def test_lokr_bypass_equals_the_rebuilt_weight(options):
    """LoKr's bypass (w1 · X · w2ᵀ on the input's feature grid) gives the same output and gradients as
    multiplying by the rebuilt kron(w1, w2): in training mode with the same dropout draws, for every shape
    choice (which side goes first depends on the factorisation)."""
    from core.adapters.lokr import LoKrModule
    options = dict(options)
    rank = options.pop("rank", 4)
    torch.manual_seed(0)
    base = nn.Linear(48, 96)
    lokr = LoKrModule("lokr_test", base, rank=rank, alpha=2, **options)
    with torch.no_grad():
        for p in lokr.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    lokr.multiplier = 0.7
    lokr.train()
    x = torch.randn(2, 5, 48)
    results = []
    for use_bypass in (True, False):
        lokr.zero_grad()
        torch.manual_seed(1)
        if use_bypass:
            out = lokr.bypass_delta(x)
        else:  # AdapterModule.delta's rebuild path, in its order of draws
            dw = lokr.effective_delta()
            out = nn.functional.linear(nn.functional.dropout(x, lokr.dropout_p) if lokr.dropout_p else x, dw)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in lokr.parameters()]))
    (bypass, bypass_grads), (rebuilt, rebuilt_grads) = results
    assert bypass.abs().max() > 0
    torch.testing.assert_close(bypass, rebuilt, rtol=1e-5, atol=1e-6)
    for got, want in zip(bypass_grads, rebuilt_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert lokr.bypass_delta(torch.randn(3, 48)).shape == (3, 96)
