"""Speed options applied to the model being trained (the plan decides; the user can override)."""
from __future__ import annotations

import torch
from torch import nn


def host_values(values, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Numbers held by the host (a list, nested lists) as a tensor on ``device``, without waiting for the device:
    for a GPU they are put in pinned memory and copied asynchronously (from pageable memory the copy may have to
    wait for the device's queue)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def compile_model(model: nn.Module, block_names: tuple[str, ...], how: str, mode: str | None = None) -> int:
    """Compile the repeated blocks ("regional": seconds to compile, most of the speed) or the whole model
    ("full").  Returns how many modules were compiled.  Adapters must already be applied: their forwards
    are traced into the compiled blocks."""
    if how == "off":
        return 0
    if how == "full":
        model.compile(mode=mode)
        return 1
    count = 0
    for module in model.modules():
        if type(module).__name__ in block_names:
            module.compile(mode=mode)
            count += 1
    if not count:
        raise ValueError(f"no block of types {block_names} found to compile")
    return count
