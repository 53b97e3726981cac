"""Textual inversion (network.algorithm "textual_inversion") on tiny SD1.5 / SDXL models on the CPU: only the new
token's rows train, the embedding file loads through diffusers' ``load_textual_inversion`` and encodes a prompt
exactly as the trainer did, bad settings are refused before anything loads, a resumed run continues exactly, and
the product trains an embedding in a fresh process."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import architectures
import core
from core.export import tensor_data_sha256
from core.settings import Settings, SettingsError, check_consistency, settings_from_dict
from core.trainer import _Run
from tests.tiny_models import (
    build_tiny_dataset,
    build_tiny_sd15,
    build_tiny_sdxl,
    tiny_train_settings,
    train_in_fresh_process,
)

BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl}
TOKEN, INIT_WORD, VECTORS = "sks", "toy car", 2
KEYS = {"sd15": ("emb_params",), "sdxl": ("clip_l", "clip_g")}
PROMPT = f"a photo of {TOKEN} on a table"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ti")
    data = build_tiny_dataset(root / "data", n=4)
    for caption in data.glob("*.txt"):
        caption.write_text(f"a photo of {TOKEN}, " + caption.read_text(encoding="utf-8"), encoding="utf-8")
    plain = build_tiny_dataset(root / "plain", n=2)
    return {"models": {arch: build(root / arch) for arch, build in BUILDERS.items()}, "data": data, "plain": plain}


def settings(tiny, arch, tmp_path, **overrides):
    values = dict(network__algorithm="textual_inversion", network__ti_token=TOKEN, network__ti_num_vectors=VECTORS,
                  network__ti_init_word=INIT_WORD, schedule__max_train_steps=3, saving__save_precision="float",
                  optimizer__learning_rate=1e-2, memory__compile="off")
    values.update(overrides)
    data = values.pop("data", tiny["data"])
    return tiny_train_settings(arch, {"model.model_path": str(tiny["models"][arch])}, data, tmp_path, **values)


def train_run(tiny, arch, tmp_path, **overrides) -> tuple[_Run, core.TrainResult, list]:
    s, config = settings(tiny, arch, tmp_path, **overrides)
    events = []
    run = _Run(s, events.append, threading.Event(), config)
    return run, run.run(), events


def base_model(tiny, arch):
    return architectures.get(arch).load(tiny["models"][arch], None, torch.float32)


def init_vector(base, i) -> torch.Tensor:
    """The init word's mean embedding in text encoder ``i`` of the base model."""
    ids = base.tokenizers[i].encode(INIT_WORD, add_special_tokens=False)
    return base.text_encoders[i].get_input_embeddings().weight[ids].mean(dim=0)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_only_the_new_rows_train_and_the_file_loads_in_diffusers(tiny, tmp_path, arch):
    run, result, events = train_run(tiny, arch, tmp_path, sampling__prompts=f"{TOKEN} --n blurry {TOKEN}",
                                    sampling__sample_every_n_steps=3)
    assert result.steps == 3 and len(result.samples) == 1   # the token renders in a preview prompt
    base = base_model(tiny, arch)
    saved = load_file(str(result.final))
    assert sorted(saved) == sorted(KEYS[arch])

    # the optimizer holds the new vectors and nothing else
    optimized = [p for group in run.optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in optimized] == [id(v) for v in run.network.vectors]
    for i, (te, key) in enumerate(zip(run.components.text_encoders, KEYS[arch])):
        base_rows = base.text_encoders[i].get_input_embeddings().weight
        rows = te.get_input_embeddings().weight   # the trained rows were written after the base matrix at the end
        assert rows.shape == (base_rows.shape[0] + VECTORS, base_rows.shape[1])
        assert torch.equal(rows[:base_rows.shape[0]], base_rows)          # every other row bit-identical
        assert saved[key].shape == (VECTORS, base_rows.shape[1]) and torch.isfinite(saved[key]).all()
        assert torch.equal(rows[base_rows.shape[0]:], saved[key])
        start = init_vector(base, i)
        assert all(not torch.allclose(row, start, atol=1e-4) for row in saved[key]), "a vector did not train"
        # the rest of each text encoder and the UNet are untouched
        trained_sd, base_sd = te.state_dict(), base.text_encoders[i].state_dict()
        assert trained_sd.keys() == base_sd.keys()
        assert all(torch.equal(trained_sd[k], base_sd[k]) for k in base_sd if "token_embedding" not in k)
    unet, base_unet = run.components.denoiser.state_dict(), base.denoiser.state_dict()
    assert all(torch.equal(unet[k], base_unet[k]) for k in base_unet)

    with safe_open(str(result.final), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == architectures.get(arch).modelspec_embedding_architecture
    assert md["modelspec.architecture"].endswith("/textual-inversion")
    assert md["modelspec.trigger_phrase"] == TOKEN and md["ss_steps"] == "3"
    assert md["sshs_model_hash"] == tensor_data_sha256(saved)
    assert not any(k.startswith("ss_network_") for k in md)

    # diffusers' loader, as its documentation shows it for each family, encodes a prompt as the trainer does
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    folder = str(tiny["models"][arch])
    if arch == "sd15":
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False)
        pipe.load_textual_inversion(str(result.final), token=TOKEN)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
        pipe.load_textual_inversion(saved["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        pipe.load_textual_inversion(saved["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        # diffusers pools bigG at the highest token id (the SDXL config's eos_token_id 2), which the new token now
        # holds; the trainer, sd-scripts and ComfyUI pool at the end token, as the model was trained
        pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id
    with torch.no_grad():
        loaded = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        ours = run.batch_conditioning([PROMPT])
    torch.testing.assert_close(loaded[0], ours["encoder_hidden_states"], rtol=0, atol=1e-6)
    if arch == "sdxl":
        torch.testing.assert_close(loaded[2], ours["pooled"], rtol=0, atol=1e-6)
    with torch.no_grad():   # and the token matters: without it the prompt encodes differently
        assert not torch.allclose(run.batch_conditioning([PROMPT.replace(TOKEN, INIT_WORD)])["encoder_hidden_states"],
                                  ours["encoder_hidden_states"], atol=1e-4)


def test_bad_settings_are_refused_naming_the_setting():
    def problems(arch="sd15", **network):
        s = Settings()
        s.model.architecture = arch
        s.network.algorithm = "textual_inversion"
        for name, value in ({"ti_token": TOKEN, "ti_init_word": INIT_WORD} | network).items():
            setattr(s.network, name, value)
        return [p for p in check_consistency(s) if p.startswith("network.")]

    assert problems() == [] and problems("sdxl", ti_num_vectors=8) == []
    assert problems(ti_token="  ")[0].startswith("network.ti_token: choose the new word")
    assert "without spaces" in problems(ti_token="my token")[0]
    for known in ("cat", "Cat", "photo"):   # CLIP lowercases prompts: "Cat" would stand for "cat"
        for arch in ("sd15", "sdxl"):
            found = problems(arch, ti_token=known)
            assert len(found) == 1 and found[0].startswith("network.ti_token: the tokenizer already knows"), found
    assert problems(ti_init_word="")[0].startswith("network.ti_init_word:")
    assert problems("flux1_dev")[0].startswith("network.algorithm: textual inversion is not available")
    with pytest.raises(SettingsError, match=r"network\.ti_num_vectors"):
        settings_from_dict({"network": {"algorithm": "textual_inversion", "ti_num_vectors": 0}})
    # the options of other algorithms are hidden, the token's shown
    s = Settings()
    s.network.algorithm = "textual_inversion"
    assert s.applies("network.ti_token") and s.applies("network.ti_init_word") and s.applies("network.ti_num_vectors")
    assert not any(s.applies(f"network.{f}") for f in ("rank", "alpha", "target", "train_text_encoder", "ema"))
    assert not s.applies("optimizer.text_encoder_lr")
    s.network.algorithm = "lora"
    assert not s.applies("network.ti_token")


def _loaded_nothing(events) -> bool:
    return not any(e["type"] == "status" and e["message"].startswith("Loading") for e in events)


def test_runs_that_cannot_work_stop_before_loading(tiny, tmp_path):
    for overrides, setting in [(dict(network__ti_token="cat"), r"network\.ti_token: the tokenizer already knows"),
                               (dict(data=tiny["plain"]), r"network\.ti_token: no training caption contains 'sks'"),
                               (dict(memory__cache_text_encoder_outputs="on"),
                                r"memory\.cache_text_encoder_outputs .*textual inversion")]:
        s, config = settings(tiny, "sd15", tmp_path, **overrides)
        events = []
        with pytest.raises(ValueError, match=setting):
            core.train(s, on_event=events.append, config=config)
        assert _loaded_nothing(events), overrides
    # left on 'auto', the text-encoder outputs are not cached: the embedding trains through the encoder
    from core.hardware import detect_hardware
    from core.plan import make_plan
    s, _ = settings(tiny, "sd15", tmp_path)
    plan = make_plan(detect_hardware(), s, architectures.get("sd15"))
    assert not plan.cache_text_encoder_outputs and any("textual inversion" in r for r in plan.reasons)


def test_the_estimate_counts_the_new_rows_and_the_encoders():
    from core.estimate import adapter_param_count, activation_profile
    s = Settings()
    s.network.algorithm = "textual_inversion"
    s.network.ti_num_vectors = 3
    # the full-size shipped configs: CLIP-L is 768 wide, OpenCLIP bigG 1280
    assert adapter_param_count(architectures.get("sd15"), s.network) == 3 * 768
    assert adapter_param_count(architectures.get("sdxl"), s.network) == 3 * (768 + 1280)
    # the backward pass runs through the frozen UNet to the conditioning: its activations are kept
    assert activation_profile(architectures.get("sd15"), 512, 1, "bf16", s.network).total > 0


def test_resume_continues_exactly(tiny, tmp_path):
    common = dict(schedule__max_train_steps=4, saving__save_every_n_steps=2)
    s, config = settings(tiny, "sd15", tmp_path / "full", **common)
    full = core.train(s, config=config)
    state = full.final.parent / "tiny_sd15-state-000002"
    assert (state / "adapter.safetensors").is_file()
    intermediate = load_file(str(full.final.parent / "tiny_sd15-step000002.safetensors"))
    assert tuple(intermediate) == ("emb_params",) and torch.isfinite(intermediate["emb_params"]).all()

    s2, config2 = settings(tiny, "sd15", tmp_path / "split", saving__resume_from=str(state), **common)
    # the state lives in the other run's outputs folder: allowed here explicitly
    config2 = config2.model_copy(update={"allowed_roots": [*config2.allowed_roots, str(tmp_path / "full")]})
    events = []
    second = core.train(s2, on_event=events.append, config=config2)
    assert [e["step"] for e in events if e["type"] == "progress"] == [3, 4]
    a, b = load_file(str(full.final)), load_file(str(second.final))
    assert not torch.equal(a["emb_params"], intermediate["emb_params"])
    torch.testing.assert_close(b["emb_params"], a["emb_params"], rtol=0, atol=1e-7)

    # a state is continued only with the token it was trained for
    s3, config3 = settings(tiny, "sd15", tmp_path / "other", saving__resume_from=str(state),
                           network__ti_token="ohwx", **common)
    config3 = config3.model_copy(update={"allowed_roots": [*config3.allowed_roots, str(tmp_path / "full")]})
    with pytest.raises(SettingsError, match=r"network\.ti_token is 'ohwx' here but 'sks'"):
        core.train(s3, config=config3)


def test_fresh_process_trains_an_sdxl_embedding(tiny, tmp_path):
    s, config = settings(tiny, "sdxl", tmp_path, saving__save_precision="fp16")
    result = train_in_fresh_process(s, config, tmp_path)
    assert result["steps"] == 3
    saved = load_file(result["final"])
    base = base_model(tiny, "sdxl")
    assert sorted(saved) == sorted(KEYS["sdxl"])
    for i, key in enumerate(KEYS["sdxl"]):
        width = base.text_encoders[i].get_input_embeddings().embedding_dim
        assert saved[key].shape == (VECTORS, width) and saved[key].dtype == torch.float16
        assert torch.isfinite(saved[key]).all()
        assert not torch.allclose(saved[key].float(), init_vector(base, i).expand(VECTORS, -1), atol=1e-3)


# -- pivotal tuning: the token's embedding beside a LoRA --------------------------------------------------------

def test_pivotal_settings_show_the_token_and_refuse_what_cannot_work():
    s = Settings()
    s.model.architecture, s.network.algorithm = "sd15", "lora"
    assert s.applies("network.pivotal") and not s.applies("network.ti_token")
    s.network.pivotal = True   # the token's fields join the adapter's (the schema's second show_if set)
    assert all(s.applies(f"network.{f}") for f in ("ti_token", "ti_init_word", "ti_num_vectors", "rank"))
    assert s.applies("optimizer.embedding_lr")
    from ui.schema_ui import field_visible
    values = {"model.architecture": "sd15", "network.algorithm": "loha", "network.pivotal": True}
    assert field_visible("network.ti_token", values)
    assert not field_visible("network.ti_token", {**values, "network.pivotal": False})
    assert not field_visible("network.ti_token", {**values, "network.algorithm": "full_finetune"})
    s.model.model_path, s.dataset.path = "model.safetensors", "images"
    problems = check_consistency(s)
    assert any(p.startswith("network.ti_token: choose the new word") for p in problems)
    s.network.ti_token, s.network.ti_init_word = TOKEN, INIT_WORD
    assert check_consistency(s) == []
    s.network.ti_token = "cat"
    assert any(p.startswith("network.ti_token: the tokenizer already knows") for p in check_consistency(s))
    s.network.ti_token = TOKEN
    # a family without embeddings hides the checkbox, and a run ignores it (it was left on for SD1.5): no refusal
    # for a setting the user cannot see, no token trained, the text encoders' outputs may be cached
    s.model.architecture = "flux1_dev"
    assert not s.applies("network.pivotal")
    assert not any("pivotal" in p or "ti_token" in p for p in check_consistency(s))
    from core.plan import text_cache_blockers
    assert text_cache_blockers(s) == []


def pivotal(**overrides) -> dict:
    return dict(network__algorithm="lora", network__pivotal=True, optimizer__learning_rate=1e-3,
                optimizer__embedding_lr=1e-2, **overrides)


def test_pivotal_resume_continues_exactly(tiny, tmp_path):
    common = pivotal(schedule__max_train_steps=4, saving__save_every_n_steps=2)
    s, config = settings(tiny, "sd15", tmp_path / "full", **common)
    full = core.train(s, config=config)
    folder = full.final.parent
    # every save writes the LoRA and the embedding file; the intermediate ones are pruned together
    assert (folder / "tiny_sd15-step000002_emb.safetensors").is_file()
    state = folder / "tiny_sd15-state-000002"
    s2, config2 = settings(tiny, "sd15", tmp_path / "split", saving__resume_from=str(state), **common)
    config2 = config2.model_copy(update={"allowed_roots": [*config2.allowed_roots, str(tmp_path / "full")]})
    second = core.train(s2, config=config2)
    for suffix in ("", "_emb"):
        a = load_file(str(full.final.with_name(f"tiny_sd15{suffix}.safetensors")))
        b = load_file(str(second.final.with_name(f"tiny_sd15{suffix}.safetensors")))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_fresh_process_pivotal_tuning_saves_a_lora_with_its_embedding(tiny, tmp_path):
    """A LoRA and its token trained together in a fresh process: the LoRA file carries the embedding as
    bundle_emb entries (A1111 / Forge / ComfyUI), the _emb file is an embedding diffusers loads; with both loaded
    in diffusers the prompt encodes as the trained text encoder encodes it."""
    s, config = settings(tiny, "sd15", tmp_path, **pivotal(saving__save_precision="float"))
    result = train_in_fresh_process(s, config, tmp_path)
    lora_path, emb_path = map(Path, result["outputs"])
    assert emb_path.name == lora_path.stem + "_emb.safetensors"
    lora, emb = load_file(str(lora_path)), load_file(str(emb_path))
    assert sorted(emb) == ["emb_params"] and emb["emb_params"].shape == (VECTORS, 32)
    bundle = {k: v for k, v in lora.items() if k.startswith("bundle_emb.")}
    # the key A1111 / Forge read beside a LoRA and ComfyUI's embedding loader concatenates
    assert list(bundle) == [f"bundle_emb.{TOKEN}.string_to_param.*"]
    assert torch.equal(bundle[f"bundle_emb.{TOKEN}.string_to_param.*"], emb["emb_params"])
    adapter = {k: v for k, v in lora.items() if k not in bundle}
    assert adapter and all(k.startswith("lora_unet_") for k in adapter)
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert all(v.abs().max() > 0 for k, v in adapter.items() if k.endswith("lora_up.weight")), "the LoRA trained"
    base = base_model(tiny, "sd15")
    assert all(not torch.allclose(row, init_vector(base, 0), atol=1e-4) for row in emb["emb_params"])
    with safe_open(str(lora_path), "pt") as f:
        lora_md = f.metadata()
    with safe_open(str(emb_path), "pt") as f:
        emb_md = f.metadata()
    assert lora_md["ss_network_module"] == "networks.lora" and lora_md["modelspec.architecture"].endswith("/lora")
    assert emb_md["modelspec.architecture"].endswith("/textual-inversion")
    assert emb_md["modelspec.trigger_phrase"] == TOKEN and not any(k.startswith("ss_network_") for k in emb_md)

    # diffusers: the LoRA's own tensors through load_lora_weights, the token through load_textual_inversion
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny["models"]["sd15"]), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(adapter)
    pipe.load_textual_inversion(str(emb_path), token=TOKEN)
    from core.embeddings import TextualInversion
    trained = base_model(tiny, "sd15")
    vectors = TextualInversion(trained, architectures.get("sd15").embedding_keys, s.network)
    vectors.load_export_state_dict(emb)
    with torch.no_grad():
        loaded = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        ours = architectures.get("sd15").encode_text(
            trained, architectures.get("sd15").tokenize(trained, [vectors.placeholders(PROMPT)]), 1)
    torch.testing.assert_close(loaded[0], ours["encoder_hidden_states"], rtol=0, atol=1e-6)
