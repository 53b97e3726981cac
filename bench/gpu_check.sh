#!/usr/bin/env bash
# The one check a session with a GPU runs first: the CUDA-only tests, the training-step bench of every family
# against plain diffusers + peft, the block-swap self-check and the memory-tier table, each part under its own
# time limit (a part that hangs or fails is reported and the others still run), ending with one Markdown block
# to paste into bench/README.md.  About 11 minutes on one H100.
#
#   bash bench/gpu_check.sh                      # everything, on the GPU
#   bash bench/gpu_check.sh --parts step,swap    # some parts: gpu tests step (with step-graphs) swap tiers
#   bash bench/gpu_check.sh --out "$OUT"         # also keep each part's log there
#   bash bench/gpu_check.sh --cpu [--config-dir DIR]   # the same pipeline on the CPU paths (tests run this)
#
# --config-dir DIR (with --cpu): DIR/<family>/ holds a diffusers-layout config folder per family to bench (tiny
# models); without it the CPU parts build full-size SD1.5 at 256 px (minutes).
# Python: .venv/bin/python when the project's environment exists, else python3 with the wheels of .whl/
# installed into a private folder first (bench/gpu_wheels.sh: the GPU machine lacks diffusers and pydantic).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

MODE=gpu OUT_DIR="" CONFIGS="" PARTS="gpu,tests,step,swap,tiers"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --out) OUT_DIR="$2"; shift ;;
    --config-dir) CONFIGS="$2"; shift ;;
    --parts) PARTS="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT_DIR="${OUT_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$OUT_DIR"
PY=python3
if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
elif compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
    .whl/*.whl || { echo "gpu_check.sh: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/gpu_check_site
fi
export PYTHONUNBUFFERED=1

SUMMARY=()
wanted() { [[ ",$PARTS," == *",$1,"* ]]; }
# part NAME SECONDS COMMAND...: run it under its limit, show its output, note how it ended
part() {
  local name=$1 limit=$2 t0=$SECONDS rc status
  shift 2
  echo "### $name: $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  cat "$OUT_DIR/$name.log"
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  SUMMARY+=("| $name | $status | $((SECONDS - t0)) s |")
  echo
}

if [ "$MODE" = gpu ]; then
  STEP_FAMILIES=(sd15 sdxl sd35_medium flux1_dev flux2_klein_4b)
  wanted gpu && part gpu 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # the tests that do more (or only run) where CUDA exists: host syncs under sync-debug mode, pinned batches,
  # quantized kernels, hardware detection, block swapping's transfers, the step captured in CUDA graphs
  wanted tests && part tests 240 "$PY" -m pytest -q -p no:cacheprovider --timeout=230 tests/test_hardware.py \
    tests/test_host_syncs.py tests/test_prefetch.py tests/test_quantize.py tests/test_block_swap.py \
    tests/test_cuda_graph.py
  wanted step && part step 300 "$PY" bench/bench_step.py "${STEP_FAMILIES[@]}" --steps 8 --warmup 3
  # our UNet step replayed from a CUDA graph
  wanted step && part step-graphs 150 "$PY" bench/bench_step.py sd15 sdxl --steps 8 --warmup 3 --cuda-graphs \
    --skip-baseline
  wanted swap && part swap 90 "$PY" bench/bench_block_swap.py
  wanted tiers && part tiers 240 "$PY" bench/bench_tiers.py sd15 sdxl sd35_medium flux1_dev flux2_klein_4b \
    --steps 3 --warmup 1 --timeout 110 --markdown
else
  wanted gpu && part gpu 30 "$PY" -c "from core.hardware import detect_hardware as d; p = d(); \
print(f'CPU {p.cpu_name}, bf16 instructions {\"yes\" if p.cpu_bf16 else \"no\"}, no CUDA GPU')"
  wanted tests && part tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_prefetch.py
  if [ -n "$CONFIGS" ]; then
    families=()
    for dir in "$CONFIGS"/*/; do families+=("$(basename "$dir")"); done
    if wanted step; then
      for fam in "${families[@]}"; do
        part "step-$fam" 180 "$PY" bench/bench_step.py "$fam" --cpu --config-dir "$CONFIGS/$fam" --resolution 64 \
          --batch 1 --steps 1 --warmup 1 --threads 1
      done
    fi
    wanted swap && part swap 120 "$PY" bench/bench_block_swap.py --cpu
    wanted tiers && part tiers 180 "$PY" bench/bench_tiers.py "${families[0]}" --cpu --resolution 64 --steps 1 \
      --warmup 1 --config-dir "$CONFIGS/${families[0]}" --markdown --timeout 170
  else
    wanted step && part step 900 "$PY" bench/bench_step.py sd15 --cpu --resolution 256 --batch 1 --steps 1 --warmup 1
    wanted swap && part swap 120 "$PY" bench/bench_block_swap.py --cpu
    wanted tiers && part tiers 900 "$PY" bench/bench_tiers.py sd15 --cpu --resolution 256 --steps 1 --warmup 1 \
      --markdown
  fi
fi

echo "## gpu_check ($MODE), $(date -u +%Y-%m-%d), logs in $OUT_DIR"
echo
echo "| part | result | time |"
echo "|---|---|---|"
printf '%s\n' "${SUMMARY[@]}"
for line in "${SUMMARY[@]}"; do
  [[ "$line" == *"| ok |"* ]] || exit 1
done
