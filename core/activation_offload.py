"""Activation offload: the tensors autograd saves for backward wait in (pinned) host memory during a training
step, and come back when backward needs them.  Weights of swapped blocks (core.block_swap) are kept as
references, never copied."""
from __future__ import annotations

from typing import Any

import torch

from core.block_swap import rebuild_swapped_weight, swapped_weight_ref

__all__ = ["offload_activations"]


class _OffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    keeps_swapped_references = True  # core.block_swap then adds no hooks of its own inside swapped blocks

    def __init__(self, pin_memory: bool, min_bytes: int, simulate: bool):
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.min_bytes = min_bytes
        self.simulate = simulate
        self.offloaded = 0  # tensors moved to host memory (tests)
        super().__init__(self.pack, self.unpack)

    def pack(self, t: torch.Tensor) -> Any:
        swapped = swapped_weight_ref(t)
        if swapped is not None:  # a swapped block's weight: a reference, never a copy
            return ("ref", *swapped)
        if (type(t) is not torch.Tensor or t.layout != torch.strided or t.requires_grad and t.is_leaf
                or t.numel() * t.element_size() < self.min_bytes or (t.device.type == "cpu" and not self.simulate)):
            return ("keep", t)
        pinned = self.pin_memory and t.is_cuda
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pinned)
        # into pinned memory the copy queues on the compute stream: the host reads ``host`` never, and the copy
        # back in ``unpack`` queues behind it, so nothing needs to wait
        host.copy_(t, non_blocking=pinned)
        self.offloaded += 1
        return ("host", host, t.device)

    def unpack(self, packed: Any) -> torch.Tensor:
        kind = packed[0]
        if kind == "ref":
            return rebuild_swapped_weight(packed[1], packed[2])
        if kind == "keep":
            return packed[1]
        host, device = packed[1], packed[2]
        return host.to(device, non_blocking=self.pin_memory) if device.type != "cpu" else host.clone()


def offload_activations(pin_memory: bool = True, min_bytes: int = 1 << 20, simulate: bool = False) -> _OffloadHooks:
    """Context manager for a training step: tensors autograd saves for backward go to (pinned) host memory
    and come back when backward needs them (``torch.autograd.graph.save_on_cpu`` plus: small tensors
    (< ``min_bytes``) and trainable parameters stay, and swapped blocks' weights are kept as references).

    When it pays: with gradient checkpointing (the usual case) it moves exactly the tensors the checkpoint
    keeps - each checkpointed block's inputs (non-reentrant checkpoint saves them through these hooks; inside a
    block nothing is saved) - plus what the non-block layers save (embedders, final layer, loss).  That is about
    ``n_blocks x batch x tokens x width x 2 bytes`` (FLUX at 1024 px, batch 1: 57 blocks x 4608 x 3072 x 2 B
    = 1.6 GB; SDXL much less), copied out in the forward and back in the backward, one block at a time - the
    cost is two host transfers of that size per step (queued on the compute stream without a host wait, but
    they occupy it).
    Use it when VRAM is still short after checkpointing, block swapping and 8-bit optimizer state; it never
    pays on a small model or a small batch.  WITHOUT checkpointing every saved activation moves (many GB at
    high resolution): it fits runs that otherwise would not, at a large speed cost.  ``simulate``: copy CPU
    tensors too (tests)."""
    return _OffloadHooks(pin_memory, min_bytes, simulate)
