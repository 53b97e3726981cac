"""Model-family plug-ins.  ``get(id)`` returns the plug-in the user chose; nothing here guesses."""
from __future__ import annotations

import functools

from architectures.base import TRAITS, AdapterTarget, Architecture, Components, ModelLoadError


@functools.cache
def registry() -> dict[str, type[Architecture]]:
    """Every family, id → class, in the order the UI lists them."""
    from architectures.flux1 import Flux1Dev, Flux1Schnell
    from architectures.flux2 import FLUX2_CLASSES
    from architectures.flux3 import FLUX3_CLASSES
    from architectures.sd3 import SD3, SD35Large, SD35Medium
    from architectures.sd15 import SD15
    from architectures.sdxl import SDXL
    return {cls.id: cls for cls in (SD15, SDXL, SD3, SD35Medium, SD35Large, Flux1Dev, Flux1Schnell,
                                     *FLUX2_CLASSES, *FLUX3_CLASSES)}


def get(arch_id: str) -> Architecture:
    families = registry()
    if arch_id not in families:
        raise ValueError(f"model.architecture: unknown architecture {arch_id!r} (available: {', '.join(families)})")
    return families[arch_id]()


def available() -> dict[str, str]:
    """id → the UI's label, for every family."""
    return {k: v.label for k, v in registry().items()}


def with_trait(trait: str) -> list[str]:
    """The ids of the families that declare ``trait`` (a key of ``architectures.base.TRAITS``)."""
    if trait not in TRAITS:
        raise ValueError(f"unknown family trait {trait!r} (known: {', '.join(TRAITS)})")
    return [k for k, v in registry().items() if trait in v.traits]


__all__ = ["AdapterTarget", "Architecture", "Components", "ModelLoadError", "TRAITS", "available", "get", "registry",
           "with_trait"]
