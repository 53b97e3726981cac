"""Applying the plan's memory choices to a loaded model: quantized frozen base, adapters, block swapping,
gradient checkpointing, channels-last, compile, and what wraps each training step (attention kernel,
activation offload).

The trainer and ``bench/bench_tiers.py`` both prepare the denoiser through ``setup_denoiser``, so the
benchmark measures exactly what a run does.  The order matters and is fixed here:

1. the denoiser is loaded on the CPU in the plan's dtype and frozen (the caller does that);
2. the frozen Linear layers are quantized (before any adapter wraps them, so adapters run in bypass mode on
   top of the quantized layer);
3. the adapters are built on the CPU model and moved to the device;
4. gradient checkpointing is switched on;
5. the denoiser goes to the device: all of it, or all but its last ``blocks_to_swap`` blocks, whose frozen
   weights stay in host memory and are streamed in (``core.block_swap``);
6. the repeated blocks are compiled last (hooks must exist before the first compiled call).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass
class DenoiserSetup:
    """What ``setup_denoiser`` made: the trainable network and the per-step context."""
    network: object | None
    swapper: object | None = None
    attention: str = "default"
    activation_offload: bool = False
    optimizer_type: str = "AdamW"
    quantize_report: object | None = None
    notes: list[str] = field(default_factory=list)

    def step_context(self) -> contextlib.ExitStack:
        """Wraps the forward pass of a step: activation offload (the attention kernel is process-wide, see
        ``run_context``)."""
        stack = contextlib.ExitStack()
        if self.activation_offload:
            from core.activation_offload import offload_activations
            stack.enter_context(offload_activations())
        return stack

    def release(self) -> None:
        """Every weight back in one place (before the weights are read for saving a checkpoint or merging)."""
        if self.swapper is not None:
            self.swapper.detach(to="cpu")
            self.swapper = None


def optimizer_for(plan, optimizer_type: str) -> str:
    """The optimizer that runs: with 8-bit state planned, AdamW → AdamW8bit and Lion → Lion8bit."""
    if plan.optimizer_8bit and optimizer_type in ("AdamW", "Lion"):
        return optimizer_type + "8bit"
    return optimizer_type


@contextlib.contextmanager
def torch_switches(plan, device: torch.device):
    """The plan's process-wide torch switches (CPU threads, TF32) for the run only: restored afterwards, so a
    later run, a plan preview or a script in the same process starts from its own."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        if device.type == "cpu" and plan.cpu_threads > 0:
            torch.set_num_threads(plan.cpu_threads)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = plan.tf32
            torch.backends.cudnn.allow_tf32 = plan.tf32
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def run_context(plan) -> contextlib.AbstractContextManager:
    """The attention kernel for everything the run computes (caching, steps, previews)."""
    from core.attention import attention_context
    return attention_context(plan.attention)


def quantize_base(denoiser: nn.Module, plan, device: torch.device, log: Callable[[str], None],
                  keep: tuple[str, ...] = ()):
    if plan.quantize_base == "none":
        return None
    from core.quantize import quantize_frozen
    # each layer is quantized on the device and stays there; with swapped blocks the whole quantized model
    # need not fit, so it is quantized in CPU memory and the swapper places it (nf4 is refused with swapping)
    report = quantize_frozen(denoiser, plan.quantize_base, keep=keep,
                             device=device if plan.blocks_to_swap == 0 else None)
    log(f"Frozen model quantized ({plan.quantize_base}): {report.summary()}")
    return report


def place_denoiser(arch, denoiser: nn.Module, plan, device: torch.device, log: Callable[[str], None],
                   trained: bool = False):
    """Move the denoiser to the device, keeping the last ``plan.blocks_to_swap`` blocks' frozen weights (and,
    when the denoiser itself is ``trained``, its trained weights) in host memory.  Returns the swapper (None
    without swapping)."""
    if plan.blocks_to_swap <= 0:
        denoiser.to(device)
        return None
    from core.block_swap import swap_blocks_of
    swapper = swap_blocks_of(denoiser, arch.block_lists, plan.blocks_to_swap, device, trainable=trained)
    log(f"Block swapping: {plan.blocks_to_swap} blocks ({swapper.bytes_swapped / 2**30:.2f} GB) stay in CPU "
        f"memory and stream in as they run ({swapper.resident_bytes / 2**30:.2f} GB of GPU buffers)"
        + ("; each block's weights are updated while it is on the device and copied back" if trained else ""))
    return swapper


def setup_denoiser(arch, components, settings, plan, device: torch.device, log: Callable[[str], None],
                   network=None) -> DenoiserSetup:
    """Prepare a frozen, loaded denoiser for LoRA-style training as the plan says (see the module docstring).

    ``network`` is an already-built trainable (full fine-tuning, textual inversion; its ``trains_denoiser`` says
    whether the denoiser's own weights train); otherwise the adapter network is built from ``settings.network`` on
    the family's targets."""
    c, s = components, settings
    setup = DenoiserSetup(network=network, attention=plan.attention, activation_offload=plan.activation_offload,
                          optimizer_type=optimizer_for(plan, s.optimizer.optimizer_type))
    setup.quantize_report = quantize_base(c.denoiser, plan, device, log, arch.quantize_keep)
    if network is None:
        from core.adapters import AdapterOptions, build_network
        targets = arch.select_adapter_targets(c, s.network.target, s.network.train_text_encoder,
                                              include=s.network.include, exclude=s.network.exclude)
        setup.network = build_network(targets, s.network.algorithm, s.network.rank, s.network.alpha,
                                      s.network.dropout, AdapterOptions.from_settings(s.network))
        setup.network.to(device, torch.float32)
        setup.network.apply_to()
    if plan.gradient_checkpointing:
        c.denoiser.enable_gradient_checkpointing()
    if plan.channels_last:
        c.denoiser.to(memory_format=torch.channels_last)
    setup.swapper = place_denoiser(arch, c.denoiser, plan, device, log,
                                   trained=network is not None and network.trains_denoiser)
    c.denoiser.train()
    if plan.compile != "off":
        from core.speed import compile_model
        n = compile_model(c.denoiser, arch.compile_blocks, plan.compile)
        log(f"Compiling {n} blocks of the {type(c.denoiser).__name__}: the first steps take longer")
    return setup


def repeated_layers(module: nn.Module) -> nn.ModuleList | None:
    """A text encoder's stack of layers: its longest ModuleList (what streaming moves one at a time)."""
    best = None
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and (best is None or len(m) > len(best)):
            best = m
    return best


@contextlib.contextmanager
def text_encoder_on_device(te: nn.Module, how: str, device: torch.device, dtype: torch.dtype):
    """A frozen text encoder ready to encode captions on ``device``: whole (``how`` none or a quantization,
    applied by the caller), or streamed layer by layer ("stream") when it does not fit even quantized.
    Leaves it in CPU memory afterwards.  (On the CPU, streaming runs block_swap's simulated transfers.)"""
    if how != "stream":
        te.to(device, dtype) if not _quantized(te) else te.to(device)
        try:
            yield te
        finally:
            te.to("cpu")
        return
    from core.layer_stream import stream_layers
    layers = repeated_layers(te)
    if layers is None:
        raise ValueError(f"{type(te).__name__} has no stack of layers to stream; choose a quantization for "
                         "memory.quantize_text_encoder")
    layer_ids = {id(p) for p in layers.parameters()} | {id(b) for b in layers.buffers()}
    te.to(dtype=dtype)
    # everything but the layers (embeddings, final norm) is small: it goes to the device whole
    for p in list(te.parameters()) + list(te.buffers()):
        if id(p) not in layer_ids:
            p.data = p.data.to(device)
    try:
        with stream_layers(list(layers), device):
            yield te
    finally:
        te.to("cpu")


def _quantized(module: nn.Module) -> bool:
    from core.quantize import is_quantized
    return any(is_quantized(m) for m in module.modules())
