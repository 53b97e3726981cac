"""Quantized frozen base: store the frozen Linear weights of a denoiser or text encoder in 8 or 4 bits.

The adapter still trains in full precision on top ("bypass" mode, QLoRA style): the adapter modules wrap
the quantized layer's forward, y = Wq·x (+ bias) + Δ(x).  Nothing of the base is ever written out (the
adapter file holds adapter tensors only), so a file trained on a quantized base loads on the full model.

API
---
* ``check_quantization(method, *, algorithm, device_type, part)``: raise ``ValueError`` (message names
  the setting and what to choose instead) for combinations that cannot run: full fine-tuning of a
  quantized model, nf4 without CUDA or without bitsandbytes, an unknown method.  Cheap, no imports of
  quanto; call it while validating the plan.
* ``quantize_frozen(module, method, *, keep=(), device=None, min_elements=65536)``: quantize in place,
  returns a ``QuantizeReport`` (layers quantized/kept, bytes before/after, ``summary()`` for the log).
* ``select_layers(module, ...)``: (names that would be quantized, names kept) without changing anything,
  for the memory estimate.
* ``is_quantized(layer)``, ``dequantized_weight(layer)``, ``dense_weight_shape(layer)``: what code that needs
  the dense weight of a possibly quantized layer uses (the adapters' DoRA norm, OFT, (IA)³, GLoRA).

Methods
-------
* ``qint8`` / ``qfloat8`` (float8 e4m3) / ``qint4``: optimum-quanto, any device.  Per-output-channel
  scales (qint4: groups of up to 128 inputs with a shift).  The weights' dtype at quantization time becomes
  the dtype of the scales and of the layer's output, so cast the model to the run's weight dtype first;
  a quantized weight's dtype cannot be changed afterwards (``.to(dtype)`` raises in quanto), moving it
  between devices is fine.
* ``nf4``: bitsandbytes ``Linear4bit`` (4-bit NormalFloat, double-quantized statistics), NVIDIA GPUs only.

What stays in full precision, and why
-------------------------------------
Only ``nn.Linear`` layers are quantized: convolutions, norms and embeddings keep their dtype (they are a
small share of the weights and the most sensitive).  Of the Linear layers these are kept:

* the layers the caller names in ``keep`` (fnmatch patterns of module names).  Each model family declares
  them (``Architecture.quantize_keep``, ``text_encoder_quantize_keep``): its timestep / guidance / pooled-text
  embedders (tiny, and their output conditions every block — an error there shifts the whole network's
  behaviour per timestep) and the first and last projections (input embedders, the final modulation and
  output projection, CLIP's ``text_projection``: errors there are not averaged out by later layers and land
  directly in the prediction / the conditioning);
* layers smaller than ``min_elements`` weights (default 65536, e.g. 256×256): they save next to nothing;
* in fp16, the model's own ``_keep_in_fp32_modules`` (T5's ``wo``): the T5 code path casts them to fp32,
  which a quantized weight cannot do.

The per-block modulation layers of the DiTs are quantized: they hold about a quarter of a DiT's weights, so
keeping them dense would forfeit much of the saving.

No compiled extensions
----------------------
optimum-quanto compiles C++ / CUDA extensions (``torch.utils.cpp_extension.load``: needs ninja, a C++
compiler and, for CUDA, nvcc and the CUDA toolkit) the first time a kernel needs one: on the CPU to unpack
qint4 weights (≈40 s the first time, cached in site-packages per torch version), on NVIDIA GPUs for its
Marlin fp8 and AWQ int4 kernels (minutes; fails on machines without the CUDA toolkit, i.e. most user
machines).  ``quantize_frozen`` therefore routes quanto to its pure-PyTorch paths (``_quanto_pure_torch``):
int4 unpacking in PyTorch ops and no Marlin/AWQ kernels, so every method runs on a fresh machine with only
the wheels installed.  Those kernels are inference kernels anyway; training needs the backward pass
through the dequantized weight.
"""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

QUANTO_METHODS = ("qfloat8", "qint8", "qint4")
METHODS = QUANTO_METHODS + ("nf4",)
_QUANTO_QTYPES = {"qfloat8": "qfloat8_e4m3fn", "qint8": "qint8", "qint4": "qint4"}

DEFAULT_MIN_ELEMENTS = 65536


class QuantizationError(ValueError):
    """The requested quantization cannot run; the message says why and what to choose instead."""


@dataclass
class QuantizeReport:
    method: str
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)       # Linear layers left in full precision
    bytes_before: int = 0                                # weights of the quantized layers, before
    bytes_after: int = 0                                 # the same layers' storage after (data + scales)

    @property
    def saved_bytes(self) -> int:
        return self.bytes_before - self.bytes_after

    def summary(self) -> str:
        mb = 1024 ** 2
        return (f"{self.method}: {len(self.quantized)} linear layers quantized, "
                f"{self.bytes_before / mb:.1f} MB → {self.bytes_after / mb:.1f} MB "
                f"({self.saved_bytes / mb:.1f} MB saved); {len(self.kept)} linear layers kept in full precision")


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
def check_quantization(method: str, *, algorithm: str | None = None, device_type: str = "cpu",
                       setting: str = "memory.quantize_base") -> None:
    """Raise ``QuantizationError`` when ``method`` cannot be used for this run.  ``method`` is the concrete
    value (not "auto"); "none" always passes."""
    if method in ("none", None, ""):
        return
    if method not in METHODS:
        raise QuantizationError(f"{setting}: unknown quantization {method!r}; choose one of none, "
                                + ", ".join(METHODS))
    from core.full_finetune import FULL_FINETUNE
    if algorithm == FULL_FINETUNE:
        raise QuantizationError(
            f"{setting} = {method} cannot be combined with network.algorithm = {FULL_FINETUNE}: a quantized "
            f"model is frozen and full fine-tuning trains the model's own weights. Set {setting} to none, "
            "or train an adapter (e.g. LoRA) on the quantized model.")
    if method == "nf4":
        if device_type != "cuda" or not torch.cuda.is_available():
            raise QuantizationError(
                f"{setting} = nf4 needs an NVIDIA GPU (bitsandbytes' 4-bit kernels run on CUDA only) and this "
                "run is on the CPU. Choose qint4 (4-bit, optimum-quanto, any device) or qint8 / qfloat8 "
                "(8-bit), or none.")
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # ImportError, or a broken CUDA setup of bitsandbytes
            raise QuantizationError(
                f"{setting} = nf4 needs the bitsandbytes package, which is not usable here ({exc}). Reinstall "
                "with `python3 run.py` on the NVIDIA machine, or choose qint4 (optimum-quanto) instead.") from None
    else:
        try:
            import optimum.quanto  # noqa: F401
        except Exception as exc:
            raise QuantizationError(
                f"{setting} = {method} needs the optimum-quanto package ({exc}); run `python3 run.py` to "
                "install the dependencies, or set it to none.") from None


# ---------------------------------------------------------------------------------------------------
# inspection helpers (used by the adapters)
# ---------------------------------------------------------------------------------------------------
def _is_quanto_tensor(t) -> bool:
    # no import: when quanto was never imported, nothing can be a QTensor (and the common unquantized path
    # stays free of quanto's import time)
    quanto = sys.modules.get("optimum.quanto")
    return quanto is not None and isinstance(t, quanto.QTensor)


def _is_bnb_4bit(t) -> bool:
    return type(t).__name__ == "Params4bit" and hasattr(t, "quant_state")


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight is stored quantized (quanto QTensor or bitsandbytes 4-bit)."""
    w = getattr(layer, "weight", None)
    return w is not None and (_is_bnb_4bit(w) or _is_quanto_tensor(w.data if isinstance(w, nn.Parameter) else w))


def dense_weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """The weight's logical shape (bitsandbytes stores 4-bit weights packed as (n, 1))."""
    w = layer.weight
    if _is_bnb_4bit(w) and w.quant_state is not None:
        return tuple(w.quant_state.shape)
    return tuple(w.shape)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a plain dense tensor, detached (no gradient flows into a frozen base).  For an
    unquantized layer this is ``layer.weight.detach()`` itself (no copy)."""
    w = layer.weight
    if _is_bnb_4bit(w):
        if w.quant_state is None:  # not quantized yet (still on the CPU)
            return w.data.detach()
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(w.data, w.quant_state).detach()
    data = w.data if isinstance(w, nn.Parameter) else w
    if _is_quanto_tensor(data):
        return data.detach().dequantize()
    return w.detach()


def weight_storage_bytes(layer: nn.Module) -> int:
    """Bytes the layer's weight occupies (a quantized weight's data, scales and shifts)."""
    w = layer.weight
    data = w.data if isinstance(w, nn.Parameter) else w
    if _is_bnb_4bit(w):
        n = w.data.numel() * w.data.element_size()
        qs = w.quant_state
        if qs is not None:
            n += qs.absmax.numel() * qs.absmax.element_size()
            if getattr(qs, "state2", None) is not None:
                n += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.code.numel() * 4
        return n
    if _is_quanto_tensor(data):
        return _qtensor_bytes(data)
    return data.numel() * data.element_size()


def _qtensor_bytes(t) -> int:
    total = 0
    names, _ = t.__tensor_flatten__()
    for name in names:
        inner = getattr(t, name)
        if _is_quanto_tensor(inner) or hasattr(inner, "__tensor_flatten__"):
            total += _qtensor_bytes(inner)
        elif isinstance(inner, torch.Tensor):
            total += inner.numel() * inner.element_size()
    return total


# ---------------------------------------------------------------------------------------------------
# quanto without compiled extensions
# ---------------------------------------------------------------------------------------------------
def _unpack_int(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's int2/int4 unpacking in PyTorch ops (its reference implementation, ``quanto::unpack``
    "default"): the values of one byte are stacked along dim 0, lowest bits first."""
    values_per_item = 8 // bits
    parts = []
    for i in range(values_per_item):
        mask = 2 ** (bits * (i + 1)) - 1
        part = packed & mask
        parts.append(part >> (bits * i) if part.device.type != "mps" else part // (2 ** (bits * i)))
    return torch.cat(parts).to(torch.uint8)


class _PureTorchLib:
    """Stands in for a compiled quanto extension: only ``unpack`` (the one kernel quanto's generic paths
    call); anything else quanto could ask for is never selected because ``_extensions`` is emptied."""

    @staticmethod
    def unpack(t: torch.Tensor, bits: int) -> torch.Tensor:
        return _unpack_int(t, bits)


_QUANTO_PATCHED = False
#: the quanto extensions routed to ``_PureTorchLib`` (kept for inspection; quanto's registry is emptied)
PATCHED_EXTENSIONS: list = []


def _quanto_pure_torch() -> None:
    """Keep optimum-quanto (0.2.x) on its pure-PyTorch paths; see the module docstring.  Idempotent."""
    global _QUANTO_PATCHED
    if _QUANTO_PATCHED:
        return
    import optimum.quanto  # noqa: F401  (registers the extensions)
    from optimum.quanto.library.extensions import extension as qext
    registry = getattr(qext, "_extensions", None)
    if isinstance(registry, dict):
        for ext in list(registry.values()):
            if hasattr(ext, "_lib"):
                # the registered torch.library kernels (quanto::unpack on CPU/CUDA/MPS) call ext.lib.unpack
                ext._lib = _PureTorchLib()
                PATCHED_EXTENSIONS.append(ext)
        # is_extension_available() is now False: WeightQBitsTensor/WeightQBytesTensor.create never pick the
        # AWQ (int4) or Marlin (fp8) CUDA kernels, which would need the extension
        registry.clear()
    _QUANTO_PATCHED = True


# ---------------------------------------------------------------------------------------------------
# quantizing
# ---------------------------------------------------------------------------------------------------
def _excluded(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_child(root: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, child)


def _cast_input_to_weight_dtype(module: nn.Module, args):
    """Forward pre-hook of a quantized layer: its kernels need activations in the weight's dtype (quanto's
    CPU int8 kernel fails on a bf16 input with fp32 scales; the output dtype is the weight's)."""
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        dtype = module.weight.dtype
        if args[0].dtype != dtype:
            return (args[0].to(dtype), *args[1:])
    return None


def select_layers(module: nn.Module, *, keep=(), min_elements: int = DEFAULT_MIN_ELEMENTS
                  ) -> tuple[list[str], list[str]]:
    """(names of the Linear layers ``quantize_frozen`` would quantize, names of those it keeps in full
    precision).  Pure: nothing is imported or changed, so the memory estimate can use it on a meta-device
    model.  Only ``nn.Linear`` layers are candidates (convolutions are never quantized)."""
    patterns = tuple(keep)
    keep_fp32 = set(getattr(module, "_keep_in_fp32_modules", None) or ()) | \
        set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    chosen, kept = [], []
    for name, layer in module.named_modules():
        if not name or not isinstance(layer, nn.Linear):
            continue
        w = layer.weight
        if (is_quantized(layer) or _excluded(name, patterns) or w.numel() < min_elements
                or (w.dtype == torch.float16 and name.rsplit(".", 1)[-1] in keep_fp32)):
            kept.append(name)
        else:
            chosen.append(name)
    return chosen, kept


def quantize_frozen(module: nn.Module, method: str, *, keep=(), device: torch.device | str | None = None,
                    min_elements: int = DEFAULT_MIN_ELEMENTS) -> QuantizeReport:
    """Quantize the frozen ``nn.Linear`` layers of ``module`` in place (each is replaced by a quantized
    layer of the same name) and return a report.

    Call it on a frozen model (``requires_grad_(False)``), already cast to the run's weight dtype, and
    before adapters are built (they must wrap the quantized layers).  ``device``: quantize each layer
    there, one at a time (the dense weights never sit on the GPU together: peak ≈ the quantized model + one
    dense layer); the layers are left on it, move the rest of the module afterwards.  ``keep``: fnmatch
    patterns of module names to keep in full precision (the family's ``quantize_keep``); which layers are
    chosen: ``select_layers``."""
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    if any(p.requires_grad for p in module.parameters()):
        raise QuantizationError("quantize_frozen: freeze the model first (requires_grad_(False)); a quantized "
                                "base cannot be trained")
    chosen, kept = select_layers(module, keep=keep, min_elements=min_elements)
    hooked = [n for n in chosen if "forward" in vars(module.get_submodule(n))]
    if hooked:  # an adapter replaced the forward: it would keep wrapping the old, dense layer
        raise QuantizationError(f"quantize_frozen: {hooked[0]} (and {len(hooked) - 1} more) already carries an "
                                "adapter; quantize the model before the adapters are attached")
    report = QuantizeReport(method, kept=kept)
    device = torch.device(device) if device is not None else None

    if method == "nf4":
        first = next(module.parameters(), None)
        where = device if device is not None else (first.device if first is not None else torch.device("cpu"))
        check_quantization("nf4", device_type=where.type)
        import bitsandbytes as bnb
    else:
        _quanto_pure_torch()
        from optimum.quanto import qtypes
        from optimum.quanto.nn import quantize_module
        qtype = qtypes[_QUANTO_QTYPES[method]]

    for name in chosen:
        layer = module.get_submodule(name)
        w = layer.weight
        before = w.numel() * w.element_size()
        if device is not None:
            layer.to(device)
        if method == "nf4":
            qlayer = _to_nf4(bnb, layer, device)
        else:
            qlayer = quantize_module(layer, weights=qtype)
            qlayer.freeze()
            qlayer.register_forward_pre_hook(_cast_input_to_weight_dtype)
        qlayer.requires_grad_(False)
        qlayer.train(layer.training)
        _set_child(module, name, qlayer)
        report.quantized.append(name)
        report.bytes_before += before
        report.bytes_after += weight_storage_bytes(qlayer)
    return report


def _to_nf4(bnb, layer: nn.Linear, device: torch.device | None) -> nn.Module:
    """A bitsandbytes Linear4bit (nf4) with ``layer``'s weights; quantized when it reaches the GPU."""
    dev = device if device is not None else layer.weight.device
    if dev.type != "cuda":
        raise QuantizationError("nf4 quantization runs on an NVIDIA GPU: pass the CUDA device to quantize_frozen")
    dtype = layer.weight.dtype
    compute = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          compute_dtype=compute, quant_type="nf4", compress_statistics=True, device="meta")
    q.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4",
                                 compress_statistics=True, module=q)
    if layer.bias is not None:
        q.bias = nn.Parameter(layer.bias.data, requires_grad=False)
    return q.to(dev)  # Params4bit quantizes on its way to (or onto) the CUDA device


__all__ = ["METHODS", "QUANTO_METHODS", "DEFAULT_EXCLUDE", "QuantizationError", "QuantizeReport",
           "check_quantization", "select_layers", "quantize_frozen", "is_quantized", "dequantized_weight",
           "dense_weight_shape", "weight_storage_bytes"]
