"""The plan is a pure function of hardware, family, shape and overrides: checked over a table of machines.

The memory targets (LoRA rank 16, batch 1; the estimate must stay under the tier and the plan must fit):
SD1.5 @512 ≤ 4 GB · SDXL @1024 ≤ 6 GB · SD3.5 medium @1024 ≤ 6 GB · SD3.5 large @1024 ≤ 12 GB ·
FLUX.1 dev @1024 ≤ 8 GB and @512 ≤ 6 GB · FLUX.2 klein-4B ≤ 6 GB · klein-9B ≤ 8 GB · FLUX.2 dev ≤ 24 GB.
Run with ``-s`` to see the table of plans."""
import pytest
import torch

import architectures
from core.hardware import GpuInfo, HardwareProfile
from core.plan import make_plan
from core.settings import Settings

AMPERE, ADA, HOPPER, TURING = (8, 6), (8, 9), (9, 0), (7, 5)
TIERS = (4, 6, 8, 10, 12, 16, 24, 48, 80)
FLUX2 = ("flux2_klein_4b", "flux2_klein_9b", "flux2_dev")
FAMILIES = [("sd15", 512), ("sdxl", 1024), ("sd35_medium", 1024), ("sd35_large", 1024), ("flux1_dev", 1024),
            ("flux1_dev", 512)] + [(a, 1024) for a in FLUX2]
TARGETS = {("sd15", 512): 4, ("sdxl", 1024): 6, ("sd35_medium", 1024): 6, ("sd35_large", 1024): 12,
           ("flux1_dev", 1024): 8, ("flux1_dev", 512): 6, ("flux2_klein_4b", 1024): 6,
           ("flux2_klein_9b", 1024): 8, ("flux2_dev", 1024): 24}
QUANT_RANK = {"none": 0, "qfloat8": 1, "qint8": 1, "qint4": 2, "nf4": 2}


def flux2_registered() -> bool:
    return "flux2_dev" in architectures.available()


def needs(arch_id):
    """Skip FLUX.2 cases until its plug-in is registered."""
    if arch_id in FLUX2 and not flux2_registered():
        pytest.skip("FLUX.2 plug-in (architectures/flux2.py) is not registered yet")


def machine(vram_gb=None, cc=AMPERE, name="GPU", ram_gb=32.0, cpu_bf16=False):
    """``cpu_bf16``: the CPU has bf16 instructions (AVX512-BF16 / AMX)."""
    gpus = [GpuInfo.from_capability(0, name, vram_gb, vram_gb, cc)] if vram_gb else []
    return HardwareProfile(gpus=gpus, cpu_cores=8, cpu_name="cpu", ram_total_gb=ram_gb, ram_available_gb=ram_gb - 4,
                           torch_version="2.13.0", cuda_version="12.8" if vram_gb else None, cpu_bf16=cpu_bf16)


def settings(arch_id="sd15", resolution=512, **memory):
    s = Settings()
    s.model.architecture = arch_id
    s.dataset.resolution = resolution
    for k, v in memory.items():
        setattr(s.memory, k, v)
    return s


def plan_for(arch_id, resolution, vram=None, cc=AMPERE, ram_gb=32.0, cpu_bf16=False, **memory):
    return make_plan(machine(vram, cc, ram_gb=ram_gb, cpu_bf16=cpu_bf16), settings(arch_id, resolution, **memory),
                     architectures.get(arch_id))


def row(p) -> str:
    e = p.estimate
    return (f"ckpt {'on ' if p.gradient_checkpointing else 'off'} swap {p.blocks_to_swap:2d}/{p.swappable_blocks:<2d} "
            f"base {p.quantize_base:7s} 8bit {'on ' if p.optimizer_8bit else 'off'} "
            f"offload {'on ' if p.activation_offload else 'off'} te {p.quantize_text_encoder:7s} "
            f"≈{e.total_gb:5.1f} GB (train {e.training_gb:5.1f}, cache {e.caching_gb:5.1f}, RAM {e.ram_gb:4.1f})"
            f"{'' if p.fits else '  DOES NOT FIT'}")


@pytest.mark.parametrize("arch_id,resolution", FAMILIES)
def test_tiers_fit_targets_and_bigger_tiers_save_less(arch_id, resolution):
    needs(arch_id)
    plans = {}
    for vram in TIERS:
        cc = AMPERE if vram <= 16 else ADA if vram <= 24 else HOPPER
        p = plan_for(arch_id, resolution, vram, cc, ram_gb=64)
        plans[vram] = p
        print(f"{arch_id:15s} @{resolution:<4d} {vram:2d} GB: {row(p)}")
        assert p.device == "cuda" and p.mixed_precision == "bf16" and p.attention == "flash"
        assert p.estimate is not None and p.budget_gb == vram
        assert p.reasons and p.summary().count("\n") >= len(p.reasons)
        if p.fits:
            assert p.estimate.total_gb <= vram
    target = TARGETS[(arch_id, resolution)]
    for vram in TIERS:
        if vram >= target:
            assert plans[vram].fits, (vram, plans[vram].summary())
            assert plans[vram].estimate.total_gb <= vram
    # more memory never means more saving: no stronger quantization, and at the same quantization no
    # activation offload that the smaller tier did without and no more swapped blocks
    def saving(p):
        return QUANT_RANK[p.quantize_base], p.activation_offload, p.blocks_to_swap, p.gradient_checkpointing
    for small, big in zip(TIERS, TIERS[1:]):
        a, b = plans[small], plans[big]
        if a.fits:
            assert saving(b) <= saving(a), (small, big)
    assert plans[80].quantize_base == "none" and plans[80].blocks_to_swap == 0
    assert not plans[80].activation_offload and not plans[80].optimizer_8bit


def test_specific_choices():
    # SD1.5 fits 6 GB without checkpointing; SDXL needs it below 24 GB
    assert not plan_for("sd15", 512, 6).gradient_checkpointing
    assert plan_for("sd15", 512, 4).gradient_checkpointing
    assert plan_for("sdxl", 1024, 12).gradient_checkpointing
    assert not plan_for("sdxl", 1024, 24, ADA).gradient_checkpointing
    # FLUX.1 dev: 80 GB trains without checkpointing in bf16; 24 GB quantizes the base; 8 GB also swaps
    p80, p24, p8 = (plan_for("flux1_dev", 1024, v, c) for v, c in ((80, HOPPER), (24, ADA), (8, AMPERE)))
    assert not p80.gradient_checkpointing and p80.quantize_base == "none"
    assert p24.gradient_checkpointing and p24.quantize_base == "qfloat8" and p24.blocks_to_swap == 0  # Ada: fp8
    assert p8.quantize_base == "qint8" and 0 < p8.blocks_to_swap < p8.swappable_blocks  # Ampere: int8
    assert p8.quantize_text_encoder in ("qint8", "qint4")  # T5-XXL (9 GB in bf16) is quantized for caching
    assert any("blocks swapped" in r for r in p8.reasons)
    # a VRAM budget below the GPU's size plans like the smaller GPU
    budgeted = plan_for("flux1_dev", 1024, 80, HOPPER, vram_budget_gb=8)
    assert budgeted.budget_gb == 8 and budgeted.blocks_to_swap > 0 and budgeted.estimate.total_gb <= 8


def test_cpu_only_plan():
    p = plan_for("sd15", 512)
    assert (p.device, p.mixed_precision, p.attention, p.cpu_threads) == ("cpu", "no", "default", 8)
    assert not p.gradient_checkpointing and p.fits and p.budget_gb == 28
    assert (p.blocks_to_swap, p.quantize_base, p.optimizer_8bit, p.activation_offload) == (0, "none", False, False)
    assert p.summary().splitlines()[1].startswith("RAM fits")
    p = plan_for("sd15", 512, cpu_threads=3)
    assert p.cpu_threads == 3
    # FLUX.1 in fp32 does not fit 28 GB of RAM: said plainly, not raised
    p = plan_for("flux1_dev", 1024)
    assert not p.fits and "DOES NOT FIT" in p.reasons[0]


def test_cpu_precision_follows_its_bf16_instructions():
    """bf16 on a CPU with AVX512-BF16 / AMX (base weights bf16, the estimate in bf16), fp32 on one without;
    an explicit memory.mixed_precision wins either way, with a warning where bf16 would be emulated."""
    fast = plan_for("sd15", 512, cpu_bf16=True)
    assert (fast.device, fast.mixed_precision) == ("cpu", "bf16") and fast.weight_dtype == torch.bfloat16
    assert fast.reasons[0].startswith("precision bf16: no GPU; this CPU has bf16 instructions (AVX512-BF16 / AMX)")
    plain = plan_for("sd15", 512, cpu_bf16=False)
    assert fast.fits and fast.estimate.total_gb < plain.estimate.total_gb  # bf16 base weights: half the bytes
    assert plain.mixed_precision == "no" and plain.weight_dtype == torch.float32
    assert plain.reasons[0].startswith("precision fp32: no GPU, and this CPU lacks bf16 instructions")
    # the user's setting wins on both kinds of CPU
    assert plan_for("sd15", 512, cpu_bf16=True, mixed_precision="no").mixed_precision == "no"
    forced = plan_for("sd15", 512, cpu_bf16=False, mixed_precision="bf16")
    assert forced.mixed_precision == "bf16"
    assert any(r.startswith("precision bf16 as set, but this CPU lacks bf16 instructions") for r in forced.reasons)
    assert not any("precision" in r for r in plan_for("sd15", 512, cpu_bf16=True, mixed_precision="bf16").reasons)
    # a GPU decides by itself, whatever the CPU has
    assert plan_for("sd15", 512, 8, TURING, cpu_bf16=True).mixed_precision == "fp16"


def test_older_gpu_fp16():
    p = plan_for("sdxl", 1024, 8, TURING)
    assert p.mixed_precision == "fp16" and not p.tf32 and p.attention == "efficient"
    p6 = plan_for("sdxl", 1024, 6, TURING)
    assert p6.fits and p6.quantize_base == "qint8"  # no fp8 before Ada


def test_low_system_ram_limits_block_swapping():
    # 12 GB RAM (8 available, 4 kept for the system): a qint8 FLUX.1 with 48 swapped blocks needs ≈ 8 GB of RAM
    p = plan_for("flux1_dev", 1024, 8, ram_gb=12)
    assert p.estimate.ram_gb <= 4.0 + 1e-6
    assert any("RAM" in r for r in p.reasons)
    assert QUANT_RANK[p.quantize_base] == 2 or p.blocks_to_swap < plan_for("flux1_dev", 1024, 8).blocks_to_swap
    # almost no RAM: nothing fits; the plan says so instead of raising
    p = plan_for("flux1_dev", 1024, 8, ram_gb=5)
    assert not p.fits and "DOES NOT FIT" in p.summary()
    assert p.blocks_to_swap == 0 and not p.activation_offload and p.estimate.ram_gb == 0
    # an explicit swap count that needs more RAM than there is: refused, naming the setting
    with pytest.raises(ValueError, match="blocks_to_swap"):
        plan_for("flux1_dev", 1024, 8, ram_gb=8, blocks_to_swap=40)


def test_user_overrides_win_and_impossible_ones_are_named():
    p = plan_for("sd15", 512, 80, HOPPER, gradient_checkpointing="on", compile="off")
    assert p.gradient_checkpointing and p.compile == "off"
    p = plan_for("flux1_dev", 1024, 80, HOPPER, blocks_to_swap=10, quantize_base="qint8", optimizer_8bit="on",
                 activation_offload="on", attention="efficient", channels_last="on", quantize_text_encoder="qint4")
    assert (p.blocks_to_swap, p.quantize_base, p.optimizer_8bit, p.activation_offload, p.attention,
            p.channels_last, p.quantize_text_encoder) == (10, "qint8", True, True, "efficient", True, "qint4")
    # an explicit choice that does not fit is followed, and the plan says it does not fit
    p = plan_for("flux1_dev", 1024, 8, gradient_checkpointing="off", quantize_base="none")
    assert not p.gradient_checkpointing and p.quantize_base == "none" and not p.fits
    assert "DOES NOT FIT" in p.reasons[0]
    # the batch size is never changed by the plan
    s = settings("sdxl", 1024)
    s.schedule.train_batch_size = 8
    make_plan(machine(6), s, architectures.get("sdxl"))
    assert s.schedule.train_batch_size == 8

    refusals = [
        (dict(mixed_precision="bf16"), dict(vram=8, cc=TURING), "bf16"),
        (dict(quantize_base="nf4"), {}, "quantize_base"),
        (dict(quantize_text_encoder="nf4"), {}, "quantize_text_encoder"),
        (dict(optimizer_8bit="on"), {}, "optimizer_8bit"),
        (dict(activation_offload="on"), {}, "activation_offload"),
        (dict(blocks_to_swap=4), {}, "blocks_to_swap"),
        (dict(attention="efficient"), {}, "attention"),
        (dict(attention="flash"), dict(vram=8, cc=TURING), "attention"),
        (dict(blocks_to_swap=100), dict(vram=8, arch_id="flux1_dev"), "only 57"),
        (dict(blocks_to_swap=2), dict(vram=8), "no swappable blocks"),
    ]
    for memory, where, match in refusals:
        arch_id = where.pop("arch_id", "sd15")
        with pytest.raises(ValueError, match=match):
            plan_for(arch_id, 512, **where, **memory)


def test_eight_bit_optimizer_only_for_adamw_and_lion():
    s = settings("flux1_dev", 1024)
    s.optimizer.optimizer_type = "Prodigy"
    p = make_plan(machine(8), s, architectures.get("flux1_dev"))
    assert not p.optimizer_8bit and any("none for Prodigy" in r for r in p.reasons)
    s.memory.optimizer_8bit = "on"
    with pytest.raises(ValueError, match="optimizer_8bit"):
        make_plan(machine(8), s, architectures.get("flux1_dev"))
    s = settings("sd15", 512)
    s.optimizer.optimizer_type = "AdamW8bit"
    with pytest.raises(ValueError, match="AdamW8bit"):
        make_plan(machine(), s, architectures.get("sd15"))


def test_text_cache_blocked_by_text_encoder_training():
    s = Settings()
    s.network.train_text_encoder = True
    assert not make_plan(machine(), s, architectures.get("sd15")).cache_text_encoder_outputs
    s.memory.cache_text_encoder_outputs = "on"
    with pytest.raises(ValueError, match="text encoder is trained"):
        make_plan(machine(), s, architectures.get("sd15"))


def test_estimate_failure_falls_back_to_the_rule_of_thumb(tmp_path):
    p = make_plan(machine(12), settings("sdxl", 1024), architectures.get("sdxl"), config_dir=tmp_path)
    assert p.estimate is None and p.gradient_checkpointing  # 12 GB < SDXL's 16 GB rule
    assert any("estimate unavailable" in r for r in p.reasons)


def test_compile_auto_stays_off_with_quantized_base_or_swapping(monkeypatch):
    import core.plan as plan_mod
    monkeypatch.setattr(plan_mod, "triton_available", lambda: True)  # Triton is part of every CUDA torch build
    roomy = plan_for("sdxl", 1024, 80, HOPPER)
    assert roomy.compile == "regional" and roomy.quantize_base == "none"
    tight = plan_for("flux1_dev", 1024, 8, AMPERE)
    assert tight.quantize_base != "none" and tight.compile == "off"
    assert any(r.startswith("compile off: not yet verified") for r in tight.reasons)
    # an explicit choice is followed
    assert plan_for("flux1_dev", 1024, 8, AMPERE, compile="regional").compile == "regional"


def test_loading_ram_is_checked():
    needs("flux2_dev")
    # the transformer alone is ≈ 60 GiB in bf16 (the 24B text encoder is read and dropped before it)
    short = plan_for("flux2_dev", 1024, 24, ADA, ram_gb=48)
    assert short.reasons[0].startswith("CPU RAM is short for loading")
    assert not any("short for loading" in r for r in plan_for("flux2_dev", 1024, 24, ADA, ram_gb=64).reasons)
    roomy = plan_for("flux2_dev", 1024, 24, ADA, ram_gb=256)
    assert not any("short for loading" in r for r in roomy.reasons)
    sdxl = plan_for("sdxl", 1024, 12)
    assert 5 < sdxl.estimate.load_ram_gb < 10   # UNet + both CLIPs + VAE in bf16 ≈ 6.6 GB
    # FLUX.1 dev reads T5 (≈ 9.5 GB) alone and drops it before the transformer (≈ 24 GB) unless previews need it
    from core.plan import loading_ram_gb
    alone = plan_for("flux1_dev", 1024, 24, ADA, ram_gb=128)
    e = alone.estimate
    assert loading_ram_gb(e, settings("flux1_dev", 1024), architectures.get("flux1_dev"), alone) == pytest.approx(
        e.load_ram_gb - e.load_text_encoders_gb)
    with_previews = settings("flux1_dev", 1024)
    with_previews.sampling.sample_every_n_steps, with_previews.sampling.prompts = 100, "a cat"
    assert loading_ram_gb(e, with_previews, architectures.get("flux1_dev"), alone) == pytest.approx(e.load_ram_gb)
    assert 30 < e.load_ram_gb < 40 and 8 < e.load_text_encoders_gb < 12


def test_four_bit_base_with_swapping_is_quanto(monkeypatch):
    """bitsandbytes' nf4 weights cannot be streamed: the swapping families' 4-bit rung is qint4, the UNets' nf4."""
    import core.plan as plan_mod
    monkeypatch.setattr(plan_mod, "bitsandbytes_available", lambda: True)  # installed on CUDA machines
    flux = plan_for("flux1_dev", 1024, 4, AMPERE)
    assert flux.quantize_base == "qint4" and flux.blocks_to_swap > 0
    sdxl = plan_for("sdxl", 1024, 4, AMPERE)
    assert sdxl.quantize_base == "nf4" and sdxl.blocks_to_swap == 0
    with pytest.raises(ValueError, match="cannot be streamed"):
        plan_for("flux1_dev", 1024, 8, AMPERE, quantize_base="nf4", blocks_to_swap=10)


def test_full_finetune_swaps_blocks_only_when_the_optimizer_steps_in_backward():
    """FLUX.1 dev full fine-tune at 1024 px on a 24 GB GPU: with Adafactor stepping inside backward the plan
    swaps blocks (trained fp32 weights in CPU memory, gradients of about one block) and fits; with AdamW it
    cannot swap, does not fit and says what would; an explicit swap count without the fused pass is refused."""
    needs("flux1_dev")

    def full(fused, optimizer="Adafactor", **memory):
        s = settings("flux1_dev", 1024, **memory)
        s.network.algorithm = "full_finetune"
        s.optimizer.optimizer_type, s.optimizer.fused_backward_pass = optimizer, fused
        return make_plan(machine(24, ADA, ram_gb=128), s, architectures.get("flux1_dev"))

    swapped = full(True)
    print(row(swapped))
    assert swapped.fits and 0 < swapped.blocks_to_swap < swapped.swappable_blocks
    assert swapped.estimate.total_gb <= 24 and swapped.estimate.ram_gb > 30   # fp32 weights of ~50 blocks
    assert swapped.estimate.parts["gradients"] < 2                           # one block's, not 44 GB
    stuck = full(False, "AdamW")
    assert not stuck.fits and stuck.blocks_to_swap == 0
    assert "fused_backward_pass" in stuck.reasons[0]
    with pytest.raises(ValueError, match="fused_backward_pass on"):
        full(False, blocks_to_swap=10)


def test_fsdp_shards_a_full_finetunes_weights_gradients_and_optimizer_state_per_gpu():
    """FLUX.1 dev full fine-tune with AdamW at 1024 px on 8 × 80 GB: every GPU holding the fp32 weights, their
    gradients and AdamW's state (≈ 196 GB) does not fit with DDP; FSDP holds 1/8 of each per GPU (plus the
    gathered running blocks) and fits.  Activations are per GPU either way."""
    needs("flux1_dev")
    eight = machine(80, HOPPER, ram_gb=256)
    eight.gpus = [GpuInfo.from_capability(i, "H100", 80, 80, HOPPER) for i in range(8)]

    def full(strategy):
        s = settings("flux1_dev", 1024, gradient_checkpointing="on", optimizer_8bit="off", activation_offload="off")
        s.network.algorithm, s.distributed.strategy = "full_finetune", strategy
        return make_plan(eight, s, architectures.get("flux1_dev"))

    ddp, fsdp = full("ddp"), full("fsdp")
    print(row(ddp), "\n", row(fsdp))
    assert not ddp.fits and fsdp.fits and fsdp.processes == 8
    for part in ("denoiser weights", "gradients", "optimizer state"):
        assert fsdp.estimate.parts[part] == pytest.approx(ddp.estimate.parts[part] / 8, rel=1e-3)
    assert 0 < fsdp.estimate.parts["gathered blocks"] < 2
    assert fsdp.estimate.parts["activations"] == ddp.estimate.parts["activations"]
    assert "8 processes (FSDP) with a global batch of 8" in fsdp.summary()
    assert "sharded: 1/8 each" in fsdp.summary() and "(DDP)" in ddp.summary()
    # loading: rank 0 alone reads the fp32 denoiser (the others receive their shards), every process its text
    # encoders: ≈ 60 GB + 7 × ≈ 10 GB fits 256 GB of RAM, where 8 full copies (DDP's loading) would not
    assert not any("short for loading" in r for r in fsdp.reasons)
    assert any("read into RAM whole, by each of the 8 processes" in r for r in ddp.reasons)
    eight.ram_total_gb = eight.ram_available_gb = 96
    short = full("fsdp").reasons[0]
    assert "(the denoiser by the first of the 8 processes only) (≈ 1" in short, short
    # a GPU without bf16 would train in fp16, whose loss scaling does not handle sharded gradients
    eight.gpus = [GpuInfo.from_capability(i, "T4", 16, 16, TURING) for i in range(8)]
    with pytest.raises(ValueError, match="T4 lacks bf16"):
        full("fsdp")
