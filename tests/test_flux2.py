"""FLUX.2 (dev, klein, klein base) on tiny models of the real classes: both load layouts, conditioning and
latents as diffusers' pipelines compute them, end-to-end training of every variant with cached text-encoder
outputs, the BFL-named adapter file consumed whole by diffusers' ``Flux2LoraLoaderMixin`` with the trainer's
outputs, the fused export equal to the unfused trained model, and refusals of other families / variants."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

import architectures
import architectures.flux2_loading
import core
from architectures.base import ModelLoadError
from architectures.flux2_keys import flux2_bfl_to_diffusers, flux2_diffusers_to_bfl
from core.adapters import build_network
from tests.test_dit_train_e2e import layers_covered, train_lora
from tests.tiny_models import build_tiny_dataset, tiny_train_settings, train_twice_with_disk_cache
from tests.tiny_models_flux2 import FLUX2_IDS, build_tiny_flux2, fake_full_size_bfl, load_kwargs, settings_paths

LAYOUTS = {("flux2_dev", "diffusers"), ("flux2_dev", "bfl"), ("flux2_klein_4b", "diffusers"),
           ("flux2_klein_4b", "bfl"), ("flux2_klein_9b", "diffusers"), ("flux2_klein_base_4b", "bfl"),
           ("flux2_klein_base_9b", "diffusers")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    models = {key: build_tiny_flux2(key[0], root / f"{key[0]}_{key[1]}", key[1]) for key in sorted(LAYOUTS)}
    build_tiny_dataset(root / "data", n=4)
    return {"models": models, "data": root / "data", "root": root}


def make_settings(tiny, arch, layout, tmp_path, **overrides):
    return tiny_train_settings(arch, settings_paths(tiny["models"][(arch, layout)]), tiny["data"], tmp_path, **overrides)


def load_arch(tiny, arch_id, layout, settings=None):
    arch = architectures.get(arch_id)
    paths = tiny["models"][(arch_id, layout)]
    comps = arch.load(paths["model"], paths.get("config_dir"), torch.float32, **load_kwargs(paths))
    if settings is not None:
        arch.configure_objective(comps, settings)
    return arch, comps


def _inputs(arch, comps, seed=0, prompt="a red square"):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 32, 4, 6, generator=g)
    with torch.no_grad():
        cond = arch.encode_text(comps, arch.tokenize(comps, [prompt]), 1)
    return latents, torch.tensor([0.6]), cond


def _random_network(arch, comps, target, seed=0, **targets_kw):
    net = build_network(arch.adapter_targets(comps, target, False), "lora", 4, 2.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.adapters.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
    return net


# -- plug-ins, configs, loading ---------------------------------------------------------------------------------

def test_plugins_and_shipped_configs():
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import AutoConfig
    labels = {"flux2_dev": "FLUX.2 dev", "flux2_klein_4b": "FLUX.2 klein 4B", "flux2_klein_9b": "FLUX.2 klein 9B",
              "flux2_klein_base_4b": "FLUX.2 klein base 4B (undistilled)",
              "flux2_klein_base_9b": "FLUX.2 klein base 9B (undistilled)"}
    spec = {"flux2_dev": "Flux.2-dev/lora", "flux2_klein_4b": "Flux.2-klein-4b/lora",
            "flux2_klein_9b": "Flux.2-klein-9b/lora", "flux2_klein_base_4b": "Flux.2-klein-4b/lora",
            "flux2_klein_base_9b": "Flux.2-klein-9b/lora"}
    blocks = {"flux2_dev": (8, 48, 6144, 15360, True), "flux2_klein_4b": (5, 20, 3072, 7680, False),
              "flux2_klein_9b": (8, 24, 4096, 12288, False)}
    for arch_id in FLUX2_IDS:
        arch = architectures.get(arch_id)
        assert arch.label == labels[arch_id] and arch.modelspec_architecture == spec[arch_id]
        assert arch.ss_base_model_version == arch_id
        folder = arch_id.replace("_base", "")
        cfg = Flux2Transformer2DModel.load_config(str(architectures.flux2_loading.default_config_dir(arch_id)),
                                                  subfolder="transformer", local_files_only=True)
        assert (cfg["num_layers"], cfg["num_single_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"],
                cfg["joint_attention_dim"], cfg["guidance_embeds"]) == blocks[folder]
        AutoencoderKLFlux2.load_config(str(architectures.flux2_loading.default_config_dir(arch_id)), subfolder="vae")
        te = AutoConfig.from_pretrained(str(architectures.flux2_loading.default_config_dir(arch_id) / "text_encoder"))
        hidden = getattr(te, "text_config", te).hidden_size
        assert 3 * hidden == cfg["joint_attention_dim"]
        if arch_id in ("flux2_dev", "flux2_klein_4b", "flux2_klein_9b"):  # sizes of the published models
            with torch.device("meta"):
                n = sum(p.numel() for p in Flux2Transformer2DModel.from_config(cfg).parameters())
            assert n == pytest.approx({"flux2_dev": 32.22e9, "flux2_klein_4b": 3.876e9, "flux2_klein_9b": 9.079e9}[arch_id],
                                      rel=1e-3)
        index = json.loads((architectures.flux2_loading.default_config_dir(arch_id) / "model_index.json").read_text())
        assert index.get("is_distilled", None) == (None if arch_id == "flux2_dev" else "base" not in arch_id)


@pytest.mark.parametrize("arch_id", ["flux2_dev", "flux2_klein_4b"])
def test_both_layouts_load_the_same_model(tiny, arch_id):
    a, folder = load_arch(tiny, arch_id, "diffusers")
    _, single = load_arch(tiny, arch_id, "bfl")
    assert type(folder.denoiser).__name__ == "Flux2Transformer2DModel"
    assert type(folder.text_encoders[0]).__name__ == ("Mistral3ForConditionalGeneration" if arch_id == "flux2_dev"
                                                      else "Qwen3ForCausalLM")
    for x, y in ((folder.denoiser, single.denoiser), (folder.vae, single.vae),
                 (folder.text_encoders[0], single.text_encoders[0])):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)
    # BFL round trip of the layout itself
    tr = folder.denoiser
    back = flux2_bfl_to_diffusers(flux2_diffusers_to_bfl(tr.state_dict(), tr.config), tr.config)
    assert back.keys() == tr.state_dict().keys() and all(torch.equal(back[k], v) for k, v in tr.state_dict().items())


def test_prefixed_bf16_single_file(tiny, tmp_path):
    """``model.diffusion_model.``-prefixed BFL keys load too, in the requested dtype."""
    from tests.tiny_models_flux2 import save_bfl
    paths = tiny["models"][("flux2_klein_4b", "bfl")]
    arch, ref = load_arch(tiny, "flux2_klein_4b", "bfl")
    prefixed = save_bfl(ref.denoiser, tmp_path / "prefixed.safetensors", prefix="model.diffusion_model.")
    comps = arch.load(prefixed, paths["config_dir"], torch.bfloat16, components_path=paths["components"])
    assert {p.dtype for p in comps.denoiser.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in comps.text_encoders[0].parameters()} == {torch.bfloat16}
    sd, sr = comps.denoiser.state_dict(), ref.denoiser.state_dict()
    assert all(torch.equal(sd[k], sr[k].to(torch.bfloat16)) for k in sr)


def test_conditioning_and_latents_match_the_pipelines(tiny):
    from diffusers import Flux2KleinPipeline, Flux2Pipeline
    prompts = ["a red square", "green and white vertical stripes on a black background"]
    for arch_id, cls in (("flux2_dev", Flux2Pipeline), ("flux2_klein_4b", Flux2KleinPipeline)):
        arch, comps = load_arch(tiny, arch_id, "diffusers")
        te, tok = comps.text_encoders[0], comps.tokenizers[0]
        with torch.no_grad():
            ours = arch.encode_text(comps, arch.tokenize(comps, prompts), 1)["prompt_embeds"]
            if arch_id == "flux2_dev":
                theirs = cls._get_mistral_3_small_prompt_embeds(te, tok, prompts)
            else:
                theirs = cls._get_qwen3_prompt_embeds(te, tok, prompts)
        assert ours.shape == (2, 512, 96)
        torch.testing.assert_close(ours, theirs)
        # latents: patchified, batch-norm normalised (the pipeline's _encode_vae_image, with the mode)
        pixels = torch.rand(1, 3, 64, 32) * 2 - 1
        vae = comps.vae
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            dist.sample = dist.mode  # noqa: the comparison needs the deterministic latent
            pipe = cls(scheduler=None, vae=vae, text_encoder=te, tokenizer=tok, transformer=comps.denoiser)
            expected = pipe._encode_vae_image(pixels, None)
            vae_encode = vae.encode
            vae.encode = lambda x: type("O", (), {"latent_dist": dist})()
            try:
                got = arch.encode_latents(comps, pixels)
            finally:
                vae.encode = vae_encode
        assert got.shape == (1, 32, 16, 8)
        torch.testing.assert_close(got, expected)
        mean, std = arch._bn_stats(vae, got)   # the normalisation and the patchify are undone exactly
        b, c, h, w = got.shape
        unpatched = (got * std + mean).reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        torch.testing.assert_close(unpatched.reshape(b, c // 4, h * 2, w * 2), dist.mode(), atol=1e-5, rtol=1e-4)
        # the transformer call: tokens and position ids as the pipeline's _pack_latents / _prepare_*_ids
        latents, t, cond = _inputs(arch, comps)
        with torch.no_grad():
            pred = arch.predict(comps, latents, t, cond, {})
            tokens = cls._pack_latents(latents)
            out = comps.denoiser(hidden_states=tokens, encoder_hidden_states=cond["prompt_embeds"], timestep=t,
                                 img_ids=cls._prepare_latent_ids(latents),
                                 txt_ids=cls._prepare_text_ids(cond["prompt_embeds"]),
                                 guidance=torch.tensor([1.0]) if arch_id == "flux2_dev" else None,
                                 return_dict=False)[0]
            expected = cls._unpack_latents_with_ids(out, cls._prepare_latent_ids(latents))
        torch.testing.assert_close(pred, expected)


# -- training ----------------------------------------------------------------------------------------------------

RUNS = {
    "flux2_dev-bfl-flux_shift": ("flux2_dev", "bfl", dict(
        schedule__timestep_sampling="flux_shift", model__guidance=3.5, schedule__train_batch_size=2,
        sampling__sample_every_n_steps=3, sampling__prompts="a blue circle", sampling__guidance_scale=3.5,
        schedule__max_train_steps=3)),
    "flux2_klein_4b-diffusers-attn": ("flux2_klein_4b", "diffusers", dict(network__target="attn",
                                                                           schedule__max_train_steps=3)),
    "flux2_klein_9b-single_blocks-shift": ("flux2_klein_9b", "diffusers", dict(
        network__target="full-lin", network__flux_blocks="single", schedule__timestep_sampling="shift",
        schedule__max_train_steps=3)),
    "flux2_klein_base_4b-bfl-cfg_preview": ("flux2_klein_base_4b", "bfl", dict(
        sampling__sample_every_n_steps=2, sampling__prompts="a red square", sampling__guidance_scale=4.0,
        sampling__negative_prompt="blue", schedule__max_train_steps=2)),
    "flux2_klein_base_9b-double_blocks-logit_normal": ("flux2_klein_base_9b", "diffusers", dict(
        network__flux_blocks="double", schedule__timestep_sampling="logit_normal", schedule__loss_weighting="cosmap",
        schedule__max_train_steps=3)),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_train_each_variant(tiny, tmp_path, run):
    arch_id, layout, overrides = RUNS[run]
    s, config = make_settings(tiny, arch_id, layout, tmp_path, **overrides)
    result, events, sd, md = train_lora(s, config)
    assert md["ss_base_model_version"] == arch_id
    assert md["ss_network_module"] == "networks.lora_flux"
    stems = {k.split(".")[0] for k in sd}
    single = {k for k in stems if k.startswith("lora_unet_single_blocks_")}
    double = {k for k in stems if k.startswith("lora_unet_double_blocks_")}
    assert single | double == stems
    if "single_blocks" in run:
        assert not double and single == {f"lora_unet_single_blocks_{i}_linear{j}" for i in (0, 1) for j in (1, 2)}
    elif "double_blocks" in run:
        assert not single and {"lora_unet_double_blocks_1_txt_mlp_2", "lora_unet_double_blocks_0_img_attn_qkv"} <= double
    else:
        assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
                "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_1_txt_attn_proj",
                "lora_unet_single_blocks_1_linear1", "lora_unet_single_blocks_0_linear2"} <= stems
        # q, k and v trained as the one qkv layer BFL holds: the network's rank 4 and alpha 2
        assert sd["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 4
        assert float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 2.0
        assert float(sd["lora_unet_single_blocks_0_linear1.alpha"]) == 2.0
        has_mlp = "lora_unet_double_blocks_0_img_mlp_0" in stems
        assert has_mlp == ("attn" not in run.split("-")[-1])
    samples = [p for e in events if e["type"] == "sample" for p in e["paths"]]
    if s.sampling.sample_every_n_steps:
        assert samples and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in samples)


# -- the file in diffusers, and merged into the BFL weights -----------------------------------------------------

def _peft_modules(module) -> int:
    return sum(1 for _, m in module.named_modules() if hasattr(m, "lora_A") and m.lora_A)


@pytest.mark.parametrize("arch_id,layout", [("flux2_dev", "diffusers"), ("flux2_klein_base_4b", "bfl")])
def test_trained_file_loads_whole_in_diffusers(tiny, tmp_path, arch_id, layout, caplog):
    """diffusers' kohya FLUX.2 converter takes its block counts from the keys and splits qkv in equal thirds: it
    has no hard-coded sizes, so the tiny models' files go through it unchanged."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline
    from diffusers.loaders import Flux2LoraLoaderMixin
    s, config = make_settings(tiny, arch_id, layout, tmp_path, optimizer__learning_rate=1e-2,
                              schedule__max_train_steps=2)
    result = core.train(s, config=config)
    arch, comps = load_arch(tiny, arch_id, layout, settings=s)
    net = build_network(arch.adapter_targets(comps, s.network.target, False), "lora", s.network.rank, s.network.alpha)
    net.load_export_state_dict(load_file(str(result.state_dir / "adapter.safetensors")))

    file_sd = load_file(str(result.final))
    with caplog.at_level(logging.WARNING):
        converted = Flux2LoraLoaderMixin.lora_state_dict(dict(file_sd))
    assert "Unsupported keys" not in caplog.text  # every key consumed
    assert all(k.startswith("transformer.") for k in converted)

    _, theirs_comps = load_arch(tiny, arch_id, layout, settings=s)
    cls = Flux2Pipeline if arch_id == "flux2_dev" else Flux2KleinPipeline
    pipe = cls(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=theirs_comps.denoiser)
    pipe.load_lora_weights(str(result.final))
    assert _peft_modules(pipe.transformer) == layers_covered(net) > 20

    latents, t, cond = _inputs(arch, comps)
    net.apply_to()
    with torch.no_grad():
        ours = arch.predict(comps, latents, t, cond, {})
    net.restore()
    with torch.no_grad():
        base = arch.predict(comps, latents, t, cond, {})
        theirs = arch.predict(theirs_comps, latents, t, cond, {})
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-3)
    assert (ours - base).abs().max() > 1e-3


def _merge_kohya(original, lora):
    """W += up @ down · alpha / rank for every ``lora_unet_<BFL module>`` key (how ComfyUI applies the file)."""
    out = dict(original)
    index = {k[:-len(".weight")].replace(".", "_"): k for k in original if k.endswith(".weight")}
    for key in lora:
        if key.endswith(".lora_down.weight"):
            stem = key[:-len(".lora_down.weight")]
            target = index[stem[len("lora_unet_"):]]
            down, up = lora[key].float(), lora[f"{stem}.lora_up.weight"].float()
            out[target] = original[target] + up @ down * (float(lora[f"{stem}.alpha"]) / down.shape[0])
    return out


@pytest.mark.parametrize("arch_id,target", [("flux2_dev", "attn_mlp"), ("flux2_klein_4b", "attn")])
def test_the_saved_file_merged_into_the_bfl_weights_is_the_trained_model(tiny, arch_id, target):
    s, _ = make_settings(tiny, arch_id, "diffusers", tiny["root"], network__target=target)
    arch, comps = load_arch(tiny, arch_id, "diffusers", settings=s)
    tr = comps.denoiser
    base_sd = {k: v.clone() for k, v in tr.state_dict().items()}
    latents, t, cond = _inputs(arch, comps)
    net = _random_network(arch, comps, target)
    net.apply_to()
    with torch.no_grad():
        ours = arch.predict(comps, latents, t, cond, {})
    net.restore()
    kohya = arch.export_adapter(comps, net.export_state_dict(torch.float32))[""]
    merged = flux2_bfl_to_diffusers(_merge_kohya(flux2_diffusers_to_bfl(base_sd, tr.config), kohya), tr.config)
    tr.load_state_dict(merged)
    with torch.no_grad():
        theirs = arch.predict(comps, latents, t, cond, {})
    tr.load_state_dict(base_sd)
    with torch.no_grad():
        base = arch.predict(comps, latents, t, cond, {})
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (ours - base).abs().max() > 1e-2


def test_targets_modulation_and_text_encoder(tiny, caplog):
    s, _ = make_settings(tiny, "flux2_klein_4b", "diffusers", tiny["root"])
    arch, comps = load_arch(tiny, "flux2_klein_4b", "diffusers", settings=s)
    names = lambda ts: sorted(t.name for t in ts)  # noqa: E731
    full, attn_mlp = arch.adapter_targets(comps, "full-lin", False), arch.adapter_targets(comps, "attn_mlp", False)
    assert names(full) == names(attn_mlp) and not any("modulation" in t.name for t in full)
    # per double block: img/txt qkv (each one fused layer) and their two output projections; per single block 2
    assert len(arch.adapter_targets(comps, "attn", False)) == 2 * 4 + 2 * 2
    with_mod = arch.select_adapter_targets(comps, "attn", False, include="*modulation*")
    added = [t for t in with_mod if "modulation" in t.path]
    assert sorted(t.path for t in added) == ["double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                                             "single_stream_modulation.linear"]
    assert {t.block for t in with_mod} >= {"double_0", "single_1", ""}
    # exported under BFL names; diffusers' kohya FLUX.2 converter drops exactly these keys (with a warning)
    from diffusers.loaders import Flux2LoraLoaderMixin
    net = build_network(with_mod, "lora", 4, 2.0)
    file_sd = arch.export_adapter(comps, net.export_state_dict(torch.float32))[""]
    mod_stems = {k.split(".")[0] for k in file_sd if "modulation" in k}
    assert mod_stems == {"lora_unet_double_stream_modulation_img_lin", "lora_unet_double_stream_modulation_txt_lin",
                         "lora_unet_single_stream_modulation_lin"}
    with caplog.at_level(logging.WARNING):
        converted = Flux2LoraLoaderMixin.lora_state_dict(dict(file_sd))
    assert "Unsupported keys" in caplog.text and "modulation" in caplog.text
    assert not any("modulation" in k for k in converted)
    s.network.train_text_encoder = True  # refused before loading (check_settings), so no targets to find
    assert any(p.startswith("network.train_text_encoder") and "transformer only" in p for p in arch.check_settings(s))


# -- refusals ------------------------------------------------------------------------------------------------------

def test_other_variants_and_families_are_refused(tiny, tmp_path):
    from tests.tiny_models_dit import build_tiny_dit
    dev = tiny["models"][("flux2_dev", "diffusers")]
    klein = tiny["models"][("flux2_klein_4b", "diffusers")]
    klein_bfl = tiny["models"][("flux2_klein_4b", "bfl")]
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.2 dev, but .* without guidance embedding.*Choose "
                                             r"FLUX\.2 klein"):
        architectures.get("flux2_dev").load(klein["model"], None, torch.float32)
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.2 klein 9B, but .*guidance.*Choose the FLUX\.2 dev"):
        architectures.get("flux2_klein_9b").load(dev["model"], None, torch.float32)
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.2 dev, but .*flux2-tiny.*without guidance"):
        architectures.get("flux2_dev").load(klein_bfl["model"], tiny["models"][("flux2_dev", "bfl")]["config_dir"],
                                            torch.float32, components_path=klein_bfl["components"])
    # distilled klein vs klein base: told apart by a folder's model_index.json only
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.2 klein base 4B, but .*step-distilled.*is_distilled "
                                             r"true.*Choose the FLUX\.2 klein 4B architecture"):
        architectures.get("flux2_klein_base_4b").load(klein["model"], None, torch.float32)
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.2 klein 9B, but .*undistilled.*Choose the FLUX\.2 "
                                             r"klein base 9B"):
        architectures.get("flux2_klein_9b").load(tiny["models"][("flux2_klein_base_9b", "diffusers")]["model"], None,
                                                 torch.float32)
    # full-size shapes: a klein 4B file chosen as klein 9B / klein base 9B
    fake = fake_full_size_bfl("flux2_klein_4b", tmp_path / "flux-2-klein-4b.safetensors")
    for wrong in ("flux2_klein_9b", "flux2_klein_base_9b"):
        with pytest.raises(ModelLoadError, match=r"5 double / 20 single blocks, width 3072.*FLUX\.2 klein 4B or "
                                                 r"klein base 4B\. Choose that"):
            architectures.get(wrong).load(fake, None, torch.float32, components_path=klein_bfl["components"])
    # FLUX.1 files and folders
    flux1 = build_tiny_dit("flux1_dev", tmp_path / "flux1", "bfl")
    with pytest.raises(ModelLoadError, match=r"You chose FLUX\.2 klein 4B, but .*FLUX\.1 dev transformer in BFL "
                                             r"layout.*Choose the FLUX\.1 dev architecture"):
        architectures.get("flux2_klein_4b").load(flux1["model"], None, torch.float32)
    # a Qwen text encoder with a dev transformer (components of another variant)
    with pytest.raises(ModelLoadError, match=r"Mistral3ForConditionalGeneration text encoder, but .* Qwen 3"):
        architectures.get("flux2_dev").load(tiny["models"][("flux2_dev", "bfl")]["model"],
                                            tiny["models"][("flux2_dev", "bfl")]["config_dir"], torch.float32,
                                            components_path=klein_bfl["components"])


def test_single_file_needs_its_components(tiny, tmp_path):
    import shutil
    paths = tiny["models"][("flux2_klein_4b", "bfl")]
    arch = architectures.get("flux2_klein_4b")
    with pytest.raises(ModelLoadError, match=r"set model\.components_path .*text_encoder/, tokenizer/ and vae/"):
        arch.load(paths["model"], paths["config_dir"], torch.float32)
    partial = tmp_path / "components"
    shutil.copytree(paths["components"], partial)
    shutil.rmtree(partial / "tokenizer")
    with pytest.raises(ModelLoadError, match=r"lacks tokenizer/"):
        arch.load(paths["model"], paths["config_dir"], torch.float32, components_path=partial)
    # the shipped full-size config does not describe the tiny file
    with pytest.raises(ModelLoadError, match=r"config folder .*describes .*5 double / 20 single.*model\.config_path"):
        arch.load(paths["model"], None, torch.float32, components_path=paths["components"])


def test_memory_probe_inputs_fit_predict(tiny):
    """The memory estimate runs ``predict`` on ``probe_inputs``: training shapes (patchified latents, 512 tokens)."""
    arch, comps = load_arch(tiny, "flux2_dev", "diffusers")
    noisy, t, cond, batch = arch.probe_inputs(comps.denoiser, 64, 2, torch.float32, device="cpu")
    assert noisy.shape == (2, 32, 4, 4) and cond["prompt_embeds"].shape == (2, 512, 96)
    with torch.no_grad():
        assert arch.predict(comps, noisy, t, cond, batch).shape == noisy.shape


@pytest.mark.parametrize("layout", ["diffusers", "bfl"])
def test_rerun_with_cached_captions_never_loads_the_text_encoder(tiny, tmp_path, layout):
    """FLUX.2 dev's text encoder is 24B parameters: with every caption's outputs on disk and no previews, a rerun
    loads everything but it, and trains exactly as the run that encoded the captions."""
    runs = train_twice_with_disk_cache("flux2_klein_4b", settings_paths(tiny["models"][("flux2_klein_4b", layout)]),
                                       tiny["data"], tmp_path)
    (first, first_file), (second, second_file) = runs
    assert any(m.startswith("Caching text-encoder outputs") for m in first)
    assert not any("text encoders are not loaded" in m for m in first)
    # the first run reads the text encoders alone, encodes, drops them, and only then reads the denoiser
    statuses = [m for m in first if m.startswith("Loading ")]
    assert len(statuses) == 2 and statuses[0].endswith("'s text encoders"), statuses
    assert any("text encoders are not loaded" in m for m in second)
    assert not any(m.startswith("Caching text-encoder outputs") for m in second)
    assert first_file.keys() == second_file.keys()
    for k in first_file:
        torch.testing.assert_close(second_file[k], first_file[k], rtol=0, atol=0, msg=k)
