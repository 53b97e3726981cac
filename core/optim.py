"""Optimizers and learning-rate schedulers under the names people know from sd-scripts."""
from __future__ import annotations

import torch
from torch.optim import Optimizer


class Lion(Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum; weight decay decoupled as in AdamW."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def _bitsandbytes(name: str, cuda: bool):
    if not cuda:
        raise ValueError(f"optimizer.optimizer_type: {name} needs an NVIDIA GPU (bitsandbytes); choose "
                         f"{name.removeprefix('Paged').removesuffix('8bit')} on this machine")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError(f"optimizer.optimizer_type: {name} needs the bitsandbytes package, which is "
                         "not installed (run.py installs it on NVIDIA machines)") from None
    return bnb.optim


#: each optimizer's (beta1, beta2) defaults, for the settings' "0: the optimizer's default"
_BETAS = {"AdamW": (0.9, 0.999), "AdamW8bit": (0.9, 0.999), "PagedAdamW8bit": (0.9, 0.999),
          "AdamWScheduleFree": (0.9, 0.999), "Prodigy": (0.9, 0.999), "DAdaptAdam": (0.9, 0.999),
          "Lion": (0.9, 0.99), "Lion8bit": (0.9, 0.99), "PagedLion8bit": (0.9, 0.99), "CAME": (0.9, 0.999)}
_WITH_EPS = ("AdamW", "AdamW8bit", "PagedAdamW8bit", "AdamWScheduleFree", "Prodigy", "DAdaptAdam")


def optimizer_kwargs(name: str, beta1: float = 0.0, beta2: float = 0.0, eps: float = 0.0,
                     d_coef: float = 1.0) -> dict:
    """The typed optimizer settings as ``name``'s constructor arguments; 0 keeps the optimizer's own default
    (only what was set is passed).  SGD's momentum is beta1 (default 0.9); Adafactor takes beta1 alone; CAME's
    third beta keeps its default."""
    out: dict = {}
    if name in _BETAS and (beta1 or beta2):
        b1, b2 = beta1 or _BETAS[name][0], beta2 or _BETAS[name][1]
        out["betas"] = (b1, b2, 0.9999) if name == "CAME" else (b1, b2)
    if name in _WITH_EPS and eps:
        out["eps"] = eps
    if name == "Adafactor" and beta1:
        out["beta1"] = beta1
    if name == "SGD":
        out["momentum"] = beta1 or 0.9
    if name == "Prodigy" and d_coef != 1.0:
        out["d_coef"] = d_coef
    return out


def build_optimizer(name: str, param_groups: list[dict], lr: float, weight_decay: float,
                    device: torch.device, warmup_steps: int = 0, relative_step: bool = False,
                    kwargs: dict | None = None) -> Optimizer:
    """The optimizer sd-scripts names ``name``.  ``warmup_steps`` goes to the optimizers that schedule themselves
    (AdamWScheduleFree); ``relative_step`` is Adafactor's own step size; ``kwargs`` (:func:`optimizer_kwargs`)
    are the typed arguments the user set."""
    cuda = device.type == "cuda"
    kw = dict(kwargs or {})
    if name == "AdamW":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=cuda or None, **kw)
    # Lion8bit is also what the memory plan picks for Lion with 8-bit state
    if name in ("AdamW8bit", "PagedAdamW8bit", "Lion8bit", "PagedLion8bit"):
        return getattr(_bitsandbytes(name, cuda), name)(param_groups, lr=lr, weight_decay=weight_decay, **kw)
    if name == "Lion":
        return Lion(param_groups, lr=lr, weight_decay=weight_decay, **kw)
    if name == "Adafactor":
        from transformers.optimization import Adafactor
        if relative_step:   # Adafactor's own step size: the learning rate is ignored
            return Adafactor(param_groups, lr=None, weight_decay=weight_decay, scale_parameter=True,
                             relative_step=True, warmup_init=True, **kw)
        # sd-scripts' usual arguments: a fixed learning rate from the scheduler, no relative step
        return Adafactor(param_groups, lr=lr, weight_decay=weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False, **kw)
    if name == "CAME":
        from came_pytorch import CAME
        return CAME(param_groups, lr=lr, weight_decay=weight_decay, **kw)
    if name == "AdamWScheduleFree":
        from schedulefree import AdamWScheduleFree
        return AdamWScheduleFree(param_groups, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, **kw)
    if name == "Prodigy":
        from prodigyopt import Prodigy
        return Prodigy(param_groups, lr=lr, weight_decay=weight_decay, decouple=True, use_bias_correction=True,
                       safeguard_warmup=True, **kw)
    if name == "DAdaptAdam":
        from dadaptation import DAdaptAdam
        return DAdaptAdam(param_groups, lr=lr, weight_decay=weight_decay, decouple=True, **kw)
    if name == "SGD":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay, **{"momentum": 0.9, **kw})
    raise ValueError(f"optimizer.optimizer_type: unknown optimizer {name!r}")


def schedule_free(optimizer) -> Optimizer | None:
    """The schedule-free optimizer inside ``optimizer`` (accelerate wraps it), or None: it has train/eval modes,
    and its weights are the ones to save or sample only in eval mode."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if callable(getattr(inner, "eval", None)) and callable(getattr(inner, "train", None)) else None


def rex_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """REX (Chen et al. 2021): a linear warmup, then (1 − z) / (1 − z/2) with z the share of the steps after it."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    z = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return (1 - z) / (1 - z / 2)


def step_rules_problem(rules: str) -> str | None:
    """What is wrong with diffusers' piecewise-constant ``step_rules`` ("1:1000,0.1:2000,0.01"), or None."""
    parts = [p.strip() for p in str(rules).split(",")]
    pairs = [p.split(":") for p in parts[:-1]]
    example = "multiplier:until_step pairs, then a last multiplier alone, e.g. '1:1000,0.1:2000,0.01'"
    if any(len(pair) != 2 for pair in pairs) or ":" in parts[-1]:
        return f"{rules!r} is not {example}"
    try:
        steps = [int(step) for _, step in pairs]
        multipliers = [float(m) for m, _ in pairs] + [float(parts[-1])]
    except ValueError:
        return f"{rules!r} is not {example}"
    if steps != sorted(set(steps)):
        return f"{rules!r}: the steps must increase"
    if any(m < 0 for m in multipliers):
        return f"{rules!r}: a multiplier is negative"
    return None


def build_scheduler(name: str, optimizer: Optimizer, warmup_steps: int, total_steps: int, num_cycles: int,
                    power: float, min_lr_ratio: float = 0.0, decay_steps: int = 0, timescale: int = 0,
                    step_rules: str = ""):
    """The learning-rate scheduler sd-scripts names ``name`` (diffusers' and transformers' implementations; REX
    here)."""
    from torch.optim.lr_scheduler import LambdaLR
    if name == "cosine_with_min_lr":
        from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps,
                                                           min_lr_rate=min_lr_ratio)
    if name == "warmup_stable_decay":
        from transformers.optimization import get_wsd_schedule
        decay = decay_steps or max(1, total_steps // 10)
        return get_wsd_schedule(optimizer, warmup_steps, min(decay, max(1, total_steps - warmup_steps)),
                                num_training_steps=total_steps, min_lr_ratio=min_lr_ratio)
    if name == "inverse_sqrt":
        from transformers.optimization import get_inverse_sqrt_schedule
        return get_inverse_sqrt_schedule(optimizer, warmup_steps, timescale=timescale or max(1, warmup_steps))
    if name == "rex":
        return LambdaLR(optimizer, lambda step: rex_factor(step, warmup_steps, total_steps))
    from diffusers.optimization import get_scheduler
    if name == "piecewise_constant":
        return get_scheduler(name, optimizer, step_rules=step_rules)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)


class FusedBackwardOptimizer(Optimizer):
    """Steps each parameter as soon as its gradient is complete, inside the backward pass, and frees the
    gradient right away, so no full set of gradients is ever held (sd-scripts' --fused_backward_pass).

    One inner optimizer per parameter; ``param_groups`` is always their current groups (loading a state
    replaces an optimizer's group dicts), so a learning-rate scheduler on this object drives them all.  ``step``/``zero_grad`` are no-ops: the hooks did the work.
    Needs optimizers without cross-parameter state (Adafactor), no gradient accumulation, no global clipping.
    ``after_step(param)``, when set, is called after each parameter's step (block swapping writes the block back).
    """

    def __init__(self, param_groups: list[dict], make_optimizer):
        self.after_step = None
        self.inner: list[Optimizer] = []
        for group in param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                opt = make_optimizer([{"params": [p], **options}])
                self.inner.append(opt)
                p.register_post_accumulate_grad_hook(self._hook(opt))
        # Optimizer.__init__ is not called: it would copy the groups; this object only forwards to the inner ones
        self.defaults = dict(self.inner[0].defaults) if self.inner else {}
        self.state = {}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.inner for group in opt.param_groups]

    def _hook(self, opt: Optimizer):
        def step_now(param: torch.Tensor) -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.after_step is not None:
                self.after_step(param)
        return step_now

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict:
        return {"inner": [opt.state_dict() for opt in self.inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        for opt, sd in zip(self.inner, state_dict["inner"], strict=True):
            opt.load_state_dict(sd)


def build_fused_backward_optimizer(name: str, param_groups: list[dict], lr: float, weight_decay: float,
                                   device: torch.device, **options) -> Optimizer:
    """:func:`build_optimizer` per parameter (``options`` as there), stepped inside the backward pass."""
    if name != "Adafactor":
        raise ValueError(f"optimizer.fused_backward_pass works with Adafactor, not {name}")
    return FusedBackwardOptimizer(param_groups, lambda groups: build_optimizer(name, groups, lr, weight_decay,
                                                                             device, **options))
