"""Block swapping on a GPU: the same outputs and gradients with and without swapping (with and without gradient
checkpointing), the step time and the peak memory, on a stack of wide transformer-like blocks.

    python bench/bench_block_swap.py          # CUDA
    python bench/bench_block_swap.py --cpu    # the same check, simulated transfers, tiny sizes
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core.block_swap import self_check  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cpu", action="store_true")
args = parser.parse_args()
if args.cpu:
    self_check("cpu", n_blocks=4, swap=3, width=64, tokens=32, steps=1, dtype=torch.float32)
else:
    if not torch.cuda.is_available():
        sys.exit("bench_block_swap.py needs a CUDA GPU (or --cpu)")
    self_check("cuda")
