"""Optimizers and learning-rate schedulers under sd-scripts' names (core.optim): each optimizer that runs on the CPU
minimises a small problem, the 8-bit ones are refused on the CPU with what to choose instead, each scheduler follows
its formula, bad settings are refused before the run, and training runs use them (tiny SD1.5)."""
from __future__ import annotations

import math

import pytest
import torch

import core
from core.optim import build_optimizer, build_scheduler, rex_factor, schedule_free, step_rules_problem
from core.settings import OPTIMIZERS, Settings, check_consistency
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings

CPU = torch.device("cpu")
EIGHT_BIT = [o for o in OPTIMIZERS if o.endswith("8bit")]


def _minimise(name: str, lr: float, steps: int = 60, **kw) -> tuple[float, float]:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    target = torch.randn(8, 4)
    opt = build_optimizer(name, [{"params": [w], "lr": lr}], lr, 0.0, CPU, **kw)
    sf = schedule_free(opt)
    if sf is not None:
        sf.train()
    first = float(((w.detach() - target) ** 2).mean())
    for _ in range(steps):
        loss = ((w - target) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    if sf is not None:
        sf.eval()
    return first, float(((w.detach() - target) ** 2).mean())


@pytest.mark.parametrize("name,lr,kw,kept", [
    ("AdamW", 5e-2, {}, 0.5), ("Lion", 5e-2, {}, 0.5), ("Adafactor", 5e-2, {}, 0.5), ("CAME", 5e-2, {}, 0.5),
    # its own step size starts at 1e-6 and grows with the steps (warmup_init): a small but steady decrease
    ("Adafactor", 0.0, {"relative_step": True}, 0.9999),
    ("AdamWScheduleFree", 5e-2, {"warmup_steps": 5}, 0.5), ("Prodigy", 1.0, {"steps": 400}, 0.5), ("DAdaptAdam", 1.0, {}, 0.5),
    ("SGD", 5e-1, {}, 0.5)])
def test_each_cpu_optimizer_minimises(name, lr, kw, kept):
    first, last = _minimise(name, lr, **kw)
    assert last < kept * first, (name, first, last)


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_eight_bit_optimizers_are_refused_on_the_cpu_with_the_alternative(name):
    with pytest.raises(ValueError, match=f"{name} needs an NVIDIA GPU.*choose {'AdamW' if 'Adam' in name else 'Lion'}"):
        build_optimizer(name, [{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-3, 0.0, CPU)


def _lrs(name: str, total: int = 100, warmup: int = 10, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(name, opt, warmup, total, 1, 1.0, **kw)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedulers_follow_their_formulas():
    cos = _lrs("cosine_with_min_lr", min_lr_ratio=0.2)
    assert cos[0] == 0.0 and cos[10] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.2, abs=1e-3)
    wsd = _lrs("warmup_stable_decay", min_lr_ratio=0.1, decay_steps=20)
    assert wsd[10:80] == pytest.approx([1.0] * 70) and wsd[-1] == pytest.approx(0.1, abs=0.02) and wsd[90] < 1.0
    inv = _lrs("inverse_sqrt", warmup=10, timescale=10)
    assert inv[10] == pytest.approx(1.0) and inv[40] == pytest.approx(1 / math.sqrt(1 + 30 / 10))
    rex = _lrs("rex")
    assert rex[:10] == pytest.approx([(i + 1) / 10 for i in range(10)]) and rex[10] == pytest.approx(1.0)
    assert rex[55] == pytest.approx(0.5 / 0.75) and rex_factor(100, 10, 100) == 0.0
    piece = _lrs("piecewise_constant", step_rules="1:30,0.5:60,0.1")
    assert piece[29] == 1.0 and piece[30] == 0.5 and piece[59] == 0.5 and piece[60] == pytest.approx(0.1)


def test_bad_scheduler_settings_are_refused_before_the_run():
    assert step_rules_problem("1:30,0.5:60,0.1") is None
    assert "the steps must increase" in step_rules_problem("1:60,0.5:30,0.1")
    assert "is not multiplier:until_step pairs" in step_rules_problem("1,0.5:60")
    s = Settings()
    s.optimizer.lr_scheduler, s.optimizer.lr_scheduler_step_rules = "piecewise_constant", "a:b"
    assert any(p.startswith("optimizer.lr_scheduler_step_rules: 'a:b' is not") for p in check_consistency(s))
    s = Settings()
    s.optimizer.optimizer_type, s.optimizer.lr_scheduler = "AdamWScheduleFree", "cosine"
    assert any("AdamWScheduleFree schedules itself: set optimizer.lr_scheduler to constant (not cosine)" in p
               for p in check_consistency(s))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimizers")
    return build_tiny_dataset(root / "data", n=2), build_tiny_sd15(root / "sd15")


@pytest.mark.parametrize("optimizer,scheduler", [("AdamWScheduleFree", "constant"), ("CAME", "rex"),
                                                 ("DAdaptAdam", "cosine_with_min_lr"),
                                                 ("Adafactor", "warmup_stable_decay")])
def test_training_runs_with_them(tiny, tmp_path, optimizer, scheduler):
    data, model = tiny
    lr = 1.0 if optimizer == "DAdaptAdam" else 1e-2
    s, config = tiny_train_settings("sd15", {"model.model_path": str(model)}, data, tmp_path,
                                    optimizer__optimizer_type=optimizer, optimizer__lr_scheduler=scheduler,
                                    optimizer__learning_rate=lr, optimizer__lr_warmup_steps=1,
                                    schedule__max_train_steps=3, saving__save_every_n_steps=2)
    events = []
    result = core.train(s, on_event=events.append, config=config)
    progress = [e for e in events if e["type"] == "progress"]
    assert result.steps == 3 and all(math.isfinite(e["loss"]) for e in progress)
    from safetensors.torch import load_file
    sd = load_file(str(result.final))
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in sd.items())
    if optimizer == "AdamWScheduleFree":   # warmup by the optimizer itself; the scheduler stays constant
        assert [e["lr"] for e in progress] == [lr] * 3


def test_schedule_free_saves_and_samples_the_averaged_weights():
    from core.trainer import _Run
    w = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer("AdamWScheduleFree", [{"params": [w], "lr": 0.1}], 0.1, 0.0, CPU)
    opt.train()
    for _ in range(3):
        (w ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    run = _Run.__new__(_Run)
    run.optimizer = opt
    training = w.detach().clone()
    with run.eval_weights():
        averaged = w.detach().clone()
        assert not opt.param_groups[0]["train_mode"]
    assert opt.param_groups[0]["train_mode"] and torch.equal(w.detach(), training)
    assert not torch.equal(averaged, training)


def test_typed_arguments_reach_each_optimizer_with_its_own_defaults():
    from core.optim import optimizer_kwargs
    assert optimizer_kwargs("AdamW") == {} and optimizer_kwargs("Lion") == {}
    assert optimizer_kwargs("AdamW", beta2=0.99, eps=1e-6) == {"betas": (0.9, 0.99), "eps": 1e-6}
    assert optimizer_kwargs("Lion", beta1=0.95) == {"betas": (0.95, 0.99)}            # Lion's beta2 default
    assert optimizer_kwargs("CAME", beta1=0.8) == {"betas": (0.8, 0.999, 0.9999)}
    assert optimizer_kwargs("Adafactor", beta1=0.9, beta2=0.5, eps=1e-3) == {"beta1": 0.9}
    assert optimizer_kwargs("SGD") == {"momentum": 0.9} and optimizer_kwargs("SGD", beta1=0.5) == {"momentum": 0.5}
    assert optimizer_kwargs("Prodigy", d_coef=0.5) == {"d_coef": 0.5}
    w = torch.nn.Parameter(torch.zeros(2))
    for name in ("AdamW", "Lion", "CAME", "AdamWScheduleFree", "Prodigy", "DAdaptAdam", "Adafactor", "SGD"):
        kw = optimizer_kwargs(name, beta1=0.8, beta2=0.95, eps=1e-6, d_coef=0.5)
        opt = build_optimizer(name, [{"params": [w], "lr": 1e-3}], 1e-3, 0.0, CPU, kwargs=kw)
        group = opt.param_groups[0]
        if "betas" in kw:
            assert tuple(group["betas"])[:2] == (0.8, 0.95), name
        if "eps" in kw:
            assert group["eps"] == 1e-6, name
    assert build_optimizer("SGD", [{"params": [w]}], 1e-3, 0.0, CPU, kwargs={"momentum": 0.5}).param_groups[0][
        "momentum"] == 0.5
