"""core.import_kohya: a kohya_ss GUI config or an sd-scripts TOML (+ dataset config) into the typed settings, with
every key either mapped (and to what) or listed with the reason it was not."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import core
from core.config import AppConfig
from core.kohya_import import KohyaImportError, parse_args, parse_resolution, parse_sample_prompts, square_side
from core.settings import Settings, SubsetSettings

# a kohya_ss GUI config of an SDXL LoRA as the GUI saves it (numbers as strings where older GUIs wrote them)
GUI_SDXL = {
    "LoRA_type": "Standard", "LyCORIS_preset": "full", "sdxl": True, "sd3_checkbox": False, "flux1_checkbox": False,
    "v2": False, "v_parameterization": False, "pretrained_model_name_or_path": "sd_xl_base_1.0.safetensors",
    "train_data_dir": "char", "reg_data_dir": "", "output_dir": "/etc/kohya_out", "output_name": "lxndrn",
    "network_dim": 32, "network_alpha": 16, "network_dropout": 0.1, "learning_rate": 0.0001, "unet_lr": 0.0002,
    "text_encoder_lr": 5e-05, "optimizer": "AdamW8bit", "optimizer_args": "weight_decay=0.05 betas=0.9,0.99",
    "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": "3", "lr_warmup": 10,
    "max_train_steps": "2000", "max_train_epochs": "", "train_batch_size": 2, "gradient_accumulation_steps": 4,
    "mixed_precision": "bf16", "save_precision": "fp16", "gradient_checkpointing": True, "cache_latents": True,
    "cache_latents_to_disk": True, "max_resolution": "1024,1024", "enable_bucket": True, "min_bucket_reso": 256,
    "max_bucket_reso": 2048, "bucket_reso_steps": 64, "bucket_no_upscale": True, "shuffle_caption": True,
    "keep_tokens": "1", "caption_dropout_rate": 0.05, "flip_aug": False, "caption_extension": ".caption",
    "noise_offset": 0.0357, "min_snr_gamma": 5, "clip_skip": "2", "seed": "12345", "save_every_n_epochs": 2,
    "sample_prompts": "lxndrn woman, portrait --n blurry --w 832 --h 1216 --s 28 --l 6.5 --d 7",
    "sample_every_n_steps": 250, "sample_sampler": "euler_a", "sdxl_cache_text_encoder_outputs": True,
    "flux1_cache_text_encoder_outputs": True, "wandb_api_key": "", "xformers": "sdpa", "color_aug": False,
    "training_comment": "lxndrn woman", "prior_loss_weight": 1.0, "dataset_config": "", "huber_c": 0.1,
    "huber_schedule": "snr", "loss_type": "huber", "ip_noise_gamma": 0.1, "scale_weight_norms": 1.0,
}
GUI_MAPPED = {
    "sdxl": ("model.architecture", "sdxl"), "pretrained_model_name_or_path": ("model.model_path",
                                                                             "sd_xl_base_1.0.safetensors"),
    "train_data_dir": ("dataset.path", "char"), "output_name": ("saving.output_name", "lxndrn"),
    "network_dim": ("network.rank", 32), "network_alpha": ("network.alpha", 16.0),
    "network_dropout": ("network.dropout", 0.1), "LoRA_type": ("network.algorithm", "lora"),
    "unet_lr": ("optimizer.learning_rate", 0.0002), "text_encoder_lr": ("optimizer.text_encoder_lr", 5e-05),
    "optimizer": ("optimizer.optimizer_type", "AdamW8bit"), "optimizer_args.weight_decay": ("optimizer.weight_decay", 0.05),
    "optimizer_args.betas[0]": ("optimizer.beta1", 0.9), "optimizer_args.betas[1]": ("optimizer.beta2", 0.99),
    "lr_scheduler": ("optimizer.lr_scheduler", "cosine_with_restarts"),
    "lr_scheduler_num_cycles": ("optimizer.lr_scheduler_num_cycles", 3),
    "lr_warmup": ("optimizer.lr_warmup_steps", 200),                    # 10 % of 2000 steps
    "max_train_steps": ("schedule.max_train_steps", 2000), "train_batch_size": ("schedule.train_batch_size", 2),
    "gradient_accumulation_steps": ("schedule.gradient_accumulation_steps", 4),
    "mixed_precision": ("memory.mixed_precision", "bf16"), "save_precision": ("saving.save_precision", "fp16"),
    "gradient_checkpointing": ("memory.gradient_checkpointing", "on"),
    "cache_latents": ("dataset.cache_latents", "disk"), "cache_latents_to_disk": ("dataset.cache_latents", "disk"),
    "max_resolution": ("dataset.resolution", 1024),
    "enable_bucket": ("dataset.enable_buckets", True), "min_bucket_reso": ("dataset.min_bucket_reso", 256),
    "max_bucket_reso": ("dataset.max_bucket_reso", 2048), "bucket_reso_steps": ("dataset.bucket_reso_steps", 64),
    "bucket_no_upscale": ("dataset.bucket_no_upscale", True), "shuffle_caption": ("dataset.shuffle_caption", True),
    "keep_tokens": ("dataset.keep_tokens", 1), "caption_dropout_rate": ("dataset.caption_dropout_rate", 0.05),
    "flip_aug": ("dataset.flip_aug", False), "caption_extension": ("dataset.caption_extension", ".caption"),
    "noise_offset": ("schedule.noise_offset", 0.0357), "min_snr_gamma": ("schedule.min_snr_gamma", 5.0),
    "clip_skip": ("model.clip_skip", 2), "seed": ("schedule.seed", 12345),
    "save_every_n_epochs": ("saving.save_every_n_epochs", 2),
    "sample_every_n_steps": ("sampling.sample_every_n_steps", 250),
    # the options stay on their line: previews read them per prompt (core.prompts)
    "sample_prompts": ("sampling.prompts", "lxndrn woman, portrait --n blurry --w 832 --h 1216 --s 28 --l 6.5 --d 7"),
    "sdxl_cache_text_encoder_outputs": ("memory.cache_text_encoder_outputs", "on"),
    "training_comment": ("saving.trigger_phrase", "lxndrn woman"),
    "prior_loss_weight": ("dataset.prior_loss_weight", 1.0),
    "huber_c": ("schedule.huber_c", 0.1), "huber_schedule": ("schedule.huber_schedule", "snr"),
    "loss_type": ("schedule.loss_type", "huber"), "ip_noise_gamma": ("schedule.ip_noise_gamma", 0.1),
}
GUI_IGNORED = {"sd3_checkbox", "flux1_checkbox", "v2", "v_parameterization", "reg_data_dir", "output_dir", "max_train_epochs",
               "LyCORIS_preset", "learning_rate", "flux1_cache_text_encoder_outputs",
               "sample_sampler", "wandb_api_key", "xformers", "color_aug", "dataset_config",
               "scale_weight_norms"}


@pytest.fixture
def config(tmp_path) -> AppConfig:
    for d in ("models", "datasets", "outputs", "presets"):
        (tmp_path / d).mkdir()
    return AppConfig(models_dir=str(tmp_path / "models"), datasets_dir=str(tmp_path / "datasets"),
                     outputs_dir=str(tmp_path / "outputs"), presets_dir=str(tmp_path / "presets"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_a_kohya_ss_gui_sdxl_lora_config_maps_field_by_field(config, tmp_path):
    path = write(tmp_path / "presets" / "lxndrn.json", json.dumps(GUI_SDXL, indent=2))
    settings, report = core.import_kohya(path, config=config)
    assert report.kind == "kohya_ss GUI config"
    mapped = {key: (dotted, value) for key, dotted, value in report.mapped}
    assert mapped == GUI_MAPPED
    for dotted, value in GUI_MAPPED.values():
        assert settings.get(dotted) == value, dotted
    ignored = {key: why for key, _, why in report.ignored}
    assert set(ignored) == GUI_IGNORED
    # every key of the file is accounted for, once as mapped or as not imported
    assert {k.split(".")[0].split(" ")[0] for k in mapped} | {k.split(".")[0] for k in ignored} == set(GUI_SDXL)
    assert "outside the folders" in ignored["output_dir"] and settings.saving.output_dir == ""
    assert ignored["learning_rate"] == "the U-Net / transformer learning rate is unet_lr"
    assert ignored["flux1_cache_text_encoder_outputs"] == "an option of another model type"
    assert ignored["max_train_epochs"] == "empty" and ignored["scale_weight_norms"] == "no equivalent setting"
    # what was not in the file keeps the base settings
    assert settings.network.target == Settings().network.target
    md = report.markdown()
    assert "`unet_lr` | `optimizer.learning_rate`" in md and "`scale_weight_norms`" in md


TRAIN_TOML = """
[model_arguments]
pretrained_model_name_or_path = "flux1-dev.safetensors"
clip_l = "clip_l.safetensors"
t5xxl = "t5xxl_fp16.safetensors"
ae = "ae.safetensors"

[network_arguments]
network_module = "lycoris.kohya"
network_args = ["algo=lokr", "factor=8", "preset=attn-mlp", "dora_wd=True", "bypass_mode=False"]
network_dim = 64
network_alpha = 32.0
network_train_unet_only = true

[optimizer_arguments]
optimizer_type = "Prodigy"
optimizer_args = ["weight_decay=0.01", "d_coef=2"]
learning_rate = 1.0
lr_scheduler = "constant_with_warmup"
lr_warmup_steps = 100

[training_arguments]
max_train_steps = 3000
mixed_precision = "bf16"
timestep_sampling = "shift"
discrete_flow_shift = 3.1582
guidance_scale = 1.0
model_prediction_type = "raw"
dataset_config = "dataset.toml"
sample_prompts = "prompts.txt"
output_name = "flux_lokr"
output_dir = "flux_lokr"
seed = 7
"""
DATASET_TOML = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = [1024, 1024]
batch_size = 2
enable_bucket = true

  [[datasets.subsets]]
  image_dir = "faces"
  num_repeats = 10
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "cls"
  is_reg = true
  num_repeats = 1
  class_tokens = "woman"
"""


def test_an_sd_scripts_toml_with_a_two_subset_dataset_config(config, tmp_path):
    folder = tmp_path / "datasets" / "flux_job"
    path = write(folder / "train.toml", TRAIN_TOML)
    write(folder / "dataset.toml", DATASET_TOML)
    write(folder / "prompts.txt", "# previews\na woman in a park --w 1024 --h 768\na woman at night\n")
    with pytest.raises(KohyaImportError, match="does not say which model it trains"):
        core.import_kohya(path, config=config)
    settings, report = core.import_kohya(path, "flux1_dev", config=config)
    assert report.kind == "sd-scripts TOML"
    mapped = {key: (dotted, value) for key, dotted, value in report.mapped}
    assert mapped == {
        "(your choice of architecture)": ("model.architecture", "flux1_dev"),
        "pretrained_model_name_or_path": ("model.model_path", "flux1-dev.safetensors"),
        "clip_l": ("model.clip_l_path", "clip_l.safetensors"), "t5xxl": ("model.t5xxl_path", "t5xxl_fp16.safetensors"),
        "ae": ("model.ae_path", "ae.safetensors"), "network_dim": ("network.rank", 64),
        "network_alpha": ("network.alpha", 32.0), "network_args.algo": ("network.algorithm", "lokr"),
        "network_args.preset": ("network.target", "attn_mlp"), "network_args.factor": ("network.lokr_factor", 8),
        "network_args.dora_wd": ("network.dora", True),
        "network_train_unet_only": ("network.train_text_encoder", False),
        "optimizer_type": ("optimizer.optimizer_type", "Prodigy"),
        "optimizer_args.weight_decay": ("optimizer.weight_decay", 0.01),
        "optimizer_args.d_coef": ("optimizer.d_coef", 2.0),
        "learning_rate": ("optimizer.learning_rate", 1.0),
        "lr_scheduler": ("optimizer.lr_scheduler", "constant_with_warmup"),
        "lr_warmup_steps": ("optimizer.lr_warmup_steps", 100), "max_train_steps": ("schedule.max_train_steps", 3000),
        "mixed_precision": ("memory.mixed_precision", "bf16"),
        "timestep_sampling": ("schedule.timestep_sampling", "shift"),
        "discrete_flow_shift": ("schedule.discrete_flow_shift", 3.1582), "guidance_scale": ("model.guidance", 1.0),
        "sample_prompts": ("sampling.prompts", "a woman in a park --w 1024 --h 768\na woman at night"),
        "output_name": ("saving.output_name", "flux_lokr"), "output_dir": ("saving.output_dir", "flux_lokr"),
        "seed": ("schedule.seed", 7), "dataset_config": ("dataset.subsets", "dataset.toml"),
        "general.shuffle_caption": ("dataset.shuffle_caption", True),
        "general.caption_extension": ("dataset.caption_extension", ".txt"),
        "general.keep_tokens": ("dataset.keep_tokens", 1),
        "datasets[0].batch_size": ("schedule.train_batch_size", 2),
        "datasets[0].resolution": ("dataset.resolution", 1024),
        "datasets[0].enable_bucket": ("dataset.enable_buckets", True),
        "datasets[0].subsets[0].image_dir": ("dataset.subsets[0].image_dir", "faces"),
        "datasets[0].subsets[0].num_repeats": ("dataset.subsets[0].num_repeats", 10),
        "datasets[0].subsets[0].flip_aug": ("dataset.subsets[0].flip_aug", True),
        "datasets[0].subsets[1].image_dir": ("dataset.subsets[1].image_dir", "cls"),
        "datasets[0].subsets[1].is_reg": ("dataset.subsets[1].is_reg", True),
        "datasets[0].subsets[1].num_repeats": ("dataset.subsets[1].num_repeats", 1),
    }
    assert settings.dataset.subsets == [SubsetSettings(image_dir="faces", num_repeats=10, flip_aug=True),
                                        SubsetSettings(image_dir="cls", is_reg=True, num_repeats=1)]
    assert settings.dataset.path == ""            # sd-scripts trains the dataset config's folders only
    for dotted, value in mapped.values():
        if not dotted.startswith("dataset.subsets"):
            assert settings.get(dotted) == value, dotted
    ignored = {key: why for key, _, why in report.ignored}
    assert set(ignored) == {"network_module", "network_args.bypass_mode",
                            "model_prediction_type", "datasets[0].subsets[1].class_tokens"}
    assert ignored["datasets[0].subsets[1].class_tokens"] == "no equivalent subset option"


def test_an_unknown_optimizer_and_a_missing_lycoris_algo_are_reported(config, tmp_path):
    path = write(tmp_path / "presets" / "t.toml", 'network_module = "lycoris.kohya"\nnetwork_args = ["algo=dylora"]\n'
                 'optimizer_type = "Adan"\nlr_scheduler = "adafactor"\nnetwork_dim = 8\n')
    settings, report = core.import_kohya(path, "sdxl", config=config)
    ignored = {key: (value, why) for key, value, why in report.ignored}
    assert ignored["network_args.algo"][0] == "dylora" and "adapter not available here" in ignored["network_args.algo"][1]
    assert ignored["optimizer_type"][0] == "Adan" and "optimizer not available here" in ignored["optimizer_type"][1]
    came, _ = core.import_kohya(write(tmp_path / "presets" / "c.toml", 'optimizer_type = "came_pytorch.CAME"\n'),
                                "sdxl", config=config)
    assert came.optimizer.optimizer_type == "CAME"
    assert ignored["lr_scheduler"][0] == "adafactor"
    assert (settings.network.algorithm, settings.optimizer.optimizer_type) == ("lora", "AdamW")   # unchanged
    assert ("network_dim", "network.rank", 8) in report.mapped
    gui = write(tmp_path / "presets" / "g.json", json.dumps({"LoRA_type": "Kohya DyLoRA", "network_dim": 8}))
    _, report = core.import_kohya(gui, config=config)
    assert any(k == "LoRA_type" and "not available" in why for k, _, why in report.ignored)


def test_controlnet_and_textual_inversion_tomls_choose_their_algorithm(config, tmp_path):
    """train_controlnet.py and train_textual_inversion.py TOMLs have no network_module: the key only that script
    reads says which it is, and their folders and token map to the ControlNet / embedding settings."""
    (tmp_path / "datasets" / "edges").mkdir()
    (tmp_path / "models" / "cn.safetensors").write_bytes(b"")
    cn, report = core.import_kohya(write(tmp_path / "presets" / "cn.toml",
                                         'conditioning_data_dir = "edges"\ncontrolnet_model_name_or_path = '
                                         '"cn.safetensors"\nlearning_rate = 1e-5\n'), "sd15", config=config)
    assert cn.network.algorithm == "controlnet"
    # inside the app's folders: kept relative to them, as the UI's pickers keep them
    assert (cn.dataset.conditioning_path, cn.network.controlnet_init) == ("edges", "cn.safetensors")
    assert ("conditioning_data_dir", "network.algorithm", "controlnet") in report.mapped
    ti, _ = core.import_kohya(write(tmp_path / "presets" / "ti.toml",
                                    'token_string = "sks"\ninit_word = "dog"\nnum_vectors_per_token = 4\n'),
                              "sdxl", config=config)
    assert (ti.network.algorithm, ti.network.ti_token, ti.network.ti_init_word, ti.network.ti_num_vectors) == (
        "textual_inversion", "sks", "dog", 4)


def test_the_architecture_is_the_configs_choice(config, tmp_path):
    flux = write(tmp_path / "presets" / "f.json", json.dumps({"LoRA_type": "Flux1", "flux1_checkbox": True,
                                                              "sdxl": False, "network_dim": 4}))
    with pytest.raises(KohyaImportError, match="choose the architecture"):
        core.import_kohya(flux, config=config)          # FLUX.1 dev or schnell: the file does not say
    settings, report = core.import_kohya(flux, "flux1_schnell", config=config)
    assert ("flux1_checkbox", "model.architecture", "flux1_schnell") in report.mapped
    with pytest.raises(KohyaImportError, match="choose the architecture"):
        core.import_kohya(flux, "sdxl", config=config)  # the caller's choice never overrides the file's
    sd15 = write(tmp_path / "presets" / "s.json", json.dumps({"LoRA_type": "Standard", "sdxl": False}))
    assert core.import_kohya(sd15, config=config)[0].model.architecture == Settings().model.architecture
    v2 = write(tmp_path / "presets" / "v2.json", json.dumps({"LoRA_type": "Standard", "v2": True}))
    with pytest.raises(KohyaImportError, match="2.x"):
        core.import_kohya(v2, config=config)


def test_a_file_that_is_neither_gets_a_clear_error(config, tmp_path):
    for name, text in (("notes.txt", "just some notes = = ["), ("other.json", '{"foo": 1}'),
                       ("ours.json", json.dumps(Settings().to_dict()))):
        with pytest.raises(KohyaImportError, match="neither a kohya_ss GUI config .* nor an sd-scripts TOML"):
            core.import_kohya(write(tmp_path / "presets" / name, text), config=config)
    with pytest.raises(KohyaImportError, match="load it as a preset"):
        core.import_kohya(tmp_path / "presets" / "ours.json", config=config)


def test_paths_outside_the_allowed_folders_are_reported_not_taken(config, tmp_path):
    path = write(tmp_path / "presets" / "t.toml", 'pretrained_model_name_or_path = "/opt/models/x.safetensors"\n'
                 'train_data_dir = "/srv/images"\ndataset_config = "/srv/dataset.toml"\nnetwork_dim = 4\n')
    settings, report = core.import_kohya(path, "sdxl", config=config)
    ignored = {key: why for key, _, why in report.ignored}
    assert set(ignored) == {"pretrained_model_name_or_path", "train_data_dir", "dataset_config"}
    assert all("outside the folders" in why for why in ignored.values())
    assert (settings.model.model_path, settings.dataset.path) == ("", "")


def test_pure_helpers():
    assert parse_args("weight_decay=0.1 betas=0.9,0.99 decouple") == {"weight_decay": "0.1", "betas": "0.9,0.99",
                                                                      "decouple": "True"}
    assert parse_args(["algo=loha", "conv_dim=4"]) == {"algo": "loha", "conv_dim": "4"}
    assert parse_resolution("1024,768") == (1024, 768) and parse_resolution([512, 512]) == (512, 512)
    assert parse_resolution(768) == (768, 768)
    assert square_side(1024, 768) == 880 and square_side(512, 512) == 512
    prompts, dropped = parse_sample_prompts("a cat --n dog, blurry --w 512 --ss euler_a --s 20\n\n# c\n"
                                            "a dog --l 5 --ss ddim\n")
    assert prompts == ["a cat --n dog, blurry --w 512 --s 20", "a dog --l 5"] and dropped == {"ss": "euler_a"}
