"""The next training batches, built on a worker thread while the current step runs.

Building a batch reads the latent cache (on disk: opens files), decodes images when nothing is cached, and
stacks tensors: host work that would otherwise sit between two steps while the GPU idles.  A worker thread builds
up to ``depth`` batches ahead; on a CUDA run it pins their tensors, so the step's ``non_blocking`` copies really
overlap with the GPU instead of going through a pageable bounce buffer.

Batches are a pure function of (indices, epoch, batch index) (``TrainingDataset.get_batch`` seeds its own RNG from
them), so building them early, on another thread, changes nothing in what is trained.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator, Sequence

import torch

# the batch entries that are tensors the step copies to the device
PINNED_KEYS = ("latents", "pixels", "masks", "conditioning", "size_conditioning")


def pinned(batch: dict) -> dict:
    """``batch`` with its tensors in page-locked memory (CUDA runs only: pinning needs a CUDA driver)."""
    return {k: v.pin_memory() if k in PINNED_KEYS and isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def prefetched_batches(data, batches: Sequence[Sequence[int]], epoch: int, first_index: int = 0,
                       depth: int = 2, pin: bool = False) -> Iterator[tuple[int, Sequence[int], dict]]:
    """Yield ``(batch_index, indices, batch)`` for ``batches`` (numbered from ``first_index``), each built by
    ``data.get_batch`` on a worker thread at most ``depth`` batches ahead of the consumer.

    An error building a batch is raised here, at that batch.  When the consumer stops early (a break, a return,
    an exception), the worker stops after the batch it is building."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1 (got {depth})")
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for offset, indices in enumerate(batches):
                batch_index = first_index + offset
                batch = data.get_batch(indices, epoch, batch_index)
                if not put((batch_index, indices, pinned(batch) if pin else batch)):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it at this batch
            put(exc)
            return
        put(done)

    worker = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()
