"""The plan this project chooses per (family, GPU memory tier), from the estimate alone: no GPU needed.

    python bench/plan_table.py                 # LoRA rank 16, batch 1, native resolutions
    python bench/plan_table.py --tiers 8 16
    python bench/plan_table.py --cpu --ram 64   # CPU-only machines, with and without bf16 instructions

Prints a markdown table: per tier, the plan's savings and its VRAM estimate (GB).  bench_tiers.py measures
whether these plans really fit on a GPU."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_tiers import FAMILIES  # noqa: E402


def profile_for(vram_gb: float, ram_gb: float = 64.0, cpu_bf16: bool = False):
    """An Ampere (< 24 GB) or Ada (24 GB) card of that size with ``ram_gb`` of system memory; ``vram_gb`` 0: no
    GPU, a CPU with (``cpu_bf16``) or without bf16 instructions (AVX512-BF16 / AMX)."""
    from core.hardware import GpuInfo, HardwareProfile
    cc = (8, 9) if vram_gb >= 24 else (8, 6)
    gpus = [GpuInfo.from_capability(0, f"{vram_gb:g} GB GPU", vram_gb, vram_gb, cc)] if vram_gb else []
    return HardwareProfile(gpus=gpus, cpu_cores=16, cpu_name="CPU", ram_total_gb=ram_gb,
                           ram_available_gb=ram_gb - 4, torch_version="", cuda_version="12.8" if gpus else None,
                           cpu_bf16=cpu_bf16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("archs", nargs="*", default=list(FAMILIES))
    ap.add_argument("--tiers", nargs="*", type=float, default=[4, 6, 8, 12, 16, 24])
    ap.add_argument("--ram", type=float, default=64.0)
    ap.add_argument("--cpu", action="store_true", help="CPU-only machines (without / with bf16) instead of GPU tiers")
    args = ap.parse_args()
    import architectures
    from core.plan import make_plan
    from core.settings import Settings
    machines = ([("CPU", profile_for(0, args.ram)), ("CPU with bf16", profile_for(0, args.ram, cpu_bf16=True))]
                if args.cpu else [(f"{t:g} GB", profile_for(t, args.ram)) for t in args.tiers])
    print("| family | px | " + " | ".join(name for name, _ in machines) + " |")
    print("|---|---|" + "---|" * len(machines))
    for arch_id in args.archs:
        s = Settings()
        s.model.architecture = arch_id
        s.dataset.resolution = FAMILIES.get(arch_id, 1024)
        s.network.rank, s.network.alpha = 16, 16.0
        arch = architectures.get(arch_id)
        cells = []
        for _, profile in machines:
            plan = make_plan(profile, s, arch)
            brief = plan.brief().split(", ")
            # past precision and attention; on the CPU the precision is what differs between the machines
            savings = brief[:1] + brief[2:] if args.cpu else brief[2:]
            text = ", ".join(savings) or "nothing needed"
            est = plan.estimate.total_gb if plan.estimate is not None else float("nan")
            cells.append(f"{text} ({est:.1f})" if plan.fits else f"does not fit ({est:.1f})")
        print(f"| {arch_id} | {s.dataset.resolution} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
