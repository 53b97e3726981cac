"""The training step never waits for the device: a few real steps of the tiny SD1.5 and FLUX.1 models through
``core.train``, with every host read of a tensor (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
``float()`` / ``int()`` / ``bool()`` / index use) counted per step.

On the CPU every tensor is a host tensor, so the count is stricter than a GPU needs: any such read in the step
would be a device synchronisation on a GPU.  The step is everything from ``_Run.training_step`` (forward and
loss) through backward, clipping, the optimizer and the loss / divergence bookkeeping up to the next batch;
the batch's host-side assembly (``TrainingDataset.get_batch``) and the report / validation / preview / save
that follow some steps are outside it, and the report is where the loss buffer is read, once.  With CUDA the
same runs also go through the step under ``torch.cuda.set_sync_debug_mode("error")``."""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

import core
from core import dataset as ds_mod
from core import trainer
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings
from tests.tiny_models_dit import build_tiny_dit, settings_paths

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__index__}
STEPS, REPORT_EVERY = 5, 3   # reports after steps 3 and 5


class HostReads(TorchFunctionMode):
    """Records host reads of tensors while ``step`` is set (the 1-based step being run)."""

    def __init__(self):
        super().__init__()
        self.step: int | None = None
        self.run = None
        self.reads: dict[int, list[str]] = {}
        self.in_report = False
        self.report_reads = 0
        self.checks = []   # (run, loss) -> None, called after each forward, outside the count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS and not self._optimizer_step_count(args[0]):
            if self.step is not None:
                where = next((f"{f.filename}:{f.lineno} {f.line}" for f in reversed(traceback.extract_stack()[:-1])
                              if "/torch/" not in f.filename), "?")
                self.reads.setdefault(self.step, []).append(f"{func.__name__} at {where}")
            elif self.in_report:
                self.report_reads += 1
        return func(*args, **(kwargs or {}))

    def _optimizer_step_count(self, t) -> bool:
        """torch's optimizers without ``capturable`` keep each parameter's step count as a CPU tensor on purpose
        (on CUDA too) and read it on the host: no device synchronisation."""
        opt = getattr(self.run, "optimizer", None)
        state = getattr(getattr(opt, "optimizer", opt), "state", {})
        return any(s.get("step") is t for s in state.values())


@pytest.fixture
def watched(monkeypatch):
    """Runs of ``core.train`` with the step watched: yields the HostReads of the current run, plus per step
    checks on the run (``mode.checks``) and, with CUDA, the sync debug mode around each step past the first."""
    mode = HostReads()
    cuda = torch.cuda.is_available()

    def watch(step: int | None) -> None:
        mode.step = step
        if cuda:  # the first step moves the noise schedule's tables to the device, once
            torch.cuda.set_sync_debug_mode("error" if step is not None and step > 1 else "default")

    real_step = trainer._Run.training_step

    def training_step(self, batch):
        mode.run = self
        watch(self.global_step + 1)
        loss = real_step(self, batch)
        step = mode.step
        watch(None)         # the test's own checks read tensors
        for check in mode.checks:
            check(self, loss)
        watch(step)
        return loss

    def outside_the_step(real, report=False):
        def wrapper(self, *args, **kwargs):
            watch(None)
            mode.in_report = report
            try:
                return real(self, *args, **kwargs)
            finally:
                mode.in_report = False
        return wrapper

    monkeypatch.setattr(trainer._Run, "training_step", training_step)
    monkeypatch.setattr(ds_mod.TrainingDataset, "get_batch", outside_the_step(ds_mod.TrainingDataset.get_batch))
    monkeypatch.setattr(trainer._Run, "report", outside_the_step(trainer._Run.report, report=True))
    for name in ("validate", "preview", "save", "finish"):  # what may follow a step
        monkeypatch.setattr(trainer._Run, name, outside_the_step(getattr(trainer._Run, name)))
    try:
        with mode:
            yield mode
    finally:
        watch(None)


def train_watched(mode, settings, config) -> list[dict]:
    events = []
    core.train(settings, on_event=events.append, config=config)
    assert [e["step"] for e in events if e["type"] == "progress"] == [REPORT_EVERY, STEPS]
    assert all(torch.isfinite(torch.tensor([loss for e in events if e["type"] == "progress"
                                            for _, loss in e["step_losses"]])))
    assert not mode.reads, "\n".join(f"step {k}: {v}" for k, v in sorted(mode.reads.items()))
    # the counter works: the reports read the loss buffer and the divergence record
    assert mode.report_reads >= 2
    return events


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("host_syncs")
    build_tiny_dataset(root / "data", n=4)
    return {"root": root, "data": root / "data", "sd15": build_tiny_sd15(root / "sd15"),
            "flux1_dev": build_tiny_dit("flux1_dev", root / "flux1_dev")}


COMMON = dict(schedule__max_train_steps=STEPS, schedule__log_every_n_steps=REPORT_EVERY,
              schedule__train_batch_size=2, optimizer__max_grad_norm=1.0)


def test_sd15_step_reads_nothing_on_the_host(tiny, tmp_path, watched):
    s, config = tiny_train_settings("sd15", {"model.model_path": str(tiny["sd15"])}, tiny["data"], tmp_path,
                                    **COMMON)
    train_watched(watched, s, config)


def test_flux1_step_reads_nothing_on_the_host(tiny, tmp_path, watched):
    fields = {**settings_paths(tiny["flux1_dev"]), "model.t5_max_length": 24}
    s, config = tiny_train_settings("flux1_dev", fields, tiny["data"], tmp_path, model__guidance=3.5,
                                    schedule__timestep_sampling="flux_shift", **COMMON)
    train_watched(watched, s, config)


def test_bf16_on_the_cpu_trains_fp32_adapters_on_a_bf16_base(tiny, tmp_path, watched):
    """What the plan picks on a CPU with AVX512-BF16 / AMX (set explicitly here, so that every CPU runs it; on a
    CUDA machine the run is on the GPU, the same path): the base weights in bf16 under bf16 autocast, the
    adapters' master weights and the loss in fp32, finite, and still no host read in the step."""
    seen = []

    def check(run, loss):
        assert run.plan.mixed_precision == "bf16" and run.device.type == run.plan.device
        assert {p.dtype for p in run.network.parameters()} == {torch.float32}
        assert {p.dtype for p in run.components.denoiser.parameters()} == {torch.bfloat16}
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        seen.append(run.global_step)

    watched.checks.append(check)
    s, config = tiny_train_settings("sd15", {"model.model_path": str(tiny["sd15"])}, tiny["data"], tmp_path,
                                    memory__mixed_precision="bf16", **COMMON)
    train_watched(watched, s, config)
    assert seen == list(range(STEPS))
