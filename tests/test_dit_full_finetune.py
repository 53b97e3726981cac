"""Full fine-tuning of the DiT families (SD3 / SD3.5, FLUX.1, FLUX.2, FLUX.3) on tiny real-class models: the transformer
trains, the final file is the family's original single file (SAI MMDiT / BFL keys) that diffusers'
``from_single_file`` loads to exactly the weights the run saved in its diffusers folder, EMA weights are what
is saved, and text-encoder training is refused up front (the file holds the transformer alone)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import architectures
import core
from core.settings import SettingsError
from tests.tiny_models import build_tiny_dataset, tiny_train_settings
from tests.tiny_models_dit import build_tiny_dit
from tests.tiny_models_dit import settings_paths as dit_paths
from tests.tiny_models_flux2 import build_tiny_flux2
from tests.tiny_models_flux2 import settings_paths as flux2_paths
from tests.tiny_models_flux3 import build_tiny_flux3

DIT_IDS = [a for a, cls in architectures.registry().items()
           if cls.supports_full_checkpoint and "flow_matching" in cls.traits]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("dit_fft") / "data", n=2)


def _model(arch_id: str, folder):
    if arch_id.startswith(("flux2", "flux3")):
        paths = (build_tiny_flux2 if arch_id.startswith("flux2") else build_tiny_flux3)(arch_id, folder, "diffusers")
        return paths["model"], flux2_paths(paths)
    paths = build_tiny_dit(arch_id, folder, "diffusers")
    return paths["model"], {**dit_paths(paths), "model.t5_max_length": 24}


def _transformer_class(model_folder):
    import diffusers
    config = json.loads((model_folder / "transformer" / "config.json").read_text(encoding="utf-8"))
    return getattr(diffusers, config["_class_name"])


@pytest.mark.parametrize("arch_id", DIT_IDS)
def test_full_finetune_writes_the_original_single_file(arch_id, data, tmp_path):
    assert len(DIT_IDS) >= 12, DIT_IDS
    model_folder, fields = _model(arch_id, tmp_path / "model")
    s, config = tiny_train_settings(arch_id, fields, data, tmp_path, network__algorithm="full_finetune",
                                    schedule__max_train_steps=2, saving__save_precision="float",
                                    saving__save_diffusers_folder=True, network__ema=True, network__ema_decay=0.5,
                                    optimizer__learning_rate=1e-3, memory__gradient_checkpointing="off")
    result = core.train(s, config=config)
    arch = architectures.get(arch_id)
    cls = _transformer_class(model_folder)
    base = cls.from_pretrained(str(model_folder), subfolder="transformer", local_files_only=True)

    saved = load_file(str(result.final))
    assert all(k.startswith(arch.original_prefix) for k in saved)
    assert all(torch.isfinite(v).all() for v in saved.values())
    bare = {k[len(arch.original_prefix):] for k in saved}
    assert bare == set(arch.to_original_layout(base.state_dict(), base.config)), "not the original key set"
    with safe_open(str(result.final), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == arch.modelspec_architecture.removesuffix("/lora")
    assert md["ss_ema"] == "True"

    # diffusers reads the single file (with the model's config) as exactly the weights of the diffusers folder
    if arch_id.startswith("flux1"):
        # diffusers 0.42.1's FLUX.1 single-file converter hard-codes the full width (3072): a tiny file goes
        # through our BFL table, which tests/test_dit_keys.py checks against that converter at full width
        from architectures.dit_keys import flux_bfl_to_diffusers
        ours = cls.from_config(base.config)
        ours.load_state_dict(flux_bfl_to_diffusers(saved, base.config), strict=True)
    else:
        ours = cls.from_single_file(str(result.final), config=str(model_folder), subfolder="transformer",
                                    local_files_only=True, torch_dtype=torch.float32)
    folder = next(p for p in result.outputs if p.is_dir())
    theirs = cls.from_pretrained(str(folder), subfolder="transformer", local_files_only=True)
    a, b, before = ours.state_dict(), theirs.state_dict(), base.state_dict()
    assert a.keys() == b.keys() == before.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
    trained = [k for k in a if not torch.equal(a[k], before[k])]
    assert len(trained) > len(a) // 2, f"only {len(trained)} of {len(a)} tensors changed"


def test_text_encoder_training_is_refused_for_a_dit_full_finetune(data, tmp_path):
    s, config = tiny_train_settings("flux1_dev", {"model.model_path": str(tmp_path / "none")}, data, tmp_path,
                                    network__algorithm="full_finetune", network__train_text_encoder=True)
    with pytest.raises(SettingsError, match="saves the transformer alone"):
        core.train(s, config=config)


def test_full_finetune_with_swapped_blocks_equals_training_without(data, tmp_path, monkeypatch):
    """Block swapping during a full fine-tune (Adafactor stepping inside backward): the plan a GPU would make
    with 3 of tiny FLUX.1's 4 blocks swapped, run with the swapper's CPU-simulated transfers (the GPU is the
    one thing mocked here).  The saved single file, the EMA inside it and the resumable state equal the same
    run without swapping, and a resume from that state continues on swapped blocks to the same weights."""
    import dataclasses

    import core.trainer
    model_folder, fields = _model("flux1_dev", tmp_path / "model")
    real_plan = core.trainer.make_plan
    common = dict(network__algorithm="full_finetune", optimizer__optimizer_type="Adafactor",
                  optimizer__fused_backward_pass=True, optimizer__learning_rate=1e-3,
                  saving__save_precision="float", network__ema=True, network__ema_decay=0.5,
                  memory__mixed_precision="no", saving__save_state=True)

    def train(swap: int, name: str, steps: int = 3, resume: str = ""):
        swapped = []

        def plan_with_swap(*args, **kwargs):
            plan = real_plan(*args, **kwargs)
            swapped.append(swap)
            return dataclasses.replace(plan, blocks_to_swap=swap, compile="off")
        monkeypatch.setattr(core.trainer, "make_plan", plan_with_swap)
        s, config = tiny_train_settings("flux1_dev", fields, data, tmp_path / name, schedule__max_train_steps=steps,
                                        saving__resume_from=resume, **common)
        events = []
        result = core.train(s, config=config, on_event=events.append)
        logs = [e["message"] for e in events if e["type"] == "log"]
        assert swapped and (not swap or any("Block swapping: 3 blocks" in m and "copied back" in m for m in logs))
        return result

    plain, swapped = train(0, "plain"), train(3, "swapped")
    a, b = load_file(str(plain.final)), load_file(str(swapped.final))
    base = _transformer_class(model_folder).from_pretrained(str(model_folder), subfolder="transformer",
                                                            local_files_only=True)
    start = architectures.get("flux1_dev").to_original_layout(base.state_dict(), base.config)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    changed = [k for k in a if not torch.equal(a[k], start[k.removeprefix("model.diffusion_model.")]
                                               .to(a[k].dtype))]
    assert any(k.startswith("single_blocks.1.") or "single_blocks.1." in k for k in changed), \
        "the last swapped block did not train"

    sa, sb = plain.state_dir, swapped.state_dir
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(str(sa / name)), load_file(str(sb / name))
        for k in x:
            torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")

    # resume the swapped run's state for two more steps, with and without swapping: the same weights
    more_plain, more_swapped = train(0, "more_plain", 5, str(sb)), train(3, "more_swapped", 5, str(sb))
    x, y = load_file(str(more_plain.final)), load_file(str(more_swapped.final))
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(x[k], b[k]) for k in x), "the resumed steps changed nothing"
