#!/usr/bin/env bash
# Run HERE (where pip reaches the package index) before a GPU session: downloads into .whl/ (git-ignored) every
# wheel bench/gpu.sh needs beyond a bare CUDA torch install (bench/gpu_requirements.txt, the pinned closure), for
# the device's CPython 3.12 on x86-64 Linux. They travel with `carry=[".whl"]` (64 MiB in all with the tree).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d .whl -r bench/gpu_requirements.txt
count=$(ls .whl/*.whl | wc -l)
wanted=$(grep -cv '^\s*#' bench/gpu_requirements.txt)
[ "$count" -eq "$wanted" ] || { echo "gpu_wheels: $count wheels for $wanted requirements" >&2; exit 1; }
du -sh .whl
