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


def build_optimizer(name: str, param_groups: list[dict], lr: float, weight_decay: float,
                    device: torch.device) -> Optimizer:
    cuda = device.type == "cuda"
    if name == "AdamW":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay, fused=cuda or None)
    if name == "AdamW8bit":
        if not cuda:
            raise ValueError("optimizer.optimizer_type: AdamW8bit needs an NVIDIA GPU; choose AdamW on this "
                             "machine")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("optimizer.optimizer_type: AdamW8bit needs the bitsandbytes package, which is "
                             "not installed (run.py installs it on NVIDIA machines)") from None
        return bnb.optim.AdamW8bit(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "Lion":
        return Lion(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "Adafactor":
        from transformers.optimization import Adafactor
        # sd-scripts' usual arguments: a fixed learning rate from the scheduler, no relative step
        return Adafactor(param_groups, lr=lr, weight_decay=weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    if name == "Prodigy":
        from prodigyopt import Prodigy
        return Prodigy(param_groups, lr=lr, weight_decay=weight_decay, decouple=True, use_bias_correction=True,
                       safeguard_warmup=True)
    if name == "SGD":
        return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay, momentum=0.9)
    raise ValueError(f"optimizer.optimizer_type: unknown optimizer {name!r}")


def build_scheduler(name: str, optimizer: Optimizer, warmup_steps: int, total_steps: int, num_cycles: int,
                    power: float):
    from diffusers.optimization import get_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)
