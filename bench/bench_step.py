"""Training-step speed and memory: this project's step versus a plain diffusers + peft step, side by side.

Full-size UNets with random weights are built from the configs shipped in architectures/configs (no
download).  Both sides train LoRA rank 16 on the attention projections (the layers diffusers' LoRA example
targets) with AdamW, bf16 (or fp32) base weights and fp32 adapter weights, on the same random latents and
text embeddings.  Run from the repository root:

    python bench/bench_step.py                 # CUDA: SD1.5 512 px batch 4 and SDXL 1024 px batch 1
    python bench/bench_step.py sdxl --steps 30 --checkpointing
    python bench/bench_step.py sd15 --cpu --batch 1 --steps 3 --warmup 1   # both sides on the CPU
    python bench/bench_step.py sd35_medium flux1_dev flux2_klein_4b         # the DiTs (1024 px; SD3.5 and
                                                                            # FLUX.1 with checkpointing)

Prints one line per (family, precision, side): it/s (on the CPU s/it, in wall-clock and in CPU seconds),
images/s, peak memory (allocated on CUDA, the process's peak RSS on the CPU), and the speed ratio.  ``--cpu`` times fp32 and, where the CPU has
bf16 instructions (AVX512-BF16 / AMX), bf16; ``--precision`` chooses.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCKS: tuple[str, ...] = ()  # --blocks overrides the family's compile_blocks
CONFIGS = ROOT / "architectures" / "configs"  # --config-dir: another diffusers-layout config folder (tests)
# the cases: family → resolution, batch and whether both sides checkpoint (the DiTs at 1024 px need it
# to fit beside the plain step's activations on 24 GB cards, and users train them so)
CASES = {"sd15": dict(resolution=512, batch=4), "sdxl": dict(resolution=1024, batch=1),
         "sd35_medium": dict(resolution=1024, batch=1, checkpointing=True),
         "flux1_dev": dict(resolution=1024, batch=1, checkpointing=True),
         "flux2_klein_4b": dict(resolution=1024, batch=1)}
UNETS = ("sd15", "sdxl")
# The layers our "attn" target trains, for peft (a regex over module names): the attention projections of both
# streams, as diffusers' DreamBooth LoRA scripts for SD3 and FLUX take them, and in the FLUX single blocks what
# the community file holds as linear1 / linear2 (attention and MLP in, attention and MLP out): so both sides
# train the same weights.
DIT_PEFT_TARGETS = (r".*\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
                    r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out|attn\.to_qkv_mlp_proj|attn\.to_out)")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def config_dir(arch_id: str) -> Path:
    return CONFIGS if (CONFIGS / "unet").is_dir() else CONFIGS / arch_id


def build_unet(arch_id: str, device, dtype):
    from diffusers import UNet2DConditionModel
    config = json.loads((config_dir(arch_id) / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config).to(device, dtype)


def make_inputs(arch_id: str, batch: int, resolution: int, device, dtype=torch.bfloat16):
    config = json.loads((config_dir(arch_id) / "unet" / "config.json").read_text())
    g = torch.Generator(device).manual_seed(0)
    side = resolution // 8
    latents = torch.randn(batch, config["in_channels"], side, side, device=device, generator=g)
    cond = {"encoder_hidden_states": torch.randn(batch, 77, config["cross_attention_dim"], device=device,
                                                 generator=g, dtype=dtype)}
    if arch_id == "sdxl":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        cond["pooled"] = torch.randn(batch, pooled, device=device, generator=g, dtype=dtype)
    sizes = [(resolution, resolution)] * batch
    meta = {"original_sizes": sizes, "crop_coords": [(0, 0)] * batch, "target_sizes": sizes,
            # what the trainer's batches carry (core.dataset.TrainingDataset): SDXL reads no host lists per step
            "size_conditioning": torch.tensor([[*o, 0, 0, *o] for o in sizes], dtype=torch.float32, device=device)}
    return latents, cond, meta


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, steps: int, warmup: int, device) -> tuple[float, float]:
    """(steps per second of wall time, the process's CPU seconds per step).  On a CPU shared with other jobs the
    CPU time is the steadier figure: it counts the work done, not the time spent waiting for a core."""
    for _ in range(warmup):
        step()
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps / (time.perf_counter() - t0), (time.process_time() - c0) / steps


def autocast_for(device, dtype, cache: bool = True):
    """bf16 autocast for a bf16 base (both sides); none in fp32.  ``cache`` False: no cache of cast weights
    (what a CUDA graph capture needs)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def bench_ours(arch_id, latents, cond, meta, steps, warmup, checkpointing, dtype=torch.bfloat16, compile_how="off",
               compile_mode=None, cuda_graphs=False):
    import architectures
    from architectures.base import Components
    from core.settings import Settings
    from diffusers import DDPMScheduler

    device = latents.device
    arch = architectures.get(arch_id)
    sched_cfg = json.loads((config_dir(arch_id) / "scheduler" / "scheduler_config.json").read_text())
    comps = Components(build_unet(arch_id, device, dtype), None, [], [], DDPMScheduler.from_config(sched_cfg))
    comps.denoiser.requires_grad_(False)
    if checkpointing:
        comps.denoiser.enable_gradient_checkpointing()
    comps.denoiser.train()
    return time_our_step(arch, comps, latents, cond, meta, Settings(), steps, warmup, dtype, compile_how,
                         compile_mode, cuda_graphs)


def time_our_step(arch, comps, latents, cond, meta, settings, steps, warmup, dtype, compile_how="off",
                  compile_mode=None, cuda_graphs=False):
    """Our LoRA r16 on the family's attention layers, AdamW, the trainer's diffusion_loss: (it/s, CPU s per
    step, trained parameters).  ``cuda_graphs``: the whole step replayed from a CUDA graph (core.cuda_graph; its
    warm-up steps and the capture happen within the untimed warm-up)."""
    from core.adapters import build_network
    from core.optim import build_optimizer
    from core.trainer import diffusion_loss

    device = latents.device
    net = build_network(arch.adapter_targets(comps, "attn", False), "lora", 16, 16.0).to(device)
    net.apply_to()
    if compile_how != "off":
        from core.speed import compile_model
        compile_model(comps.denoiser, BLOCKS or arch.compile_blocks, compile_how, compile_mode)
    opt = build_optimizer("AdamW", net.param_groups(1e-4, 0), 1e-4, 0.01, device)

    def step():
        loss = diffusion_loss(arch, comps, latents, cond, meta, settings, dtype, lambda: autocast_for(device, dtype))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda_graphs:
        from core import cuda_graph

        def whole_step(inputs):
            opt.zero_grad(set_to_none=True)
            loss = diffusion_loss(arch, comps, inputs["latents"], inputs["cond"], meta, settings, dtype,
                                  lambda: autocast_for(device, dtype, cache=False))
            loss.backward()
            opt.step()
            return {"loss": loss.detach()}

        cuda_graph.use_device_learning_rates(opt, capturable=device.type == "cuda")
        captured = cuda_graph.CapturedStep(whole_step, cuda_graph.capture_backend(device),
                                           lambda message, level="info": print(message, file=sys.stderr))
        inputs = {"latents": latents, "cond": cond}

        def step():
            captured(inputs)

        warmup = max(warmup, cuda_graph.WARMUP_STEPS + 2)   # warm-ups, the capture and its first replay
    return *timed(step, steps, warmup, device), sum(p.numel() for p in net.parameters())


def bench_diffusers_peft(arch_id, latents, cond, meta, steps, warmup, checkpointing, dtype=torch.bfloat16):
    """What diffusers' train_text_to_image_lora(_sdxl).py does per step."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    device = latents.device
    unet = build_unet(arch_id, device, dtype)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler.from_config(json.loads(
        (config_dir(arch_id) / "scheduler" / "scheduler_config.json").read_text()))
    added = None
    if arch_id == "sdxl":
        time_ids = torch.tensor([list(o) + list(c) + list(t) for o, c, t in
                                 zip(meta["original_sizes"], meta["crop_coords"], meta["target_sizes"])],
                                device=device, dtype=dtype)
        added = {"text_embeds": cond["pooled"], "time_ids": time_ids}

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = sched.add_noise(latents, noise, t)
        with autocast_for(device, dtype):
            pred = unet(noisy.to(dtype), t, cond["encoder_hidden_states"], added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad()

    return *timed(step, steps, warmup, device), sum(p.numel() for p in params)


def dit_case(arch_id: str, resolution: int, batch: int, device, dtype, checkpointing: bool):
    """A DiT family's full-size denoiser with random weights (bench_tiers' builder, from the shipped or
    --config-dir configs), its objective configured, and random inputs of its training shapes."""
    import architectures
    from bench.bench_tiers import random_components, random_inputs
    from core.settings import Settings

    arch = architectures.get(arch_id)
    settings = Settings()
    settings.model.architecture = arch_id
    comps = random_components(arch, dtype, CONFIGS if (CONFIGS / "transformer").is_dir() else None, device)
    arch.configure_objective(comps, settings)
    comps.denoiser.requires_grad_(False)
    if checkpointing:
        comps.denoiser.enable_gradient_checkpointing()
    comps.denoiser.train()
    latents, cond, meta = random_inputs(arch, comps.denoiser, resolution, device, dtype)
    if batch > 1:
        latents = latents.repeat(batch, *[1] * (latents.dim() - 1))
        cond = {k: v.repeat(batch, *[1] * (v.dim() - 1)) for k, v in cond.items()}
    return arch, settings, comps, latents, cond, meta


def bench_ours_dit(arch_id, resolution, batch, device, steps, warmup, checkpointing, dtype=torch.bfloat16):
    """Our step on a DiT: our adapters on the family's attention layers (fused where the original file fuses
    them), the trainer's diffusion_loss."""
    arch, settings, comps, latents, cond, meta = dit_case(arch_id, resolution, batch, device, dtype, checkpointing)
    return time_our_step(arch, comps, latents, cond, meta, settings, steps, warmup, dtype)


def bench_peft_dit(arch_id, resolution, batch, device, steps, warmup, checkpointing, dtype=torch.bfloat16):
    """What diffusers' train_dreambooth_lora_sd3 / _flux scripts do per step: peft LoRA on the attention
    projections, x_t = (1 − σ)·x₀ + σ·ε, MSE against ε − x₀.  The denoiser is called through the family's
    ``predict`` (only the packing of its inputs: FLUX's sequence layout, ids and guidance)."""
    from peft import LoraConfig

    arch, settings, comps, latents, cond, meta = dit_case(arch_id, resolution, batch, device, dtype, checkpointing)
    model = comps.denoiser
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=DIT_PEFT_TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        noise = torch.randn_like(latents)
        sigma = torch.rand(latents.shape[0], device=device).view(-1, *[1] * (latents.dim() - 1))
        noisy = (1 - sigma) * latents + sigma * noise
        with autocast_for(device, dtype):
            pred = arch.predict(comps, noisy.to(dtype), sigma.flatten() * 1000, cond, meta)
        loss = F.mse_loss(pred.float(), (noise - latents).float())
        loss.backward()
        opt.step()
        opt.zero_grad()

    return *timed(step, steps, warmup, device), sum(p.numel() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archs", nargs="*", default=list(UNETS), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--checkpointing", action="store_true", help="also for the cases that do not by default")
    ap.add_argument("--compile", default="off", choices=["off", "regional", "full"],
                    help="compile our side's UNet (the baseline stays eager)")
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="replay our whole step from a CUDA graph (core.cuda_graph; UNet families)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--blocks", default="", help="comma-separated block class names for regional compile")
    ap.add_argument("--cpu", action="store_true", help="run both sides on the CPU")
    ap.add_argument("--precision", nargs="*", choices=list(DTYPES), default=None,
                    help="default: bf16 on CUDA; on the CPU fp32, and bf16 where the CPU has bf16 instructions")
    ap.add_argument("--resolution", type=int, default=0, help="0: the family's case (512 / 1024 px)")
    ap.add_argument("--batch", type=int, default=0, help="0: the family's case (4 / 1)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--config-dir", default="", help="a diffusers-layout config folder (unet/, scheduler/) instead "
                                                     "of the shipped full-size one")
    args = ap.parse_args()
    global BLOCKS, CONFIGS
    BLOCKS = tuple(b for b in args.blocks.split(",") if b)
    if args.config_dir:
        CONFIGS = Path(args.config_dir)
    if args.cpu:
        from core.hardware import detect_hardware
        profile = detect_hardware()
        device = torch.device("cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
        precisions = args.precision or (["fp32", "bf16"] if profile.cpu_bf16 else ["fp32"])
        print(f"# CPU {profile.cpu_name}, {torch.get_num_threads()} threads, bf16 instructions "
              f"{'yes' if profile.cpu_bf16 else 'no'} · torch {torch.__version__} · 'ckpt': gradient "
              f"checkpointing on both sides")
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_step.py needs a CUDA GPU (or --cpu)")
        device = torch.device("cuda")
        precisions = args.precision or ["bf16"]
        print(f"# {torch.cuda.get_device_name()} · torch {torch.__version__} · 'ckpt': gradient checkpointing on "
              f"both sides")
    table_rows = []  # one Markdown row per (family, precision): both sides' img/s and peak memory, the ratio
    for arch_id in args.archs:
        case = CASES[arch_id]
        resolution, batch = args.resolution or case["resolution"], args.batch or case["batch"]
        checkpointing = args.checkpointing or case.get("checkpointing", False)
        for precision in precisions:
            dtype = DTYPES[precision]
            rates, cpu_times, memories = {}, {}, {}
            ours_label = ("ours" if args.compile == "off" else f"ours {args.compile} {args.mode or 'default'}") + (
                " graphs" if args.cuda_graphs else "")
            if arch_id in UNETS:
                latents, cond, meta = make_inputs(arch_id, batch, resolution, device, dtype)
                sides = [("diffusers+peft", lambda **k: bench_diffusers_peft(arch_id, latents, cond, meta, **k)),
                         (ours_label, lambda **k: bench_ours(arch_id, latents, cond, meta, **k,
                                                             compile_how=args.compile, compile_mode=args.mode,
                                                             cuda_graphs=args.cuda_graphs))]
            else:
                if args.compile != "off" or args.cuda_graphs:
                    sys.exit("--compile and --cuda-graphs are measured on the UNet families only")
                sides = [("diffusers+peft", lambda **k: bench_peft_dit(arch_id, resolution, batch, device, **k)),
                         (ours_label, lambda **k: bench_ours_dit(arch_id, resolution, batch, device, **k))]
            if args.skip_baseline:
                sides = sides[1:]
            for side, fn in sides:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                t_start = time.perf_counter()
                rate, cpu_s, n_params = fn(steps=args.steps, warmup=args.warmup, checkpointing=checkpointing,
                                           dtype=dtype)
                wall = time.perf_counter() - t_start
                rates[side], cpu_times[side] = rate, cpu_s
                if device.type == "cuda":
                    speed, memory = f"{rate:6.2f} it/s", f"peak {torch.cuda.max_memory_allocated() / 2**30:5.1f} GB"
                else:
                    import resource  # the process's peak so far: the second side's includes the first's
                    speed = f"{1 / rate:6.2f} s/it ({cpu_s:6.2f} CPU s/it)"
                    memory = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:5.1f} GB"
                memories[side] = memory
                print(f"{arch_id:5s} {resolution}px b{batch} {precision}{' ckpt' if checkpointing else ''}  "
                      f"{side:15s} {speed} "
                      f"{rate * batch:6.2f} img/s  {memory}  lora params {n_params / 1e6:.2f} M  "
                      f"(wall incl. warm-up/compile {wall:.0f} s)", flush=True)
            if "diffusers+peft" in rates:
                cpu_ratio = (f" (CPU time {cpu_times['diffusers+peft'] / cpu_times[ours_label]:.2f}x)"
                             if device.type == "cpu" else "")
                print(f"{arch_id:5s} {precision} speed ratio {ours_label} / diffusers+peft: "
                      f"{rates[ours_label] / rates['diffusers+peft']:.2f}x{cpu_ratio}", flush=True)
            cells = [f"{rates[side] * batch:.2f} img/s, {memories[side].strip()}" if side in rates else "-"
                     for side in ("diffusers+peft", ours_label)]
            ratio = f"{rates[ours_label] / rates['diffusers+peft']:.2f}x" if "diffusers+peft" in rates else "-"
            table_rows.append(f"| {arch_id} | {resolution} px b{batch}{' ckpt' if checkpointing else ''} | "
                              f"{precision} | {cells[0]} | {cells[1]} | {ratio} |")
    print(f"\n| family | case | precision | diffusers + peft | {ours_label} | ratio |\n|---|---|---|---|---|---|")
    print("\n".join(table_rows), flush=True)


if __name__ == "__main__":
    main()
