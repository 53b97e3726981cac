"""Orthogonal fine-tuning (LyCORIS ``diag-oft`` and ``boft``): W' = R·W with R orthogonal, built from
skew-symmetric blocks by the Cayley transform R = (I + Q)(I − Q)⁻¹, Q = B − Bᵀ.  R starts as I (B = 0).

* Diag-OFT: R is block-diagonal over the output channels; ``oft_blocks`` (blocks, size, size), the block size
  is the rank setting (rounded to a divisor of the layer's width).
* BOFT: a butterfly of ``m`` block-diagonal stages; ``oft_blocks`` (m, blocks, size, size).

``rescale`` (out, 1[, 1, 1]) optionally scales the output rows after the rotation.  ``alpha`` is OFT's norm
constraint on Q; 0 means none (what is written here — LyCORIS and ComfyUI read the constraint differently).
ComfyUI applies ``rescale`` for BOFT but not for Diag-OFT.
"""
from __future__ import annotations

import torch
from torch import nn

from core.adapters.base import AdapterModule, factorization, power2factorization


def cayley(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=torch.float32)
    q = blocks.float() - blocks.float().transpose(-1, -2)
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    return (eye + q) @ torch.linalg.inv(eye - q)


class _OFTBase(AdapterModule):
    def __init__(self, name: str, base: nn.Module, *, rescale: bool = False, module_dropout: float = 0.0):
        super().__init__(name, base, module_dropout=module_dropout)
        self.constraint = 0.0
        self.alpha_value = 0.0
        self.rescaled = bool(rescale)
        if rescale:
            self.rescale = nn.Parameter(torch.empty(self.out_dim, *[1] * (len(self.shape) - 1)))
            self.init_params("ones", "rescale")

    def rotate(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_delta(self) -> torch.Tensor:
        w = self.base_weight().float()
        rotated = self.rotate(w)
        if self.rescaled:
            rotated = rotated * self.rescale
        return rotated - w

    def param_tensors(self) -> dict[str, torch.Tensor]:
        out = {"oft_blocks": self.oft_blocks}
        if self.rescaled:
            out["rescale"] = self.rescale
        return out

    file_tensors = param_tensors


class DiagOFTModule(_OFTBase):
    algo = "diag-oft"

    def __init__(self, name: str, base: nn.Module, rank: int, *_, rescale: bool = False,
                 module_dropout: float = 0.0, **__):
        super().__init__(name, base, rescale=rescale, module_dropout=module_dropout)
        self.block_size, self.block_num = factorization(self.out_dim, rank)
        self.oft_blocks = nn.Parameter(torch.empty(self.block_num, self.block_size, self.block_size))
        self.init_params("zeros", "oft_blocks")

    def rotate(self, w: torch.Tensor) -> torch.Tensor:
        r = cayley(self.oft_blocks, self.constraint)
        rest = w.shape[1:]
        return torch.einsum("k n m, k n ... -> k m ...", r, w.reshape(self.block_num, self.block_size, *rest)
                            ).reshape(w.shape)


class BOFTModule(_OFTBase):
    algo = "boft"

    def __init__(self, name: str, base: nn.Module, rank: int, *_, rescale: bool = False,
                 module_dropout: float = 0.0, **__):
        super().__init__(name, base, rescale=rescale, module_dropout=module_dropout)
        b, n = power2factorization(self.out_dim, rank)
        if not b:
            raise ValueError(f"{name}: BOFT cannot split {self.out_dim} channels with block size ≤ {rank} "
                             f"(it needs an even block size times a power of two); raise network.rank")
        self.block_size, self.block_num = b, n
        self.boft_m = bin(n - 1).count("1") + 1
        self.oft_blocks = nn.Parameter(torch.empty(self.boft_m, n, b, b))
        self.init_params("zeros", "oft_blocks")

    def rotate(self, w: torch.Tensor) -> torch.Tensor:
        r = cayley(self.oft_blocks, self.constraint)
        b = self.block_size
        half = b // 2
        inp = w
        for i in range(self.boft_m):
            k = 2 ** i * half
            inp = inp.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            inp = torch.einsum("b i j, b j ... -> b i ...", r[i], inp)
            inp = inp.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
        return inp
