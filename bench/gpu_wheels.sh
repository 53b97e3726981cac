#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its image has torch, accelerate, safetensors and pytest, but not diffusers,
# pydantic or the optimizer and quantization packages), downloaded here into .whl/ at the versions this
# checkout's .venv holds, for Python 3.12 on x86-64 (that machine's).  Run once before a GPU session's first
# call, then carry ".whl": bench/gpu_check.sh installs them into a private folder.  .whl/ is git-ignored
# (.git/info/exclude).  Left out: bitsandbytes (over 60 MB; its nf4 test skips without it) and dadaptation
# (published as source only; DAdaptAdam is imported only when chosen).
set -eu
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PACKAGES=(diffusers transformers peft lycoris-lora pydantic pydantic_core annotated-types typing-inspection
          optimum-quanto prodigyopt schedulefree came-pytorch)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for name in "${PACKAGES[@]}"; do
  version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "gpu_wheels.sh: $name is not installed in .venv (run python3 -m tests once)" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$name==$version"
done
du -sh .whl
