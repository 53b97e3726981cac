"""Speed options applied to the model being trained (the plan decides; the user can override)."""
from __future__ import annotations

from torch import nn


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
