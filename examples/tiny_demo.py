"""The whole Python API on a tiny generated SD1.5 model: builds the model and a 4-image dataset in a
temporary folder, trains 10 steps on the CPU, writes a preview and the adapter, then prints the file's keys.

    .venv/bin/python examples/tiny_demo.py
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors import safe_open  # noqa: E402

import core  # noqa: E402
from core.config import AppConfig  # noqa: E402
from tests.tiny_models import build_tiny_dataset, build_tiny_sd15  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    model = build_tiny_sd15(tmp / "models" / "tiny-sd15", "diffusers")
    build_tiny_dataset(tmp / "datasets" / "shapes", n=4)
    config = AppConfig(models_dir=str(tmp / "models"), datasets_dir=str(tmp / "datasets"),
                       outputs_dir=str(tmp / "outputs"))

    settings = core.load_settings()
    settings.model.architecture = "sd15"
    settings.model.model_path = "tiny-sd15"
    settings.dataset.path = "shapes"
    settings.dataset.resolution = 64
    settings.dataset.min_bucket_reso = 32
    settings.dataset.max_bucket_reso = 128
    settings.dataset.bucket_reso_steps = 32
    settings.network.rank = 4
    settings.schedule.max_train_steps = 10
    settings.schedule.log_every_n_steps = 2
    settings.sampling.sample_every_n_steps = 10
    settings.sampling.prompts = "a red square"
    settings.sampling.steps = 4

    result = core.train(settings, config=config, on_event=lambda e: e["type"] == "progress" and print(
        f"step {e['step']}/{e['total_steps']} loss {e['loss']:.4f}"))
    print("adapter:", result.final.name, "previews:", [p.name for p in result.samples])
    with safe_open(str(result.final), "pt") as f:
        keys = list(f.keys())
        print(len(keys), "tensors, e.g.", keys[0])
        print("modelspec.architecture =", f.metadata()["modelspec.architecture"])
