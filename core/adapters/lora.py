"""LoRA, kohya style: the base layer stays in place and its forward gains ``up(down(x)) * alpha / rank``.

Keeping the base module (instead of replacing it with a wrapper) keeps the model's own state-dict keys
and module tree intact, so the same model can be compared with, or handed to, diffusers unchanged.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from architectures.base import AdapterTarget


class LoRAModule(nn.Module):
    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.name = name
        if isinstance(base, nn.Conv2d):
            if base.kernel_size != (1, 1):
                raise ValueError(f"{name}: LoRA on {base.kernel_size} convolutions needs LoCon")
            self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        elif isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        else:
            raise TypeError(f"{name}: LoRA supports Linear and 1x1 Conv2d, not {type(base).__name__}")
        self.rank = rank
        # alpha 0 means "alpha = rank" in every loader people use; store what the file will say.
        self.alpha_value = float(alpha) if alpha else float(rank)
        self.register_buffer("alpha", torch.tensor(self.alpha_value), persistent=False)
        self.scale = self.alpha_value / rank
        self.multiplier = 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        # not a submodule: the base belongs to the model, not to the adapter's state dict
        self.__dict__["base"] = base
        self._base_forward = None

    def apply_to(self) -> None:
        if self._base_forward is None:
            self._base_forward = self.base.forward
            self.base.forward = self.forward

    def restore(self) -> None:
        if self._base_forward is not None:
            self.base.forward = self._base_forward
            self._base_forward = None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self._base_forward(x, *args, **kwargs)
        lx = self.lora_down(self.dropout(x.to(self.lora_down.weight.dtype)))
        return out + (self.lora_up(lx) * (self.scale * self.multiplier)).to(out.dtype)

    # -- community file format ------------------------------------------------------------------------
    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.name}.lora_down.weight": self.lora_down.weight.detach(),
                f"{self.name}.lora_up.weight": self.lora_up.weight.detach(),
                f"{self.name}.alpha": torch.tensor(self.alpha_value)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_down.weight.copy_(tensors[f"{self.name}.lora_down.weight"])
            self.lora_up.weight.copy_(tensors[f"{self.name}.lora_up.weight"])

    def expected_keys(self) -> list[str]:
        return [f"{self.name}.lora_down.weight", f"{self.name}.lora_up.weight", f"{self.name}.alpha"]


class AdapterNetwork(nn.Module):
    """All adapter modules of one run, keyed by their community name."""

    def __init__(self, modules: dict[str, nn.Module], parts: dict[str, str], algorithm: str,
                 rank: int, alpha: float):
        super().__init__()
        self.adapters = nn.ModuleDict(modules)
        self.parts = parts  # name -> "unet" / "te1" / …
        self.algorithm = algorithm
        self.rank = rank
        self.alpha = alpha

    def apply_to(self) -> None:
        for m in self.adapters.values():
            m.apply_to()

    def restore(self) -> None:
        for m in self.adapters.values():
            m.restore()

    def set_multiplier(self, value: float) -> None:
        for m in self.adapters.values():
            m.multiplier = value

    def param_groups(self, lr: float, text_encoder_lr: float) -> list[dict]:
        groups: dict[str, list] = {}
        for name, m in self.adapters.items():
            part = "unet" if self.parts[name] == "unet" else "te"
            groups.setdefault(part, []).extend(p for p in m.parameters() if p.requires_grad)
        out = []
        if groups.get("unet"):
            out.append({"params": groups["unet"], "lr": lr, "name": "unet"})
        if groups.get("te"):
            out.append({"params": groups["te"], "lr": text_encoder_lr or lr, "name": "text_encoder"})
        return out

    def export_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        sd = {}
        for m in self.adapters.values():
            for k, v in m.export_tensors().items():
                v = v.detach().to("cpu")
                sd[k] = v.to(dtype).contiguous() if dtype is not None and v.is_floating_point() else v.contiguous()
        return sd

    def load_export_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        expected = {k for m in self.adapters.values() for k in m.expected_keys()}
        if strict:
            missing = sorted(k for k in expected if k not in sd and not k.endswith(".alpha"))
            unexpected = sorted(k for k in sd if k not in expected)
            if missing or unexpected:
                raise ValueError(f"adapter file does not match this model: {len(missing)} missing keys "
                                 f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        for name, m in self.adapters.items():
            alpha_key = f"{name}.alpha"
            if alpha_key in sd and abs(float(sd[alpha_key]) - m.alpha_value) > 1e-6:
                raise ValueError(f"{alpha_key}: file has alpha {float(sd[alpha_key])}, network {m.alpha_value}")
            m.load_tensors(sd)


def build_network(targets: list[AdapterTarget], algorithm: str, rank: int, alpha: float,
                  dropout: float = 0.0) -> AdapterNetwork:
    if algorithm != "lora":
        raise ValueError(f"unknown adapter algorithm {algorithm!r}")
    modules, parts = {}, {}
    for t in targets:
        if t.name in modules:
            raise ValueError(f"two layers map to the same key {t.name}")
        modules[t.name] = LoRAModule(t.name, t.module, rank, alpha, dropout)
        parts[t.name] = t.part
    if not modules:
        raise ValueError("no layer matched the adapter's target list")
    return AdapterNetwork(modules, parts, algorithm, rank, alpha)
