"""Layer streaming for inference: a model part whose weights do not fit the device (a large text encoder while
captions are cached) visits it block by block, the next block copied while the current one runs."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from core.block_swap import BlockSwapper

__all__ = ["stream_layers"]


@contextlib.contextmanager
def stream_layers(blocks: Iterable[nn.Module], device: torch.device | str, *, prefetch: int = 1,
                  simulate: bool | None = None, pin_memory: bool = True) -> Iterator[BlockSwapper]:
    """Inference only: every block of ``blocks`` stays in host memory and visits ``device`` for its forward
    (the next one is copied meanwhile).  The rest of the model (embeddings, final norm) must be on ``device``;
    run the model under ``torch.no_grad()``.  On exit the blocks' weights are host tensors again.

        with stream_layers(encoder.layers, "cuda"), torch.no_grad():
            hidden = encoder(ids).last_hidden_state
    """
    blocks = list(blocks)
    swapper = BlockSwapper(blocks, len(blocks), device, prefetch=prefetch, simulate=simulate,
                           pin_memory=pin_memory, keep_last_resident=False, prefetch_trigger=None).attach()
    try:
        yield swapper
    finally:
        swapper.detach(to="cpu")
