"""(IA)³ (LyCORIS ``ia3``): learned per-output-channel scales, W' = W · (1 + w).  Tiny files; it needs a much
higher learning rate than LoRA (LyCORIS suggests 5e-3 … 1e-2).

Keys: ``weight`` ((out,) for Linear, (1, out, 1, 1) for Conv2d — LyCORIS' layout) and ``on_input`` (0-d integer,
0: the scale is on the output channels).  A1111 and LyCORIS read these; ComfyUI does not load (IA)³.
"""
from __future__ import annotations

import torch
from torch import nn

from core.adapters.base import AdapterModule


class IA3Module(AdapterModule):
    algo = "ia3"

    def __init__(self, name: str, base: nn.Module, *_, module_dropout: float = 0.0, **__):
        super().__init__(name, base, module_dropout=module_dropout)
        shape = (1, self.out_dim, 1, 1) if self.is_conv else (self.out_dim,)
        self.weight = nn.Parameter(torch.empty(shape))
        self.init_params("zeros", "weight")
        self.register_buffer("on_input", torch.tensor(0), persistent=False)

    def weight_delta(self) -> torch.Tensor:
        w = self.base_weight().to(self.weight.dtype)
        return w * self.weight.reshape(self.out_dim, *[1] * (w.dim() - 1))

    def param_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "on_input": self.on_input}

    file_tensors = param_tensors
