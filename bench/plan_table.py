"""The plan this project chooses per (family, GPU memory tier), from the estimate alone: no GPU needed.

    python bench/plan_table.py                 # LoRA rank 16, batch 1, native resolutions
    python bench/plan_table.py --tiers 8 16

Prints a markdown table: per tier, the plan's savings and its VRAM estimate (GB).  bench_tiers.py measures
whether these plans really fit on a GPU."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_tiers import FAMILIES  # noqa: E402


def profile_for(vram_gb: float, ram_gb: float = 64.0):
    """An Ampere (< 24 GB) or Ada (24 GB) card of that size with ``ram_gb`` of system memory."""
    from core.hardware import GpuInfo, HardwareProfile
    cc = (8, 9) if vram_gb >= 24 else (8, 6)
    gpu = GpuInfo.from_capability(0, f"{vram_gb:g} GB GPU", vram_gb, vram_gb, cc)
    return HardwareProfile(gpus=[gpu], cpu_cores=16, cpu_name="CPU", ram_total_gb=ram_gb,
                           ram_available_gb=ram_gb - 4, torch_version="", cuda_version="12.8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("archs", nargs="*", default=list(FAMILIES))
    ap.add_argument("--tiers", nargs="*", type=float, default=[4, 6, 8, 12, 16, 24])
    ap.add_argument("--ram", type=float, default=64.0)
    args = ap.parse_args()
    import architectures
    from core.plan import make_plan
    from core.settings import Settings
    print("| family | px | " + " | ".join(f"{t:g} GB" for t in args.tiers) + " |")
    print("|---|---|" + "---|" * len(args.tiers))
    for arch_id in args.archs:
        s = Settings()
        s.model.architecture = arch_id
        s.dataset.resolution = FAMILIES.get(arch_id, 1024)
        s.network.rank, s.network.alpha = 16, 16.0
        arch = architectures.get(arch_id)
        cells = []
        for tier in args.tiers:
            plan = make_plan(profile_for(tier, args.ram), s, arch)
            savings = plan.brief().split(", ")[2:]  # past precision and attention
            text = ", ".join(savings) or "nothing needed"
            est = plan.estimate.total_gb if plan.estimate is not None else float("nan")
            cells.append(f"{text} ({est:.1f})" if plan.fits else f"does not fit ({est:.1f})")
        print(f"| {arch_id} | {s.dataset.resolution} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
