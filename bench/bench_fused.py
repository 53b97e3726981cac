"""Adapters trained on fused layers (q, k, v → qkv) versus the unfused LoRA path, side by side.

A FLUX.1-shaped transformer (width 3072: 24 heads × 128, random weights; ``--double`` / ``--single`` blocks)
trains one step at a time on the memory-probe inputs of its family.  Sides, all on the same layers (the
``attn`` preset: every q, k, v, output projection and, in FLUX.1's single blocks, linear1 = q, k, v + MLP-in):

* ``peft-lora``: plain diffusers + peft, LoRA rank r on each diffusers layer (q, k, v apart);
* ``ours-lora``: this project's LoRA, rank r on each original layer (qkv and linear1 trained whole);
* ``ours-lokr``: this project's LoKr on the same original layers.

Prints per side: seconds per step (mean of ``--steps`` after one warm-up), trainable parameters, the bytes
autograd saves for the backward pass (both devices) and, on CUDA, the peak allocated memory.

    python bench/bench_fused.py                       # CUDA if present, else CPU (bf16 on CUDA, fp32 on CPU)
    python bench/bench_fused.py --double 1 --single 2 --resolution 256 --steps 3
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(double: int, single: int, device, dtype):
    import architectures
    from architectures.base import Components
    arch = architectures.get("flux1_dev")
    config = dict(arch.build_denoiser_on_meta().config)
    config.update(num_layers=double, num_single_layers=single)
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_config(config).to(device, dtype).requires_grad_(False)
    return arch, Components(model, None, [], [], None)


def covered_paths(model, targets) -> list[str]:
    """The diffusers layers the targets act on (a fused target's parts one by one)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for t in targets for layer in getattr(t.module, "parts", [t.module])]


def saved_bytes_of(step) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass of ``step()``."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        except RuntimeError:
            pass
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def run_side(name, arch, comps, params, inputs, steps, device) -> dict:
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        pred = arch.predict(comps, *inputs)
        pred.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    saved = saved_bytes_of(step)  # also the warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out = {"side": name, "s_per_step": (time.perf_counter() - start) / steps, "saved_mb": saved / 2**20,
           "params": sum(p.numel() for p in params)}
    if device.type == "cuda":
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    from core.adapters import AdapterOptions, build_network
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    arch, comps = build(args.double, args.single, device, dtype)
    inputs = (*arch.probe_inputs(comps.denoiser, args.resolution, 1, dtype, device), {})[:4]
    targets = arch.adapter_targets(comps, "attn", False)
    results = []

    for name, algo in (("ours-lora", "lora"), ("ours-lokr", "lokr")):
        net = build_network(targets, algo, args.rank, args.rank, 0.0, AdapterOptions(factor=16)).to(device)
        net.apply_to()
        results.append(run_side(name, arch, comps, list(net.parameters()), inputs, args.steps, device))
        net.restore()

    from peft import LoraConfig
    model = comps.denoiser
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=covered_paths(model, targets)))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    results.insert(0, run_side("peft-lora", arch, comps, params, inputs, args.steps, device))

    print(f"FLUX.1 shape, {args.double} double + {args.single} single blocks, {args.resolution} px, rank "
          f"{args.rank}, {device.type} {dtype}")
    base = results[0]["s_per_step"]
    for r in results:
        peak = f", peak {r['peak_mb']:.0f} MB" if "peak_mb" in r else ""
        print(f"  {r['side']:10s} {r['s_per_step']:.3f} s/step ({r['s_per_step'] / base:.2f}x), "
              f"{r['params'] / 1e6:.2f} M trainable, saved for backward {r['saved_mb']:.0f} MB{peak}")
    return results


if __name__ == "__main__":
    main()
