"""Print the memory/speed plan and the VRAM estimate this machine would use for a preset, without loading
anything: the same plan the Run tab shows before Start.

    .venv/bin/python examples/show_plan.py examples/presets/flux2_klein_base_4b_lora.json
    .venv/bin/python examples/show_plan.py training.json --vram 8      # as if the GPU had 8 GB
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import architectures  # noqa: E402
import core  # noqa: E402
from core.hardware import detect_hardware  # noqa: E402
from core.plan import make_plan  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("settings", nargs="?", default="training.json")
parser.add_argument("--vram", type=float, default=0.0, help="plan for this many GB (memory.vram_budget_gb)")
args = parser.parse_args()

settings = core.load_settings(args.settings)
if args.vram:
    settings.memory.vram_budget_gb = args.vram
profile = detect_hardware()
print(profile.summary())
print()
try:
    plan = make_plan(profile, settings, architectures.get(settings.model.architecture))
except ValueError as exc:  # an explicit choice this machine cannot follow: the message names the setting
    sys.exit(f"Cannot plan this run here: {exc}")
print(plan.summary())
