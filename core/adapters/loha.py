"""LoHa (LyCORIS): ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank — a Hadamard product of two low-rank
matrices, rank up to rank² for the parameters of two LoRAs.

Keys: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·k·k), ``hada_w2_a``, ``hada_w2_b``, ``alpha``; with Tucker on
a k×k convolution ``hada_t1``/``hada_t2`` (r, r, k, k) and ``hada_w?_a`` (r, out), ``hada_w?_b`` (r, in).
"""
from __future__ import annotations

import torch
from torch import nn

from core.adapters.base import AdapterModule, rank_scale


class _HadaWeight(torch.autograd.Function):
    """(w1a @ w1b) ⊙ (w2a @ w2b) · scale without keeping the two full-size products for the backward pass
    (they are recomputed): LoHa's ΔW is as large as the layer's weight."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scale: float):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scale = scale
        return (w1a @ w1b) * (w2a @ w2b) * scale

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scale
        g1 = grad * (w2a @ w2b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2, None


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """(out, in, k, k) from t (r, r, k, k), wa (r, out), wb (r, in) — LyCORIS / ComfyUI layout."""
    return torch.einsum("i j ..., j r, i p -> p r ...", t, wb, wa)


class LoHaModule(AdapterModule):
    algo = "loha"

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *,
                 use_tucker: bool = False, use_scalar: bool = False, rs_lora: bool = False,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, dora: bool = False,
                 dora_on_output: bool = False, **_):
        super().__init__(name, base, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                         dora=dora, dora_on_output=dora_on_output)
        self.rank = rank
        self.tucker = bool(use_tucker and self.is_conv and any(k != 1 for k in self.kernel))
        out_dim, in_dim = self.out_dim, self.in_dim
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(rank, rank, *self.kernel))
            self.hada_t2 = nn.Parameter(torch.empty(rank, rank, *self.kernel))
            self.hada_w1_a = nn.Parameter(torch.empty(rank, out_dim))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim))
            self.hada_w2_a = nn.Parameter(torch.empty(rank, out_dim))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim))
            self.init_params("normal", "hada_t1", "hada_t2", std=0.1)
        else:
            flat_in = in_dim * (self.kernel[0] * self.kernel[1] if self.is_conv else 1)
            self.hada_w1_a = nn.Parameter(torch.empty(out_dim, rank))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, flat_in))
            self.hada_w2_a = nn.Parameter(torch.empty(out_dim, rank))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, flat_in))
        self.scale, self.alpha_value = rank_scale(alpha, rank, rs_lora)
        # LyCORIS' initialisation: the second product starts at zero (or the scalar does)
        self.init_params("normal", "hada_w1_b", "hada_w2_b", std=1.0)
        self.init_params("normal", "hada_w1_a", std=0.1)
        if use_scalar:
            self.init_params("normal", "hada_w2_a", std=0.1)
            self.scalar = nn.Parameter(torch.empty(()))
            self.init_params("zeros", "scalar")
        else:
            self.init_params("zeros", "hada_w2_a")

    def weight_delta(self) -> torch.Tensor:
        if self.tucker:
            dw = _tucker(self.hada_t1, self.hada_w1_a, self.hada_w1_b) * \
                _tucker(self.hada_t2, self.hada_w2_a, self.hada_w2_b) * self.scale
        else:
            dw = _HadaWeight.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale)
        dw = self.row_dropout(dw.reshape(self.shape))
        return dw * self.scalar if self.has_scalar else dw

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out = self.param_tensors()
        if self.has_scalar:
            out["hada_w1_a"] = self.hada_w1_a * self.scalar
        return out

    def param_tensors(self) -> dict[str, torch.Tensor]:
        out = {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b,
               "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}
        if self.tucker:
            out["hada_t1"] = self.hada_t1
            out["hada_t2"] = self.hada_t2
        return out
