"""LyCORIS "full": a full-rank, trainable weight difference (plus bias difference), W' = W + diff.

Files are as large as the adapted layers.  Keys: ``diff`` (the weight's shape) and ``diff_b`` (where the layer
has a bias); no alpha.  ComfyUI, Forge and A1111 load them.
"""
from __future__ import annotations

import torch
from torch import nn

from core.adapters.base import AdapterModule


class FullModule(AdapterModule):
    algo = "full"

    def __init__(self, name: str, base: nn.Module, *_, module_dropout: float = 0.0, **__):
        super().__init__(name, base, module_dropout=module_dropout)
        self.diff = nn.Parameter(torch.empty(self.shape))
        self.diff_b = nn.Parameter(torch.empty(self.out_dim)) if base.bias is not None else None
        self.init_params("zeros", "diff", *(["diff_b"] if self.diff_b is not None else []))

    def weight_delta(self) -> torch.Tensor:
        return self.diff

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        m = self.multiplier
        bias = None if self.diff_b is None else self.diff_b * m if m != 1 else self.diff_b
        weight = self.diff * m if m != 1 else self.diff
        return self.op(x.to(weight.dtype), weight, bias, **self.kw)

    def param_tensors(self) -> dict[str, torch.Tensor]:
        out = {"diff": self.diff}
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b
        return out

    file_tensors = param_tensors
