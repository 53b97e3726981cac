"""LoRA (kohya) and LoCon (LyCORIS): the base layer stays in place and its forward gains
``up(down(x)) * alpha / rank``.

LoRA adapts Linear layers and 1x1 convolutions; LoCon also adapts k×k convolutions (``down`` is a k×k conv
with the layer's stride and padding, ``up`` a 1x1 conv), optionally Tucker-decomposed (``down`` 1x1,
``lora_mid`` k×k, ``up`` 1x1).  Keys: ``lora_down.weight``, ``lora_up.weight``, ``lora_mid.weight``,
``alpha`` (+ ``dora_scale``) — the format every loader reads.
"""
from __future__ import annotations


import torch
from torch import nn

from core.adapters.base import AdapterModule, rank_scale


class LoRAModule(AdapterModule):
    algo = "lora"
    plus_param_names = ("lora_up",)

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *,
                 allow_conv: bool = False, use_tucker: bool = False, use_scalar: bool = False,
                 rs_lora: bool = False, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 dora: bool = False, dora_on_output: bool = False):
        super().__init__(name, base, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                         dora=dora, dora_on_output=dora_on_output)
        self.tucker = False
        if self.is_conv:
            if base.groups != 1:
                raise ValueError(f"{name}: grouped convolutions are not supported")
            k = base.kernel_size
            if k != (1, 1) and not allow_conv:
                raise ValueError(f"{name}: LoRA on {k} convolutions needs LoCon")
            geometry = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, bias=False)
            if k != (1, 1) and use_tucker:
                self.tucker = True
                self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
                self.lora_mid = nn.Conv2d(rank, rank, k, **geometry)
            else:
                self.lora_down = nn.Conv2d(base.in_channels, rank, k, **geometry)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        self.rank = rank
        # alpha 0 means "alpha = rank" in every loader people use; store what the file will say.
        self.scale, self.alpha_value = rank_scale(alpha, rank, rs_lora)
        self.register_buffer("alpha", torch.tensor(self.alpha_value), persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init_params("kaiming", "lora_down.weight", *(["lora_mid.weight"] if self.tucker else []))
        if use_scalar:
            # LyCORIS' scalar: the up side starts random and a learned scalar (0 at the start) gates it
            self.init_params("kaiming", "lora_up.weight")
            self.scalar = nn.Parameter(torch.empty(()))
            self.init_params("zeros", "scalar")
        else:
            self.init_params("zeros", "lora_up.weight")

    def bypass_delta(self, x: torch.Tensor) -> torch.Tensor:
        lx = self.lora_down(self.dropout(x.to(self.lora_down.weight.dtype)))
        if self.tucker:
            lx = self.lora_mid(lx)
        scale = self.scale * self.multiplier
        if self.rank_dropout and self.training:
            # kohya: a per-sample mask over the rank, the survivors rescaled
            mask = (torch.rand((lx.size(0), self.rank), device=lx.device) > self.rank_dropout).to(lx.dtype)
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask
            scale = scale / (1.0 - self.rank_dropout)
        out = self.lora_up(lx) * scale
        return out * self.scalar if self.has_scalar else out

    def weight_delta(self) -> torch.Tensor:
        up = self.lora_up.weight.reshape(self.lora_up.weight.shape[0], self.rank)
        if self.rank_dropout and self.training:
            keep = (torch.rand(self.rank, device=up.device) > self.rank_dropout).to(up.dtype)
            up = up * (keep / (1.0 - self.rank_dropout))
        if self.tucker:
            down = self.lora_down.weight.reshape(self.rank, -1)
            dw = torch.einsum("m n ..., i m, n j -> i j ...", self.lora_mid.weight, up, down)
        else:
            dw = (up @ self.lora_down.weight.reshape(self.rank, -1)).reshape(self.shape)
        return dw * (self.scale * self._scalar())

    # -- community file format -------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, torch.Tensor]:
        out = {"lora_down.weight": self.lora_down.weight,
               "lora_up.weight": self.lora_up.weight * self.scalar if self.has_scalar else self.lora_up.weight}
        if self.tucker:
            out["lora_mid.weight"] = self.lora_mid.weight
        return out

    def param_tensors(self) -> dict[str, torch.Tensor]:
        out = {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight}
        if self.tucker:
            out["lora_mid.weight"] = self.lora_mid.weight
        return out


class LoConModule(LoRAModule):
    """LoRA that also adapts k×k convolutions (LyCORIS ``locon``); same keys."""
    algo = "locon"

    def __init__(self, *args, **kwargs):
        kwargs["allow_conv"] = True
        super().__init__(*args, **kwargs)
