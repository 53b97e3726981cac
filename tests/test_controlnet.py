"""ControlNet training (network.algorithm "controlnet") on tiny SD1.5 / SDXL models: the original single-file key
layout (round trip, diffusers' single-file loader reading it back with equal outputs), the diffusers folder,
building from the UNet or from a saved file, conditioning images matched, checked and fitted like their images,
bad settings and bad conditioning folders refused before anything loads, the estimate, a resumed run continuing
exactly, and the product training a ControlNet in a fresh process whose files load in diffusers."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import architectures
import core
from architectures.controlnet_keys import controlnet_state_dict_from_original
from core.controlnet import load_conditioning, match_conditioning_images, save_controlnet_folder
from core.dataset import DatasetError, ImageItem
from core.io import atomic_save_safetensors
from core.settings import Settings, check_consistency
from tests.tiny_models import (
    build_conditioning_folder,
    build_tiny_controlnet_base,
    build_tiny_dataset,
    build_tiny_sd15,
    build_tiny_sdxl,
    tiny_train_settings,
    train_in_fresh_process,
)

BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_controlnet")
    models = {}
    for arch, build in BUILDERS.items():
        family = architectures.get(arch)
        components = family.load(build(root / arch), None, torch.float32)
        controlnet = family.build_controlnet(components, None)
        # from_unet zeroes the output convs; random values make every output depend on every weight.
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in controlnet.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        models[arch] = (family, components, controlnet)
    return {"root": root, "models": models}


def _controlnet_outputs(controlnet, components) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    config = components.denoiser.config
    sample = torch.randn(1, config.in_channels, 16, 16, generator=gen)
    # The conditioning embedding downsamples by 8 as the real VAEs do (the standard layout that the loaders
    # expect), so it takes 8× the latent size whatever the tiny VAE's factor.
    cond = torch.rand(1, 3, 16 * 8, 16 * 8, generator=gen)
    hidden = torch.randn(1, 4, config.cross_attention_dim, generator=gen)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=gen),
                                       "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}
    with torch.no_grad():
        down, mid = controlnet(sample, torch.tensor([500]), hidden, cond, return_dict=False, **kwargs)
    return [*down, mid]


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_original_layout_round_trip(tiny, arch):
    family, _, controlnet = tiny["models"][arch]
    original = family.export_controlnet(controlnet)
    # the keys ComfyUI's load_controlnet recognises, and diffusers' fixed conv_out index
    for key in ("control_model.zero_convs.0.0.weight", "control_model.input_hint_block.0.weight",
                "control_model.input_hint_block.14.weight", "control_model.middle_block_out.0.weight",
                "control_model.time_embed.0.weight", "control_model.input_blocks.0.0.weight"):
        assert key in original
    assert all(k.startswith("control_model.") for k in original)
    assert (arch == "sdxl") == ("control_model.label_emb.0.0.weight" in original)
    back = controlnet_state_dict_from_original(original, controlnet.config)
    expected = controlnet.state_dict()
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_single_file_and_folder_reload_with_equal_outputs(tiny, arch, tmp_path):
    family, components, controlnet = tiny["models"][arch]
    single = atomic_save_safetensors(tmp_path / "cn.safetensors", family.export_controlnet(controlnet))
    folder = save_controlnet_folder(controlnet, tmp_path / "cn_diffusers")
    with pytest.raises(FileExistsError):
        save_controlnet_folder(controlnet, folder)  # a run never overwrites files

    expected = _controlnet_outputs(controlnet, components)
    loaded_models = [ControlNetModel.from_pretrained(folder, local_files_only=True),
                     family.build_controlnet(components, single),   # "from an existing ControlNet file"
                     family.build_controlnet(components, folder)]   # … or folder
    if arch == "sd15":
        # diffusers' convert_controlnet_checkpoint (0.42) maps no label_emb -> add_embedding, so it cannot read
        # any SDXL ControlNet in the original layout (ComfyUI's cldm can); SD1.5 it reads completely.
        loaded_models.append(ControlNetModel.from_single_file(str(single), config=str(folder),
                                                              local_files_only=True, torch_dtype=torch.float32))
    for model in loaded_models:
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in controlnet.state_dict().items())
        got = _controlnet_outputs(model.eval(), components)
        assert len(got) == len(expected)
        # The weights are bit-equal (the round-trip test); the CPU kernels still differ in the last bits
        # between a module built by from_unet and one loaded from a file (1.5e-6 seen).
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_families_without_controlnet_refuse_with_a_message():
    with pytest.raises(NotImplementedError, match="no ControlNet training"):
        architectures.get("flux1_dev").build_controlnet(None, None)


# -- conditioning images ------------------------------------------------------------------------------------

def _items(folder: Path) -> list[ImageItem]:
    items = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as im:
            items.append(ImageItem(path=path, caption="", repeats=1, width=im.width, height=im.height))
    return items


def test_conditioning_images_matched_and_fitted_with_the_same_flip(tmp_path):
    images = build_tiny_dataset(tmp_path / "images", n=2)
    conditioning = build_conditioning_folder(images, tmp_path / "cond")
    items = _items(images)
    matched = match_conditioning_images(items, images, conditioning)
    assert {p.name for p in matched} == {"img_000.png", "img_001.png"}
    tall = items[1]  # 64×96 fitted to a 64×64 bucket: centre crop
    plain = load_conditioning(matched[tall.path], tall, (64, 64))
    flipped = load_conditioning(matched[tall.path], tall, (64, 64), flip=True)
    assert plain.shape == (3, 64, 64) and 0.0 <= float(plain.min()) and float(plain.max()) <= 1.0
    assert torch.equal(flipped, plain.flip(-1))
    assert float(plain[0, 0, -1]) > float(plain[0, 0, 0]) + 0.5  # the gradient survived, left to right


def test_conditioning_problems_listed_in_one_message_naming_the_setting(tmp_path):
    images = build_tiny_dataset(tmp_path / "images", n=4)
    conditioning = build_conditioning_folder(images, tmp_path / "cond")
    (conditioning / "img_000.jpg").unlink()  # missing
    Image.new("RGB", (32, 32)).save(conditioning / "img_001.jpg")  # another size
    (conditioning / "img_002.jpg").write_bytes(b"not an image")  # unreadable
    with pytest.raises(DatasetError) as err:
        match_conditioning_images(_items(images), images, conditioning)
    message = str(err.value)
    assert "dataset.conditioning_path" in message
    assert "img_000.png" in message and "no conditioning image" in message
    assert "img_001.jpg: 32×32" in message and "64×96" in message
    assert "img_002.jpg" in message and "cannot be read" in message
    assert "img_003" not in message
    with pytest.raises(DatasetError, match="does not exist"):
        match_conditioning_images(_items(images), images, tmp_path / "nowhere")


# -- training ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet_runs")
    data = build_tiny_dataset(root / "data", n=4)
    return {"root": root, "data": data, "conditioning": build_conditioning_folder(data, root / "cond"),
            "models": {arch: build_tiny_controlnet_base(arch, root / arch) for arch in BUILDERS}}


def controlnet_settings(runs, arch, tmp_path, **overrides):
    values = dict(network__algorithm="controlnet", dataset__conditioning_path=str(runs["conditioning"]),
                  schedule__max_train_steps=3, saving__save_precision="float")
    values.update(overrides)
    return tiny_train_settings(arch, {"model.model_path": str(runs["models"][arch])}, runs["data"], tmp_path,
                               **values)


def _loaded_nothing(events) -> bool:
    return not any(e["type"] == "status" and e["message"].startswith("Loading") for e in events)


def test_bad_settings_are_refused_naming_the_setting():
    def problems(arch="sd15", **values):
        s = Settings()
        s.model.architecture, s.model.model_path = arch, "model.safetensors"
        s.dataset.path, s.network.algorithm = "images", "controlnet"
        for dotted, value in values.items():
            section, name = dotted.split("__")
            setattr(getattr(s, section), name, value)
        return "\n".join(check_consistency(s))

    assert "dataset.conditioning_path: choose the folder of conditioning images" in problems()
    assert problems(dataset__conditioning_path="cond") == ""
    assert "clear dataset.reg_path and dataset.subsets" in problems(dataset__conditioning_path="cond",
                                                                     dataset__reg_path="reg")
    assert "network.train_text_encoder" in problems(dataset__conditioning_path="cond", network__train_text_encoder=True)
    refused = problems("flux1_dev", dataset__conditioning_path="cond")
    assert "ControlNet training is not available for FLUX.1" in refused and "SD 1.5, SDXL" in refused


def test_conditioning_problems_stop_the_run_before_anything_loads(runs, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in sorted(runs["conditioning"].iterdir())[1:]:  # the first image's conditioning image is missing
        (partial / path.name).write_bytes(path.read_bytes())
    for folder, message in [(partial, r"1 image\(s\) have no conditioning image"),
                            (tmp_path / "nowhere", "does not exist")]:
        s, config = controlnet_settings(runs, "sd15", tmp_path, dataset__conditioning_path=str(folder))
        events = []
        with pytest.raises(DatasetError, match=message):
            core.train(s, on_event=events.append, config=config)
        assert _loaded_nothing(events)


def test_a_starting_controlnet_that_cannot_work_is_refused_naming_the_setting(runs, tmp_path):
    """network.controlnet_init: a missing path or a file without ControlNet tensors stops the run before anything
    loads; a ControlNet made for another family stops it when the model is there to compare with."""
    not_controlnet = atomic_save_safetensors(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight":
                                                                             torch.zeros(2, 2)})
    for init, message in [(tmp_path / "missing.safetensors", "does not exist"),
                          (not_controlnet, "holds no ControlNet")]:
        s, config = controlnet_settings(runs, "sd15", tmp_path, network__controlnet_init=str(init))
        events = []
        with pytest.raises(core.SettingsError, match=rf"network\.controlnet_init: .*{message}"):
            core.train(s, on_event=events.append, config=config)
        assert _loaded_nothing(events)
    sdxl = architectures.get("sdxl")
    components = sdxl.load(runs["models"]["sdxl"], None, torch.float32)
    other = atomic_save_safetensors(tmp_path / "sdxl_cn.safetensors",
                                    sdxl.export_controlnet(sdxl.build_controlnet(components, None)))
    s, config = controlnet_settings(runs, "sd15", tmp_path, network__controlnet_init=str(other))
    with pytest.raises(ValueError, match=r"network\.controlnet_init: .* is not a ControlNet for this Stable "
                                         r"Diffusion 1\.5 model"):
        core.train(s, config=config)


def test_the_estimate_counts_the_controlnet_and_its_activations():
    from core.estimate import activation_profile, adapter_param_count
    s = Settings()
    lora = s.network.model_copy()
    s.network.algorithm = "controlnet"
    # the full-size shipped configs: the published ControlNets have 361 M (SD1.5) and 1.25 B (SDXL) parameters
    assert round(adapter_param_count(architectures.get("sd15"), s.network) / 1e6, 2) == 361.28
    assert round(adapter_param_count(architectures.get("sdxl"), s.network) / 1e6, 2) == 1251.01
    sd15 = architectures.get("sd15")
    # the ControlNet's own forward pass keeps activations beside the UNet's
    assert activation_profile(sd15, 512, 1, "bf16", s.network).total > activation_profile(sd15, 512, 1, "bf16",
                                                                                         lora).total


def test_resume_continues_exactly(runs, tmp_path):
    common = dict(schedule__max_train_steps=4, saving__save_every_n_steps=2, dataset__flip_aug=True)
    s, config = controlnet_settings(runs, "sd15", tmp_path / "full", **common)
    full = core.train(s, config=config)
    state = full.final.parent / "tiny_sd15-state-000002"
    assert (state / "adapter.safetensors").is_file()
    s2, config2 = controlnet_settings(runs, "sd15", tmp_path / "split", saving__resume_from=str(state), **common)
    config2 = config2.model_copy(update={"allowed_roots": [*config2.allowed_roots, str(tmp_path / "full")]})
    events = []
    second = core.train(s2, on_event=events.append, config=config2)
    assert [e["step"] for e in events if e["type"] == "progress"] == [3, 4]
    a, b = load_file(str(full.final)), load_file(str(second.final))
    intermediate = load_file(str(full.final.parent / "tiny_sd15-step000002.safetensors"))
    assert a.keys() == b.keys() == intermediate.keys()
    assert any(not torch.equal(a[k], intermediate[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_fresh_process_trains_a_controlnet_that_loads_in_diffusers(runs, tmp_path, arch):
    s, config = controlnet_settings(runs, arch, tmp_path, saving__save_diffusers_folder=True,
                                    dataset__flip_aug=True, dataset__validation_split=0.25,
                                    sampling__prompts="a red disc", sampling__sample_every_n_steps=3)
    result = train_in_fresh_process(s, config, tmp_path)
    assert result["steps"] == 3 and len(result["samples"]) == 1 and len(result["validation"]) == 1
    single, folder = map(Path, result["outputs"])
    assert single.suffix == ".safetensors" and folder.name == single.stem + "_diffusers"

    family = architectures.get(arch)
    components = family.load(runs["models"][arch], None, torch.float32)
    start = family.build_controlnet(components, None).state_dict()  # what training started from
    saved = load_file(str(single))
    assert all(k.startswith("control_model.") for k in saved)
    trained = controlnet_state_dict_from_original(saved, ControlNetModel.from_pretrained(folder).config)
    assert trained.keys() == start.keys()
    for key, tensor in trained.items():
        assert torch.isfinite(tensor).all(), key
        if tensor.is_floating_point():
            assert not torch.equal(tensor, start[key]), f"{key} did not train"
    with safe_open(str(single), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == family.modelspec_architecture.removesuffix("/lora") + "/controlnet"
    assert not any(k.startswith("ss_network_") for k in meta)

    # the single file (read back by our loader, as "start from ControlNet" does, and for SD1.5 by diffusers'
    # single-file loader) and the diffusers folder hold the same weights and give the same residuals
    loaded = [family.build_controlnet(components, single), ControlNetModel.from_pretrained(folder, local_files_only=True)]
    if arch == "sd15":
        loaded.append(ControlNetModel.from_single_file(str(single), config=str(folder), local_files_only=True,
                                                       torch_dtype=torch.float32))
    expected = _controlnet_outputs(loaded[0].eval(), components)
    for model in loaded[1:]:
        state = model.state_dict()
        assert all(torch.equal(state[k], trained[k]) for k in trained)
        for got, want in zip(_controlnet_outputs(model.eval(), components), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
