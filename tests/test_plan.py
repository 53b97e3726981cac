"""The plan is a pure function of hardware, family and overrides: checked over a table of machines."""
import pytest

import architectures
from core.hardware import GpuInfo, HardwareProfile
from core.plan import make_plan
from core.settings import Settings


def machine(vram_gb=None, cc=(8, 6), name="GPU"):
    gpus = [GpuInfo.from_capability(0, name, vram_gb, vram_gb, cc)] \
        if vram_gb else []
    return HardwareProfile(gpus=gpus, cpu_cores=8, cpu_name="cpu", ram_total_gb=32, ram_available_gb=28,
                           torch_version="2.13.0", cuda_version="12.8" if vram_gb else None)


@pytest.mark.parametrize("vram,cc,arch,precision,checkpointing", [
    (None, None, "sd15", "no", False),          # CPU: fp32, memory is not the limit
    (6, (8, 6), "sd15", "bf16", True),          # 6 GB Ampere: SD1.5 needs checkpointing
    (12, (8, 9), "sd15", "bf16", False),
    (12, (8, 9), "sdxl", "bf16", True),
    (24, (8, 9), "sdxl", "bf16", False),
    (8, (7, 5), "sd15", "fp16", False),         # Turing: no bf16, fp16 with loss scaling
    (24, (8, 9), "flux1_dev", "bf16", True),
    (80, (9, 0), "flux1_dev", "bf16", False),
])
def test_auto_choices_per_machine(vram, cc, arch, precision, checkpointing):
    plan = make_plan(machine(vram, cc), Settings(), architectures.get(arch))
    assert (plan.mixed_precision, plan.gradient_checkpointing) == (precision, checkpointing)
    assert plan.device == ("cuda" if vram else "cpu")
    assert plan.reasons  # every auto choice says why


def test_user_overrides_win_and_impossible_ones_are_named():
    s = Settings()
    s.memory.gradient_checkpointing = "on"
    s.memory.compile = "off"
    plan = make_plan(machine(80), s, architectures.get("sd15"))
    assert plan.gradient_checkpointing and plan.compile == "off"
    s.memory.mixed_precision = "bf16"
    with pytest.raises(ValueError, match="bf16"):
        make_plan(machine(8, (7, 5)), s, architectures.get("sd15"))


def test_text_cache_blocked_by_text_encoder_training():
    s = Settings()
    s.network.train_text_encoder = True
    assert not make_plan(machine(), s, architectures.get("sd15")).cache_text_encoder_outputs
    s.memory.cache_text_encoder_outputs = "on"
    with pytest.raises(ValueError, match="text encoder is trained"):
        make_plan(machine(), s, architectures.get("sd15"))
