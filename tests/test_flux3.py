"""FLUX.3 klein and klein base on tiny models of the real classes: both load layouts (the BFL layout checked
against diffusers' own converter), conditioning and the transformer call as diffusers' FLUX.3 modular pipeline
computes them, training runs (LoRA with CFG previews, LoKr with previews) whose ``.diffusers`` files diffusers loads
key for key with the trainer's outputs, text-embedding caching, and refusals of the other variant, FLUX.2 and
settings the family cannot honour."""
from __future__ import annotations

import fnmatch
import json
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import architectures
import core
from architectures.base import ModelLoadError
from architectures.flux3_keys import flux3_bfl_to_diffusers, flux3_diffusers_to_bfl
from architectures.load_util import default_config_dir
from core.adapters import build_network
from tests.tiny_models import build_tiny_dataset, tiny_train_settings, train_twice_with_disk_cache
from tests.tiny_models_flux3 import FLUX3_IDS, build_tiny_flux3, load_kwargs, save_bfl, settings_paths

LAYOUTS = [(a, layout) for a in FLUX3_IDS for layout in ("diffusers", "bfl")]
LONG = "green and white vertical stripes on a black background with a red circle " * 8  # > 80 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux3")
    models = {key: build_tiny_flux3(key[0], root / f"{key[0]}_{key[1]}", key[1]) for key in LAYOUTS}
    build_tiny_dataset(root / "data", n=4)
    return {"models": models, "data": root / "data", "root": root}


def load_arch(tiny, arch_id, layout, settings=None):
    arch = architectures.get(arch_id)
    paths = tiny["models"][(arch_id, layout)]
    comps = arch.load(paths["model"], paths.get("config_dir"), torch.float32, **load_kwargs(paths))
    if settings is not None:
        arch.configure_objective(comps, settings)
    return arch, comps


def make_settings(tiny, arch_id, layout, tmp_path, **overrides):
    return tiny_train_settings(arch_id, settings_paths(tiny["models"][(arch_id, layout)]), tiny["data"], tmp_path,
                               **overrides)


# -- plug-ins and shipped configs ----------------------------------------------------------------------------------

def test_plugins_and_shipped_configs():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
    from transformers import AutoConfig
    labels = {"flux3_klein": ("FLUX.3 klein", "FLUX.3 klein"),
              "flux3_klein_base": ("FLUX.3 klein base (undistilled)", "FLUX.3 klein base")}
    for arch_id, (label, short) in labels.items():
        arch = architectures.get(arch_id)
        assert (arch.label, arch.short_label, arch.ss_base_model_version) == (label, short, arch_id)
        assert arch.modelspec_architecture == "Flux.3-klein/lora"
        assert arch.traits == {"flow_matching", "components_folder", "double_single_blocks"}
        assert arch_id in architectures.with_trait("components_folder")
        folder = default_config_dir(arch_id)
        cfg = Flux3Transformer2DModel.load_config(str(folder), subfolder="transformer", local_files_only=True)
        assert (cfg["num_layers"], cfg["num_single_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"],
                cfg["joint_attention_dim"], cfg["flow_map"]) == (5, 28, 3072, 20480, arch_id == "flux3_klein")
        meta = arch.build_denoiser_on_meta()
        n = sum(p.numel() for p in meta.parameters())
        assert n == {"flux3_klein": 5_548_681_984, "flux3_klein_base": 5_538_458_368}[arch_id]
        # every keep-pattern names real Linear layers, and every embedder / output layer is kept
        linears = [name for name, m in meta.named_modules() if isinstance(m, torch.nn.Linear)]
        kept = {name for name in linears if any(fnmatch.fnmatchcase(name, p) for p in arch.quantize_keep)}
        unmatched = [p for p in arch.quantize_keep if not any(fnmatch.fnmatchcase(name, p) for name in linears)]
        assert unmatched == ([] if arch_id == "flux3_klein" else ["target_timestep_embedder.*"])
        assert {"context_embedder", "x_embedders.image", "proj_out", "norm_out.linear",
                "timestep_embedder.linear_1"} <= kept
        assert ("target_timestep_embedder.linear_2" in kept) == (arch_id == "flux3_klein")
        assert not any(".attn." in k or "stream_modulations" in k for k in kept)
        te = AutoConfig.from_pretrained(str(folder / "text_encoder"))
        assert te.model_type == "qwen3_vl" and len(arch.hidden_layers) * te.text_config.hidden_size == 20480
        assert te.text_config.num_hidden_layers >= max(arch.hidden_layers)
        sched = FlowMatchEulerDiscreteScheduler.from_config(json.loads((folder / "scheduler" / "scheduler_config.json")
                                                                       .read_text()))
        assert sched.config.shift == 6.93 and not sched.config.use_dynamic_shifting  # Flux3SetTimestepsStep's
        AutoencoderKLFlux2.load_config(str(folder), subfolder="vae")


@pytest.mark.parametrize("arch_id", FLUX3_IDS)
def test_both_layouts_load_the_same_model(tiny, arch_id):
    from diffusers.loaders.single_file_utils import convert_flux3_transformer_checkpoint_to_diffusers
    _, folder = load_arch(tiny, arch_id, "diffusers")
    _, single = load_arch(tiny, arch_id, "bfl")
    assert type(folder.text_encoders[0]).__name__ == "Qwen3VLForConditionalGeneration"
    for x, y in ((folder.denoiser, single.denoiser), (folder.vae, single.vae),
                 (folder.text_encoders[0], single.text_encoders[0])):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    # our BFL names are exactly the inverse of diffusers' converter (adaLN halves included)
    sd = folder.denoiser.state_dict()
    bfl = flux3_diffusers_to_bfl(sd, folder.denoiser.config)
    assert ("ref_time_in.in_layer.weight" in bfl) == (arch_id == "flux3_klein")
    for back in (convert_flux3_transformer_checkpoint_to_diffusers(dict(bfl)),
                 flux3_bfl_to_diffusers(bfl, folder.denoiser.config)):
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


# -- conditioning and the transformer call as diffusers' modular pipeline ----------------------------------------

def test_conditioning_and_call_match_the_modular_pipeline(tiny):
    from diffusers.modular_pipelines.flux3.before_denoise import Flux3TextRoPEInputsStep, _prepare_image_ids
    from diffusers.modular_pipelines.flux3.encoders import Flux3TextEncoderStep, Flux3VaeEncoderStep
    for arch_id in FLUX3_IDS:
        arch, comps = load_arch(tiny, arch_id, "diffusers")
        te, tok = comps.text_encoders[0], comps.tokenizers[0]
        processor = types.SimpleNamespace(apply_chat_template=tok.apply_chat_template, tokenizer=tok)
        with torch.no_grad():
            cond = arch.encode_text(comps, arch.tokenize(comps, ["a red square", LONG]), 1)
            theirs = [Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds(te, processor, p)
                      for p in ("a red square", LONG)]
        assert [t.shape[1] for t in theirs] == [80, 160] and cond["text_window"].tolist() == [80, 160]
        for i, t in enumerate(theirs):  # the cached row cut to its window is the pipeline's embedding
            torch.testing.assert_close(cond["prompt_embeds"][i:i + 1, :t.shape[1]], t, rtol=0, atol=0)
        assert arch.preview_embeddings(comps, [LONG], 1)["prompt_embeds"].shape == (1, 160, 256)
        # the denoiser call (batched, cut to the batch's widest window) as the modular denoise loop makes it
        g = torch.Generator().manual_seed(0)
        latents, t = torch.randn(2, 32, 4, 6, generator=g), torch.tensor([0.3, 0.8])
        with torch.no_grad():
            pred = arch.predict(comps, latents, t, cond, {})
            text = cond["prompt_embeds"][:, :160]
            out = comps.denoiser(hidden_states=latents.flatten(2).transpose(1, 2), encoder_hidden_states=text,
                                 timestep=t, img_ids=_prepare_image_ids(4, 6, 0.5),
                                 txt_ids=Flux3TextRoPEInputsStep._prepare_text_ids(text),
                                 target_timestep=t if arch_id == "flux3_klein" else None, return_dict=False)[0]
        torch.testing.assert_close(pred, out.transpose(1, 2).reshape(2, 32, 4, 6))
    # latents: the VAE encoder step's patchify and batch-norm normalisation (with the mode)
    vae = comps.vae
    pixels = torch.rand(1, 3, 64, 32) * 2 - 1
    with torch.no_grad():
        mode = vae.encode(pixels).latent_dist.mode()
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        expected = (Flux3VaeEncoderStep._patchify_latents(mode) - mean) / std
        comps.vae = types.SimpleNamespace(encode=lambda x: types.SimpleNamespace(
            latent_dist=types.SimpleNamespace(sample=lambda: vae.encode(x).latent_dist.mode())),
            device=vae.device, dtype=vae.dtype, bn=vae.bn, config=vae.config)
        got = arch.encode_latents(comps, pixels)
    torch.testing.assert_close(got, expected)


# -- training, files, diffusers ------------------------------------------------------------------------------------

RUNS = {
    "base-bfl-lora-cfg": ("flux3_klein_base", "bfl", dict(
        network__algorithm="lora", schedule__train_batch_size=2, sampling__sample_every_n_steps=2,
        sampling__prompts="a red square", sampling__guidance_scale=4.0, sampling__negative_prompt="blue")),
    "klein-diffusers-lokr": ("flux3_klein", "diffusers", dict(
        network__algorithm="lokr", network__alpha=1.0, schedule__timestep_sampling="shift",
        sampling__sample_every_n_steps=2, sampling__prompts="a blue circle")),
}


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    out = {}
    for name, (arch_id, layout, overrides) in RUNS.items():
        s, config = make_settings(tiny, arch_id, layout, tmp_path_factory.mktemp(name), optimizer__learning_rate=1e-2,
                                  schedule__max_train_steps=2, **overrides)
        events = []
        out[name] = (s, core.train(s, on_event=events.append, config=config), events)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_training_writes_bfl_and_diffusers_files(tiny, runs, name):
    arch_id, _, _ = RUNS[name]
    s, result, events = runs[name]
    losses = [e["loss"] for e in events if e["type"] == "progress"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert "text-encoder cache on" in " ".join(e.get("message", "") for e in events if e["type"] == "log")
    sd = load_file(str(result.final))
    with safe_open(str(result.final), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "Flux.3-klein/lora" and md["ss_base_model_version"] == arch_id
    assert md["ss_network_module"] == ("networks.lora_flux" if s.network.algorithm == "lora" else "lycoris.kohya")
    stems = {k.split(".")[0] for k in sd}
    expected = {f"lora_unet_{blocks}_{i}_{layer}" for i in (0, 1) for layer in ("q_proj", "k_proj", "v_proj",
                "attn_out", "mlp_in", "mlp_out") for blocks in ("txt_mode_blocks", "content_mode_blocks_image",
                                                                "single_blocks")}
    assert stems == expected  # BFL names, no reference-image blocks
    trained = "lora_up.weight" if s.network.algorithm == "lora" else "lokr_w2"
    ups = [v for k, v in sd.items() if k.endswith(trained)]
    assert ups and all(torch.isfinite(v).all() for v in sd.values()) and all(v.abs().max() > 0 for v in ups)
    side = load_file(str(result.final.with_name(result.final.stem + ".diffusers.safetensors")))
    assert all(k.startswith(("transformer.txt_mode_blocks.", "transformer.mode_blocks.image.",
                             "transformer.single_transformer_blocks.")) for k in side)
    samples = [p for e in events if e["type"] == "sample" for p in e["paths"]]
    assert samples and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in samples)


@pytest.mark.parametrize("name", list(RUNS))
def test_diffusers_loads_every_key_and_matches_the_trainer(tiny, runs, name):
    """LoRA through the FLUX.3 modular pipeline's ``load_lora_weights``; LoKr through the transformer's
    ``load_lora_adapter`` (diffusers 0.42.1's pipeline loader rejects keys without "lora")."""
    from diffusers.modular_pipelines.flux3 import Flux3AutoBlocks
    from peft.utils import get_peft_model_state_dict
    arch_id, layout, _ = RUNS[name]
    s, result, _ = runs[name]
    arch, comps = load_arch(tiny, arch_id, layout, settings=s)
    net = build_network(arch.adapter_targets(comps, s.network.target, False), s.network.algorithm, s.network.rank,
                        s.network.alpha)
    net.load_export_state_dict(load_file(str(result.state_dir / "adapter.safetensors")))

    side_path = result.final.with_name(result.final.stem + ".diffusers.safetensors")
    side = load_file(str(side_path))
    _, theirs = load_arch(tiny, arch_id, layout, settings=s)
    if s.network.algorithm == "lora":
        pipe = Flux3AutoBlocks().init_pipeline()
        pipe.update_components(transformer=theirs.denoiser)
        pipe.load_lora_weights(str(side_path), adapter_name="trained")
    else:
        theirs.denoiser.load_lora_adapter(str(side_path), prefix="transformer", adapter_name="trained")
    loaded = get_peft_model_state_dict(theirs.denoiser, adapter_name="trained")
    assert {f"transformer.{k}" for k in loaded} == set(side)  # every key consumed, nothing else created

    g = torch.Generator().manual_seed(1)
    latents, t = torch.randn(1, 32, 4, 6, generator=g), torch.tensor([0.6])
    with torch.no_grad():
        cond = arch.encode_text(comps, arch.tokenize(comps, ["a red square"]), 1)
        base = arch.predict(comps, latents, t, cond, {})
        net.apply_to()
        ours = arch.predict(comps, latents, t, cond, {})
        net.restore()
        got = arch.predict(theirs, latents, t, cond, {})
    torch.testing.assert_close(got, ours, atol=1e-5, rtol=1e-4)
    assert (ours - base).abs().max() > 1e-3


def test_rerun_with_cached_captions_never_loads_the_text_encoder(tiny, tmp_path):
    runs = train_twice_with_disk_cache("flux3_klein_base", settings_paths(tiny["models"][("flux3_klein_base", "bfl")]),
                                       tiny["data"], tmp_path)
    (first, first_file), (second, second_file) = runs
    assert any(m.startswith("Caching text-encoder outputs") for m in first)
    assert any("text encoders are not loaded" in m for m in second)
    assert not any(m.startswith("Caching text-encoder outputs") for m in second)
    assert first_file.keys() == second_file.keys()
    for k in first_file:
        torch.testing.assert_close(second_file[k], first_file[k], rtol=0, atol=0, msg=k)


# -- targets and settings --------------------------------------------------------------------------------------------

def test_targets_blocks_and_settings(tiny):
    s, _ = make_settings(tiny, "flux3_klein_base", "diffusers", tiny["root"])
    arch, comps = load_arch(tiny, "flux3_klein_base", "diffusers", settings=s)
    names = lambda ts: sorted(t.path for t in ts)  # noqa: E731
    assert len(arch.adapter_targets(comps, "attn", False)) == 6 * 4
    full = arch.adapter_targets(comps, "full-lin", False)
    assert names(full) == names(arch.adapter_targets(comps, "attn_mlp", False))
    s.network.flux_blocks = "double"
    arch.configure_objective(comps, s)
    double = arch.adapter_targets(comps, "attn", False)
    assert {t.path.split(".attn.")[0] for t in double} == {f"{b}.{i}" for b in ("txt_mode_blocks", "mode_blocks.image")
                                                           for i in (0, 1)}
    s.network.flux_blocks = "single"
    arch.configure_objective(comps, s)
    single = arch.select_adapter_targets(comps, "attn", False, include="*stream_modulations.txt*")
    assert {t.block for t in single} == {"single_0", "single_1", ""}
    mods = [t for t in single if "modulations" in t.path]
    net = build_network(mods, "lora", 4, 2.0)
    files = arch.export_adapter(comps, net.export_state_dict(torch.float32))
    assert {k.split(".")[0] for k in files[""]} == {"lora_unet_early_stream_modulations_txt_lin",
                                                    "lora_unet_single_stream_modulations_txt_lin"}
    assert "transformer.early_stream_modulations.txt.linear.lora_A.weight" in files[".diffusers"]
    for field, value, words in (("algorithm", "loha", "network.algorithm"), ("dora", True, "network.dora"),
                                ("train_text_encoder", True, "network.train_text_encoder")):
        t, _ = make_settings(tiny, "flux3_klein", "diffusers", tiny["root"], **{f"network__{field}": value})
        assert any(p.startswith(words) for p in arch.check_settings(t)), field
    for algorithm in ("lora", "locon", "lokr"):
        t, _ = make_settings(tiny, "flux3_klein", "diffusers", tiny["root"], network__algorithm=algorithm)
        assert arch.check_settings(t) == []


def test_memory_probe_inputs_fit_predict(tiny):
    arch, comps = load_arch(tiny, "flux3_klein", "diffusers")
    noisy, t, cond, batch = arch.probe_inputs(comps.denoiser, 64, 2, torch.float32, device="cpu")
    assert noisy.shape == (2, 32, 4, 4) and cond["prompt_embeds"].shape == (2, arch.max_sequence_length, 256)
    with torch.no_grad():
        assert arch.predict(comps, noisy, t, cond, batch).shape == noisy.shape


# -- refusals ------------------------------------------------------------------------------------------------------

def test_other_variant_and_families_are_refused(tiny, tmp_path):
    m = tiny["models"]
    klein, base = architectures.get("flux3_klein"), architectures.get("flux3_klein_base")
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.3 klein, but .*undistilled FLUX\.3 klein base.*flow_map "
                                             r"false.*Choose the FLUX\.3 klein base architecture"):
        klein.load(m[("flux3_klein_base", "diffusers")]["model"], None, torch.float32)
    bfl = m[("flux3_klein", "bfl")]
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.3 klein base, but .*flux3-tiny.*step-distilled.*"
                                             r"ref_time_in.*Choose the FLUX\.3 klein architecture"):
        base.load(bfl["model"], m[("flux3_klein_base", "bfl")]["config_dir"], torch.float32,
                  components_path=bfl["components"])
    # model.diffusion_model.-prefixed files load; diffusers-layout files are refused
    arch, ref = load_arch(tiny, "flux3_klein", "bfl")
    prefixed = save_bfl(ref.denoiser, tmp_path / "prefixed.safetensors", prefix="model.diffusion_model.")
    comps = klein.load(prefixed, bfl["config_dir"], torch.bfloat16, components_path=bfl["components"])
    assert {p.dtype for n, p in comps.denoiser.named_parameters() if "norm_" not in n} == {torch.bfloat16}
    from safetensors.torch import save_file
    flat = tmp_path / "diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in ref.denoiser.state_dict().items()}, str(flat))
    with pytest.raises(ModelLoadError, match=r"FLUX\.3 transformer in diffusers key layout"):
        klein.load(flat, bfl["config_dir"], torch.float32, components_path=bfl["components"])
    # the shipped full-size config does not describe the tiny file; a single file needs its components
    with pytest.raises(ModelLoadError, match=r"2 per-mode / 2 single blocks, width 32.*describes 5 per-mode / 28 "
                                             r"single blocks, width 3072.*model\.config_path"):
        klein.load(bfl["model"], None, torch.float32, components_path=bfl["components"])
    with pytest.raises(ModelLoadError, match=r"set model\.components_path"):
        klein.load(bfl["model"], bfl["config_dir"], torch.float32)
    # FLUX.2: a (tiny) folder, a full-size klein 4B file, a Qwen3 text encoder among the components
    from tests.tiny_models_flux2 import build_tiny_flux2, fake_full_size_bfl
    folder2 = build_tiny_flux2("flux2_klein_4b", tmp_path / "flux2_folder", "diffusers")
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.3 klein base, but .*FLUX\.2 transformer without "
                                             r"guidance.*Choose the FLUX\.2 architecture of its size"):
        base.load(folder2["model"], None, torch.float32)
    bfl2 = build_tiny_flux2("flux2_klein_4b", tmp_path / "flux2_bfl", "bfl")
    fake = fake_full_size_bfl("flux2_klein_4b", tmp_path / "flux-2-klein-4b.safetensors")
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.3 klein, but .*flux-2-klein-4b.*FLUX\.2 transformer "
                                             r"without guidance.*5 double / 20 single blocks.*Choose FLUX\.2 klein 4B "
                                             r"or klein base 4B for this model"):
        klein.load(fake, None, torch.float32, components_path=bfl2["components"])
    with pytest.raises(ModelLoadError, match=r"Qwen3VLForConditionalGeneration text encoder, but .*'qwen3'"):
        klein.load(bfl["model"], bfl["config_dir"], torch.float32, components_path=bfl2["components"])
    # another family entirely (a FLUX.1 BFL file): named by the shared DiT detection
    from tests.tiny_models_dit import build_tiny_dit
    flux1 = build_tiny_dit("flux1_dev", tmp_path / "flux1", "bfl")
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.3 klein, but .*FLUX\.1 dev transformer in BFL "
                                             r"layout.*Choose the FLUX\.1 dev architecture"):
        klein.load(flux1["model"], None, torch.float32)
