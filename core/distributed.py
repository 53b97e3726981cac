"""Training on several processes with DDP semantics: N worker processes (one per GPU; on the CPU, processes that
share its cores) that together train exactly what one process with N times the batch trains.

Starting.  ``core.train`` calls :func:`train_on_processes` when :func:`process_count` says more than one
(``distributed.num_processes``; 0: one per usable CUDA GPU, 1 without one).  The caller's process hosts the
rendezvous: a TCPStore on 127.0.0.1 on a port the OS assigns (no free-port race), which the workers, started with
``torch.multiprocessing``'s spawn context, join with ``init_process_group(backend, store=…, rank=r,
world_size=n)`` (nccl on CUDA, gloo on the CPU); nothing is read from the environment.  Rank 0's events come back
through a queue to the caller's ``on_event`` (the UI follows rank 0), the caller's stop event is copied into a
shared one, and the caller gets rank 0's TrainResult, or the first failing worker's error with its message (a
killed worker's death rather than the broken connection the others then report).  A worker that fails or dies
ends the others at once: they might otherwise wait for it in a collective, which times out only after
COLLECTIVE_TIMEOUT.

Exactness.  Every worker iterates the same sampler with the global batch (B·N), prepares the inputs of the whole
global batch and draws every random number for it (noise, timesteps, …) as one process would, so the random
streams stay equal on all workers.  Worker r runs the model on rows [r·k, (r+1)·k), k = ⌈rows/N⌉
(:meth:`Peers.rows`; ``core.trainer.diffusion_loss`` slices there, the family slices its own conditioning with
``Architecture.conditioning_rows``).  Its loss is the sum of its rows' losses over the global row count; after
the backward pass the gradients and the step's loss are summed over the workers in one flat all-reduce, so
clipping, the optimizer and the divergence guard see what one process sees.  A worker left without rows (a short
last batch) runs the batch's last row at weight 0: the same layers run and draw the same random numbers as on the
others, and it adds zeros.  What draws randomness per sample inside the model (the adapters' input dropout,
LoRA's per-sample rank dropout) cannot be split that way and is refused (:func:`distributed_problems`), as is
Adafactor's fused backward pass (it steps before the gradients could be summed).

Saving, caching, stopping.  Rank 0 alone writes (adapters, states, previews, logs, TensorBoard); the others wait
until it has written each save, so no worker runs ahead.  The workers share the validation images and add up
their sums (it draws nothing from the training's streams); rank 0 alone renders the previews, with
its random streams forked, so that whatever sampling draws leaves them equal to the others'.  Latents and
text-encoder outputs are computed once, by rank 0, while the others wait; then rank 0 broadcasts what it holds in
memory (``broadcast_object_list``), and with the disk cache the others read its files.  That is the simplest way
that is right for every cache mode: one encoder pass, no second copy on disk.  Waits for rank 0 poll the store
instead of blocking in a collective, so a long caching pass or save never runs into a timeout.  Stop: before
training rank 0 decides and the others follow its announcement in the store; during training all workers agree at
every report interval (an all-reduce of the stop flag), then all save once (rank 0 writes) and return.  A resume
loads the state on every worker: rank 0's saved random state is every worker's.

Strategies.  ``distributed.strategy`` ddp is the above: every worker holds the whole model.  fsdp (a full
fine-tune only) shards the denoiser over the workers and changes what needs all of them: the gradient
reduction, saves, validation and previews (``core.fsdp``)."""
from __future__ import annotations

import contextlib
import math
import pickle
import queue
import threading
import time
import traceback
from dataclasses import fields, replace
from datetime import timedelta

import torch

from core.events import RunFailed, emit
from core.settings import RANKED_ALGORITHMS, Settings, SettingsError, check_consistency

#: how long the workers may take to join the rendezvous (they import torch, diffusers … first)
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)
#: how long one collective may wait for a worker that is alive but does not arrive
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
#: how long the other workers may take to return after rank 0 has (they only wait for its last save)
FINISH_GRACE_S = 60.0
POLL_S = 0.2
_STOP_KEY = "studio/stop"


def process_count(settings: Settings, cuda_gpus: int | None = None) -> int:
    """The run's number of processes: ``distributed.num_processes``, or for 0 one per usable CUDA GPU (1 without
    one).  ``cuda_gpus``: the usable CUDA GPUs (asked from torch when None).  More processes than GPUs on a CUDA
    machine is refused: each process needs a GPU of its own."""
    wanted = settings.distributed.num_processes
    if wanted == 1:
        return 1
    if cuda_gpus is None:
        cuda_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if wanted == 0:
        if cuda_gpus <= 1 and settings.distributed.strategy == "fsdp":
            raise SettingsError("distributed.strategy fsdp shards the model over several GPUs, but distributed."
                                "num_processes 0 (one per GPU) gives one process here: choose DDP (Distributed → "
                                "Strategy), or set distributed.num_processes to 2 or more.")
        return max(1, cuda_gpus)
    if cuda_gpus and wanted > cuda_gpus:
        raise SettingsError(f"distributed.num_processes is {wanted}, but this machine has {cuda_gpus} usable CUDA "
                            f"GPU(s) and each process needs its own. Set at most {cuda_gpus}, or 0 (one per GPU).")
    return wanted


def distributed_problems(settings: Settings, processes: int) -> list[str]:
    """What cannot be trained exactly on ``processes`` processes (0: one per GPU, not known yet), or with the
    chosen strategy (``core.fsdp``)."""
    from core.fsdp import fsdp_problems
    strategy = fsdp_problems(settings, processes)
    if processes <= 1:
        return strategy
    n, o = settings.network, settings.optimizer
    out = []
    why = (f"which cannot be split over {processes} processes exactly: set it to 0, or train on one process "
           "(distributed.num_processes 1)")
    if n.algorithm in RANKED_ALGORITHMS and n.dropout > 0:
        out.append(f"network.dropout ({n.dropout:g}) draws a mask per sample inside the model, {why}")
    if n.algorithm in ("lora", "locon") and n.rank_dropout > 0 and not n.dora:
        out.append(f"network.rank_dropout ({n.rank_dropout:g}) draws a LoRA rank mask per sample inside the model, "
                   f"{why}")
    if o.optimizer_type == "Adafactor" and o.fused_backward_pass:
        out.append(f"optimizer.fused_backward_pass steps each weight inside the backward pass, before the "
                   f"gradients of the {processes} processes could be summed: turn it off, or train on one process "
                   "(distributed.num_processes 1)")
    return strategy + out


def take_rows(arch, components, noised, cond: dict, batch: dict, start: int, stop: int):
    """Rows [start, stop) of what the model and the loss read per sample: the noised batch (every field of
    ``architectures.base.Noised`` holds one value per sample), the family's conditioning (its
    ``conditioning_rows``) and the dataset's batch (every entry of ``TrainingDataset.get_batch`` is per
    sample)."""
    noised = replace(noised, **{f.name: getattr(noised, f.name)[start:stop] for f in fields(noised)})
    return (noised, arch.conditioning_rows(components, cond, start, stop),
            {k: v[start:stop] for k, v in batch.items()})


class Solo:
    """One process: what :class:`Peers` shares between workers, with no one to share it with."""
    rank = 0
    world = 1
    writes = True

    def rows(self, count: int) -> tuple[int, int, int] | None:
        return None

    def stop_requested(self, stop_event) -> bool:
        return stop_event.is_set()

    def announce_stop(self) -> None:
        pass

    def stop_agreed(self, stop_event, check_now: bool) -> bool:
        return stop_event.is_set()

    def sum_gradients(self, params: list[torch.nn.Parameter], losses) -> None:
        pass

    def share_of(self, items: list, same_count: bool = False) -> list[tuple[object, float]]:
        """This worker's part of work that is split by item (the validation images), each with the weight its
        result counts with.  ``same_count``: every worker gets as many (a sharded model's forward pass is a
        collective of all): the short ones repeat the last item at weight 0."""
        return [(item, 1.0) for item in items]

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the workers."""
        return value

    def share_latents(self, cache, fill) -> None:
        fill()

    def captions_to_encode(self, missing: list[str]) -> list[str]:
        return missing

    def share_text(self, text_cache) -> None:
        pass

    def saved(self) -> None:
        pass

    def own_random_streams(self):
        return contextlib.nullcontext()

    def set_cuda_rng_states(self, states: list[torch.Tensor]) -> None:
        torch.cuda.set_rng_state_all(states)


SOLO = Solo()

#: the largest flat buffer the gradients are summed through (DDP's default bucket size)
BUCKET_BYTES = 25 * 2 ** 20


def gradient_buckets(tensors: list[torch.Tensor], cap_bytes: int) -> list[list[torch.Tensor]]:
    """``tensors`` in order, cut into runs of one dtype and at most ``cap_bytes`` each (a tensor larger than the
    cap is a run of its own, summed in place)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not buckets or buckets[-1][-1].dtype != t.dtype or size + nbytes > cap_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    return buckets


class Peers(Solo):
    """One worker of a several-process run: its rank, the row split, the collectives and the waits for rank 0."""

    def __init__(self, rank: int, world: int, store, device: torch.device):
        self.rank, self.world, self.store, self.device = rank, world, store, device
        self.writes = rank == 0
        self.saves = 0
        #: the captions without a disk-cached embedding: rank 0 encodes them for everyone, the others receive them
        self.captions: list[str] = []

    def rows(self, count: int) -> tuple[int, int, int]:
        """(start, stop, count): this worker's contiguous share of a global batch of ``count`` rows."""
        k = math.ceil(count / self.world)
        start = min(self.rank * k, count)
        return start, min(start + k, count), count

    # -- stopping --------------------------------------------------------------------------------------
    def stop_requested(self, stop_event) -> bool:
        """Before training: rank 0 decides, the others follow its announcement."""
        return stop_event.is_set() if self.rank == 0 else self.store.check([_STOP_KEY])

    def announce_stop(self) -> None:
        if self.rank == 0:
            self.store.set(_STOP_KEY, "1")

    def stop_agreed(self, stop_event, check_now: bool) -> bool:
        """During training: at ``check_now`` (the same steps on every worker) all agree, else no one stops."""
        if not check_now:
            return False
        flag = torch.tensor([1.0 if stop_event.is_set() else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    # -- the step --------------------------------------------------------------------------------------
    def sum_gradients(self, params: list[torch.nn.Parameter], losses) -> None:
        """Every gradient and the step's loss summed over the workers, one all-reduce per bucket of at most
        :data:`BUCKET_BYTES` (:func:`gradient_buckets`), so the extra memory is one bucket, not a second copy of
        every gradient (a full fine-tune's are gigabytes).  The parameters with a gradient are the same on every
        worker (the same layers ran).  A sharded parameter's gradient (FSDP: a DTensor) was summed into this
        worker's shard in the backward pass already."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
        from torch.distributed.tensor import DTensor
        step_loss = losses.current.detach().reshape(1).float().clone()
        tensors = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)] + [step_loss]
        for bucket in gradient_buckets(tensors, BUCKET_BYTES):
            if len(bucket) == 1:
                torch.distributed.all_reduce(bucket[0])
                continue
            flat = _flatten_dense_tensors(bucket)
            torch.distributed.all_reduce(flat)
            for tensor, summed in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                tensor.copy_(summed)
        losses.use_step_total(step_loss[0])

    def share_of(self, items: list, same_count: bool = False) -> list[tuple[object, float]]:
        own = [(item, 1.0) for item in items[self.rank::self.world]]
        padding = math.ceil(len(items) / self.world) - len(own) if same_count and items else 0
        return own + [(items[-1], 0.0)] * padding

    def total(self, value: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(value)
        return value

    # -- caching ---------------------------------------------------------------------------------------
    def wait_for_rank0(self, what: str) -> None:
        """Until rank 0 has announced ``what`` (polling the store: no collective, so no timeout); a stop it
        announced instead stops this worker too."""
        from core.trainer import TrainingStopped
        key = f"studio/{what}"
        while not self.store.check([key]):
            if self.store.check([_STOP_KEY]):
                raise TrainingStopped
            time.sleep(POLL_S)

    def announce(self, what: str) -> None:
        self.store.set(f"studio/{what}", "1")

    def broadcast(self, value):
        """Rank 0's ``value`` on every worker."""
        box = [value if self.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def share_latents(self, cache, fill) -> None:
        """Rank 0 fills the latent cache (``fill``) while the others wait; then they get its latents: broadcast
        from memory, or read from the files it wrote ("off" caches nothing: rank 0 has checked every image)."""
        if self.rank == 0:
            fill()
            self.announce("latents")
        else:
            self.wait_for_rank0("latents")
        if cache.mode == "memory":
            latents = self.broadcast(cache.entries() if self.rank == 0 else None)
            if self.rank:
                cache.adopt(latents)
        elif cache.mode == "disk" and self.rank:
            fill()

    def captions_to_encode(self, missing: list[str]) -> list[str]:
        """What this worker encodes itself: rank 0 every caption not on disk, the others none (they receive)."""
        self.captions = list(missing)
        return missing if self.rank == 0 else []

    def share_text(self, text_cache) -> None:
        """After rank 0 has encoded :attr:`captions`: its outputs on every worker."""
        if text_cache is None:
            return
        if self.rank == 0:
            self.announce("text")
        else:
            self.wait_for_rank0("text")
        entries = self.broadcast({c: text_cache.entries[c] for c in self.captions} if self.rank == 0 else None)
        if self.rank:
            text_cache.adopt({c: entries[c] for c in self.captions})

    # -- saving and resuming ---------------------------------------------------------------------------
    def own_random_streams(self):
        """Rank 0 renders the previews alone: whatever they draw must not move its random streams away from
        the others'."""
        return torch.random.fork_rng(devices=[self.device.index] if self.device.type == "cuda" else [])

    def set_cuda_rng_states(self, states: list[torch.Tensor]) -> None:
        """A saved state's CUDA random state: rank 0 drew on GPU 0, and every worker draws what rank 0 draws."""
        torch.cuda.set_rng_state(states[0])

    def saved(self) -> None:
        """Rank 0 has written a save (called in the same order as :meth:`wait_for_save` on the others)."""
        self.saves += 1
        self.announce(f"save-{self.saves}")

    def wait_for_save(self) -> None:
        self.saves += 1
        self.wait_for_rank0(f"save-{self.saves}")


# -- the caller's side -------------------------------------------------------------------------------------

def train_on_processes(settings: Settings, processes: int, on_event, stop_event: threading.Event, config):
    """Train on ``processes`` worker processes (see the module docstring); returns rank 0's TrainResult."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    problems = distributed_problems(settings, processes) if settings.distributed.num_processes == 0 else []
    problems += check_consistency(settings)
    if problems:
        raise SettingsError("Cannot start:\n" + "\n".join("  " + p for p in problems))
    cuda = torch.cuda.is_available()
    store = dist.TCPStore("127.0.0.1", 0, processes, is_master=True, wait_for_workers=False,
                          timeout=RENDEZVOUS_TIMEOUT)
    ctx = mp.get_context("spawn")
    messages, stop = ctx.Queue(), ctx.Event()
    # not daemonic: a daemonic process may not start processes of its own (torch.compile's compile workers)
    workers = [ctx.Process(target=_worker, args=(rank, processes, store.port, cuda, settings, config, messages, stop),
                           name=f"training worker {rank}") for rank in range(processes)]
    for w in workers:
        w.start()
    returned = False
    try:
        result = _follow(workers, messages, stop, stop_event, on_event)
        returned = True
        return result
    finally:
        for w in workers:
            if returned:  # they are closing their process groups
                w.join(10)
            if w.is_alive():
                w.terminate()
                w.join(10)
            if w.is_alive():
                w.kill()
                w.join()


def _follow(workers, messages, stop, stop_event, on_event):
    """Forward rank 0's events and the stop request until every worker has returned; rank 0's result.  Once rank
    0 has returned, its result stands: the others had only its saves to wait for (one that fails while it closes
    its connections, or takes longer than FINISH_GRACE_S, is ended)."""
    results: dict[int, object] = {}
    rank0_done = None
    dead_since: dict[int, float] = {}
    while True:
        if stop_event.is_set():
            stop.set()
        try:
            kind, rank, payload = messages.get(timeout=POLL_S)
        except queue.Empty:
            kind = None
        if kind == "event":
            if on_event is not None:
                on_event(payload)
            continue
        if kind == "result":
            results[rank] = payload
            if rank == 0:
                rank0_done = time.monotonic()
        if rank0_done is not None:
            if len(results) == len(workers):
                return results[0]
            if kind == "error" or time.monotonic() - rank0_done > FINISH_GRACE_S \
                    or all(w.exitcode is not None for w in workers):
                late = ", ".join(str(r) for r in range(len(workers)) if r not in results)
                emit(on_event, "log", level="warning", message=f"Training worker(s) {late} did not return after "
                     "rank 0 had; they were ended (rank 0's saves are complete)")
                return results[0]
            continue
        if kind == "error":
            # a collective fails on the others when a worker dies: the death is the cause to report
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not _deaths(workers):
                time.sleep(POLL_S)
            raise (_deaths(workers) or [_error_from(rank, len(workers), payload)])[0]
        now = time.monotonic()
        for rank, w in enumerate(workers):
            # a worker's last message may still be on its way when its exit is seen
            if w.exitcode is not None and rank not in results and now - dead_since.setdefault(rank, now) > 2.0:
                raise (_deaths(workers) or [RunFailed(
                    f"Training worker {rank} of {len(workers)} ended without a result; the other workers were "
                    "stopped. Nothing after the last save was written.")])[0]


def _deaths(workers) -> list[RunFailed]:
    """One error per worker that was killed or crashed (a worker that fails normally reports and exits with 0)."""
    out = []
    for rank, w in enumerate(workers):
        if w.exitcode:
            how = f"was killed by signal {-w.exitcode}" if w.exitcode < 0 else f"exited with code {w.exitcode}"
            out.append(RunFailed(f"Training worker {rank} of {len(workers)} {how} (out of memory?); the other "
                                 "workers were stopped. Nothing after the last save was written."))
    return out


def _error_from(rank: int, world: int, payload: tuple[bytes | None, str, str]) -> BaseException:
    """The worker's exception with its message (a RunFailed with it when the exception could not travel)."""
    pickled, message, trace = payload
    exc = None
    if pickled is not None:
        try:
            exc = pickle.loads(pickled)
        except Exception:
            exc = None
    if exc is None:
        exc = RunFailed(message)
    exc.add_note(f"in training worker {rank} of {world}:\n{trace}")
    return exc


def _worker(rank: int, world: int, port: int, cuda: bool, settings: Settings, config, messages, stop) -> None:
    import torch.distributed as dist

    from core.trainer import _Run
    try:
        if cuda:
            torch.cuda.set_device(rank)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                                timeout=COLLECTIVE_TIMEOUT)
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        on_event = (lambda event: messages.put(("event", 0, event))) if rank == 0 else None
        result = _Run(settings, on_event, stop, config, Peers(rank, world, store, device)).run()
        messages.put(("result", rank, result))
    except BaseException as exc:
        try:
            pickled = pickle.dumps(exc)
        except Exception:
            pickled = None
        messages.put(("error", rank, (pickled, str(exc) or type(exc).__name__, traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
