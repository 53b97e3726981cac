"""Block swapping: train (or run) a model whose frozen weights do not all fit in VRAM.

* :class:`BlockSwapper` keeps the FROZEN weights (and buffers) of the last ``blocks_to_swap`` of a model's
  repeated blocks in host memory and streams each block into a small fixed pool of device buffers ("slots")
  just before it runs, on a side CUDA stream, so the copy of block i+1 overlaps the compute of block i.  Each
  block's host copy is one flat buffer in the slot's layout, page-locked with ``cudaHostRegister`` (exact size;
  the caching pinned allocator would round every allocation up to a power of two), so a block is ONE
  asynchronous host-to-device copy.  The backward pass brings the blocks back in reverse order, with the same
  prefetch.  Trainable parameters (adapters, ``requires_grad=True``) never move: the optimizer holds them.
  :func:`swap_blocks_of` is the one-call entry point for a diffusers model and its block lists.
* The same machinery serves ``core.layer_stream.stream_layers`` (inference: every layer visits the device for its
  forward only) and ``core.activation_offload`` (saved activations in host memory), which keeps swapped weights as
  references through :func:`swapped_weight_ref`.  The GPU self-check is ``bench/bench_block_swap.py``.

How a swapped block's weights move
----------------------------------
Each frozen tensor of a swapped block (a plain parameter, a buffer, or an inner tensor of a tensor subclass
such as optimum-quanto's ``WeightQBytesTensor``: its ``_data`` / ``_scale``) keeps its Python object; only its
``.data`` changes.  While offloaded it is a zero-element placeholder on the device, so any use of a block that
was not brought in fails loudly (a shape error) instead of computing with stale data; while resident it is a
view into one of the slots.  The host master copy never changes (the weights are frozen), so "sending a block
back" is only re-pointing ``.data`` at the placeholder and handing its slot to the next block.

Weights saved by autograd
-------------------------
Backward of ``y = x @ W.T`` needs ``W``, and autograd saves it as a *view* (``W.t()``) of the storage that held
``W`` during the forward - here a slot that later blocks overwrite.  Swapping ``.data`` alone is therefore not
enough: without gradient checkpointing the swapper installs saved-tensor hooks while a swapped block runs, and
any saved tensor that lives in a slot is stored as a reference (block, dtype, shape, stride, offset) and
rebuilt from the block's slot at backward time, after the block was brought back.  With (non-reentrant)
gradient checkpointing the checkpoint's own hooks are in place instead: the block's forward is re-run inside
backward, its forward pre-hook brings the block in, and the recomputed tensors are used right away.

When the block runs in the backward pass is learnt from a gradient hook on the block's outputs: it fires when
the gradient w.r.t. the outputs is complete, i.e. just before the block's own backward, and brings the block in
(if it is not already) and prefetches the block before it.  A slot is reused only after every kernel enqueued
on the compute stream for its previous block (an event recorded at release, waited on by the copy stream).

Which blocks are swapped: the LAST ``n``.  Their first transfer then overlaps the compute of the resident
blocks before them (a pre-hook on the preceding block starts it), the last swapped block is still resident
when backward starts (it is the first one backward needs), the first swapped block is still resident when the
next step's forward reaches it, and the backward of the resident blocks at the start needs no transfer at
all.  (kohya's sd-scripts likewise starts each step with the later blocks in host memory.)  In FLUX the later
blocks are the single-stream blocks, which are also the smaller ones, so the slot pool (sized for the largest
swapped block) stays small.

Integration (trainer order)
---------------------------
1. Load the denoiser on the CPU (do not move it to the GPU first: that is what must not fit), freeze it
   (``requires_grad_(False)``).
2. Build and apply the adapters (DoRA reads the base weights when it is built; the adapter network is moved to
   the device as usual).
3. ``enable_gradient_checkpointing()`` (before or after step 4: it is read at forward time).
4. ``swapper = swap_blocks_of(denoiser, arch.block_lists, n, device)``: swaps the last ``n`` blocks and moves
   the rest of the denoiser to the device.
5. ``compile_model(...)`` (regional compile) AFTER step 4: dynamo does not guard on module hooks, so hooks
   must exist before the first compiled call.  The hooks are excluded from compilation
   (``torch.compiler.disable``); the block bodies are compiled.  Not with CUDA-graph compile modes
   ("reduce-overhead", "max-autotune"): the weights' addresses change from step to step.
6. Train as usual: no per-step calls.  ``swapper.detach()`` when done (everything back on the device).

Trained weights (full fine-tuning)
----------------------------------
With ``trainable=True`` the swapped blocks' trainable parameters move too (sd-scripts trains FLUX.1 full
fine-tunes in 24 GB this way).  Their gradients must be used while the block is on the device, so the optimizer
steps inside the backward pass (``FusedBackwardOptimizer``) and tells the swapper after each step
(:meth:`BlockSwapper.param_updated`); the block's slot is then copied back into its host master before the slot
is reused, and at the end of the backward pass for the blocks still resident (a device-to-host copy on the copy
stream, ordered before the next transfer into that slot).  Anything that reads the weights on the host (saving,
EMA, a training state) goes through :meth:`BlockSwapper.live`, which waits for those copies.

Do not call ``.to()`` on the model, or read its ``state_dict()``, while attached: offloaded weights are
placeholders (:meth:`BlockSwapper.host_state_dict` gives the real values).  Keep the frozen weights in the
compute dtype (the trainer does): an autocast cast of a weight is a new tensor that autograd saves on the
device, which undoes the saving for that weight.
"""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["BlockSwapper", "collect_blocks", "swap_blocks_of", "swapped_weight_ref", "rebuild_swapped_weight"]

_ALIGN = 512  # byte alignment of every tensor inside a slot: as the CUDA caching allocator aligns
_ACTIVE: weakref.WeakSet[BlockSwapper] = weakref.WeakSet()


def _no_compile(fn):
    """Run ``fn`` eagerly even inside a compiled region (hooks move data and talk to CUDA streams)."""
    try:
        return torch.compiler.disable(fn)
    except Exception:  # pragma: no cover - very old torch
        return fn


def _in_backward() -> bool:
    """Whether we are inside an autograd backward (e.g. a gradient checkpoint re-running a forward)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover
        return False


def _is_subclass(t: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    return is_traceable_wrapper_subclass(t)


def _plain_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold a tensor's data: itself, or a subclass' inner tensors (recursively)."""
    if not _is_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    out: list[torch.Tensor] = []
    for n in names:
        out += _plain_parts(getattr(t, n))
    return out


def _tensors_in(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 3 and isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors_in(o, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors_in(o, depth + 1)


@dataclass
class _Leaf:
    """One plain frozen tensor of a swapped block: ``tensor`` keeps its identity, its ``.data`` moves."""
    tensor: torch.Tensor
    source: torch.Tensor | None  # the original data until the host buffer is filled
    offset: int  # byte offset inside the block's host buffer and inside a slot (same layout)
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size
    host: torch.Tensor | None = None  # view into the block's host buffer (the master copy)
    trained: bool = False  # a trainable parameter (``trainable=True``): the slot's values go back to the host


@dataclass
class _SubclassParam:
    module: nn.Module
    name: str
    wrapper: torch.Tensor
    leaves: list[_Leaf]


@dataclass
class _Entry:
    index: int
    block: nn.Module
    leaves: list[_Leaf] = field(default_factory=list)
    subclass_params: list[_SubclassParam] = field(default_factory=list)
    nbytes: int = 0  # slot bytes this block needs (aligned)
    host: torch.Tensor | None = None  # flat uint8 master copy of all leaves, slot layout (pinned on CUDA)
    slot: int | None = None
    last_use: int = 0
    dirty: bool = False  # the optimizer changed its weights in the slot since they were last written back


@dataclass
class _WeightRef:
    """What a saved-tensor hook keeps instead of a tensor that lives in a slot."""
    entry: _Entry
    dtype: torch.dtype
    size: tuple
    stride: tuple
    offset: int  # storage offset in elements of ``dtype``


@dataclass
class _Chained:
    unpack: Any
    packed: Any


class BlockSwapper:
    """Keep the frozen weights of the last ``blocks_to_swap`` of ``blocks`` in host memory and stream them in.

    ``blocks``: the model's repeated blocks in execution order (see :func:`collect_blocks`).
    ``device``: the compute device.  ``prefetch``: how many blocks ahead are copied while one computes; the
    device pool holds ``prefetch + 1`` slots, each as large as the largest swapped block.
    ``simulate`` (default: the device is the CPU): no CUDA stream, events or pinning - copies are synchronous -
    but the same hooks, ordering, slots, placeholders and prefetch run, so CPU tests exercise the real path.
    ``keep_last_resident``: in a forward with grad enabled, leave the last swapped block in its slot (backward
    needs it first).  ``trainable``: swap the blocks' trainable parameters too (full fine-tuning with an
    optimizer that steps in the backward pass; see the module docstring).

    ``attach()`` offloads and installs the hooks; ``detach(to=None)`` puts every weight back on ``device`` (or on
    ``to``, e.g. "cpu") and removes the hooks.  ``bytes_swapped``: bytes of frozen weights kept in host memory;
    ``resident_bytes``: device bytes the swapped blocks take (the slot pool); ``loads``: host-to-device block
    copies so far.
    """

    def __init__(self, blocks: Iterable[nn.Module], blocks_to_swap: int, device: torch.device | str, *,
                 prefetch: int = 1, simulate: bool | None = None, pin_memory: bool = True,
                 keep_last_resident: bool = True, prefetch_trigger: nn.Module | None = "auto",
                 trainable: bool = False):
        self.blocks = list(blocks)
        self.trainable = bool(trainable)
        n = int(blocks_to_swap)
        if n < 0 or n > len(self.blocks):
            raise ValueError(f"blocks_to_swap must be between 0 and {len(self.blocks)} (the model's blocks), "
                             f"not {blocks_to_swap}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.simulate = self.device.type != "cuda" if simulate is None else bool(simulate)
        if not self.simulate and self.device.type != "cuda":
            raise ValueError(f"block swapping streams to a CUDA device; {self.device} needs simulate=True")
        self.pin_memory = pin_memory and not self.simulate
        self.prefetch = max(0, int(prefetch))
        self.keep_last_resident = keep_last_resident
        self.swapped = self.blocks[len(self.blocks) - n:] if n else []
        if prefetch_trigger == "auto":
            prefetch_trigger = self.blocks[len(self.blocks) - n - 1] if 0 < n < len(self.blocks) else None
        self.prefetch_trigger = prefetch_trigger
        self.enabled = True  # False: hooks do nothing (tests use it to show a non-resident block is detected)
        self.loads = 0
        self.attached = False
        self._entries: list[_Entry] = []
        self._slots: list[torch.Tensor] = []
        self._slot_ptr: dict[int, int] = {}
        self._slot_owner: list[_Entry | None] = []
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._free: list[int] = []
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._trainable: list[torch.Tensor] = []
        self._pushed: list[Any] = []  # per running block: the saved-tensor hooks it pushed, or None
        self._current: _Entry | None = None
        self._clock = itertools.count(1)
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._stream = None
        self._ready: list[Any] = []
        self._freed: list[Any] = []
        self._trained: dict[int, tuple[_Entry, _Leaf]] = {}  # id(parameter) → its block and leaf
        self._end_of_backward_queued = False

    # -- sizes -----------------------------------------------------------------------------------------
    @property
    def bytes_swapped(self) -> int:
        return sum(leaf.nbytes for e in self._entries for leaf in e.leaves)

    @property
    def resident_bytes(self) -> int:
        return sum(s.nbytes for s in self._slots)

    @staticmethod
    def estimate(blocks: Iterable[nn.Module], blocks_to_swap: int, prefetch: int = 1,
                 trainable: bool = False) -> dict[str, int]:
        """Bytes moved off the device and bytes the slot pool takes, before attaching (for a plan)."""
        blocks = list(blocks)
        swapped = blocks[len(blocks) - blocks_to_swap:] if blocks_to_swap else []
        sizes = []
        for b in swapped:
            size = 0
            for t in itertools.chain((p for p in b.parameters() if trainable or not p.requires_grad), b.buffers()):
                for part in _plain_parts(t):
                    size += -(-part.numel() * part.element_size() // _ALIGN) * _ALIGN
            sizes.append(size)
        pool = (min(len(sizes), prefetch + 1) * max(sizes)) if sizes else 0
        return {"bytes_swapped": sum(sizes), "resident_bytes": pool}

    # -- attach / detach -------------------------------------------------------------------------------
    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        ph = self._placeholders.get(dtype)
        if ph is None:
            with torch.inference_mode(False), torch.no_grad():
                ph = self._placeholders[dtype] = torch.empty(0, dtype=dtype, device=self.device)
        return ph

    def _add_leaf(self, e: _Entry, target: torch.Tensor, source: torch.Tensor) -> _Leaf | None:
        if source.numel() == 0:
            if target.device != self.device:
                target.data = target.data.to(self.device)
            return None
        leaf = _Leaf(target, source.detach(), e.nbytes, source.numel() * source.element_size(), source.dtype,
                     source.shape)
        e.nbytes += -(-leaf.nbytes // _ALIGN) * _ALIGN
        e.leaves.append(leaf)
        return leaf

    def _fill_host(self, e: _Entry) -> None:
        """One flat host buffer per block in the slot layout (one copy per block; pinned by registering the
        exact bytes: the caching pinned allocator would round each allocation up to a power of two)."""
        host = torch.empty(max(e.nbytes, 1), dtype=torch.uint8, device="cpu")
        for leaf in e.leaves:
            leaf.host = host[leaf.offset:leaf.offset + leaf.nbytes].view(leaf.dtype).view(leaf.shape)
            leaf.host.copy_(leaf.source)
            leaf.source = None
            leaf.tensor.data = self._placeholder(leaf.dtype)  # the original storage can go now
        if self.pin_memory:
            host = self._pin(host, e)
        e.host = host

    def _pin(self, host: torch.Tensor, e: _Entry) -> torch.Tensor:
        try:
            if int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), 1)) == 0:
                self._registered.append(host)
                return host
        except Exception:
            pass
        pinned = host.pin_memory()  # fallback: the caching pinned allocator
        for leaf in e.leaves:
            leaf.host = pinned[leaf.offset:leaf.offset + leaf.nbytes].view(leaf.dtype).view(leaf.shape)
        return pinned

    def _build_entry(self, index: int, block: nn.Module, seen: set[int]) -> _Entry:
        e = _Entry(index, block)
        with torch.no_grad():
            for module in block.modules():
                for name, p in list(module._parameters.items()):
                    if p is None or id(p) in seen:
                        continue
                    seen.add(id(p))
                    if p.requires_grad and not self.trainable:  # an adapter's: lives on the device, never swapped
                        if p.device != self.device:
                            p.data = p.data.to(self.device)
                        self._trainable.append(p)
                        continue
                    if p.requires_grad:
                        if _is_subclass(p):
                            raise TypeError("a trained parameter cannot be a quantized tensor")
                        leaf = self._add_leaf(e, p, p)
                        if leaf is not None:
                            leaf.trained = True
                            self._trained[id(p)] = (e, leaf)
                        continue
                    if _is_subclass(p):
                        if p.device != self.device:
                            # ``.data =`` cannot move a subclass (its device is wrapper metadata): module-level
                            # move, one parameter at a time, then its inner tensors are swapped like the others
                            # (read back from the moved wrapper: its layout may differ on the device)
                            moved = nn.Parameter(p.to(self.device), requires_grad=False)
                            module._parameters[name] = moved
                            seen.add(id(moved))
                            p = moved
                        sp = _SubclassParam(module, name, p, [])
                        for part in _plain_parts(p):
                            leaf = self._add_leaf(e, part, part)
                            if leaf is not None:
                                sp.leaves.append(leaf)
                        e.subclass_params.append(sp)
                    else:
                        self._add_leaf(e, p, p)
                for name, b in list(module._buffers.items()):
                    if b is None or id(b) in seen:
                        continue
                    seen.add(id(b))
                    if _is_subclass(b):  # rare: just keep it on the device
                        module._buffers[name] = b.to(self.device)
                        continue
                    self._add_leaf(e, b, b)
            self._fill_host(e)
        return e

    def attach(self) -> BlockSwapper:
        if self.attached:
            return self
        for i, b in enumerate(self.swapped):
            for j, other in enumerate(self.swapped):
                if i != j and any(m is b for m in other.modules()):
                    raise ValueError("swapped blocks must not contain one another")
        seen: set[int] = set()
        self._registered: list[torch.Tensor] = []
        self._unregister = weakref.finalize(self, _unregister, self._registered)
        self._entries = [self._build_entry(i, b, seen) for i, b in enumerate(self.swapped)]
        n_slots = min(len(self._entries), self.prefetch + 1)
        size = max((e.nbytes for e in self._entries), default=0)
        with torch.inference_mode(False), torch.no_grad():
            self._slots = [torch.empty(max(size, 1), dtype=torch.uint8, device=self.device) for _ in range(n_slots)]
            for s, buf in enumerate(self._slots):
                for e in self._entries:  # views made once: no per-step allocation or Python slicing
                    self._views[(s, e.index)] = [
                        buf[leaf.offset:leaf.offset + leaf.nbytes].view(leaf.dtype).view(leaf.shape)
                        for leaf in e.leaves]
        self._slot_ptr = {buf.untyped_storage().data_ptr(): s for s, buf in enumerate(self._slots)}
        self._slot_owner = [None] * n_slots
        self._free = list(range(n_slots))[::-1]
        if not self.simulate:
            self._stream = torch.cuda.Stream(self.device)
            self._ready = [torch.cuda.Event() for _ in range(n_slots)]
            self._freed = [torch.cuda.Event() for _ in range(n_slots)]
        for e in self._entries:
            self._handles.append(e.block.register_forward_pre_hook(self._make_pre_forward(e)))
            self._handles.append(e.block.register_forward_hook(self._make_post_forward(e), with_kwargs=True))
        if self.prefetch_trigger is not None and self._entries:
            self._handles.append(self.prefetch_trigger.register_forward_pre_hook(self._make_trigger()))
        self.attached = True
        _ACTIVE.add(self)
        return self

    def detach(self, to: torch.device | str | None = None) -> None:
        """Every swapped weight back as a normal tensor on ``to`` (default: the compute device); hooks removed."""
        if not self.attached:
            return
        target = self.device if to is None else torch.device(to)
        self._sync_host()   # trained weights changed in their slots go back first
        self._drop_pushed()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._stream is not None:
            self._stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        with torch.inference_mode(False), torch.no_grad():
            for e in self._entries:
                for leaf in e.leaves:
                    # each tensor gets its own storage again (not a view of the block's host buffer)
                    leaf.tensor.data = leaf.host.to(target, copy=True) if target.type != "cpu" else leaf.host.clone()
                    leaf.host = None
                for sp in e.subclass_params:
                    if sp.wrapper.device != target and sp.leaves:
                        # the wrapper's device is metadata: rebuild it around the moved inner tensors
                        names, meta = sp.wrapper.__tensor_flatten__()
                        inner = {n: getattr(sp.wrapper, n) for n in names}
                        rebuilt = type(sp.wrapper).__tensor_unflatten__(inner, meta, sp.wrapper.size(),
                                                                        sp.wrapper.stride())
                        sp.module._parameters[sp.name] = nn.Parameter(rebuilt, requires_grad=False)
                for i, t in enumerate(self._registered):  # free this block's host buffer before the next
                    if t is e.host:
                        _unregister([self._registered.pop(i)])
                        break
                e.host = None
        self._unregister()
        self._entries = []
        self._slots = []
        self._views.clear()
        self._slot_ptr = {}
        self._slot_owner = []
        self._free = []
        self._current = None
        self._stream = None
        self.attached = False
        _ACTIVE.discard(self)

    def host_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the swapped weights' values in place of their placeholders (copies: the
        host masters are views of one buffer per block, which a safetensors file may not hold)."""
        self._sync_host()
        real = {id(leaf.tensor): leaf.host for e in self._entries for leaf in e.leaves}
        return {k: real[id(v)].clone() if id(v) in real else v.detach()
                for k, v in model.state_dict(keep_vars=True).items()}

    # -- moving blocks ---------------------------------------------------------------------------------
    def _take_slot(self, e: _Entry, protect: tuple[_Entry, ...]) -> int | None:
        if self._free:
            return self._free.pop()
        victims = [x for x in self._entries if x.slot is not None and x is not e and all(x is not p for p in protect)]
        if not victims:
            return None
        self._release(min(victims, key=lambda x: x.last_use))
        return self._free.pop()

    def _load(self, e: _Entry, protect: tuple[_Entry, ...] = ()) -> bool:
        """Start bringing ``e`` into a slot (no wait).  False if no slot could be freed."""
        if e.slot is not None:
            return True
        slot = self._take_slot(e, protect)
        if slot is None:
            return False
        views = self._views[(slot, e.index)]
        dst = self._slots[slot][:e.host.numel()]
        if self._stream is not None:
            # the slot's previous block: every kernel that used it was enqueued before the release event
            self._stream.wait_event(self._freed[slot])
            with torch.cuda.stream(self._stream):
                dst.copy_(e.host, non_blocking=True)  # the whole block in one transfer
            self._ready[slot].record(self._stream)
        else:
            dst.copy_(e.host)
        for v, leaf in zip(views, e.leaves):
            leaf.tensor.data = v
        e.slot = slot
        e.last_use = next(self._clock)
        self._slot_owner[slot] = e
        self.loads += 1
        return True

    def _ensure(self, e: _Entry) -> None:
        """``e`` resident, and the compute stream ordered after its copy."""
        if e.slot is None:
            self._load(e)  # may evict any other block: the caller is done with it
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[e.slot])
        e.last_use = next(self._clock)

    def _release(self, e: _Entry) -> None:
        if e.slot is None:
            return
        self._write_back(e)
        for leaf in e.leaves:
            leaf.tensor.data = self._placeholder(leaf.dtype)
        if self._stream is not None:
            self._freed[e.slot].record(torch.cuda.current_stream(self.device))
        self._slot_owner[e.slot] = None
        self._free.append(e.slot)
        e.slot = None
        if self._current is e:
            self._current = None

    # -- trained weights -------------------------------------------------------------------------------
    def param_updated(self, p: torch.Tensor) -> None:
        """The optimizer has just changed ``p`` (called inside the backward pass, after its step): if ``p`` lives
        in a swapped block, that block's slot now holds the newest values and must go back to the host."""
        found = self._trained.get(id(p))
        if found is None:
            return
        entry, _ = found
        if entry.slot is None:
            raise RuntimeError(f"block {entry.index} was sent back before its weights were updated")
        entry.dirty = True
        if not self._end_of_backward_queued and _in_backward():
            self._end_of_backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._end_of_backward_queued = False
        for e in self._entries:
            self._write_back(e)

    def _write_back(self, e: _Entry) -> None:
        """Copy a changed block's trained weights from its slot into the host master copy (the frozen ones never
        change).  On CUDA the copy runs on the copy stream after everything queued so far on the compute stream,
        and before any later transfer into the slot (same stream)."""
        if not e.dirty or e.slot is None:
            return
        e.dirty = False
        views = self._views[(e.slot, e.index)]
        pairs = [(leaf.host, v) for leaf, v in zip(e.leaves, views) if leaf.trained]
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for host, v in pairs:
                    host.copy_(v, non_blocking=True)
        else:
            for host, v in pairs:
                host.copy_(v)

    def _sync_host(self) -> None:
        """The host master copies up to date: changed blocks written back and the copies finished."""
        for e in self._entries:
            self._write_back(e)
        if self._stream is not None:
            self._stream.synchronize()

    def live(self, tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor's current values: the host master copy (a view: do not modify) for a swapped weight, the
        tensor itself otherwise."""
        self._sync_host()
        real = {id(leaf.tensor): leaf.host for e in self._entries for leaf in e.leaves}
        return [real.get(id(t), t) for t in tensors]

    def trained_parameters(self) -> list[torch.Tensor]:
        """The trainable parameters this swapper moves (``trainable=True``)."""
        return [leaf.tensor for _, leaf in self._trained.values()]

    @torch.no_grad()
    def load_value(self, p: torch.Tensor, value: torch.Tensor) -> None:
        """Set a swapped trainable parameter (a resumed state): its host master and, if resident, its slot."""
        entry, leaf = self._trained[id(p)]
        self._sync_host()
        leaf.host.copy_(value)
        entry.dirty = False
        if entry.slot is not None:
            p.data.copy_(value)

    def _prefetch(self, e: _Entry, direction: int) -> None:
        protect: tuple[_Entry, ...] = (e,)
        for k in range(1, self.prefetch + 1):
            i = e.index + direction * k
            if not 0 <= i < len(self._entries):
                return
            nxt = self._entries[i]
            if not self._load(nxt, protect):
                return
            protect += (nxt,)

    # -- saved tensors (no gradient checkpointing) -----------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        ref = self._ref_for(t)
        return t if ref is None else ref

    def _ref_for(self, t: torch.Tensor) -> _WeightRef | None:
        if type(t) not in (torch.Tensor, nn.Parameter) or t.layout != torch.strided:
            return None
        try:
            slot = self._slot_ptr.get(t.untyped_storage().data_ptr())
        except Exception:
            return None
        if slot is None or self._slot_owner[slot] is None:
            return None
        return _WeightRef(self._slot_owner[slot], t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def _unpack(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, _WeightRef):
            return self._rebuild(obj)
        return obj

    def _rebuild(self, ref: _WeightRef) -> torch.Tensor:
        if not self.attached:
            raise RuntimeError("a tensor saved by a swapped block is used after BlockSwapper.detach()")
        self._ensure(ref.entry)  # normally resident already (the gradient hook on the block's outputs)
        buf = self._slots[ref.entry.slot]
        out = torch.empty(0, dtype=ref.dtype, device=buf.device)
        return out.set_(buf.untyped_storage(), ref.offset, ref.size, ref.stride)

    def _hooks_for_block(self) -> Any:
        """The saved-tensor hooks to push for a swapped block's forward, or None."""
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if top is None:
            return self._hooks
        owner = getattr(top[0], "__self__", None)
        if owner is self or getattr(owner, "keeps_swapped_references", False):  # e.g. activation offload
            return None
        if getattr(top[0], "__module__", "") == "torch.utils.checkpoint":
            # a gradient checkpoint keeps nothing and re-runs the block in backward (this hook brings it in)
            return None
        # someone else's hooks (e.g. torch.autograd.graph.save_on_cpu): weights become references, the rest
        # still goes through them
        outer_pack, outer_unpack = top

        def pack(t):
            ref = self._ref_for(t)
            return ref if ref is not None else _Chained(outer_unpack, outer_pack(t))

        def unpack(obj):
            return self._rebuild(obj) if isinstance(obj, _WeightRef) else obj.unpack(obj.packed)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _drop_pushed(self) -> None:
        """Pop saved-tensor hooks a forward left pushed (it raised between the block's pre- and post-hook)."""
        while self._pushed:
            hooks = self._pushed.pop()
            if hooks is not None:
                hooks.__exit__(None, None, None)

    # -- hooks -----------------------------------------------------------------------------------------
    def _make_trigger(self):
        @_no_compile
        def trigger(module, args):
            if self.enabled and not _in_backward():
                self._load(self._entries[0], (self._current,) if self._current else ())
        return trigger

    def _make_pre_forward(self, e: _Entry):
        @_no_compile
        def pre_forward(module, args):
            if not self.enabled:
                return
            if _in_backward():  # gradient checkpointing re-runs the forward inside backward
                self._ensure(e)
                self._current = e
                self._prefetch(e, -1)
                return
            if self._pushed:
                self._drop_pushed()
            self._ensure(e)
            self._current = e
            self._prefetch(e, +1)
            hooks = self._hooks_for_block() if torch.is_grad_enabled() else None
            if hooks is not None:
                hooks.__enter__()
            self._pushed.append(hooks)
        return pre_forward

    def _make_post_forward(self, e: _Entry):
        def pre_backward(grad):
            self._ensure(e)
            self._current = e
            self._prefetch(e, -1)

        pre_backward = _no_compile(pre_backward)

        @_no_compile
        def post_forward(module, args, kwargs, output):
            if not self.enabled or _in_backward():
                return
            hooks = self._pushed.pop() if self._pushed else None
            if hooks is not None:
                hooks.__exit__(None, None, None)
            if torch.is_grad_enabled():
                inputs = {id(t) for t in _tensors_in((args, kwargs))}
                for t in _tensors_in(output):
                    # a pass-through input's gradient belongs to an earlier block
                    if t.requires_grad and id(t) not in inputs:
                        t.register_hook(pre_backward)
                if self.keep_last_resident and e is self._entries[-1]:
                    return
            self._release(e)
        return post_forward


def _unregister(tensors: list[torch.Tensor]) -> None:
    """Undo cudaHostRegister (while the tensors are still alive: the finalizer holds them)."""
    for t in tensors:
        try:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        except Exception:
            pass
    tensors.clear()


def collect_blocks(model: nn.Module, block_list_names: Iterable[str]) -> list[nn.Module]:
    """The blocks of the named ``ModuleList`` attributes of ``model``, in the order given, which must be the
    execution order (prefetch follows it; another order stays correct, with less overlap).  A name that is a
    single module (a UNet's ``mid_block``) counts as one block; a missing / None one is skipped."""
    blocks: list[nn.Module] = []
    for name in block_list_names:
        obj = getattr(model, name, None)
        if isinstance(obj, (nn.ModuleList, nn.Sequential)):
            blocks += list(obj)
        elif isinstance(obj, nn.Module):
            blocks.append(obj)
    return blocks


def swap_blocks_of(model: nn.Module, block_list_names: Iterable[str], blocks_to_swap: int,
                   device: torch.device | str, **kwargs) -> BlockSwapper:
    """Swap the last ``blocks_to_swap`` blocks of ``model``'s block lists (e.g. FLUX's
    ``("transformer_blocks", "single_transformer_blocks")``) and move the rest of the model to ``device``.
    Returns the attached :class:`BlockSwapper` (keyword arguments go to it)."""
    swapper = BlockSwapper(collect_blocks(model, block_list_names), blocks_to_swap, device, **kwargs).attach()
    model.to(swapper.device)  # nothing is resident right after attach: swapped weights are device placeholders
    return swapper


def swapped_weight_ref(t: torch.Tensor) -> tuple[BlockSwapper, Any] | None:
    """(swapper, reference) when ``t`` is a weight of a block some attached swapper holds (its slot memory is
    reused, so a saved copy would be wrong and a reference is what to keep), else None."""
    for swapper in list(_ACTIVE):
        ref = swapper._ref_for(t)
        if ref is not None:
            return swapper, ref
    return None


def rebuild_swapped_weight(swapper: BlockSwapper, ref: Any) -> torch.Tensor:
    """The tensor behind a reference from :func:`swapped_weight_ref`, brought back into its slot if needed."""
    return swapper._rebuild(ref)

