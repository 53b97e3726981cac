"""Adapter algorithms.  Each one is a small module class with the same API, built from a list of
``AdapterTarget`` that the family plug-in supplies; nothing here knows about families."""
from core.adapters.lora import LoRAModule, AdapterNetwork, build_network

__all__ = ["LoRAModule", "AdapterNetwork", "build_network"]
