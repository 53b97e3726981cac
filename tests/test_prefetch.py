"""core.prefetch: batches built ahead on a worker thread equal the batches built in place, in order; errors arrive
at their batch; a consumer that stops early stops the worker."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from core.dataset import BucketBatchSampler, LatentCache, TrainingDataset
from core.prefetch import prefetched_batches
from tests.test_dataset import CountingEncoder, small_dataset  # noqa: F401  (the fixture)


def test_prefetched_batches_equal_the_batches_built_in_place(small_dataset):  # noqa: F811
    ds, items = small_dataset
    cache = LatentCache("memory", CountingEncoder(), "t")
    cache.fill(items, ds.flip_aug, 2)
    data = TrainingDataset(items, ds, cache, seed=5)
    sampler = BucketBatchSampler(items, 2, seed=5)
    for epoch, start in ((0, 0), (3, 2)):
        order = sampler.batches(epoch)[start:]
        got = list(prefetched_batches(data, order, epoch, first_index=start, depth=2))
        assert [(i, idx) for i, idx, _ in got] == list(enumerate(order, start))
        for i, idx, batch in got:
            want = data.get_batch(idx, epoch, i)
            assert batch["captions"] == want["captions"] and batch["flips"] == want["flips"]
            assert torch.equal(batch["latents"], want["latents"])


class SlowData:
    """Counts the batches built; fails at batch ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.built: list[int] = []
        self.fail_at = fail_at

    def get_batch(self, indices, epoch, batch_index):
        if batch_index == self.fail_at:
            raise OSError(f"cannot read batch {batch_index}")
        time.sleep(0.01)
        self.built.append(batch_index)
        return {"latents": torch.full((1, 1), float(batch_index))}


def test_an_error_building_a_batch_is_raised_at_that_batch():
    data = SlowData(fail_at=3)
    seen = []
    with pytest.raises(OSError, match="cannot read batch 3"):
        for i, _, batch in prefetched_batches(data, [[0]] * 6, epoch=0):
            seen.append(int(batch["latents"][0, 0]))
    assert seen == [0, 1, 2]


def test_stopping_early_stops_the_worker_within_its_depth():
    data = SlowData()
    before = threading.active_count()
    for i, _, _ in prefetched_batches(data, [[0]] * 100, epoch=0, depth=2):
        if i == 4:
            break
    assert threading.active_count() == before   # the worker was joined
    # it built at most the batch in hand, the queue's two and the one it was putting when told to stop
    assert len(data.built) <= 4 + 1 + 2 + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_cuda_runs_get_pinned_tensors():
    batches = list(prefetched_batches(SlowData(), [[0]] * 2, epoch=0, pin=True))
    assert all(batch["latents"].is_pinned() for _, _, batch in batches)
