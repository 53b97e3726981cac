"""End to end on tiny SD3 / SD3.5 / FLUX.1 models: the Python API trains each family with cached text-encoder
outputs and writes community-format adapters; the files load in diffusers with the trainer's outputs; the
fused q/k/v export applied to the original-layout weights (what ComfyUI does with a kohya file) equals the
separately trained modules."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import architectures
import core
from architectures.base import Components
from architectures.dit_keys import flux_bfl_to_diffusers, flux_diffusers_to_bfl, sd3_diffusers_to_original
from core.adapters import build_network
from tests.tiny_models import build_tiny_dataset, tiny_train_settings, train_twice_with_disk_cache
from tests.tiny_models_dit import FLUX_IDS, SD3_IDS, build_tiny_dit, load_kwargs, settings_paths

LAYOUTS = {("sd3", "single_file"), ("sd35_medium", "diffusers"), ("sd35_large", "diffusers"), ("flux1_dev", "bfl"),
           ("flux1_dev", "diffusers"), ("flux1_schnell", "diffusers")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_e2e")
    models = {}
    for arch, layout in sorted(LAYOUTS):
        models[(arch, layout)] = build_tiny_dit(arch, root / f"{arch}_{layout}", layout,
                                                include_t5=arch != "sd3")
    build_tiny_dataset(root / "data", n=4)
    return {"models": models, "data": root / "data", "root": root}


def make_settings(tiny, arch, layout, tmp_path, **overrides):
    # tiny T5: keep the text short
    model_fields = {**settings_paths(tiny["models"][(arch, layout)]), "model.t5_max_length": 24}
    return tiny_train_settings(arch, model_fields, tiny["data"], tmp_path, **overrides)


def load_arch(tiny, arch_id, layout, dtype=torch.float32, settings=None):
    arch = architectures.get(arch_id)
    paths = tiny["models"][(arch_id, layout)]
    kw = load_kwargs(paths)
    if arch_id == "sd3":
        kw["use_t5"] = False
    comps = arch.load(paths["model"], paths.get("config_dir"), dtype, **kw)
    if settings is not None:
        arch.configure_objective(comps, settings)
    return arch, comps


RUNS = {
    # arch, layout, settings overrides (cached text-encoder outputs in every run: no TE training, no shuffle)
    "sd3-single_file-no_t5": ("sd3", "single_file", dict(
        model__use_t5=False, network__target="attn", schedule__timestep_sampling="uniform",
        saving__save_every_n_steps=1, saving__save_last_n=1, schedule__max_train_steps=3,
        sampling__sample_every_n_steps=3, sampling__prompts="a red square", sampling__negative_prompt="blue")),
    "sd35_medium-logit_normal-cosmap": ("sd35_medium", "diffusers", dict(
        schedule__timestep_sampling="logit_normal", schedule__logit_mean=0.3, schedule__loss_weighting="cosmap",
        model__apply_t5_attention_mask=True)),
    "sd35_large-full_lin-mode-sigma_sqrt": ("sd35_large", "diffusers", dict(
        network__target="full-lin", schedule__timestep_sampling="mode", schedule__loss_weighting="sigma_sqrt")),
    "flux1_dev-bfl-flux_shift": ("flux1_dev", "bfl", dict(
        schedule__timestep_sampling="flux_shift", model__guidance=3.5, schedule__train_batch_size=2,
        sampling__sample_every_n_steps=4, sampling__prompts="a blue circle", sampling__guidance_scale=3.5)),
    "flux1_schnell-single_blocks-shift": ("flux1_schnell", "diffusers", dict(
        network__target="full-lin", network__flux_blocks="single", schedule__timestep_sampling="shift",
        schedule__discrete_flow_shift=2.0)),
}


def train_lora(s, config) -> tuple:
    """Train a tiny LoRA through ``core.train``: every step's loss is reported and finite, the captions went
    through the text-encoder cache, and the file carries the family's names.  Returns (result, events, tensors,
    metadata)."""
    events = []
    result = core.train(s, on_event=events.append, config=config)
    losses = [e["loss"] for e in events if e["type"] == "progress"]
    assert len(losses) == s.schedule.max_train_steps and all(torch.isfinite(torch.tensor(losses)))
    logs = " ".join(e.get("message", "") for e in events if e["type"] == "log")
    assert "text-encoder cache on" in logs
    arch = architectures.get(s.model.architecture)
    sd = load_file(str(result.final))
    with safe_open(str(result.final), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == arch.modelspec_architecture
    assert md["ss_base_model_version"] == arch.ss_base_model_version
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    return result, events, sd, md


@pytest.mark.parametrize("run", list(RUNS))
def test_train_each_family(tiny, tmp_path, run):
    arch_id, layout, overrides = RUNS[run]
    s, config = make_settings(tiny, arch_id, layout, tmp_path, **overrides)
    result, events, sd, md = train_lora(s, config)
    arch = architectures.get(arch_id)
    assert md["ss_network_module"] == ("networks.lora_flux" if arch_id in FLUX_IDS else "networks.lora_sd3")
    assert json.loads(md["ss_tag_frequency"])
    stems = {k.split(".")[0] for k in sd}
    if arch_id in FLUX_IDS:
        single = {k for k in stems if k.startswith("lora_unet_single_blocks_")}
        double = {k for k in stems if k.startswith("lora_unet_double_blocks_")}
        assert single | double == stems
        if "single" in run:
            assert not double and {"lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_1_linear2",
                                   "lora_unet_single_blocks_0_modulation_lin"} <= single
        else:
            assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_proj",
                    "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_txt_mlp_2",
                    "lora_unet_single_blocks_1_linear1", "lora_unet_single_blocks_0_linear2"} <= stems
            # q, k, v and the MLP input trained as the one layer BFL holds: the network's rank 4 and alpha 2
            assert sd["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 4
            assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape[0] == 3 * 32 + 128
            assert float(sd["lora_unet_single_blocks_0_linear1.alpha"]) == 2.0
        assert [p.name for p in result.outputs if p.name.endswith(".diffusers.safetensors")] == []
    else:
        assert all(k.startswith("lora_unet_joint_blocks_") for k in stems)
        assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in stems and "lora_unet_joint_blocks_1_context_block_attn_qkv" in stems
        assert float(sd["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"]) == 2.0  # q, k, v as one layer
        if arch_id == "sd35_medium":
            assert "lora_unet_joint_blocks_0_x_block_attn2_qkv" in stems and "lora_unet_joint_blocks_0_x_block_mlp_fc1" in stems
        if "full_lin" in run:
            assert "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1" in stems
        side = result.final.with_name(result.final.stem + ".diffusers.safetensors")
        assert side in result.outputs and side.is_file()
        dsd = load_file(str(side))
        assert all(k.startswith("transformer.transformer_blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                   for k in dsd)
        with safe_open(str(side), "pt") as f:
            assert f.metadata()["modelspec.architecture"] == arch.modelspec_architecture
    if "save_last_n" in " ".join(overrides):
        names = sorted(p.name for p in result.final.parent.glob("*.safetensors"))
        assert names == [f"tiny_{arch_id}-step000002.diffusers.safetensors", f"tiny_{arch_id}-step000002.safetensors",
                         f"tiny_{arch_id}.diffusers.safetensors", f"tiny_{arch_id}.safetensors"], names
    samples = [p for e in events if e["type"] == "sample" for p in e["paths"]]
    if s.sampling.sample_every_n_steps:
        assert samples and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in samples)


# -- the fused export applied the way ComfyUI / sd-scripts apply a kohya file ----------------------------------

def _merge_kohya(original: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W += up @ down · alpha / rank for every ``lora_unet_<original module>`` key (kohya semantics)."""
    out = dict(original)
    index = {k[:-len(".weight")].replace(".", "_"): k for k in original if k.endswith(".weight")}
    for key in lora:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[:-len(".lora_down.weight")]
        target = index[stem[len("lora_unet_"):]]
        down, up = lora[key].float(), lora[f"{stem}.lora_up.weight"].float()
        alpha = float(lora[f"{stem}.alpha"])
        out[target] = original[target] + up @ down * (alpha / down.shape[0])
    return out


def _random_network(arch, comps, target, seed=0):
    net = build_network(arch.adapter_targets(comps, target, False), "lora", 4, 2.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.adapters.values():
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.2)
    return net


def _inputs(arch, comps, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        cond = arch.encode_text(comps, arch.tokenize(comps, ["a red square"]), 1)
    return latents, torch.tensor([0.6]), cond


@pytest.mark.parametrize("arch_id,layout,target", [("sd35_medium", "diffusers", "full-lin"),
                                                   ("sd3", "single_file", "attn_mlp"),
                                                   ("flux1_dev", "bfl", "full-lin"),
                                                   ("flux1_schnell", "diffusers", "attn")])
def test_fused_export_equals_the_unfused_trained_model(tiny, arch_id, layout, target):
    s, _ = make_settings(tiny, arch_id, layout, tiny["root"], network__target=target, model__use_t5=arch_id != "sd3")
    arch, comps = load_arch(tiny, arch_id, layout, settings=s)
    tr = comps.denoiser
    base_sd = {k: v.clone() for k, v in tr.state_dict().items()}
    latents, t, cond = _inputs(arch, comps)
    net = _random_network(arch, comps, target)
    net.apply_to()
    with torch.no_grad():
        ours = arch.predict(comps, latents, t, cond, {})
    net.restore()
    kohya = arch.export_adapter(comps, net.export_state_dict(torch.float32))[""]
    if arch_id in FLUX_IDS:
        merged = flux_bfl_to_diffusers(_merge_kohya(flux_diffusers_to_bfl(base_sd, tr.config), kohya), tr.config)
    else:
        from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
        orig = _merge_kohya(sd3_diffusers_to_original(base_sd, tr.config), kohya)
        merged = convert_sd3_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in orig.items()})
    tr.load_state_dict(merged)
    with torch.no_grad():
        theirs = arch.predict(comps, latents, t, cond, {})
    tr.load_state_dict(base_sd)
    with torch.no_grad():
        base = arch.predict(comps, latents, t, cond, {})
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert (ours - base).abs().max() > 1e-2  # the adapter matters


# -- diffusers consumes the files ----------------------------------------------------------------------------

def _peft_modules(module) -> int:
    return sum(1 for _, m in module.named_modules() if hasattr(m, "lora_A") and m.lora_A)


def layers_covered(net, part: str = "unet") -> int:
    """diffusers layers the network's adapters of ``part`` act on (an adapter on a fused qkv covers three)."""
    return sum(len(getattr(a.base, "parts", [a.base])) for name, a in net.adapters.items() if net.parts[name] == part)


def test_sd3_diffusers_file_loads_in_diffusers(tiny, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    s, config = make_settings(tiny, "sd35_medium", "diffusers", tmp_path, network__train_text_encoder=True,
                              optimizer__learning_rate=1e-2)
    result = core.train(s, config=config)
    side = result.final.with_name(result.final.stem + ".diffusers.safetensors")
    arch, comps = load_arch(tiny, "sd35_medium", "diffusers", settings=s)
    net = build_network(arch.adapter_targets(comps, s.network.target, True), "lora", s.network.rank, s.network.alpha)
    state = load_file(str(result.state_dir / "adapter.safetensors"))
    net.load_export_state_dict(state)
    n_ours = {p: layers_covered(net, p) for p in ("unet", "te1", "te2")}

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny["models"][("sd35_medium", "diffusers")]["model"],
                                                    local_files_only=True)
    pipe.load_lora_weights(str(side))
    assert _peft_modules(pipe.transformer) == n_ours["unet"] > 20
    assert _peft_modules(pipe.text_encoder) == n_ours["te1"] > 0
    assert _peft_modules(pipe.text_encoder_2) == n_ours["te2"] > 0

    latents, t, _ = _inputs(arch, comps)
    tokens = arch.tokenize(comps, ["a red square"])
    net.apply_to()
    with torch.no_grad():
        cond = arch.encode_text(comps, tokens, 1)
        ours = arch.predict(comps, latents, t, cond, {})
        theirs_comps = replace(comps, denoiser=pipe.transformer, vae=pipe.vae, noise_scheduler=None,
                               text_encoders=[pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3])
        cond_theirs = arch.encode_text(theirs_comps, tokens, 1)
        theirs = arch.predict(theirs_comps, latents, t, cond_theirs, {})
    net.restore()
    torch.testing.assert_close(cond_theirs["pooled"], cond["pooled"], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-3)
    pipe.unload_lora_weights()
    with torch.no_grad():
        base = arch.predict(theirs_comps, latents, t, arch.encode_text(theirs_comps, tokens, 1), {})
    assert (base - ours).abs().max() > 1e-3


def test_flux_kohya_file_loads_in_diffusers(tiny, tmp_path):
    """diffusers 0.42.1's kohya FLUX converter hard-codes width 3072 for single blocks' linear1, so the tiny
    (width 32) model trains the double blocks (+ CLIP-L) here; single blocks: see the full-width test below."""
    from diffusers import FluxPipeline
    s, config = make_settings(tiny, "flux1_dev", "diffusers", tmp_path, network__flux_blocks="double",
                              network__train_text_encoder=True, optimizer__learning_rate=1e-2)
    result = core.train(s, config=config)
    arch, comps = load_arch(tiny, "flux1_dev", "diffusers", settings=s)
    net = build_network(arch.adapter_targets(comps, s.network.target, True), "lora", s.network.rank, s.network.alpha)
    net.load_export_state_dict(load_file(str(result.state_dir / "adapter.safetensors")))

    pipe = FluxPipeline.from_pretrained(tiny["models"][("flux1_dev", "diffusers")]["model"], local_files_only=True)
    pipe.load_lora_weights(str(result.final))  # raises on any key its converter cannot place
    assert _peft_modules(pipe.transformer) == layers_covered(net) > 20
    assert _peft_modules(pipe.text_encoder) == sum(1 for p in net.parts.values() if p == "te1") > 0

    latents, t, _ = _inputs(arch, comps)
    tokens = arch.tokenize(comps, ["a red square"])
    net.apply_to()
    with torch.no_grad():
        ours = arch.predict(comps, latents, t, arch.encode_text(comps, tokens, 1), {})
        theirs_comps = replace(comps, denoiser=pipe.transformer, vae=pipe.vae, noise_scheduler=None,
                               text_encoders=[pipe.text_encoder, pipe.text_encoder_2])
        theirs = arch.predict(theirs_comps, latents, t, arch.encode_text(theirs_comps, tokens, 1), {})
    net.restore()
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-3)


def test_flux_single_blocks_load_in_diffusers_at_full_width(tmp_path):
    """The single-block path of diffusers' kohya converter (linear1 split 3072/3072/3072/12288) on a layout it
    accepts: FLUX.1 width (24 heads × 128), no double blocks, one single block; every linear of the block
    trained (q, k, v and the MLP input fused into linear1)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tr = FluxTransformer2DModel(in_channels=64, num_layers=0, num_single_layers=1, attention_head_dim=128,
                                    num_attention_heads=24, joint_attention_dim=32, pooled_projection_dim=32,
                                    guidance_embeds=False).eval()
    arch = architectures.get("flux1_schnell")
    comps = Components(tr, None, [], [], None)
    net = _random_network(arch, comps, "full-lin", seed=3)
    assert len(net.adapters) == 3 and layers_covered(net) == 6   # q, k, v, MLP-in trained as linear1
    files = arch.export_adapter(comps, net.export_state_dict(torch.float32))
    assert list(files) == [""]
    path = tmp_path / "flux_full_width.safetensors"
    save_file(files[""], str(path))
    assert {k.split(".")[0] for k in files[""]} == {"lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
                                                  "lora_unet_single_blocks_0_modulation_lin"}
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 4, 4, generator=g)
    cond = {"prompt_embeds": torch.randn(1, 3, 32, generator=g), "pooled": torch.randn(1, 32, generator=g)}
    t = torch.tensor([0.4])
    net.apply_to()
    with torch.no_grad():
        ours = arch.predict(comps, latents, t, cond, {})
    net.restore()
    with torch.no_grad():
        base = arch.predict(comps, latents, t, cond, {})
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=tr)
    pipe.load_lora_weights(str(path))
    assert _peft_modules(tr) == 6
    with torch.no_grad():
        theirs = arch.predict(comps, latents, t, cond, {})
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-3)
    assert (ours - base).abs().max() > 1e-2


# -- conditioning ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch_id", ["sd35_large", "flux1_schnell"])
def test_encode_text_matches_the_diffusers_pipeline(tiny, arch_id):
    from diffusers import DiffusionPipeline
    s, _ = make_settings(tiny, arch_id, "diffusers", tiny["root"])
    arch, comps = load_arch(tiny, arch_id, "diffusers", settings=s)
    pipe = DiffusionPipeline.from_pretrained(tiny["models"][(arch_id, "diffusers")]["model"], local_files_only=True)
    prompts = ["a red square", "green and white vertical stripes"]
    with torch.no_grad():
        ours = arch.encode_text(comps, arch.tokenize(comps, prompts), 1)
        if arch_id in SD3_IDS:
            pe, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=24)
        else:
            pe, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=24)
    torch.testing.assert_close(ours["prompt_embeds"], pe)
    torch.testing.assert_close(ours["pooled"], pooled)
    assert ours["t5_mask"].shape == (2, 24) and ours["t5_mask"][0].sum() < ours["t5_mask"][1].sum() < 24
    # with the T5 mask applied, padding positions are zero
    s.model.apply_t5_attention_mask = True
    arch.configure_objective(comps, s)
    with torch.no_grad():
        masked = arch.encode_text(comps, arch.tokenize(comps, prompts), 1)["prompt_embeds"]
    t5_part = masked[:, -24:]
    assert not t5_part[0, int(ours["t5_mask"][0].sum()):].any()


def test_a_target_the_family_lacks_is_refused_before_training(tiny, tmp_path):
    s, config = make_settings(tiny, "sd35_large", "diffusers", tmp_path, network__target="full", network__algorithm="locon")
    with pytest.raises(ValueError, match=r"network\.target.*full-lin.*not 'full'"):
        core.train(s, config=config)


@pytest.mark.parametrize("option", [{"network__use_tucker": True}, {"network__conv_rank": 8, "network__conv_alpha": 4}])
def test_a_convolution_option_on_linear_layers_is_refused_before_loading(tiny, tmp_path, option):
    """Tucker / conv rank shape 3×3 convolutions; a DiT target has none (its fused qkv is linear), so the
    option would be silently ignored: it is refused, naming the option and where to turn it off, before the
    model path is even read."""
    s, config = make_settings(tiny, "flux1_dev", "diffusers", tmp_path, network__algorithm="lokr", **option)
    s.model.model_path = str(tmp_path / "not-there")
    with pytest.raises(ValueError, match=r"network\.(use_tucker|conv_rank, network\.conv_alpha): shape 3×3 "
                                         r"convolutions only.*Network → Advanced"):
        core.train(s, config=config)
    s.network.include = "x_embedder"   # a pattern may add other layers: then it is the user's call
    from core.settings import check_consistency
    assert not [p for p in check_consistency(s) if "3×3" in p]


def test_t5_in_fp16_keeps_its_output_projections_in_fp32(tiny):
    """fp16 plans (GPUs without bf16) cast the text encoders to fp16; T5 overflows there unless its ``wo``
    projections stay fp32, as transformers keeps them when it loads T5 in fp16."""
    s, _ = make_settings(tiny, "flux1_schnell", "diffusers", tiny["root"])
    arch, comps = load_arch(tiny, "flux1_schnell", "diffusers", settings=s)
    tokens = arch.tokenize(comps, ["a red square"])
    with torch.no_grad():
        ref = arch.encode_text(comps, tokens, 1)["prompt_embeds"]
        for te in comps.text_encoders:
            te.half()
        with torch.autocast("cpu", dtype=torch.float16):
            half = arch.encode_text(comps, tokens, 1)["prompt_embeds"]
    t5 = comps.text_encoders[1]
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert t5.shared.weight.dtype == torch.float16 and half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("arch_id,layout", [("flux1_dev", "bfl"), ("sd3", "single_file"), ("sd35_medium", "diffusers")])
def test_rerun_with_cached_captions_loads_no_text_encoder(tiny, tmp_path, arch_id, layout):
    """With every caption's outputs on disk and no previews, a rerun reads neither CLIP nor T5 (FLUX.1's T5 file is
    9.5 GB) and trains exactly as the run that encoded them."""
    model_fields = {**settings_paths(tiny["models"][(arch_id, layout)]), "model.t5_max_length": 24,
                    "model.use_t5": arch_id != "sd3"}      # the tiny SD3 file has no T5
    runs = train_twice_with_disk_cache(arch_id, model_fields, tiny["data"], tmp_path)
    (first, first_file), (second, second_file) = runs
    assert not any("text encoders are not loaded" in m for m in first)
    assert any("text encoders are not loaded" in m for m in second)
    # the first run reads the text encoders alone, encodes, drops them, and only then reads the denoiser
    statuses = [m for m in first if m.startswith("Loading ")]
    assert len(statuses) == 2 and statuses[0].endswith("'s text encoders"), statuses
    for k in first_file:
        torch.testing.assert_close(second_file[k], first_file[k], rtol=0, atol=0, msg=k)
