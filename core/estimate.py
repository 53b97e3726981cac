"""How much GPU memory a planned run needs, part by part, without loading a single weight.

The denoiser is built from its (shipped or given) config on the meta device: parameter counts per block
are exact.  Activations are measured, not guessed: the denoiser (with the run's adapter patched in) runs one
forward pass on meta tensors of the training shapes while ``torch.autograd.graph.saved_tensors_hooks``
records every tensor autograd keeps for the backward pass, deduplicated by storage, weights excluded.
During that pass

- ``scaled_dot_product_attention`` is replaced by a stand-in that keeps what the flash / memory-efficient
  kernels keep (q, k, v, output, log-sum-exp) instead of the math kernel's N² probabilities (added back
  analytically when the plan uses the math kernel);
- with mixed precision, a function mode applies CUDA autocast's casting rules (matmuls and convolutions in
  bf16/fp16, normalisations and softmax in fp32) so that the copies autocast makes are counted;
- diffusers' gradient-checkpointing hook records each checkpointed unit (its inputs and what it saves) so
  one pass gives both numbers: without checkpointing every saved tensor; with it the tensors saved outside
  the units + the units' inputs + the largest unit's saved tensors (recomputed one unit at a time).

Public API:

- ``estimate(arch, EstimateInputs(...)) -> Estimate`` (cached): ``parts`` (GB per part), ``total_gb``,
  ``training_gb`` / ``caching_gb`` (the two peaks), ``ram_gb`` (CPU memory for what is offloaded),
  ``summary()``.
- ``denoiser_stats(arch, config_dir)``, ``adapter_param_count(...)``, ``activation_profile(...)``,
  ``text_encoder_params(...)``: the cached pieces (also used by the tests).
- ``trace_saved_bytes(model, run, ...)``: the tracer itself, usable on any diffusers model.

Sizes are GiB (2**30 bytes), written "GB" like the rest of the app.
"""
from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core.embeddings import trains_new_token

GIB = 1024 ** 3
#: what CUDA, cuBLAS and cuDNN take before the first tensor (measured 0.5–0.8 GB on recent drivers)
CUDA_CONTEXT_GB = 0.7
#: caching-allocator fragmentation and transient buffers, as a share of the tensors' peak
ALLOCATOR_SLACK = 0.08

QUANT_METHODS = ("qfloat8", "qint8", "qint4", "nf4")


def quantized_weight_bytes(numel: int, rows: int, method: str) -> int:
    """Bytes of Linear weights (``numel`` elements, ``rows`` output channels) when quantized: 8-bit (quanto
    qfloat8/qint8): 1 byte each + a bf16 scale per output channel; quanto qint4: ½ byte + a bf16 scale and
    shift per group of 128; bitsandbytes nf4 (double quantization): ½ byte + an 8-bit absmax per block of 64
    + an fp32 absmax per 256 of those."""
    if method in ("qfloat8", "qint8"):
        return numel + 2 * rows
    if method == "qint4":
        return numel // 2 + 4 * (-(-numel // 128))
    if method == "nf4":
        return numel // 2 + (-(-numel // 64)) + 4 * (-(-numel // (64 * 256)))
    raise ValueError(f"unknown quantization {method!r}")


def dtype_bytes(precision: str) -> int:
    return 4 if precision in ("no", "fp32") else 2


# ---------------------------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamGroup:
    """Parameters of one part of a model: ``dense`` elements stay at the weight dtype (norms, biases,
    embeddings); ``linear``/``rows`` are the Linear and Conv weights a quantized base stores in 8/4 bits."""
    dense: int = 0
    linear: int = 0
    rows: int = 0

    @property
    def numel(self) -> int:
        return self.dense + self.linear

    def nbytes(self, elem_bytes: int, quant: str = "none") -> int:
        if quant in (None, "none"):
            return (self.dense + self.linear) * elem_bytes
        # quantized layers are counted as one tensor per group: the per-row / per-group overheads add up
        return self.dense * elem_bytes + quantized_weight_bytes(self.linear, self.rows, quant)

    def __add__(self, other: "ParamGroup") -> "ParamGroup":
        return ParamGroup(self.dense + other.dense, self.linear + other.linear, self.rows + other.rows)


def quantizable_weights(model: nn.Module, keep: tuple[str, ...]) -> set[int]:
    """ids of the weights a quantized base stores in 8/4 bits: the Linear layers ``core.quantize`` selects
    (the family's ``keep`` patterns and small layers stay dense)."""
    try:
        from core.quantize import select_layers
    except ImportError:  # without the quantization module: every Linear weight
        return {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    modules = dict(model.named_modules())
    chosen, _ = select_layers(model, keep=keep)
    return {id(modules[name].weight) for name in chosen}


def param_group(module: nn.Module, skip: set[int] | None = None, quantizable: set[int] | None = None,
                keep: tuple[str, ...] = ()) -> ParamGroup:
    """Parameters and floating buffers of ``module`` (each tensor once; ids in ``skip`` left out);
    ``quantizable``: ids of the weights a quantized base stores in 8/4 bits (default: what
    :func:`quantizable_weights` selects in ``module`` with the ``keep`` patterns)."""
    dense = linear = rows = 0
    seen = set(skip or ())
    if quantizable is None:
        quantizable = quantizable_weights(module, keep)
    for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        if id(t) in quantizable and t.dim() >= 2:
            linear += t.numel()
            rows += t.shape[0]
        else:
            dense += t.numel()
    return ParamGroup(dense, linear, rows)


@dataclass(frozen=True)
class DenoiserStats:
    """Parameter groups of the denoiser: the blocks that can be swapped (in forward order) and the rest."""
    blocks: tuple[ParamGroup, ...]
    rest: ParamGroup
    class_name: str

    @property
    def total(self) -> ParamGroup:
        out = self.rest
        for b in self.blocks:
            out = out + b
        return out

    def weight_bytes(self, elem_bytes: int, quant: str = "none", swapped: int = 0) -> tuple[int, int, int]:
        """(resident bytes, swap-buffer bytes, bytes kept in CPU memory) with the last ``swapped`` blocks
        streamed from CPU memory: two block buffers on the GPU (the running one and the next one)."""
        swapped = max(0, min(swapped, len(self.blocks)))
        kept = self.blocks[:len(self.blocks) - swapped]
        out = self.blocks[len(self.blocks) - swapped:]
        resident = self.rest.nbytes(elem_bytes, quant) + sum(b.nbytes(elem_bytes, quant) for b in kept)
        sizes = [b.nbytes(elem_bytes, quant) for b in out]
        # core.block_swap: a pool of (prefetch 1 + 1) slots, each as large as the largest swapped block
        return resident, min(len(sizes), 2) * max(sizes, default=0), sum(sizes)


_LOCK = threading.RLock()


@functools.lru_cache(maxsize=4)
def _meta_denoiser(arch_id: str, config_key: str) -> nn.Module:
    import architectures
    return architectures.get(arch_id).build_denoiser_on_meta(Path(config_key))


def _config_key(arch, config_dir) -> str:
    return str(Path(config_dir).resolve()) if config_dir else str(arch.config_dir())


@functools.lru_cache(maxsize=32)
def _denoiser_stats(arch_id: str, config_key: str) -> DenoiserStats:
    import architectures
    arch = architectures.get(arch_id)
    model = _meta_denoiser(arch_id, config_key)
    quantizable = quantizable_weights(model, arch.quantize_keep)
    blocks, ids = [], set()
    for list_name in arch.block_lists:
        for block in getattr(model, list_name):
            blocks.append(param_group(block, quantizable=quantizable))
            ids |= {id(t) for t in list(block.parameters()) + list(block.buffers())}
    return DenoiserStats(tuple(blocks), param_group(model, skip=ids, quantizable=quantizable),
                         type(model).__name__)


def denoiser_stats(arch, config_dir: Path | None = None) -> DenoiserStats:
    return _denoiser_stats(arch.id, _config_key(arch, config_dir))


def _meta_module(sub: Path) -> nn.Module | None:
    """A diffusers or transformers model of a config folder, built on the meta device (None: no config)."""
    path = sub / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    if "_class_name" in config:
        import diffusers
        cls = getattr(diffusers, config["_class_name"], None)
        if cls is None:
            return None
        with torch.device("meta"):
            return cls.from_config(config)
    import transformers
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        return None
    cfg = transformers.AutoConfig.from_pretrained(str(sub), local_files_only=True)
    with torch.device("meta"):
        return cls._from_config(cfg)


@functools.lru_cache(maxsize=64)
def _part_params(config_key: str, sub: str, keep: tuple[str, ...] = ()) -> ParamGroup | None:
    model = _meta_module(Path(config_key) / sub)
    return None if model is None else param_group(model, keep=keep)


def text_encoder_params(arch, config_dir: Path | None = None) -> list[tuple[str, ParamGroup]]:
    """(folder name, parameters) of each text encoder in the config folder, in order."""
    root = Path(_config_key(arch, config_dir))
    out = []
    for sub in sorted(p.name for p in root.glob("text_encoder*") if p.is_dir()):
        g = _part_params(str(root), sub, arch.text_encoder_quantize_keep)
        if g is not None:
            out.append((sub, g))
    return out


def vae_params(arch, config_dir: Path | None = None) -> ParamGroup:
    return _part_params(_config_key(arch, config_dir), "vae") or ParamGroup()


# ---------------------------------------------------------------------------------------------------------
# the activation tracer
# ---------------------------------------------------------------------------------------------------------
class _FlashStandIn(torch.autograd.Function):
    """Attention whose saved tensors are those of flash / memory-efficient attention."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


_F = torch.nn.functional
_LOW = {_F.linear, _F.conv1d, _F.conv2d, _F.conv3d, _F.conv_transpose1d, _F.conv_transpose2d,
        _F.conv_transpose3d, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.addbmm,
        torch.einsum, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm, _F.prelu}
_FP32 = {_F.layer_norm, _F.group_norm, _F.softmax, _F.log_softmax, torch.softmax, torch.log_softmax,
         torch.Tensor.softmax, torch.Tensor.log_softmax, torch.norm, torch.Tensor.norm, _F.cosine_similarity,
         torch.cumsum, torch.logsumexp, torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow}
if hasattr(_F, "rms_norm"):
    _FP32.add(_F.rms_norm)


def _cast_args(args, kwargs, dtype):
    def cast(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(cast(y) for y in x)
        return x
    return cast(args), {k: cast(v) for k, v in kwargs.items()}


class _TraceMode(torch.overrides.TorchFunctionMode):
    """Attention stand-in and (optionally) autocast's casting rules on devices without autocast (meta)."""

    def __init__(self, autocast_dtype: torch.dtype | None, attention_calls: list):
        super().__init__()
        self.low = autocast_dtype
        self.calls = attention_calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _F.scaled_dot_product_attention:
            q, k, v = args[:3] if len(args) >= 3 else (kwargs["query"], kwargs["key"], kwargs["value"])
            if self.low is not None:
                (q, k, v), _ = _cast_args((q, k, v), {}, self.low)
            # the math kernel would keep softmax(qkᵀ): batch·heads·Lq·Lk elements
            self.calls.append((q.numel() // q.shape[-1] * k.shape[-2], q.element_size()))
            return _FlashStandIn.apply(q, k, v)
        if self.low is not None:
            if func in _LOW:
                args, kwargs = _cast_args(args, kwargs, self.low)
            elif func in _FP32:
                if func in (torch.exp, torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.cumsum):
                    pass  # in autocast's fp32 list, but only ever on tiny tensors here: keep input dtype
                else:
                    args, kwargs = _cast_args(args, kwargs, torch.float32)
        return func(*args, **kwargs)


def _storage_key(t: torch.Tensor):
    try:
        return t.untyped_storage()._cdata
    except Exception:  # e.g. tensor subclasses without storage
        return ("id", id(t))


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except Exception:
        return t.numel() * t.element_size()


@dataclass(frozen=True)
class ActivationProfile:
    """Bytes autograd keeps for the backward pass (weights excluded), from one traced forward pass."""
    total: int              # without gradient checkpointing
    outside: int            # with checkpointing: saved outside the checkpointed units
    unit_inputs: int        # with checkpointing: the units' inputs (kept for the recomputation)
    max_unit: int           # with checkpointing: the largest unit's saved tensors (recomputed in backward)
    max_unit_input: int     # the largest single unit's inputs
    units: int              # checkpointed units seen
    math_extra: int         # more bytes if attention runs the math kernel (N² probabilities)
    output: int             # the denoiser's output (its gradient is as large)

    def kept(self, checkpointing: bool, offload: bool = False, math: bool = False) -> int:
        """Activation bytes on the device at the peak.  With offload the saved tensors (with checkpointing:
        the units' inputs) live in CPU memory; two units' worth are in flight."""
        extra = self.math_extra if math else 0
        if checkpointing and self.units:
            if offload:
                return self.outside + self.max_unit + 2 * self.max_unit_input + extra // max(self.units, 1)
            return self.outside + self.unit_inputs + self.max_unit + extra // max(self.units, 1)
        if offload:
            return self.max_unit + 2 * self.max_unit_input
        return self.total + extra

    def offloaded(self, checkpointing: bool) -> int:
        """Bytes activation offload moves to CPU memory."""
        return self.unit_inputs if checkpointing and self.units else self.total


def _flatten(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _flatten(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _flatten(y)]
    return []


def _signature(x):
    """A hashable description of a unit's argument (None: not describable, so never replayed)."""
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.requires_grad, x.device.type)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, (list, tuple)):
        parts = tuple(_signature(y) for y in x)
        return None if any(p is None and y is not None for p, y in zip(parts, x)) else (type(x).__name__, parts)
    if isinstance(x, dict):
        items = tuple((k, _signature(v)) for k, v in sorted(x.items()))
        return None if any(p is None and x[k] is not None for k, p in items) else ("D", items)
    return None


def _module_signature(module: nn.Module):
    """Class, parameter shapes/dtypes/grad flags and patched-in adapters of every submodule."""
    out = []
    for m in module.modules():
        adapter = getattr(m.__dict__.get("forward"), "__self__", None)
        extra = ()
        if isinstance(adapter, nn.Module) and adapter is not m:
            extra = (type(adapter).__name__,) + tuple((tuple(p.shape), p.dtype) for p in adapter.parameters())
        out.append((type(m).__name__, tuple((tuple(p.shape), p.dtype, p.requires_grad)
                                            for p in m.parameters(recurse=False)), extra, m.training))
    return tuple(out)


def _rebuild(template, tensors):
    """``template`` (a unit's output) with its tensors replaced, in order, by ``tensors``."""
    it = iter(tensors)

    def go(x):
        if isinstance(x, torch.Tensor):
            return next(it)
        if isinstance(x, (list, tuple)):
            return type(x)(go(y) for y in x)
        if isinstance(x, dict):
            return {k: go(v) for k, v in x.items()}
        return x
    return go(template)


def _fresh_like(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """New tensors shaped like ``tensors``, sharing storages where they do (views of one result stay views
    of one new storage: a saved view keeps its whole storage alive)."""
    bases, out = {}, []
    for t in tensors:
        key = _storage_key(t)
        if key not in bases:
            n = max(_storage_bytes(t) // t.element_size(), t.storage_offset() + 1)
            bases[key] = torch.empty(n, dtype=t.dtype, device=t.device).requires_grad_(t.requires_grad)
        out.append(bases[key].as_strided(t.shape, t.stride(), t.storage_offset()))
    return out


def trace_saved_bytes(model: nn.Module, run, autocast_dtype: torch.dtype | None = None,
                      stand_in_attention: bool = True, replay: bool = True, exclude=()) -> ActivationProfile:
    """Run ``run()`` (a forward pass of ``model``, which must require grad somewhere) and account the tensors
    autograd saves.  Works on meta tensors (nothing is computed) and on real ones.  ``model`` is a diffusers
    model: its gradient-checkpointing hook is used to find the checkpointed units.

    ``replay``: a unit identical to one traced before (same module structure, adapters, argument shapes) is
    not run again; its outputs are fresh tensors of the recorded shapes and its saved tensors are the
    recorded ones, mapped onto this unit's inputs and outputs (FLUX.1's 57 blocks are 2 distinct units).
    Meant for meta tensors: replayed outputs hold no values.  ``exclude``: more tensors that are weights, not
    activations (the adapter's parameters, which are not submodules of the model)."""
    params = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers()) + list(exclude)}
    outside: dict = {}
    units: list[tuple[dict, dict]] = []          # (inputs, saved) per outermost unit
    templates: dict = {}
    stack: list[int] = []
    keep: list[torch.Tensor] = []                # keeps storages alive so that keys stay unique
    fresh = iter(range(1 << 62))

    def pack(t):
        key = _storage_key(t)
        if key not in params:
            keep.append(t)
            (units[stack[0]][1] if stack else outside)[key] = _storage_bytes(t)
        return t

    def unit_fn(module, *args, **kwargs):
        if stack:                                # nested unit: part of the outer one
            return module(*args, **kwargs)
        arg_tensors = _flatten((args, kwargs))
        in_keys = [_storage_key(t) for t in arg_tensors]
        inputs = {}
        for t, k in zip(arg_tensors, in_keys):
            if k not in params:
                keep.append(t)
                inputs[k] = _storage_bytes(t)
        sig = None
        if replay:
            sig_args = _signature((args, kwargs))
            if sig_args is not None:
                sig = (_module_signature(module), sig_args)
        if sig is not None and sig in templates:
            t_in, t_out, t_saved, t_output, t_calls = templates[sig]
            calls.extend(t_calls)
            outs = _fresh_like(_flatten(t_output))
            keep.extend(outs)
            out_keys = [_storage_key(o) for o in outs]
            mapping = {k: in_keys[i] for i, k in reversed(list(enumerate(t_in)))}
            mapping.update({k: out_keys[i] for i, k in enumerate(t_out)})
            saved = {}
            for k, b in t_saved.items():
                nk = mapping.get(k, ("replayed", next(fresh)))
                if nk not in params:
                    saved[nk] = b
            units.append((inputs, saved))
            return _rebuild(t_output, outs)
        units.append((inputs, {}))
        first_call = len(calls)
        stack.append(len(units) - 1)
        try:
            result = module(*args, **kwargs)
        finally:
            stack.pop()
        if sig is not None:
            templates[sig] = (in_keys, [_storage_key(o) for o in _flatten(result)], dict(units[-1][1]), result,
                              list(calls[first_call:]))
        return result

    calls: list = []
    had = getattr(model, "is_gradient_checkpointing", False)
    supports = getattr(model, "_supports_gradient_checkpointing", False)
    if supports:
        model.enable_gradient_checkpointing(unit_fn)
    try:
        mode = _TraceMode(autocast_dtype, calls) if (stand_in_attention or autocast_dtype is not None) else None
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if mode is not None:
                with mode:
                    out = run()
            else:
                out = run()
    finally:
        if supports:
            model.disable_gradient_checkpointing()
            if had:
                model.enable_gradient_checkpointing()
    out_t = _flatten(out)[0]
    everything = dict(outside)
    for inputs, saved in units:
        everything.update(saved)
    kept_inputs = {}
    for inputs, _ in units:
        kept_inputs.update(inputs)
    with_ckpt = dict(outside)
    with_ckpt.update(kept_inputs)
    recompute = [sum(b for k, b in saved.items() if k not in with_ckpt) for _, saved in units]
    math = sum(n * size for n, size in calls)
    return ActivationProfile(
        total=sum(everything.values()), outside=sum(outside.values()),
        unit_inputs=sum(b for k, b in kept_inputs.items() if k not in outside),
        max_unit=max(recompute, default=0), max_unit_input=max((sum(i.values()) for i, _ in units), default=0),
        units=len(units), math_extra=math, output=_storage_bytes(out_t))


# ---------------------------------------------------------------------------------------------------------
# adapter + activation profile of a run (cached per architecture, shape, precision and network settings)
# ---------------------------------------------------------------------------------------------------------
def _network_settings(network_json: str):
    from core.settings import NetworkSettings
    return NetworkSettings.model_validate_json(network_json)


def _build_adapter(arch, model: nn.Module, network):
    """The run's adapter network on the meta denoiser (None for full fine-tuning, textual inversion and a
    ControlNet)."""
    from architectures.base import Components
    from core.adapters import AdapterOptions, build_network
    if network.algorithm in ("full_finetune", "textual_inversion", "controlnet"):
        return None
    components = Components(denoiser=model, vae=None, text_encoders=[], tokenizers=[], noise_scheduler=None,
                            network=network)
    targets = arch.select_adapter_targets(components, network.target, False, include=network.include,
                                          exclude=network.exclude)
    with torch.device("meta"):
        net = build_network(targets, network.algorithm, network.rank, network.alpha, network.dropout,
                            AdapterOptions.from_settings(network))
    return net.to("meta", torch.float32)


@functools.lru_cache(maxsize=64)
def _adapter_params(arch_id: str, config_key: str, network_json: str) -> int:
    import architectures
    arch = architectures.get(arch_id)
    network = _network_settings(network_json)
    with _LOCK:
        model = _meta_denoiser(arch_id, config_key)
        if network.algorithm == "full_finetune":
            return sum(p.numel() for p in model.parameters())
        if network.algorithm == "controlnet":
            return sum(p.numel() for p in _meta_controlnet(arch, model).parameters())
        # the new rows of every text encoder's embedding (textual inversion; pivotal tuning beside an adapter)
        rows = network.ti_num_vectors * sum(
            _meta_module(Path(config_key) / sub).get_input_embeddings().embedding_dim
            for sub, _ in text_encoder_params(arch, Path(config_key))) \
            if trains_new_token(network, arch) else 0
        if network.algorithm == "textual_inversion":
            return rows
        net = _build_adapter(arch, model, network)
        return sum(p.numel() for p in net.parameters()) + rows


def _meta_controlnet(arch, model: nn.Module) -> nn.Module:
    """The family's ControlNet for the meta denoiser, on the meta device (shapes only)."""
    from architectures.base import Components
    with torch.device("meta"):
        return arch.build_controlnet(Components(denoiser=model, vae=None, text_encoders=[], tokenizers=[],
                                                noise_scheduler=None), None)


def adapter_param_count(arch, network, config_dir: Path | None = None) -> int:
    """Trainable parameters of the run's adapter (full fine-tuning: the denoiser's; textual inversion: the new
    embedding rows; a ControlNet's own)."""
    return _adapter_params(arch.id, _config_key(arch, config_dir), network.model_dump_json())


@functools.lru_cache(maxsize=64)
def _activations(arch_id: str, config_key: str, resolution: int, batch_size: int, precision: str,
                 network_json: str) -> ActivationProfile:
    import architectures
    arch = architectures.get(arch_id)
    network = _network_settings(network_json)
    with _LOCK:
        return _trace_run(arch, _meta_denoiser(arch_id, config_key), network, resolution, batch_size, precision)


def _trace_run(arch, model, network, resolution, batch_size, precision) -> ActivationProfile:
    from architectures.base import Components
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    full = network.algorithm == "full_finetune"
    # nn.Module.to: diffusers' override warns about fp32 modules even when its list of them is empty
    nn.Module.to(model, torch.float32 if full else weight_dtype)
    model.requires_grad_(full)
    net = None if full else _build_adapter(arch, model, network)
    if net is not None:
        net.apply_to()
    components = Components(denoiser=model, vae=None, text_encoders=[], tokenizers=[], noise_scheduler=None,
                            network=network)
    noisy, timesteps, cond, batch = arch.probe_inputs(model, resolution, batch_size, weight_dtype)
    if trains_new_token(network, arch):  # the embedding's gradient passes the conditioning
        cond = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in cond.items()}
    trained = list(net.parameters()) if net is not None else []
    if network.algorithm == "controlnet":  # its activations count too; its fp32 weights are what trains
        components.controlnet = _meta_controlnet(arch, model)
        trained = list(components.controlnet.parameters())
        batch = {**batch, "conditioning": torch.zeros(batch_size, 3, resolution, resolution, device="meta")}
    autocast = weight_dtype if weight_dtype != torch.float32 else None
    model.train()
    try:
        return trace_saved_bytes(model, lambda: arch.predict(components, noisy, timesteps, cond, batch),
                                 autocast_dtype=autocast, exclude=trained)
    finally:
        if net is not None:
            net.restore()


def activation_profile(arch, resolution: int, batch_size: int, precision: str, network,
                       config_dir: Path | None = None) -> ActivationProfile:
    return _activations(arch.id, _config_key(arch, config_dir), int(resolution), int(batch_size), precision,
                        network.model_dump_json())


# ---------------------------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------------------------
#: optimizer state bytes per trainable fp32 parameter (and with 8-bit state)
OPTIMIZER_STATE = {"AdamW": 8, "AdamW8bit": 2, "PagedAdamW8bit": 2, "Lion": 4, "Lion8bit": 1, "PagedLion8bit": 1,
                   "Adafactor": 0.5, "CAME": 4.5, "AdamWScheduleFree": 8, "Prodigy": 16, "DAdaptAdam": 12, "SGD": 4}
OPTIMIZER_STATE_8BIT = {"AdamW": 2, "AdamW8bit": 2, "Lion": 1}


@dataclass(frozen=True)
class EstimateInputs:
    """The resolved choices of a plan that memory depends on (hashable: the estimate is cached on it)."""
    resolution: int
    batch_size: int
    precision: str = "bf16"                   # "bf16" | "fp16" | "no"
    device: str = "cuda"
    gradient_checkpointing: bool = False
    attention: str = "flash"                  # math: N² probabilities kept
    blocks_to_swap: int = 0
    quantize_base: str = "none"
    quantize_text_encoder: str = "none"       # "none" | method | "stream"
    activation_offload: bool = False
    optimizer: str = "AdamW"
    optimizer_8bit: bool = False
    cache_text_encoder_outputs: bool = True
    train_text_encoder: bool = False
    fused_backward: bool = False              # each weight stepped in backward: no full set of gradients
    shards: int = 1                           # FSDP: a full fine-tune's denoiser sharded over this many GPUs
    network_json: str = ""                    # settings.network as JSON ("" → defaults)
    config_dir: str = ""                      # "" → the shipped full-size config


@dataclass
class Estimate:
    """Memory of the planned run.  ``parts``: GB per part at the training peak; ``caching_parts``: GB while
    captions are encoded (text encoders on the GPU, the denoiser not yet); ``total_gb``: the larger peak,
    CUDA context and allocator slack included; ``ram_gb``: CPU memory for swapped blocks and offloaded
    activations; ``text_encoder_ram_gb``: the text encoders parked in CPU memory after caching."""
    parts: dict[str, float]
    caching_parts: dict[str, float]
    training_gb: float
    caching_gb: float
    total_gb: float
    ram_gb: float
    swappable_blocks: int
    text_encoder_ram_gb: float = 0.0         # text encoders parked in CPU memory after caching
    load_ram_gb: float = 0.0                 # every part dense in CPU memory while loading (before quantizing)
    load_text_encoders_gb: float = 0.0       # of which the text encoders (loaded alone first where possible)
    activations: ActivationProfile | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def allocated_gb(self) -> float:
        """Tensors at the training peak (what torch.cuda.max_memory_allocated reports)."""
        return sum(v for k, v in self.parts.items() if k not in ("CUDA context", "allocator slack"))

    def summary(self) -> str:
        def fmt(parts):
            return " · ".join(f"{k} {v:.2f}" for k, v in parts.items() if v >= 0.005)
        def detail(parts):
            text = fmt(parts)
            return f" ({text})" if text else ""
        training = fmt(self.parts)
        line = f"≈ {self.total_gb:.1f} GB (training {self.training_gb:.1f}" + (f": {training})" if training else ")")
        if self.caching_parts and self.caching_gb >= 0.05:   # a few MB of tiny encoders are not worth a clause
            line += f"; caption encoding {self.caching_gb:.1f} GB{detail(self.caching_parts)}"
        if self.ram_gb >= 0.05:
            line += f"; CPU RAM for offloaded parts {self.ram_gb:.1f} GB"
        return line


def _te_bytes(groups: list[ParamGroup], elem: int, method: str) -> int:
    if method == "stream":                    # one layer at a time: ≈ the largest 1/24 of the biggest encoder
        return sum(g.nbytes(elem) for g in groups if g.numel < 2e9) + max(
            (g.nbytes(elem) // 24 for g in groups if g.numel >= 2e9), default=0)
    return sum(g.nbytes(elem, method) for g in groups)


def estimate(arch, inputs: EstimateInputs) -> Estimate:
    return _estimate(arch.id, inputs)


@functools.lru_cache(maxsize=512)
def _estimate(arch_id: str, x: EstimateInputs) -> Estimate:
    import architectures
    from core.settings import NetworkSettings
    arch = architectures.get(arch_id)
    config_dir = Path(x.config_dir) if x.config_dir else None
    network = _network_settings(x.network_json) if x.network_json else NetworkSettings()
    gpu = x.device == "cuda"
    elem = dtype_bytes(x.precision)
    full = network.algorithm == "full_finetune"
    stats = denoiser_stats(arch, config_dir)
    quant = "none" if full else x.quantize_base
    resident, buffers, swapped_bytes = stats.weight_bytes(4 if full else elem, quant, x.blocks_to_swap)
    trainable = adapter_param_count(arch, network, config_dir)
    act = activation_profile(arch, x.resolution, x.batch_size, x.precision, network, config_dir)
    te = [g for _, g in text_encoder_params(arch, config_dir)]
    vae = vae_params(arch, config_dir)
    per_state = (OPTIMIZER_STATE_8BIT.get(x.optimizer, OPTIMIZER_STATE.get(x.optimizer, 8)) if x.optimizer_8bit
                 else OPTIMIZER_STATE.get(x.optimizer, 8))
    activations = act.kept(x.gradient_checkpointing, x.activation_offload, x.attention == "math")
    parts = {
        "denoiser weights": resident / GIB,
        "swap buffers": buffers / GIB,
        "text encoders": 0.0 if x.cache_text_encoder_outputs else sum(g.nbytes(elem) for g in te) / GIB,
        "trainable parameters": 0.0 if full else trainable * 4 / GIB,
        # stepping in backward holds the gradients of about one block at a time
        "gradients": (max((b.nbytes(4) for b in stats.blocks), default=0) if full and x.fused_backward
                      else trainable * 4) / GIB,
        "optimizer state": trainable * per_state / GIB,
        "activations": (activations + 2 * act.output) / GIB,
    }
    if full and x.shards > 1:
        # FSDP (core.fsdp): each GPU holds 1/N of the denoiser's fp32 weights, their gradients and the optimizer
        # state, plus the whole weights of the running block and of the next one, gathered in the compute dtype
        for part in ("denoiser weights", "gradients", "optimizer state"):
            parts[part] /= x.shards
        parts["gathered blocks"] = 2 * max((b.nbytes(elem) for b in stats.blocks), default=0) / GIB
    if network.ema and not network.ema_on_cpu:
        parts["EMA weights"] = trainable * 4 / GIB
    notes = []
    if x.train_text_encoder:
        notes.append("text-encoder activations are not included")
    tensors = sum(parts.values())
    if gpu:
        parts["allocator slack"] = tensors * ALLOCATOR_SLACK
        parts["CUDA context"] = CUDA_CONTEXT_GB
    training = sum(parts.values())
    caching_parts = {}
    if x.cache_text_encoder_outputs and te:
        method = x.quantize_text_encoder if x.quantize_text_encoder not in ("auto", "") else "none"
        caching_parts["text encoders"] = _te_bytes(te, elem, method) / GIB
        caching_parts["VAE"] = vae.nbytes(elem) / GIB
        if gpu:
            caching_parts["CUDA context"] = CUDA_CONTEXT_GB
    caching = sum(caching_parts.values())
    ram = swapped_bytes
    if x.activation_offload:
        ram += act.offloaded(x.gradient_checkpointing)
    # after caching the trainer keeps the text encoders in CPU memory (previews bring them back)
    te_ram = _te_bytes(te, elem, x.quantize_text_encoder if x.quantize_text_encoder not in ("auto", "", "stream")
                       else "none") if x.cache_text_encoder_outputs and gpu else 0
    return Estimate(parts={k: round(v, 4) for k, v in parts.items()},
                    caching_parts={k: round(v, 4) for k, v in caching_parts.items()},
                    training_gb=training, caching_gb=caching, total_gb=max(training, caching), ram_gb=ram / GIB,
                    text_encoder_ram_gb=te_ram / GIB,
                    load_ram_gb=(stats.total.nbytes(4 if full else elem) + sum(g.nbytes(elem) for g in te)
                                 + vae.nbytes(4)) / GIB,
                    load_text_encoders_gb=sum(g.nbytes(elem) for g in te) / GIB,
                    swappable_blocks=len(stats.blocks), activations=act, notes=notes)
