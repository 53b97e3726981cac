"""Train a LoRA from a script, without the UI.

Edit the paths below (relative paths are inside the folders named in config.json) and run it with the
project's Python: `.venv/bin/python examples/train_lora.py`.  With no model of your own at hand,
`examples/tiny_demo.py` runs the same API end to end on a tiny generated model in a few seconds.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import core  # noqa: E402

settings = core.load_settings("examples/presets/sdxl_lora_12gb.json")
settings.model.model_path = "sd_xl_base_1.0.safetensors"   # a file or diffusers folder in models/
settings.dataset.path = "my_character"                       # a folder in datasets/
settings.saving.output_name = "my_character_sdxl"


def on_event(event: dict) -> None:
    if event["type"] == "progress":
        print(f"step {event['step']}/{event['total_steps']}  loss {event['loss']:.4f}  "
              f"{event['it_per_s']:.2f} it/s")
    elif event["type"] in ("status", "log", "saved", "error"):
        print(event.get("message") or event.get("path"))


result = core.train(settings, on_event=on_event)
print("saved:", result.final)
