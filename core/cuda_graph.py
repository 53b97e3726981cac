"""The whole training step (forward, backward, clipping, optimizer) captured in a CUDA graph per bucket shape
(``memory.cuda_graphs``).

Why: the UNet families' steps are bound by the host, not the GPU (FIELD_NOTES "Measured here": the GPU idles
60–85% of an SD1.5 / SDXL step spent launching 10k–23k kernels); a replayed graph launches them all at once.

How it follows ``torch/cuda/graphs.py`` and ``torch/optim/adam.py``:

- Each input shape (the shapes and dtypes of the step's tensors: one per bucket, and masks / loss weights when
  present) gets its own graph, at most :data:`MAX_GRAPHS`; a shape beyond those runs eagerly (logged once).
- The first :data:`WARMUP_STEPS` steps of a shape run eagerly on a side stream, as PyTorch requires before a
  capture: the optimizer state, cuBLAS / cuDNN workspaces and the noise schedule's tables on the device are
  created then, outside the graph.  They are real training steps; nothing is run twice.
- Inputs are copied into the shape's static buffers before every replay; the outputs (loss, gradient norm) are
  the graph's static tensors, which the caller reads (queues device work on) before the next replay.
- The learning rate is a 0-d device tensor in each parameter group: torch's LRScheduler fills such a tensor in
  place, outside the graph, and the captured AdamW (``capturable``) reads it and steps its counts on the device.
- Noise and timesteps are drawn inside the graph from the default CUDA generator, which ``torch.cuda.graph``
  registers: each replay advances its offset, so each replay draws new numbers.
- The step sets the gradients to None before its forward pass, so a capture allocates them in the graph's memory
  and each replay overwrites them.  The graphs share one memory pool: they replay one at a time on one stream, and
  what outlives a replay (inputs, outputs, optimizer state) is held outside the pool or by the graph's entry.
- A capture that fails (an op that synchronises or reads the host) is logged with its reason; capture is then
  off for the rest of the run and every step runs eagerly.

The loss buffer (``core.trainer.StepLosses``) and ``DivergenceGuard`` run outside the graph, on its static
outputs: they only queue device work, so they cost no synchronisation either."""
from __future__ import annotations

import contextlib
from functools import partial

import torch

from core.speed import host_values

#: graphs kept per run (one per input shape); each holds its shape's activations in the shared pool
MAX_GRAPHS = 8
#: eager steps of a new shape before it is captured (PyTorch's documented whole-network example uses 3)
WARMUP_STEPS = 3
#: optimizers whose step can be captured: torch's AdamW (fused, or ``capturable``)
CAPTURABLE_OPTIMIZERS = ("AdamW",)


def capture_blockers(settings, arch, plan) -> list[str]:
    """Why this run's step cannot be captured in a CUDA graph (empty: it can).  ``plan`` is the memory plan
    (device, processes, swapping, offload, quantized base, precision, 8-bit state), ``arch`` the family's
    plug-in.  Each reason names the setting to change where one can."""
    from core.plan import steps_in_backward
    s = settings
    reasons = []
    if plan.device != "cuda":
        reasons.append("there is no CUDA GPU")
    if plan.processes > 1:
        reasons.append(f"{plan.processes} processes exchange gradients through host code (core.distributed; "
                       "distributed.num_processes)")
    if plan.blocks_to_swap:
        reasons.append(f"{plan.blocks_to_swap} blocks are swapped between CPU and GPU memory on the host's schedule "
                       "(memory.blocks_to_swap)")
    if plan.activation_offload:
        reasons.append("activations are offloaded to CPU memory (memory.activation_offload)")
    if plan.quantize_base != "none":
        reasons.append(f"the base is quantized ({plan.quantize_base}): the quantized layers' forward has not been "
                       "checked for host work (memory.quantize_base)")
    if steps_in_backward(s):
        reasons.append("the fused backward pass steps the optimizer from hooks inside the backward pass "
                       "(optimizer.fused_backward_pass)")
    optimizer = "AdamW8bit" if plan.optimizer_8bit and s.optimizer.optimizer_type == "AdamW" \
        else s.optimizer.optimizer_type
    if optimizer not in CAPTURABLE_OPTIMIZERS:
        reasons.append(f"the optimizer {optimizer} has no capturable step; torch's AdamW has "
                       "(optimizer.optimizer_type" + (", memory.optimizer_8bit)" if plan.optimizer_8bit else ")"))
    if s.schedule.gradient_accumulation_steps > 1:
        reasons.append("gradient accumulation spreads an optimizer step over several batches, and the captured step "
                       "is one batch (schedule.gradient_accumulation_steps)")
    if plan.mixed_precision == "fp16":
        reasons.append("fp16 loss scaling skips steps with infinite gradients by reading them on the host "
                       "(memory.mixed_precision)")
    if s.network.algorithm == "full_finetune":
        reasons.append("full fine-tuning has not been checked under capture (network.algorithm)")
    from core.embeddings import trains_new_token
    if trains_new_token(s.network, arch) or s.network.train_text_encoder:
        reasons.append("the text encoder trains: captions are tokenized and encoded on the host in every step "
                       "(network.train_text_encoder)")
    if s.schedule.multires_noise_iterations > 0:
        reasons.append("multi-resolution noise draws its level sizes on the host every step "
                       "(schedule.multires_noise_iterations)")
    if s.network.module_dropout > 0:
        reasons.append("module dropout decides on the host which layers run (network.module_dropout)")
    if arch.host_conditioning:
        reasons.append(f"{arch.label} reads part of its conditioning on the host every step "
                       f"({', '.join(arch.host_conditioning)})")
    return reasons


def use_device_learning_rates(optimizer, capturable: bool) -> None:
    """Each parameter group's learning rate as a 0-d tensor on its parameters' device (kept if it is one
    already), which the scheduler fills in place (``torch.optim.lr_scheduler._update_param_group_val``) and a
    captured step reads; ``capturable`` (CUDA) lets torch's AdamW keep its step counts on the device.  The
    optimizer's saved state keeps plain numbers (:func:`portable_groups`)."""
    inner = getattr(optimizer, "optimizer", optimizer)   # accelerate's wrapper
    for group in inner.param_groups:
        device = group["params"][0].device
        lr = group["lr"]
        group["lr"] = (lr.detach().to(device, torch.float32) if isinstance(lr, torch.Tensor)
                       else torch.tensor(float(lr), dtype=torch.float32, device=device))
        if capturable:
            group["capturable"] = True
    inner.register_state_dict_post_hook(portable_groups)


def portable_groups(optimizer, state: dict) -> dict:
    """A saved state that an uncaptured run (another optimizer setup, the CPU) resumes from: the learning rates
    as numbers (read from the device at a save, not in a step) and ``capturable`` off; a captured resumed run
    turns both back on.  (``state_dict`` packs each group into a new dict: the live groups keep their tensors.)"""
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        if group.get("capturable"):
            group["capturable"] = False
    return state


def capture_backend(device: torch.device) -> TorchGraphs | None:
    """How steps on ``device`` are captured: CUDA graphs, or None (the step runs eagerly)."""
    return TorchGraphs(device) if device.type == "cuda" else None


class TorchGraphs:
    """What capturing needs from ``torch.cuda``: a side stream, one memory pool for every graph, and
    :meth:`capture`.  (The tests replace this object: the CPU cannot capture.)"""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def side_stream(self):
        """Eager warm-up work on the side stream, ordered after what was queued before and before what follows."""
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield
        current.wait_stream(self.stream)

    def capture(self, step):
        """A graph of ``step()`` (not run: :meth:`CapturedGraph.replay` runs it).  "thread_local": only this
        thread's unsafe calls fail the capture, not the batch prefetcher's pinned copies."""
        return CapturedGraph(step, self.pool, self.stream)


class CapturedGraph:
    def __init__(self, step, pool, stream):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            self.outputs = step()

    def replay(self) -> None:
        self.graph.replay()


def flat_tensors(tree, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in nested dicts, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        return [pair for key in sorted(tree) for pair in flat_tensors(tree[key], f"{prefix}/{key}")]
    return []


def shape_key(inputs: dict) -> tuple:
    """What a graph is specific to: every input tensor's place, shape and dtype."""
    return tuple((path, tuple(t.shape), t.dtype) for path, t in flat_tensors(inputs))


def static_copy(tree):
    """Fresh tensors shaped like ``tree``'s (the buffers a graph reads), same nesting."""
    if isinstance(tree, torch.Tensor):
        return torch.empty_like(tree)
    return {key: static_copy(value) for key, value in tree.items()}


class _Graph:
    def __init__(self, inputs: dict):
        self.inputs = static_copy(inputs)
        self.graph = None   # a CapturedGraph once captured

    def load(self, inputs: dict) -> None:
        for (_, static), (_, new) in zip(flat_tensors(self.inputs), flat_tensors(inputs)):
            static.copy_(new, non_blocking=True)


class CapturedStep:
    """``step(inputs) -> dict of output tensors`` (one whole optimizer step) replayed from a CUDA graph per input
    shape.  ``inputs`` is a dict of tensors (nested dicts allowed) on the device.  ``graphs`` is the capture
    backend (:class:`TorchGraphs`), or None to run every step eagerly (the CPU)."""

    def __init__(self, step, graphs: TorchGraphs | None, log, max_graphs: int = MAX_GRAPHS):
        self.step = step
        self.backend = graphs
        self.log = log
        self.max_graphs = max_graphs
        self.warmup_steps = WARMUP_STEPS
        self.graphs: dict[tuple, _Graph] = {}
        self.eager_steps: dict[tuple, int] = {}
        self.told_full = False

    @property
    def capturing(self) -> bool:
        return self.backend is not None

    def __call__(self, inputs: dict) -> dict:
        if not self.capturing:
            return self.step(inputs)
        key = shape_key(inputs)
        entry = self.graphs.get(key)
        if entry is not None:
            entry.load(inputs)
            entry.graph.replay()
            return entry.graph.outputs
        done = self.eager_steps.get(key, 0)
        if len(self.graphs) >= self.max_graphs:
            if not self.told_full:
                self.told_full = True
                self.log(f"CUDA graphs: {self.max_graphs} input shapes captured already; the steps of further "
                         "shapes (buckets) run without a graph")
            return self.step(inputs)
        if done < self.warmup_steps:
            self.eager_steps[key] = done + 1
            with self.backend.side_stream():
                return self.step(inputs)
        entry = _Graph(inputs)
        try:
            entry.graph = self.backend.capture(partial(self.step, entry.inputs))
        except Exception as exc:  # noqa: BLE001 - any capture failure: the step still runs, eagerly
            self.backend = None
            self.log(f"CUDA graphs off for the rest of the run: capturing the step failed "
                     f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                     "the steps run eagerly", level="warning")
            return self.step(inputs)
        self.graphs[key] = entry
        self.log(f"CUDA graph {len(self.graphs)} captured for inputs "
                 + ", ".join(f"{path.lstrip('/')} {list(shape)}" for path, shape, _ in key))
        entry.load(inputs)
        entry.graph.replay()
        return entry.graph.outputs


class TrainingStep:
    """One optimizer step of a run (``core.trainer._Run``) on one batch, through a :class:`CapturedStep`: the
    batch's tensors are made eagerly (latents, cached or encoded conditioning, masks, loss weights), then forward,
    backward, clipping and the optimizer step run in the graph.  The learning-rate scheduler steps outside it.
    ``(loss, gradient norm or None) = training_step(batch)``: static tensors, valid until the next call."""

    def __init__(self, run, clipping: bool):
        from accelerate.utils import AutocastKwargs
        self.run = run
        self.clipping = clipping
        cuda = run.device.type == "cuda"
        use_device_learning_rates(run.optimizer, capturable=cuda)
        # autocast's cache of cast weights must be off in a capture (torch.cuda.make_graphed_callables says so)
        self.autocast = partial(run.accelerator.autocast, autocast_handler=AutocastKwargs(cache_enabled=False))
        self.captured = CapturedStep(self.step, capture_backend(run.device), run.log)

    def inputs(self, batch: dict) -> dict:
        run = self.run
        latents, cond = run.step_inputs(batch)
        # the batch's other tensors (masks, a ControlNet's conditioning images) as they are
        extra = {key: value.to(run.device, non_blocking=True) for key, value in batch.items()
                 if isinstance(value, torch.Tensor) and key not in ("latents", "pixels")}
        if batch.get("loss_weights") is not None:
            extra["loss_weights"] = host_values(batch["loss_weights"], run.device)
        return {"latents": latents, "cond": cond, "batch": extra}

    def step(self, inputs: dict) -> dict:
        run = self.run
        run.optimizer.zero_grad(set_to_none=True)   # a capture then allocates the gradients in the graph's pool
        loss = run.batch_loss(inputs["latents"], inputs["cond"], inputs["batch"], self.autocast)
        run.accelerator.backward(loss)
        out = {"loss": loss.detach()}
        if self.clipping:
            out["grad_norm"] = run.accelerator.clip_grad_norm_(run.network.parameters(),
                                                               run.s.optimizer.max_grad_norm)
        run.optimizer.step()
        return out

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.captured(self.inputs(batch))
        return out["loss"], out.get("grad_norm")
