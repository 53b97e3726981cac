"""The training step captured in a CUDA graph (core.cuda_graph, memory.cuda_graphs).

No GPU runs here, so: the eligibility rules and the plan's choice are pure functions; the captured step's
Python path (static buffers, warm-ups, one graph per shape, the bound, the fallback) runs on the CPU with only
the capture replaced (``FakeGraphs``: "capture" records the step, "replay" calls it again); and the tiny SD1.5
trainer runs with the step in its eager mode and through the fake graphs, each compared with the trainer's usual
step.  ``test_real_capture_*`` really capture, where CUDA exists (bench/gpu_check.sh's tests part runs them)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import architectures
from core import cuda_graph, trainer
from core.cuda_graph import CapturedStep, capture_blockers, shape_key, use_device_learning_rates
from core.optim import build_scheduler
from core.plan import Plan, make_plan
from core.settings import Settings
from tests.test_plan import machine
from tests.tiny_models import (
    build_conditioning_folder,
    build_tiny_controlnet_base,
    build_tiny_dataset,
    build_tiny_sd15,
    build_tiny_sdxl,
    tiny_train_settings,
)

SD15 = architectures.get("sd15")


def cuda_plan(**fields) -> Plan:
    return Plan(**{"device": "cuda", "mixed_precision": "bf16", "tf32": True, "gradient_checkpointing": False,
                   "cache_text_encoder_outputs": True, **fields})


def run_settings(**values) -> Settings:
    s = Settings()
    s.model.architecture = "sd15"
    for dotted, value in values.items():
        section, name = dotted.split("__")
        setattr(getattr(s, section), name, value)
    return s


# -- eligibility -------------------------------------------------------------------------------------------
def test_a_plain_adamw_lora_step_on_cuda_can_be_captured():
    assert capture_blockers(run_settings(), SD15, cuda_plan()) == []


@pytest.mark.parametrize("plan_fields, values, arch_id, reason", [
    ({"device": "cpu"}, {}, "sd15", "no CUDA GPU"),
    ({"processes": 2}, {}, "sd15", "distributed.num_processes"),
    ({"blocks_to_swap": 4}, {}, "sd15", "memory.blocks_to_swap"),
    ({"activation_offload": True}, {}, "sd15", "memory.activation_offload"),
    ({"quantize_base": "qint8"}, {}, "sd15", "memory.quantize_base"),
    ({"mixed_precision": "fp16"}, {}, "sd15", "memory.mixed_precision"),
    ({"optimizer_8bit": True}, {}, "sd15", "AdamW8bit has no capturable step"),
    ({}, {"optimizer__optimizer_type": "Prodigy"}, "sd15", "Prodigy has no capturable step"),
    ({}, {"optimizer__optimizer_type": "AdamWScheduleFree"}, "sd15", "AdamWScheduleFree has no capturable"),
    ({}, {"optimizer__optimizer_type": "Adafactor", "optimizer__fused_backward_pass": True}, "sd15",
     "optimizer.fused_backward_pass"),
    ({}, {"schedule__gradient_accumulation_steps": 2}, "sd15", "schedule.gradient_accumulation_steps"),
    ({}, {"network__train_text_encoder": True}, "sd15", "network.train_text_encoder"),
    ({}, {"network__algorithm": "textual_inversion"}, "sd15", "the text encoder trains"),
    ({}, {"network__pivotal": True}, "sd15", "the text encoder trains"),
    ({}, {"network__algorithm": "full_finetune"}, "sd15", "full fine-tuning"),
    ({}, {"schedule__multires_noise_iterations": 6}, "sd15", "schedule.multires_noise_iterations"),
    ({}, {"network__module_dropout": 0.1}, "sd15", "network.module_dropout"),
])
def test_each_blocker_is_named(plan_fields, values, arch_id, reason):
    reasons = capture_blockers(run_settings(**values), architectures.get(arch_id), cuda_plan(**plan_fields))
    assert reason in reasons[0], reasons
    # the fused backward pass exists for Adafactor only, which is not capturable either
    assert len(reasons) == (2 if values.get("optimizer__fused_backward_pass") else 1), reasons


def test_masked_loss_loss_weights_and_a_controlnet_do_not_block():
    s = run_settings(dataset__masked_loss=True, schedule__min_snr_gamma=5.0)
    assert capture_blockers(s, SD15, cuda_plan()) == []
    # the conditioning images are one more static input (TrainingStep.inputs takes every batch tensor), and so
    # is SDXL's size conditioning (TrainingDataset's size_conditioning)
    assert capture_blockers(run_settings(network__algorithm="controlnet"), SD15, cuda_plan()) == []
    assert capture_blockers(run_settings(), architectures.get("sdxl"), cuda_plan()) == []


# -- the plan ----------------------------------------------------------------------------------------------
def sd15_settings(**memory) -> Settings:
    s = run_settings()
    for name, value in memory.items():
        setattr(s.memory, name, value)
    return s


def test_plan_auto_stays_off_and_says_why():
    plan = make_plan(machine(80.0), sd15_settings(), SD15)
    assert not plan.cuda_graphs
    assert any(r.startswith("CUDA graphs off: not yet verified on a GPU") for r in plan.reasons)
    assert "CUDA graphs off" in plan.summary()
    blocked = make_plan(machine(80.0), sd15_settings(mixed_precision="fp16"), SD15)
    assert any(r.startswith("CUDA graphs off: fp16 loss scaling") for r in blocked.reasons)


def test_plan_on_is_followed_where_every_condition_holds():
    plan = make_plan(machine(80.0), sd15_settings(cuda_graphs="on"), SD15)
    assert plan.cuda_graphs and "CUDA graphs" in plan.brief() and "CUDA graphs on" in plan.summary()


@pytest.mark.parametrize("vram, memory, named", [
    (None, {}, "no CUDA GPU"),
    (80.0, {"activation_offload": "on"}, "memory.activation_offload"),
    (80.0, {"mixed_precision": "fp16"}, "memory.mixed_precision"),
])
def test_plan_refuses_on_with_the_reasons(vram, memory, named):
    with pytest.raises(ValueError) as err:
        make_plan(machine(vram), sd15_settings(cuda_graphs="on", **memory), SD15)
    message = str(err.value)
    assert message.startswith("memory.cuda_graphs is 'on', but") and named in message and "'auto' or 'off'" in message


def test_plan_off_says_nothing():
    plan = make_plan(machine(80.0), sd15_settings(cuda_graphs="off"), SD15)
    assert not plan.cuda_graphs and not any("CUDA graphs" in r for r in plan.reasons)


# -- the learning rate as a device tensor ------------------------------------------------------------------
def test_scheduler_fills_the_learning_rate_tensor_in_place():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 1e-2}], lr=1e-2)
    scheduler = build_scheduler("linear", optimizer, 0, 4, 1, 1.0)
    use_device_learning_rates(optimizer, capturable=False)
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dim() == 0
    for expected in (7.5e-3, 5e-3):
        weight.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
        assert optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(expected)
    # a saved state holds a number, which an uncaptured run resumes from; the live group keeps its tensor
    optimizer.param_groups[0]["capturable"] = True   # as on CUDA
    saved = optimizer.state_dict()["param_groups"][0]
    assert saved["lr"] == pytest.approx(5e-3) and type(saved["lr"]) is float and saved["capturable"] is False
    assert optimizer.param_groups[0]["lr"] is lr and optimizer.param_groups[0]["capturable"]


# -- the captured step's bookkeeping, with the capture faked -----------------------------------------------
class FakeGraphs:
    """Stands in for TorchGraphs where no GPU is: "capture" records the step without running it (as a capture
    runs no kernel), "replay" runs the recorded step again on the same static buffers and copies its results into
    the first replay's output tensors (a graph's outputs keep their memory)."""

    def __init__(self, fail: Exception | None = None):
        self.captured, self.replays, self.side_steps, self.fail = [], 0, 0, fail

    def side_stream(self):
        fake = self

        class Side:
            def __enter__(self):
                fake.side_steps += 1

            def __exit__(self, *exc):
                return False
        return Side()

    def capture(self, step):
        if self.fail is not None:
            raise self.fail
        fake = self

        class Graph:
            outputs = None

            def replay(self):
                fake.replays += 1
                fresh = step()
                if self.outputs is None:
                    self.outputs = fresh
                else:
                    for key, value in fresh.items():
                        self.outputs[key].copy_(value)
        self.captured.append(step)
        return Graph()


def linear_step(model, seen):
    def step(inputs):
        seen.append(inputs["x"].clone())
        return {"y": model(inputs["x"]).sum().detach()}
    return step


def test_one_graph_per_shape_after_the_warmups_and_a_bound(monkeypatch):
    model, seen, logs = torch.nn.Linear(4, 1), [], []
    monkeypatch.setattr(cuda_graph, "WARMUP_STEPS", 2)
    fake = FakeGraphs()
    captured = CapturedStep(linear_step(model, seen), fake, lambda m, level="info": logs.append(m), max_graphs=2)
    shapes = [(1, 4)] * 4 + [(2, 4)] * 3 + [(3, 4)] * 2
    batches = [{"x": torch.randn(shape)} for shape in shapes]
    outs = [captured(b)["y"].clone() for b in batches]
    assert len(fake.captured) == 2 and fake.side_steps == 4       # 2 warm-ups for each of 2 shapes
    assert fake.replays == 3                                       # steps 3, 4 of (1, 4) and 3 of (2, 4)
    assert len(seen) == len(batches)                               # every batch stepped exactly once
    for batch, x, out in zip(batches, seen, outs):                  # each step saw its own batch
        assert torch.equal(x, batch["x"]) and torch.allclose(out, model(batch["x"]).sum())
    assert any("2 input shapes captured already" in m for m in logs)
    assert shape_key({"a": torch.zeros(2, 3), "b": {"c": torch.zeros(1, dtype=torch.long)}}) == (
        ("/a", (2, 3), torch.float32), ("/b/c", (1,), torch.long))


def test_a_failed_capture_falls_back_to_eager_for_the_rest(monkeypatch):
    model, seen, logs = torch.nn.Linear(4, 1), [], []
    monkeypatch.setattr(cuda_graph, "WARMUP_STEPS", 1)
    fake = FakeGraphs(fail=RuntimeError("operation not permitted when stream is capturing\nmore"))
    captured = CapturedStep(linear_step(model, seen), fake, lambda m, level="info": logs.append((level, m)))
    for _ in range(3):
        captured({"x": torch.randn(2, 4)})
    assert len(seen) == 3 and not captured.capturing and fake.side_steps == 1
    assert [lv for lv, m in logs if "CUDA graphs off" in m and "operation not permitted" in m] == ["warning"]


# -- the trainer's step: eager mode and faked capture against the usual step (tiny SD1.5) -------------------
STEPS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cuda_graph")
    model = build_tiny_sd15(root / "sd15", "diffusers")
    data = build_tiny_dataset(root / "data", n=4)
    return model, data


def trained_weights(tiny, tmp_path, monkeypatch, captured: bool, graphs=None, arch: str = "sd15",
                    **overrides) -> dict[str, torch.Tensor]:
    """The adapter after STEPS steps of a fresh run; ``captured``: the plan says cuda_graphs (which it cannot on the
    CPU, so that one decision is forced), and ``graphs`` stands in for the capture."""
    model, data = tiny
    s, config = tiny_train_settings(arch, {"model.model_path": str(model)}, data, tmp_path,
                                    schedule__max_train_steps=STEPS, optimizer__lr_scheduler="linear",
                                    optimizer__max_grad_norm=0.01, dataset__shuffle_caption=True, **overrides)
    with monkeypatch.context() as patch:
        if captured:
            real = trainer.make_plan
            patch.setattr(trainer, "make_plan", lambda *a, **k: replace(real(*a, **k), cuda_graphs=True))
            patch.setattr(cuda_graph, "capture_backend", lambda device: graphs)
            patch.setattr(cuda_graph, "WARMUP_STEPS", 1)
        result = trainer.train(s, config=config)
    assert result.steps == STEPS
    return load_file(str(result.final))


@pytest.fixture(scope="module")
def usual(tiny, tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return trained_weights(tiny, tmp_path_factory.mktemp("usual"), monkeypatch, captured=False)


def same(a: dict, b: dict) -> bool:
    """Equal up to rounding: AdamW computes its step size from a tensor learning rate in float32 where the usual
    step does it in Python floats (a few units in the last place of the saved fp16 weights)."""
    assert a.keys() == b.keys()
    return all(torch.allclose(a[key].float(), b[key].float(), rtol=2e-3, atol=1e-5) for key in a)


def test_eager_mode_trains_as_the_usual_step(tiny, usual, tmp_path, monkeypatch):
    assert same(trained_weights(tiny, tmp_path, monkeypatch, captured=True), usual)


def test_replays_read_each_batch_from_the_static_buffers(tiny, usual, tmp_path, monkeypatch):
    fake = FakeGraphs()
    weights = trained_weights(tiny, tmp_path, monkeypatch, captured=True, graphs=fake)
    assert fake.captured and fake.replays == STEPS - len(fake.captured)   # per shape: 1 warm-up, then replays
    assert same(weights, usual)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_stale_buffer_would_be_caught(tiny, usual, tmp_path, monkeypatch):
    """The comparison above can see a missing copy: with the inputs copied only at the capture (a replay then
    trains on its shape's first captured batch again), the weights differ."""
    copy = cuda_graph._Graph.load

    def load_once(self, inputs):
        if not getattr(self, "loaded", False):
            self.loaded = True
            copy(self, inputs)
    monkeypatch.setattr(cuda_graph._Graph, "load", load_once)
    fake = FakeGraphs()
    weights = trained_weights(tiny, tmp_path, monkeypatch, captured=True, graphs=fake)
    assert not same(weights, usual)


@pytest.fixture(scope="module")
def controlnet_tiny(tmp_path_factory):
    """Tiny SDXL and SD1.5 models whose VAE downsamples 8× (a ControlNet's conditioning needs it) and the
    dataset's conditioning images."""
    root = tmp_path_factory.mktemp("tiny_cuda_graph_inputs")
    data = build_tiny_dataset(root / "data", n=4)
    return {"sdxl": build_tiny_sdxl(root / "sdxl", "diffusers"), "sd15": build_tiny_controlnet_base("sd15", root / "cn"),
            "data": data, "conditioning": build_conditioning_folder(data, root / "cond")}


@pytest.mark.parametrize("case", ["sdxl", "controlnet"])
def test_replays_read_sdxl_sizes_and_conditioning_images_from_static_buffers(controlnet_tiny, case, tmp_path,
                                                                              monkeypatch):
    """The other per-batch tensors replay as inputs too: SDXL's size conditioning (a 64×96 image's crop and
    sizes differ from a square one's) and a ControlNet's conditioning images (the gradient ramp, flipped with
    its image)."""
    t = controlnet_tiny
    arch, extra = ("sdxl", {}) if case == "sdxl" else ("sd15", {
        "network__algorithm": "controlnet", "dataset__conditioning_path": str(t["conditioning"]),
        "dataset__flip_aug": True})
    tiny = (t[arch], t["data"])
    usual_weights = trained_weights(tiny, tmp_path / "usual", monkeypatch, captured=False, arch=arch,
                                    dataset__enable_buckets=True, **extra)
    fake = FakeGraphs()
    weights = trained_weights(tiny, tmp_path / "captured", monkeypatch, captured=True, graphs=fake, arch=arch,
                              dataset__enable_buckets=True, **extra)
    assert fake.captured and fake.replays > 0
    assert same(weights, usual_weights)


# -- a real capture (GPU only) -----------------------------------------------------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda_only
def test_real_capture_replays_the_eager_steps():
    """A deterministic step (no random draws) on the GPU: a fused AdamW with its learning rate on the device,
    a linear schedule, two input shapes; replayed from real CUDA graphs it gives the weights eager steps give."""
    def run(capture: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1)).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        scheduler = build_scheduler("linear", optimizer, 0, 12, 1, 1.0)
        use_device_learning_rates(optimizer, capturable=True)

        def step(inputs):
            optimizer.zero_grad(set_to_none=True)
            loss = ((model(inputs["x"]) - inputs["y"]) ** 2).mean()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            return {"loss": loss.detach(), "grad_norm": grad_norm}
        captured = CapturedStep(step, cuda_graph.capture_backend(torch.device("cuda")) if capture else None,
                                lambda message, level="info": print(message))
        data = torch.Generator().manual_seed(1)
        for i in range(12):
            rows = 4 if i % 3 else 6
            batch = {"x": torch.randn(rows, 8, generator=data).cuda(), "y": torch.randn(rows, 1, generator=data).cuda()}
            captured(batch)
            scheduler.step()
        assert len(captured.graphs) == (2 if capture else 0)
        return torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(run(True), run(False), rtol=1e-4, atol=1e-6)


@cuda_only
def test_real_capture_trains_tiny_sd15(tiny, tmp_path):
    """Tiny SD1.5 on the GPU with memory.cuda_graphs 'on': graphs are captured, no capture falls back, and every
    saved weight is finite and trained (the noise drawn in replays differs from eager draws, so the weights are
    not compared with an eager run's)."""
    model, data = tiny
    logs = []
    s, config = tiny_train_settings("sd15", {"model.model_path": str(model)}, data, tmp_path,
                                    schedule__max_train_steps=12, memory__cuda_graphs="on", memory__compile="off")
    result = trainer.train(s, config=config, on_event=lambda e: logs.append(str(e.get("message", ""))))
    assert any(m.startswith("CUDA graph 1 captured") for m in logs), logs
    assert not any("CUDA graphs off" in m for m in logs), logs
    weights = load_file(str(result.final))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert any(k.endswith("lora_up.weight") and t.abs().sum() > 0 for k, t in weights.items())
