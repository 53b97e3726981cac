"""LoKr (LyCORIS): ΔW = kron(w1, w2) · alpha / rank, the Kronecker product of a small matrix and a larger one.

Each side's shape comes from factorising the layer's dimensions (``factor``; -1: as square as possible):
out = a·b, in = c·d, w1 is (a, c) and w2 (b, d[, k, k]).  w2 is low-rank (``lokr_w2_a`` @ ``lokr_w2_b``, or
Tucker ``lokr_t2`` on a k×k convolution) unless the rank is at least half its size or ``full_matrix`` is set;
w1 is low-rank only with ``decompose_both``.  With both sides full the scale is 1 (alpha is written as the
rank, which every loader reads as scale 1).  The choices follow LyCORIS exactly, so files load everywhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.adapters.base import AdapterModule, factorization, rank_scale


class LoKrModule(AdapterModule):
    algo = "lokr"

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, *,
                 factor: int = -1, decompose_both: bool = False, full_matrix: bool = False,
                 use_tucker: bool = False, use_scalar: bool = False, rs_lora: bool = False,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, dora: bool = False,
                 dora_on_output: bool = False, **_):
        super().__init__(name, base, dropout=dropout, rank_dropout=rank_dropout, module_dropout=module_dropout,
                         dora=dora, dora_on_output=dora_on_output)
        factor = int(factor)
        self.rank = rank
        in_m, in_n = factorization(self.in_dim, factor)
        out_l, out_k = factorization(self.out_dim, factor)
        k = self.kernel if self.is_conv else ()
        self.tucker = bool(use_tucker and self.is_conv and any(s != 1 for s in k))

        self.use_w1 = not (decompose_both and rank < max(out_l, in_m) / 2 and not full_matrix)
        if self.use_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_l, rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, in_m))

        self.use_w2 = full_matrix or rank >= max(out_k, in_n) / 2
        if self.use_w2:
            self.tucker = False
            self.lokr_w2 = nn.Parameter(torch.empty(out_k, in_n, *k))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(torch.empty(rank, rank, *k))
            self.lokr_w2_a = nn.Parameter(torch.empty(rank, out_k))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, in_n))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, rank))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, in_n * math.prod(k)))

        if self.use_w1 and self.use_w2:
            # nothing is low-rank: scale 1, and the file says alpha = rank (ComfyUI reads no rank: scale 1)
            self.scale, self.alpha_value = 1.0, float(rank)
        else:
            self.scale, self.alpha_value = rank_scale(alpha, rank, rs_lora)

        # LyCORIS' initialisation: the w2 side starts at zero (or the scalar does)
        gated = "kaiming" if use_scalar else "zeros"
        if self.use_w2:
            self.init_params(gated, "lokr_w2")
        else:
            self.init_params("kaiming", "lokr_w2_a", *(["lokr_t2"] if self.tucker else []))
            self.init_params(gated, "lokr_w2_b")
        self.init_params("kaiming", *(["lokr_w1"] if self.use_w1 else ["lokr_w1_a", "lokr_w1_b"]))
        if use_scalar:
            self.scalar = nn.Parameter(torch.empty(()))
            self.init_params("zeros", "scalar")

    def w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.use_w1 else self.lokr_w1_a @ self.lokr_w1_b

    def w2(self) -> torch.Tensor:
        if self.use_w2:
            return self.lokr_w2
        if self.tucker:
            return torch.einsum("i j ..., j r, i p -> p r ...", self.lokr_t2, self.lokr_w2_b, self.lokr_w2_a)
        return self.lokr_w2_a @ self.lokr_w2_b

    def bypass_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """kron(w1, w2) applied to ``x`` without building it: with x's features as a (c, d) grid,
        kron(w1, w2) x = w1 · X · w2ᵀ.  Two small matmuls instead of a ΔW as large as the layer (built, kept for
        backward and multiplied by every token); the side with the smaller intermediate goes first."""
        if self.is_conv:
            return None
        w1, w2 = self.w1(), self.w2()
        (a, c), (b, d) = w1.shape, w2.shape
        # the same draws in the same order as the rebuild path (row dropout, then input dropout)
        keep = None
        if self.training and self.rank_dropout:
            keep = (torch.rand(self.out_dim, device=w2.device) > self.rank_dropout).to(w2.dtype)
        x = x.to(w2.dtype)
        if self.dropout_p and self.training:
            x = F.dropout(x, self.dropout_p)
        grid = x.reshape(*x.shape[:-1], c, d)
        y = w1 @ (grid @ w2.T) if c * b <= a * d else (w1 @ grid) @ w2.T
        y = y.reshape(*x.shape[:-1], a * b) * (self.scale * self.multiplier)
        if keep is not None:
            y = y * (keep / (1.0 - self.rank_dropout))
        return y * self.scalar if self.has_scalar else y

    def weight_delta(self) -> torch.Tensor:
        w1, w2 = self.w1(), self.w2()
        for _ in range(w2.dim() - w1.dim()):
            w1 = w1.unsqueeze(-1)
        dw = self.row_dropout(torch.kron(w1, w2.contiguous()).reshape(self.shape) * self.scale)
        return dw * self.scalar if self.has_scalar else dw

    def param_tensors(self) -> dict[str, torch.Tensor]:
        names = (["lokr_w1"] if self.use_w1 else ["lokr_w1_a", "lokr_w1_b"]) + \
            (["lokr_w2"] if self.use_w2 else ["lokr_w2_a", "lokr_w2_b"] + (["lokr_t2"] if self.tucker else []))
        return {n: getattr(self, n) for n in names}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        out = self.param_tensors()
        if self.has_scalar:
            first = "lokr_w1" if self.use_w1 else "lokr_w1_a"
            out[first] = out[first] * self.scalar
        return out
