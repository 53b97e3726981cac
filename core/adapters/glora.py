"""GLoRA (LyCORIS): ΔW = (W·a1·a2 + b1·b2) · alpha / rank — a low-rank transform of the input side of the
frozen weight plus a LoRA term.

Keys (LyCORIS / ComfyUI layout): ``a1.weight`` (in, r[, 1, 1]), ``a2.weight`` (r, in[, 1, 1]),
``b1.weight`` (out, r[, 1, 1]), ``b2.weight`` (r, in[, k, k]), ``alpha``.
"""
from __future__ import annotations


import torch
from torch import nn

from core.adapters.base import AdapterModule, rank_scale


class GLoRAModule(AdapterModule):
    algo = "glora"

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *,
                 use_scalar: bool = False, rs_lora: bool = False, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, **_):
        super().__init__(name, base, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout)
        if self.is_conv and base.groups != 1:
            raise ValueError(f"{name}: grouped convolutions are not supported")
        self.rank = rank
        one = (1, 1) if self.is_conv else ()
        k = self.kernel if self.is_conv else ()
        self.a1 = nn.Parameter(torch.empty(self.in_dim, rank, *one))
        self.a2 = nn.Parameter(torch.empty(rank, self.in_dim, *one))
        self.b1 = nn.Parameter(torch.empty(self.out_dim, rank, *one))
        self.b2 = nn.Parameter(torch.empty(rank, self.in_dim, *k))
        self.scale, self.alpha_value = rank_scale(alpha, rank, rs_lora)
        self.init_params("kaiming", "a1", "b1")
        if use_scalar:
            self.init_params("kaiming", "a2", "b2")
            self.scalar = nn.Parameter(torch.empty(()))
            self.init_params("zeros", "scalar")
        else:
            self.init_params("zeros", "a2", "b2")

    def weight_delta(self) -> torch.Tensor:
        w = self.base_weight().to(self.a1.dtype)
        wa = torch.einsum("o i ..., i r -> o r ...", w, self.a1.reshape(self.in_dim, self.rank))
        wa = torch.einsum("o r ..., r j -> o j ...", wa, self.a2.reshape(self.rank, self.in_dim))
        wb = (self.b1.reshape(self.out_dim, self.rank) @ self.b2.reshape(self.rank, -1)).reshape(self.shape)
        if self.has_scalar:
            # LyCORIS folds the scalar into a2 and b2 in the file
            wa, wb = wa * self.scalar, wb * self.scalar
        return self.row_dropout((wa + wb) * self.scale)

    def param_tensors(self) -> dict[str, torch.Tensor]:
        return {"a1.weight": self.a1, "a2.weight": self.a2, "b1.weight": self.b1, "b2.weight": self.b2}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out = self.param_tensors()
        if self.has_scalar:
            out["a2.weight"] = self.a2 * self.scalar
            out["b2.weight"] = self.b2 * self.scalar
        return out
