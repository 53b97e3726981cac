"""Training-step speed and memory: this project's step versus a plain diffusers + peft step, side by side.

Full-size UNets with random weights are built from the configs shipped in architectures/configs (no
download).  Both sides train LoRA rank 16 on the attention projections (the layers diffusers' LoRA example
targets) with AdamW, bf16 base weights and fp32 adapter weights, on the same random latents and text
embeddings.  Run on a CUDA machine from the repository root:

    python bench/bench_step.py                 # SD1.5 512 px batch 4 and SDXL 1024 px batch 1
    python bench/bench_step.py sdxl --steps 30 --checkpointing

Prints one line per (family, side): it/s, images/s, peak allocated memory, and the speed ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCKS: tuple[str, ...] = ()  # --blocks overrides the family's compile_blocks
CASES = {"sd15": dict(resolution=512, batch=4), "sdxl": dict(resolution=1024, batch=1)}


def build_unet(arch_id: str, device, dtype):
    from diffusers import UNet2DConditionModel
    config = json.loads((ROOT / "architectures" / "configs" / arch_id / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config).to(device, dtype)


def make_inputs(arch_id: str, batch: int, resolution: int, device):
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device, generator=g)
    width = 768 if arch_id == "sd15" else 2048
    cond = {"encoder_hidden_states": torch.randn(batch, 77, width, device=device, generator=g,
                                                 dtype=torch.bfloat16)}
    if arch_id == "sdxl":
        cond["pooled"] = torch.randn(batch, 1280, device=device, generator=g, dtype=torch.bfloat16)
    sizes = [(resolution, resolution)] * batch
    meta = {"original_sizes": sizes, "crop_coords": [(0, 0)] * batch, "target_sizes": sizes}
    return latents, cond, meta


def timed(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def bench_ours(arch_id, latents, cond, meta, steps, warmup, checkpointing, compile_how="off", compile_mode=None):
    import architectures
    from architectures.base import Components
    from core.adapters import build_network
    from core.optim import build_optimizer
    from core.settings import Settings
    from core.trainer import diffusion_loss
    from diffusers import DDPMScheduler

    device = latents.device
    arch = architectures.get(arch_id)
    sched_cfg = json.loads((ROOT / "architectures" / "configs" / arch_id / "scheduler" / "scheduler_config.json")
                           .read_text())
    comps = Components(build_unet(arch_id, device, torch.bfloat16), None, [], [],
                       DDPMScheduler.from_config(sched_cfg))
    comps.denoiser.requires_grad_(False)
    if checkpointing:
        comps.denoiser.enable_gradient_checkpointing()
    comps.denoiser.train()
    net = build_network(arch.adapter_targets(comps, "attn", False), "lora", 16, 16.0).to(device)
    net.apply_to()
    if compile_how != "off":
        from core.speed import compile_model
        compile_model(comps.denoiser, BLOCKS or arch.compile_blocks, compile_how, compile_mode)
    opt = build_optimizer("AdamW", net.param_groups(1e-4, 0), 1e-4, 0.01, device)
    settings = Settings()

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def step():
        loss = diffusion_loss(arch, comps, latents, cond, meta, settings, torch.bfloat16, autocast)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rate = timed(step, steps, warmup)
    return rate, sum(p.numel() for p in net.parameters())


def bench_diffusers_peft(arch_id, latents, cond, meta, steps, warmup, checkpointing):
    """What diffusers' train_text_to_image_lora(_sdxl).py does per step."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    device = latents.device
    unet = build_unet(arch_id, device, torch.bfloat16)
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
        (ROOT / "architectures" / "configs" / arch_id / "scheduler" / "scheduler_config.json").read_text()))
    added = None
    if arch_id == "sdxl":
        time_ids = torch.tensor([list(o) + list(c) + list(t) for o, c, t in
                                 zip(meta["original_sizes"], meta["crop_coords"], meta["target_sizes"])],
                                device=device, dtype=torch.bfloat16)
        added = {"text_embeds": cond["pooled"], "time_ids": time_ids}

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy.to(torch.bfloat16), t, cond["encoder_hidden_states"], added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad()

    rate = timed(step, steps, warmup)
    return rate, sum(p.numel() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archs", nargs="*", default=list(CASES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--compile", default="off", choices=["off", "regional", "full"],
                    help="compile our side's UNet (the baseline stays eager)")
    ap.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--blocks", default="", help="comma-separated block class names for regional compile")
    args = ap.parse_args()
    global BLOCKS
    BLOCKS = tuple(b for b in args.blocks.split(",") if b)
    if not torch.cuda.is_available():
        sys.exit("bench_step.py needs a CUDA GPU")
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} · torch {torch.__version__} · checkpointing {args.checkpointing}")
    for arch_id in args.archs:
        case = CASES[arch_id]
        latents, cond, meta = make_inputs(arch_id, case["batch"], case["resolution"], device)
        rates = {}
        sides = [("diffusers+peft", bench_diffusers_peft)] if not args.skip_baseline else []
        ours_label = "ours" if args.compile == "off" else f"ours {args.compile} {args.mode or 'default'}"
        sides.append((ours_label, lambda *a: bench_ours(*a, compile_how=args.compile, compile_mode=args.mode)))
        for side, fn in sides:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t_start = time.perf_counter()
            rate, n_params = fn(arch_id, latents, cond, meta, args.steps, args.warmup, args.checkpointing)
            wall = time.perf_counter() - t_start
            peak = torch.cuda.max_memory_allocated() / 2**30
            rates[side] = rate
            print(f"{arch_id:5s} {case['resolution']}px b{case['batch']}  {side:15s} {rate:6.2f} it/s "
                  f"{rate * case['batch']:6.2f} img/s  peak {peak:5.1f} GB  lora params {n_params / 1e6:.2f} M  "
                  f"(wall incl. warm-up/compile {wall:.0f} s)",
                  flush=True)
        if "diffusers+peft" in rates:
            print(f"{arch_id:5s} speed ratio {ours_label} / diffusers+peft: "
                  f"{rates[ours_label] / rates['diffusers+peft']:.2f}x")


if __name__ == "__main__":
    main()
