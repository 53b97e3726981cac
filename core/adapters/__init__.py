"""Adapter algorithms.  Each one is a small module class with the same API (apply_to/restore, forward,
export_tensors, load_tensors, expected_keys), built from a list of ``AdapterTarget`` that the family plug-in
supplies; nothing here knows about families.

LoRA / LoCon (``lora``), LoHa (``loha``), LoKr (``lokr``), (IA)³ (``ia3``), Diag-OFT and BOFT (``oft``),
GLoRA (``glora``), LyCORIS full (``full``); DoRA is an option of LoRA, LoCon, LoHa and LoKr.  Files use kohya
key names and LyCORIS tensor suffixes."""
from core.adapters.base import AdapterModule
from core.adapters.lora import LoConModule, LoRAModule
from core.adapters.network import (ALGORITHMS, RANKED, AdapterNetwork, AdapterOptions, build_network,
                                   network_args, network_module)

__all__ = ["AdapterModule", "LoRAModule", "LoConModule", "AdapterNetwork", "AdapterOptions", "ALGORITHMS",
           "RANKED", "build_network", "network_args", "network_module"]
