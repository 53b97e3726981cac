"""Memory tiers: does each family train within 4, 6, 8 … 24 GB, with the plan this project chooses?

For every (family, tier) a fresh child process builds the family's denoiser at full size with random weights
(from the configs shipped in architectures/configs, no download), caps the GPU at the tier — counting the
CUDA context, so a 6 GB tier means 6 GB as nvidia-smi would show it — lets ``core.plan.make_plan`` choose for
that budget, prepares the denoiser exactly as the trainer does (quantized base, adapters, block swapping,
checkpointing, attention kernel) and runs LoRA rank-16 steps at batch 1 on random latents and text
embeddings at the family's native resolution.  Text encoders and the VAE are not loaded: in a real run their
outputs are cached first and they leave the GPU, so they do not count against the training step.

    python bench/bench_tiers.py                          # every family at its target tier (the quick check)
    python bench/bench_tiers.py --all-tiers              # every family × tiers 4 6 8 10 12 16 24 and uncapped
    python bench/bench_tiers.py flux1_dev --tiers 8 12 --resolution 512 --steps 6
    python bench/bench_tiers.py sd15 --cpu --steps 2     # the CPU-only plan and its s/it
    python bench/bench_tiers.py --markdown               # also print the table for bench/README.md

Prints one line per (family, tier): fits or not, peak allocated / reserved GB, s/it, the estimate and the
plan chosen.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: family → native training resolution (the issue's targets)
FAMILIES = {"sd15": 512, "sdxl": 1024, "sd35_medium": 1024, "sd35_large": 1024, "flux1_dev": 1024,
            "flux2_klein_4b": 1024, "flux2_klein_9b": 1024, "flux2_dev": 1024}
TIERS = (4, 6, 8, 10, 12, 16, 24, 0)  # 0: the whole GPU
#: issue 6's targets: the tier each family must train in (LoRA r16, batch 1, native resolution)
TARGETS = [("sd15", 512, 4), ("sdxl", 1024, 6), ("sd35_medium", 1024, 6), ("sd35_large", 1024, 12),
           ("flux1_dev", 1024, 8), ("flux1_dev", 512, 6), ("flux2_klein_4b", 1024, 6), ("flux2_klein_9b", 1024, 8),
           ("flux2_dev", 1024, 24)]
GIB = 2 ** 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("archs", nargs="*", default=list(FAMILIES))
    ap.add_argument("--tiers", nargs="*", type=float, default=None,
                    help="GB; 0 = uncapped (default: each family's target tier)")
    ap.add_argument("--all-tiers", action="store_true", help=f"tiers {' '.join(f'{t:g}' for t in TIERS)} (0: uncapped)")
    ap.add_argument("--resolution", type=int, default=0, help="0: the family's native resolution")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu", action="store_true", help="plan and time a CPU-only run (no tiers)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per (family, tier)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--config-dir", default="", help="a diffusers-layout config folder instead of the shipped "
                                                     "full-size one (the CPU check runs a tiny model's)")
    ap.add_argument("--child", nargs=3, metavar=("ARCH", "TIER", "RESOLUTION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        arch_id, tier, resolution = args.child
        print("RESULT " + json.dumps(run_one(arch_id, float(tier), int(resolution), args.steps, args.warmup,
                                             args.cpu, Path(args.config_dir) if args.config_dir else None)),
              flush=True)
        return

    rows = []
    if args.cpu or args.tiers is not None or args.all_tiers:
        tiers = [0.0] if args.cpu else args.tiers if args.tiers is not None else list(TIERS)
        runs = [(a, args.resolution or FAMILIES.get(a, 1024), float(t)) for a in args.archs for t in tiers]
    else:  # the targets, for the families asked for
        runs = [(a, args.resolution or r, float(t)) for a, r, t in TARGETS if a in args.archs]
    for arch_id, resolution, tier in runs:
        cmd = [sys.executable, __file__, "--child", arch_id, str(tier), str(resolution),
               "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--cpu"] if args.cpu else []) + \
            (["--config-dir", args.config_dir] if args.config_dir else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {
                "arch": arch_id, "tier_gb": tier, "resolution": resolution, "fits": False,
                "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        except subprocess.TimeoutExpired:
            row = {"arch": arch_id, "tier_gb": tier, "resolution": resolution, "fits": False,
                   "error": f"timed out after {args.timeout:.0f} s"}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(format_row(row), flush=True)
    if args.markdown:
        print()
        print(markdown_table(rows))


def format_row(r: dict) -> str:
    tier = "CPU" if r.get("device") == "cpu" else (f"{r['tier_gb']:g} GB" if r["tier_gb"] else "uncapped")
    head = f"{r['arch']:15s} {r['resolution']:5d}px {tier:>9s}  "
    if r.get("error") and not r.get("fits"):
        return head + f"DOES NOT FIT / FAILED: {r['error']}  (plan: {r.get('plan', '?')})"
    return (head + f"fits  peak {r['peak_allocated_gb']:.2f} GB alloc / {r['peak_reserved_gb']:.2f} GB reserved  "
            f"{r['s_per_it']:.2f} s/it  estimate {r['estimate_gb']:.2f} GB  plan: {r['plan']}")


def markdown_table(rows: list[dict]) -> str:
    out = ["| family | px | tier | fits | peak alloc / reserved GB | s/it | estimate GB | plan |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tier = "CPU" if r.get("device") == "cpu" else (f"{r['tier_gb']:g} GB" if r["tier_gb"] else "whole GPU")
        if r.get("fits"):
            out.append(f"| {r['arch']} | {r['resolution']} | {tier} | yes | {r['peak_allocated_gb']:.2f} / "
                       f"{r['peak_reserved_gb']:.2f} | {r['s_per_it']:.2f} | {r['estimate_gb']:.2f} | {r['plan']} |")
        else:
            out.append(f"| {r['arch']} | {r['resolution']} | {tier} | no | – | – | {r.get('estimate_gb', '–')} | "
                       f"{r.get('plan', '')} ({r.get('error', '')}) |")
    return "\n".join(out)


# -- one (family, tier), in its own process ------------------------------------------------------------------
def cap_gpu(tier_gb: float) -> float:
    """Cap this process's CUDA allocations so that context + allocations stay within ``tier_gb``.  Returns the
    CUDA context's size (GB), measured as the device memory in use right after initialising it."""
    import torch
    torch.cuda.init()
    torch.empty(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    context_gb = (total - free) / GIB
    if tier_gb > 0:
        torch.cuda.set_per_process_memory_fraction(max(0.01, (tier_gb - context_gb) * GIB / total))
    return context_gb


def random_components(arch, dtype, config_dir=None, device="cpu"):
    """The family's full-size denoiser with random weights (small normal values, so activations stay finite)
    and its noise scheduler, from the shipped configs; no text encoders or VAE (their outputs are random).
    Built in CPU memory (the plan's setup moves it), or on ``device`` directly (the step bench: drawing 12 B
    random weights takes minutes on a CPU, a second on a GPU)."""
    import json

    import diffusers
    import torch

    from architectures.base import Components
    # cast on the meta device first: materialising fp32 would need twice the RAM (FLUX.2 dev: 128 GB)
    denoiser = torch.nn.Module.to(arch.build_denoiser_on_meta(config_dir), dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in list(denoiser.named_parameters()) + list(denoiser.named_buffers()):
            if p.is_floating_point():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02, generator=g)
                elif "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
    sched_dir = Path(config_dir or arch.config_dir()) / "scheduler"
    config = json.loads((sched_dir / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    return Components(denoiser=denoiser, vae=None, text_encoders=[], tokenizers=[], noise_scheduler=scheduler,
                      scheduler_config=config)


def random_inputs(arch, denoiser, resolution: int, device, dtype):
    """Random clean latents and text conditioning of the shapes the family trains on (``probe_inputs``)."""
    import torch
    noisy, _, cond, batch = arch.probe_inputs(denoiser, resolution, 1, dtype, device="cpu")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(noisy.shape, generator=g).to(device)
    cond = {k: (torch.randn(v.shape, generator=g).to(device, v.dtype) if v.is_floating_point() else v.to(device))
            for k, v in cond.items()}
    return latents, cond, batch


def run_one(arch_id: str, tier_gb: float, resolution: int, steps: int, warmup: int, cpu: bool,
            config_dir=None) -> dict:
    """One (family, tier) in this process.  ``config_dir``: another diffusers-layout config folder than the
    shipped full-size one (the tests run a tiny model through the same code)."""
    import torch

    import architectures
    from core.hardware import detect_hardware
    from core.plan import make_plan
    from core.settings import Settings
    from core.memory_setup import DenoiserSetup, setup_denoiser
    from core.trainer import diffusion_loss

    row = {"arch": arch_id, "tier_gb": tier_gb, "resolution": resolution, "device": "cpu" if cpu else "cuda"}
    if not cpu and not torch.cuda.is_available():
        return {**row, "fits": False, "error": "no CUDA GPU (use --cpu for the CPU-only plan)"}
    context_gb = 0.0 if cpu else cap_gpu(tier_gb)
    row["context_gb"] = round(context_gb, 2)
    profile = detect_hardware()
    if cpu:
        profile.gpus = []
    arch = architectures.get(arch_id)
    s = Settings()
    s.model.architecture = arch_id
    s.dataset.resolution = resolution
    s.network.rank, s.network.alpha = 16, 16.0
    s.schedule.train_batch_size = 1
    if tier_gb > 0:
        s.memory.vram_budget_gb = tier_gb
    plan = make_plan(profile, s, arch, config_dir)
    row["plan"] = plan.brief()
    row["estimate_gb"] = round(plan.estimate.total_gb, 2)
    try:
        device = torch.device("cpu" if cpu else "cuda")
        components = random_components(arch, plan.weight_dtype, config_dir)
        arch.configure_objective(components, s)
        setup: DenoiserSetup = setup_denoiser(arch, components, s, plan, device, log=lambda m: None)
        latents, cond, batch = random_inputs(arch, components.denoiser, resolution, device, plan.weight_dtype)
        from core.optim import build_optimizer
        opt = build_optimizer(setup.optimizer_type, setup.network.param_groups(1e-4, 0), 1e-4, 0.01, device)

        def autocast():
            if plan.mixed_precision == "no":
                import contextlib
                return contextlib.nullcontext()
            return torch.autocast(device.type, dtype=plan.weight_dtype)

        def step():
            with setup.step_context():
                loss = diffusion_loss(arch, components, latents, cond, batch, s, plan.weight_dtype, autocast)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        row["s_per_it"] = (time.perf_counter() - t0) / steps
        if device.type == "cuda":
            # as nvidia-smi would count it: the allocator's peak plus the CUDA context
            row["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GIB + context_gb
            row["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GIB + context_gb
        else:
            # the process's resident memory after the steps (libraries and the Python heap included)
            from core.hardware import current_memory_use
            row["peak_allocated_gb"] = row["peak_reserved_gb"] = current_memory_use().get("ram_gb") or 0.0
        row["fits"] = True
    except torch.OutOfMemoryError as e:
        row.update(fits=False, error="out of memory: " + str(e).splitlines()[0][:160])
    return row


if __name__ == "__main__":
    main()
