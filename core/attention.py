"""The attention kernel (PyTorch SDPA backend) of the training step and the previews.

* ``choose_attention(gpu, precision)`` -> ``(name, reason)``: what "auto" resolves to (a pure function of a
  ``core.hardware.GpuInfo`` or None and the resolved precision "bf16" | "fp16" | "no").
* ``check_attention(name, gpu, precision)``: raise ``AttentionError`` (a ValueError naming
  ``memory.attention`` and what to choose) for a choice that cannot run on this machine / precision.
* ``attention_context(name)``: the context manager to wrap the training step (forward *and* backward) and
  the sampling in.

The choice ("auto")
-------------------
* NVIDIA GPU, compute capability 8.0+ (Ampere, Ada, Hopper, Blackwell), bf16/fp16 → ``flash``.  Never left to
  PyTorch's default on CUDA: its default pick on an H100, cuDNN attention, crashed in FLUX.1's backward pass
  while the flash kernel ran (FIELD_NOTES).
* NVIDIA GPU in fp32 (``mixed_precision`` "no") → ``efficient``: the flash kernels take half precision only.
* NVIDIA GPU below 8.0 (Turing, Volta, Pascal) → ``efficient``: PyTorch's flash kernels need sm80+.
* CPU → ``default``.  PyTorch's own choice on the CPU is its CPU flash kernel, measured against the math
  kernel on this project's 2-core CPU machine (one thread, fp32, forward + backward of q/k/v (batch, heads,
  seq, head dim)): (2,4,256,8) 4.8 vs 7.9 ms, (2,4,1024,16) 51 vs 163 ms, (1,8,1024,64) 118 vs 214 ms,
  (1,8,4096,64) 2.3 vs 4.9 s — 1.6–3× faster than math, and it never materialises the attention matrix.

What each name enables (``sdpa_kernel(..., set_priority=True)``: the first that can run a call runs it)
-----------------------------------------------------------------------------------------------------
* ``flash``: FLASH, then EFFICIENT, then MATH.  Flash cannot take an attention mask (FLUX.1 with
  ``apply_t5_attention_mask``, T5's position bias, CLIP's padding mask when a text encoder trains) nor head
  dims above 256; those calls fall back to the memory-efficient kernel instead of failing with "No available
  kernel".  cuDNN is never enabled.
* ``efficient``: EFFICIENT, then MATH.  ``cudnn``: CUDNN, then FLASH, EFFICIENT, MATH.  ``math``: MATH only.
* ``default``: no context; PyTorch (and diffusers) choose.

diffusers routing (0.42.1)
--------------------------
SD1.5 / SDXL (``AttnProcessor2_0``) and SD3 (``JointAttnProcessor2_0``) call
``F.scaled_dot_product_attention`` directly.  FLUX.1 (``FluxAttnProcessor``) and FLUX.2
(``Flux2AttnProcessor``) call ``attention_dispatch.dispatch_attention_fn``, which runs diffusers' *active
backend*: by default ``native`` (``_native_attention`` → ``F.scaled_dot_product_attention``, which
``sdpa_kernel`` governs), but the ``DIFFUSERS_ATTN_BACKEND`` environment variable or
``model.set_attention_backend(...)`` can select others (``_native_cudnn``, ``flash`` via the flash-attn
package, xformers, sage …) that bypass or override ``sdpa_kernel``.  ``attention_context`` therefore also
enters diffusers' ``attention_backend("native")`` for every name but ``default``, so the SDPA choice here is
the one that runs; per-model ``set_attention_backend`` is never called by this project.  transformers'
text encoders (``attn_implementation="sdpa"``) go through ``F.scaled_dot_product_attention`` as well.
"""
from __future__ import annotations

import contextlib

ATTENTION_CHOICES = ("flash", "efficient", "cudnn", "math", "default")


class AttentionError(ValueError):
    """The chosen attention kernel cannot run here; the message says why and what to choose."""


def _backends(name: str) -> list:
    from torch.nn.attention import SDPBackend as B
    return {"flash": [B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH],
            "efficient": [B.EFFICIENT_ATTENTION, B.MATH],
            "cudnn": [B.CUDNN_ATTENTION, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH],
            "math": [B.MATH]}[name]


def choose_attention(gpu, precision: str) -> tuple[str, str]:
    """``gpu``: the training GPU's ``GpuInfo`` (or anything with ``compute_capability`` and ``name``), None
    on the CPU.  ``precision``: the resolved mixed precision, "bf16" | "fp16" | "no"."""
    if gpu is None:
        return "default", ("attention default: on the CPU PyTorch picks its CPU flash kernel, 1.6-3x faster "
                           "than the math kernel")
    cc = tuple(gpu.compute_capability)
    where = f"{gpu.name} (compute capability {cc[0]}.{cc[1]})"
    if cc < (8, 0):
        return "efficient", f"attention efficient: flash attention needs compute capability 8.0+, {where}"
    if precision not in ("bf16", "fp16"):
        return "efficient", "attention efficient: flash attention needs bf16/fp16, the run is in fp32"
    return "flash", (f"attention flash on {where} in {precision} (PyTorch's default pick, cuDNN attention, has "
                     "crashed in FLUX backward passes)")


def check_attention(name: str, gpu, precision: str) -> None:
    """Raise ``AttentionError`` for a concrete choice (not "auto") that cannot run."""
    if name not in ATTENTION_CHOICES:
        raise AttentionError(f"memory.attention: unknown kernel {name!r}; choose auto or one of "
                             + ", ".join(ATTENTION_CHOICES))
    if name in ("default", "math"):
        return
    if gpu is None:
        if name in ("efficient", "cudnn"):
            raise AttentionError(f"memory.attention = {name} needs an NVIDIA GPU and this run is on the CPU; "
                                 "choose auto, default or math")
        return  # "flash" on the CPU is PyTorch's CPU flash kernel (any dtype)
    cc = tuple(gpu.compute_capability)
    if name in ("flash", "cudnn"):
        if precision not in ("bf16", "fp16"):
            raise AttentionError(
                f"memory.attention = {name} needs half precision, but memory.mixed_precision resolves to "
                f"'{precision}' (fp32): set memory.mixed_precision to bf16 or fp16 (or auto), or set "
                "memory.attention to efficient or auto")
        if cc < (8, 0):
            raise AttentionError(
                f"memory.attention = {name} needs an NVIDIA GPU of compute capability 8.0 or newer (Ampere+); "
                f"{gpu.name} is {cc[0]}.{cc[1]}: choose efficient or auto")


@contextlib.contextmanager
def attention_context(name: str):
    """A context manager that makes SDPA run the kernel(s) of ``name`` (see the module docstring); wrap the
    whole training step in it, backward included (the backward of a recomputed, checkpointed block runs the
    forward kernels again), and the sampling.  "default" (and "auto", should it arrive unresolved) leaves
    PyTorch's and diffusers' choice alone.  The SDPA flags are process-wide, not per thread."""
    if name in ("default", "auto"):
        yield
        return
    if name not in ATTENTION_CHOICES:
        raise AttentionError(f"memory.attention: unknown kernel {name!r}")
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(_backends(name), set_priority=True), _diffusers_native_backend():
        yield


def _diffusers_native_backend():
    """diffusers' ``attention_backend("native")`` context (a null context where diffusers has no dispatcher)."""
    try:
        from diffusers.models.attention_dispatch import attention_backend
    except Exception:
        return contextlib.nullcontext()
    return attention_backend("native")


__all__ = ["ATTENTION_CHOICES", "AttentionError", "choose_attention", "check_attention", "attention_context"]
