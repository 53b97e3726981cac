"""Block swapping on a GPU: the same outputs and gradients with and without swapping (with and without gradient
checkpointing), the step time and the peak memory, on a stack of wide transformer-like blocks; then a full
fine-tune of the stack (fp32 weights, Adafactor stepping inside backward) with its trained blocks swapped, whose
weights must equal those trained without swapping.

    python bench/bench_block_swap.py          # CUDA
    python bench/bench_block_swap.py --cpu    # the same check, simulated transfers, tiny sizes
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from core.block_swap import swap_blocks_of  # noqa: E402


class MLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Model(nn.Module):
    def __init__(self, n_blocks: int, width: int):
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(n_blocks))
        self.gc = False

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        for b in self.blocks:
            x = checkpoint(b, x, use_reentrant=False) if self.gc else b(x)
        return x


def self_check(device: str = "cuda", n_blocks: int = 8, swap: int = 6, width: int = 2048, tokens: int = 1024,
               steps: int = 3, dtype: torch.dtype = torch.bfloat16) -> None:
    """Same outputs / LoRA gradients with and without swapping, with and without gradient checkpointing, plus
    step time and peak memory."""
    import time

    from core.adapters.lora import LoRAModule

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    model = Model(n_blocks, width).to(dtype).requires_grad_(False)
    adapters = nn.ModuleList()
    for i, b in enumerate(model.blocks):
        for layer in (b.fc1, b.fc2):
            a = LoRAModule(f"b{i}", layer, rank=16, alpha=16)
            nn.init.normal_(a.lora_up.weight, std=0.01)
            a.apply_to()
            adapters.append(a)
    adapters.to(dev)
    x = torch.randn(2, tokens, width, device=dev, dtype=dtype)

    def run():
        times, out, grads = [], None, None
        for _ in range(steps):
            for p in adapters.parameters():
                p.grad = None
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(x)
            out.float().square().mean().backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            grads = [p.grad.clone() for p in adapters.parameters()]
        return out.detach().float(), grads, min(times)

    def peak():
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")

    for gc in (False, True):
        model.gc = gc
        model.to(dev)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ref_out, ref_grads, ref_t = run()
        ref_peak = peak()
        model.to("cpu")
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        swapper = swap_blocks_of(model, ("blocks",), swap, dev)
        out, grads, t = run()
        sw_peak = peak()
        moved, pool = swapper.bytes_swapped, swapper.resident_bytes
        swapper.detach()
        d_out = (out - ref_out).abs().max().item()
        d_grad = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item() for g, r in zip(grads, ref_grads))
        print(f"gc={gc}: max |out diff| {d_out:.3g}, max rel grad diff {d_grad:.3g}; step {ref_t * 1e3:.1f} ms -> "
              f"{t * 1e3:.1f} ms swapping {swap}/{n_blocks} blocks ({moved / 2**20:.0f} MiB off the device, "
              f"pool {pool / 2**20:.0f} MiB); peak {ref_peak:.0f} -> {sw_peak:.0f} MiB")
        # the same kernels on the same bytes: expected to be exactly 0; the margin only allows for
        # nondeterministic kernels
        assert d_out <= 1e-3 * ref_out.abs().max().item() and d_grad <= 1e-3, "swapping changed the results"


def full_finetune_check(device: str = "cuda", n_blocks: int = 8, swap: int = 6, width: int = 2048,
                        tokens: int = 1024, steps: int = 3) -> None:
    """A full fine-tune of the stack (fp32 weights under bf16 autocast on CUDA, Adafactor stepping each weight
    inside backward): the trained blocks swapped give the same weights as training without swapping."""
    import time

    from core.optim import build_fused_backward_optimizer

    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def train(n_swap: int):
        torch.manual_seed(0)
        model = Model(n_blocks, width)
        model.gc = True
        swapper = None
        if n_swap:
            swapper = swap_blocks_of(model, ("blocks",), n_swap, dev, trainable=True)
        else:
            model.to(dev)
        opt = build_fused_backward_optimizer("Adafactor", [{"params": list(model.parameters()), "lr": 1e-3}], 1e-3,
                                             0.0, dev, warmup_steps=0, relative_step=False, kwargs={})
        if swapper is not None:
            opt.after_step = swapper.param_updated
        gen = torch.Generator(device="cpu").manual_seed(1)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            x = torch.randn(2, tokens, width, generator=gen).to(dev)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(dev.type, torch.bfloat16, enabled=cuda):
                out = model(x)
            out.float().square().mean().backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
        params = list(model.parameters())
        values = swapper.live(params) if swapper is not None else params
        weights = [v.detach().float().cpu().clone() for v in values]
        if swapper is not None:
            swapper.detach(to="cpu")
        return weights, min(times), peak

    ref, ref_t, ref_peak = train(0)
    got, t, peak = train(swap)
    d = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item() for g, r in zip(got, ref))
    print(f"full fine-tune: max rel weight diff {d:.3g} after {steps} steps; step {ref_t * 1e3:.1f} ms -> "
          f"{t * 1e3:.1f} ms swapping {swap}/{n_blocks} trained blocks; peak {ref_peak:.0f} -> {peak:.0f} MiB")
    assert d <= 1e-3, "swapping trained blocks changed the weights (a write-back is missing or late)"



parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cpu", action="store_true")
args = parser.parse_args()
if args.cpu:
    self_check("cpu", n_blocks=4, swap=3, width=64, tokens=32, steps=1, dtype=torch.float32)
    full_finetune_check("cpu", n_blocks=4, swap=3, width=64, tokens=32, steps=3)
else:
    if not torch.cuda.is_available():
        sys.exit("bench_block_swap.py needs a CUDA GPU (or --cpu)")
    self_check("cuda")
    full_finetune_check("cuda")
