"""What makes a run's outputs trustworthy: the divergence guard (a NaN run fails, writes nothing non-finite, keeps
and names its last good save, and resumes from it), optimizer-step counts for every mix of epochs, batch size,
accumulation and repeats, refusals before anything loads, Stop in every phase, and the adapter init check."""
from __future__ import annotations

import ast
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import architectures
import core
from core.adapters import build_network
from core.io import NonFiniteError, atomic_save_safetensors, non_finite_keys
from core.settings import SettingsError, check_consistency
from core.trainer import DivergenceGuard, accumulation_group, total_steps_and_epochs
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15, tiny_train_settings


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    model = build_tiny_sd15(root / "sd15", "diffusers")
    data = build_tiny_dataset(root / "data", n=7)  # 4 square (64x64) and 3 tall (64x96) images: two buckets
    return {"model": model, "data": data}


def settings_for(tiny, tmp_path, **overrides):
    return tiny_train_settings("sd15", {"model.model_path": str(tiny["model"])}, tiny["data"], tmp_path, **overrides)


def run(tiny, tmp_path, stop_when=None, **overrides):
    """core.train on the tiny SD1.5; ``stop_when(event)`` presses Stop.  Returns (result or exception, events)."""
    s, config = settings_for(tiny, tmp_path, **overrides)
    events, stop = [], threading.Event()

    def on_event(e):
        events.append(e)
        if stop_when is not None and stop_when(e):
            stop.set()
    try:
        return core.train(s, on_event=on_event, stop_event=stop, config=config), events
    except Exception as exc:  # noqa: BLE001 - the caller asserts on it
        return exc, events


def saved_files(folder):
    return sorted(p for p in folder.rglob("*.safetensors"))


def assert_all_finite(folder):
    for path in saved_files(folder):
        assert not non_finite_keys(load_file(str(path))), path
    for path in folder.rglob("optimizer.pt"):
        state = torch.load(path, weights_only=True)["state"]
        assert all(torch.isfinite(t).all() for s in state.values() for t in s.values() if t.is_floating_point()), path


# -- step counts -------------------------------------------------------------------------------------------

def test_accumulation_groups_end_with_each_epoch():
    # 7 batches, accumulation 2: groups (0,1) (2,3) (4,5) (6); the last, partial one steps too
    groups = [accumulation_group(i, 7, 2) for i in range(7)]
    assert groups == [(2, False), (2, True), (2, False), (2, True), (2, False), (2, True), (1, True)]
    assert [accumulation_group(i, 3, 4) for i in range(3)] == [(3, False), (3, False), (3, True)]
    assert all(accumulation_group(i, 5, 1) == (1, True) for i in range(5))


STEP_TABLE = [
    # batch size, repeats, accumulation, epochs (0: steps mode), max steps -> optimizer steps, epochs
    (1, 1, 2, 3, 0, 12, 3),    # 7 batches per epoch -> 4 steps (the last one with one micro-batch)
    (2, 1, 3, 2, 0, 4, 2),     # buckets of 4 and 3 images -> 2 + 2 batches -> 2 steps per epoch
    (1, 2, 4, 1, 0, 4, 1),     # 14 batches -> 4 + 4 + 4 + 2
    (3, 1, 1, 2, 0, 6, 2),     # 2 + 1 batches
    (1, 1, 2, 0, 5, 5, 2),     # steps mode ends inside the second epoch
    (2, 1, 2, 0, 6, 6, 3),     # 4 batches -> 2 steps per epoch -> 3 epochs
]


@pytest.mark.parametrize("batch,repeats,accumulation,epochs,max_steps,steps,total_epochs", STEP_TABLE)
def test_optimizer_steps_match_the_plan(tiny, tmp_path, batch, repeats, accumulation, epochs, max_steps, steps,
                                        total_epochs):
    result, events = run(tiny, tmp_path, schedule__train_batch_size=batch, dataset__num_repeats=repeats,
                         schedule__gradient_accumulation_steps=accumulation, schedule__max_train_epochs=epochs,
                         schedule__max_train_steps=max_steps or 1, optimizer__lr_scheduler="linear",
                         saving__save_state=False)
    assert not isinstance(result, Exception), result
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, steps + 1))
    assert progress[-1]["total_steps"] == steps and progress[-1]["total_epochs"] == total_epochs
    assert progress[-1]["epoch"] == total_epochs
    assert progress[-1]["lr"] == 0.0  # the linear schedule reached its end
    assert result.steps == steps


def test_total_steps_and_epochs_table():
    s = core.load_settings()
    s.schedule.gradient_accumulation_steps, s.schedule.max_train_epochs = 2, 3
    assert total_steps_and_epochs(s, 7) == (12, 3)
    s.schedule.max_train_epochs, s.schedule.max_train_steps = 0, 9
    assert total_steps_and_epochs(s, 7) == (9, 3)


# -- the divergence guard ----------------------------------------------------------------------------------

def test_guard_records_the_first_non_finite_step_on_the_device():
    guard = DivergenceGuard(torch.device("cpu"), step=10)
    guard.update(torch.tensor(0.5), torch.tensor(2.0))
    assert guard.first_bad() is None
    guard.update(torch.tensor(0.4), torch.tensor(float("inf")))
    guard.update(torch.tensor(float("nan")))
    assert guard.first_bad() == (12, "The gradient norm became NaN or infinite")
    other = DivergenceGuard(torch.device("cpu"), step=0)
    other.update(torch.tensor(float("inf")))
    assert other.first_bad() == (1, "Loss became infinite")


def test_saving_refuses_non_finite_tensors(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(NonFiniteError, match="1 of 2 tensors.*b"):
        atomic_save_safetensors(path, {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])})
    assert not path.exists() and not list(tmp_path.iterdir())


def test_a_diverging_run_fails_keeps_its_last_good_save_and_resumes(tiny, tmp_path):
    out = tmp_path / "outputs" / "tiny_sd15"
    good, _ = run(tiny, tmp_path, schedule__max_train_steps=4, saving__save_state=True)
    assert not isinstance(good, Exception), good
    state = good.state_dir
    before = {p: p.stat().st_mtime_ns for p in saved_files(out)}

    # a learning rate no run survives, clipping off, no saves on the way: the guard stops it; started the way the
    # Run tab starts it, so the page's status is checked too
    from ui.run_state import RunController
    s, config = settings_for(tiny, tmp_path, schedule__max_train_steps=40, saving__resume_from=str(state),
                             optimizer__learning_rate=10.0, optimizer__max_grad_norm=0.0, schedule__log_every_n_steps=5)
    controller = RunController(config=config)
    assert controller.start(s)[0] and controller.wait(300)
    snap = controller.state.snapshot()
    assert snap.phase == "failed" and snap.status.startswith("Failed: Loss became NaN near step ")
    message = snap.error
    assert "near step" in message and "(learning rate 10," in message and "gradient clipping off" in message
    assert f"The last good save is {state}" in message and "resume from that state" in message
    assert not any("Traceback" in line for line in snap.log) and snap.final is None
    assert {p: p.stat().st_mtime_ns for p in saved_files(out)} == before  # nothing written, nothing replaced
    assert_all_finite(out)

    # resumed from the named state with a sane learning rate: trains to the end
    resumed, events = run(tiny, tmp_path, schedule__max_train_steps=8, saving__resume_from=str(state),
                          optimizer__learning_rate=1e-3)
    assert not isinstance(resumed, Exception), resumed
    assert resumed.steps == 8
    assert_all_finite(out)
    up = [t for k, t in load_file(str(resumed.final)).items() if k.endswith("lora_up.weight")]
    assert up and all(t.abs().max() > 0 for t in up)


def test_resume_takes_the_new_learning_rate(tiny, tmp_path):
    first, _ = run(tiny, tmp_path, schedule__max_train_steps=2, optimizer__learning_rate=1e-2)
    resumed, events = run(tiny, tmp_path, schedule__max_train_steps=4, saving__resume_from=str(first.state_dir),
                          optimizer__learning_rate=1e-3, optimizer__lr_scheduler="constant")
    assert not isinstance(resumed, Exception), resumed
    assert any(e.get("message") == "Learning rate 0.001 (the saved run used 0.01)" for e in events)
    assert {e["lr"] for e in events if e["type"] == "progress"} == {1e-3}


def test_clipping_keeps_a_high_learning_rate_finite_or_the_guard_stops_it(tiny, tmp_path):
    """Gradient clipping on: the gradient norm joins the guard; either way no non-finite file is written."""
    result, _ = run(tiny, tmp_path, schedule__max_train_steps=6, optimizer__learning_rate=10.0,
                    optimizer__max_grad_norm=1.0, saving__save_every_n_steps=2)
    assert isinstance(result, (core.TrainResult, core.TrainingDiverged))
    assert_all_finite(tmp_path / "outputs")


# -- refusals before anything loads -----------------------------------------------------------------------

def test_family_refusals_come_before_loading(tiny, tmp_path):
    s = core.load_settings()
    s.model.architecture = "sd35_medium"
    s.network.algorithm = "loha"
    assert architectures.get("sd35_medium").check_settings(s) == []   # trained on the fused layers
    s.model.architecture = "flux3_klein"
    assert any(p.startswith("network.algorithm") for p in architectures.get("flux3_klein").check_settings(s))
    s.model.architecture, s.network.algorithm, s.network.train_text_encoder = "flux2_klein_4b", "lora", True
    assert any(p.startswith("network.train_text_encoder") for p in check_consistency(s))
    s.model.architecture, s.network.train_text_encoder, s.network.target = "sd3", False, "full"
    assert any(p.startswith("network.target:") for p in architectures.get("sd3").check_settings(s))
    s.model.architecture, s.network.algorithm, s.network.train_text_encoder = "flux1_dev", "full_finetune", True
    assert any("saves the transformer alone" in p for p in check_consistency(s))

    result, events = run(tiny, tmp_path, model__architecture="sd3", network__target="full")
    assert isinstance(result, SettingsError) and "network.target" in str(result)
    assert not any(e["type"] == "status" for e in events)  # refused before reading the dataset


def test_the_run_tab_plan_shows_family_refusals():
    from ui.app import plan_markdown
    s = core.load_settings()
    s.model.architecture, s.network.algorithm = "flux3_klein", "loha"
    text = plan_markdown(s)
    assert "Cannot start" in text and "Choose LoRA, LoCon or LoKr" in text


def test_resume_mismatch_names_the_field_before_loading(tiny, tmp_path):
    first, _ = run(tiny, tmp_path, schedule__max_train_steps=1)
    result, events = run(tiny, tmp_path, network__rank=8, saving__resume_from=str(first.state_dir))
    assert isinstance(result, SettingsError)
    assert "network.rank is 8 here but 4 in that run" in str(result) and "network.alpha" not in str(result)
    assert not any(e["type"] == "status" for e in events)
    result, _ = run(tiny, tmp_path, saving__resume_from=str(tmp_path))
    assert isinstance(result, SettingsError) and "no train_state.json" in str(result)


# -- Stop in every phase -----------------------------------------------------------------------------------

def starts(prefix):
    return lambda e: e["type"] == "status" and e["message"].startswith(prefix)


@pytest.mark.parametrize("phase,later", [("Reading the dataset", "Loading"), ("Loading", "Caching"),
                                         ("Caching latents", "Training"),
                                         ("Caching text-encoder outputs", "Training")])
def test_stop_before_training_ends_within_the_phase(tiny, tmp_path, phase, later):
    tiny = {**tiny, "data": shutil.copytree(tiny["data"], tmp_path / "data")}  # no caches from other tests
    t0 = time.monotonic()
    result, events = run(tiny, tmp_path, stop_when=starts(phase), dataset__cache_latents="disk")
    assert not isinstance(result, Exception), result
    assert time.monotonic() - t0 < 60
    assert result.stopped and result.final is None and not result.outputs
    statuses = [e["message"] for e in events if e["type"] == "status"]
    assert any(m.startswith(phase) for m in statuses)
    assert not any(m.startswith(later) for m in statuses[statuses.index(next(m for m in statuses
                                                                             if m.startswith(phase))) + 1:])
    done = [e for e in events if e["type"] == "done"]
    assert done and done[0]["stopped"] and "nothing was saved" in done[0]["message"]
    assert not saved_files(tmp_path / "outputs") if (tmp_path / "outputs").exists() else True
    # the caches left behind are usable: the same run afterwards trains to the end
    again, _ = run(tiny, tmp_path / "again", dataset__cache_latents="disk")
    assert not isinstance(again, Exception) and again.steps == 4 and not again.stopped


def test_stop_while_training_saves_what_was_trained(tiny, tmp_path):
    result, events = run(tiny, tmp_path, stop_when=lambda e: e["type"] == "progress" and e["step"] == 2,
                         schedule__max_train_steps=50, schedule__gradient_accumulation_steps=2)
    assert not isinstance(result, Exception), result
    assert result.stopped and result.steps == 2 and result.final.is_file()
    assert_all_finite(tmp_path / "outputs")


# -- the adapter init check --------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["lora", "locon", "loha", "lokr", "ia3", "diag-oft", "boft", "glora", "full"])
def test_every_algorithm_is_built_at_its_initial_values(tiny, algorithm):
    arch = architectures.get("sd15")
    comps = arch.load(tiny["model"], None, torch.float32)
    targets = arch.adapter_targets(comps, "full" if algorithm != "lora" else "attn_mlp", False)
    net = build_network(targets, algorithm, 4, 2.0)  # raises if any module is not at its initial values
    assert all(not m.init_problems() for m in net.adapters.values())
    first = next(iter(net.adapters.values()))
    rules = first.init_rules
    assert rules, algorithm
    name, (rule, _) = next(iter(rules.items()))
    with torch.no_grad():
        first.get_parameter(name).fill_(1e30 if rule == "zeros" else 0.0)
    problems = first.init_problems()
    assert len(problems) == 1 and first.name in problems[0] and name in problems[0]


def test_stop_during_previews_skips_the_prompts_left(tiny, tmp_path):
    result, events = run(tiny, tmp_path, stop_when=starts("Preview images"), schedule__max_train_steps=50,
                         sampling__sample_every_n_steps=2, sampling__prompts="a red square\na blue disc\nstripes")
    assert not isinstance(result, Exception), result
    assert result.stopped and result.steps == 2 and result.final.is_file()
    assert not result.samples and not list((tmp_path / "outputs").rglob("*.png"))


def test_previews_one_prompt_at_a_time_keep_their_seeds(tiny, tmp_path):
    """Rendered one by one (so Stop can cut in), prompt i still gets seed + i: the same images as all at once."""
    import numpy as np

    from PIL import Image
    result, _ = run(tiny, tmp_path, schedule__max_train_steps=2, sampling__sample_every_n_steps=2,
                    sampling__prompts="a red square\na red square")
    first, second = (np.asarray(Image.open(p)) for p in result.samples)
    assert first.shape == second.shape and not np.array_equal(first, second)  # seeds 42 and 43 differ
    s, _ = settings_for(tiny, tmp_path)
    s.sampling.seed += 1
    arch = architectures.get("sd15")
    comps = arch.load(tiny["model"], None, torch.float32)
    net = build_network(arch.adapter_targets(comps, s.network.target, False), "lora", 4, 2.0)
    net.load_export_state_dict(load_file(str(result.state_dir / "adapter.safetensors")))
    net.apply_to()
    with torch.no_grad():
        [again] = arch.sample(comps, ["a red square"], s, (64, 64), torch.device("cpu"), torch.float32)
    assert np.abs(np.asarray(again).astype(int) - second.astype(int)).max() <= 1


# -- no process-wide patching --------------------------------------------------------------------------------

LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "lycoris", "safetensors", "gradio",
             "optimum", "bitsandbytes", "numpy", "PIL")
# torch switches the run sets for its own duration and restores (core.memory_setup.torch_switches)
SCOPED_SWITCHES = {("core/memory_setup.py", "torch.backends.cuda.matmul.allow_tf32"),
                   ("core/memory_setup.py", "torch.backends.cudnn.allow_tf32")}


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def test_no_code_assigns_into_a_library():
    """Replacing anything inside torch or a library (torch.nn.init.*, F.scaled_dot_product_attention, a class's
    method) leaks into every later model in the process: libraries capture such things at import.  The app's
    code never assigns into, or setattr()s on, a name bound to a library module or its members."""
    root = Path(__file__).resolve().parent.parent
    found = []
    for path in sorted([*root.glob("core/**/*.py"), *root.glob("architectures/**/*.py"), *root.glob("ui/**/*.py"),
                        root / "run.py"]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names
                          if a.name.split(".")[0] in LIBRARIES}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARIES:
                bound |= {a.asname or a.name for a in node.names}
        rel = str(path.relative_to(root))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    targets += t.elts if isinstance(t, ast.Tuple) else [t]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                    "setattr", "delattr") and node.args:
                targets.append(ast.Attribute(value=node.args[0], attr="*"))
            for t in targets:
                name = _dotted(t) if isinstance(t, ast.Attribute) else ""
                if name and name.split(".")[0] in bound and (rel, name) not in SCOPED_SWITCHES:
                    found.append(f"{rel}:{node.lineno}: {name}")
    assert not found, "assignments into a library:\n" + "\n".join(found)

