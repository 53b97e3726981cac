"""Model-family plug-ins.  ``get(id)`` returns the plug-in the user chose; nothing here guesses."""
from __future__ import annotations

from architectures.base import AdapterTarget, Architecture, Components, ModelLoadError


def _registry() -> dict[str, type[Architecture]]:
    from architectures.flux1 import Flux1Dev, Flux1Schnell
    from architectures.flux2 import FLUX2_CLASSES
    from architectures.sd3 import SD3, SD35Large, SD35Medium
    from architectures.sd15 import SD15
    from architectures.sdxl import SDXL
    return {cls.id: cls for cls in (SD15, SDXL, SD3, SD35Medium, SD35Large, Flux1Dev, Flux1Schnell,
                                     *FLUX2_CLASSES)}


def get(arch_id: str) -> Architecture:
    registry = _registry()
    if arch_id not in registry:
        raise ValueError(f"model.architecture: unknown architecture {arch_id!r} (available: {', '.join(registry)})")
    return registry[arch_id]()


def available() -> dict[str, str]:
    return {k: v.label for k, v in _registry().items()}


__all__ = ["AdapterTarget", "Architecture", "Components", "ModelLoadError", "get", "available"]
