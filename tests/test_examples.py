"""The runnable examples run: the plan printer on a shipped preset, and the whole API on a tiny model."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, rc: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == rc, proc.stderr[-2000:]
    return proc


def test_show_plan_prints_the_plan_for_a_preset():
    out = run("examples/show_plan.py", "examples/presets/sd15_lora.json").stdout
    assert "device cpu" in out and ("RAM fits" in out or "RAM DOES NOT FIT" in out)
    assert "gradient checkpointing" in out and "CPU threads" in out
    # a preset this machine cannot follow (AdamW8bit needs CUDA) gets the setting named, not a traceback
    err = run("examples/show_plan.py", "examples/presets/sdxl_lora_12gb.json", rc=1).stderr
    assert "Cannot plan this run here: optimizer.optimizer_type: AdamW8bit" in err and "Traceback" not in err


def test_tiny_demo_trains_and_prints_the_keys():
    out = run("examples/tiny_demo.py").stdout
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.alpha" in out
    assert "stable-diffusion-v1/lora" in out
