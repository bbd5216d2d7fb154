#!/usr/bin/env bash
# Every GPU measurement the issues ask for, in one device call (the plain recipe runs in the same process as ours):
#   here:   bash bench/gpu_wheels.sh
#   device: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=570)
# Results land in $OUT (train_step.log, text_encoding.log); copy them into bench/RESULTS.md with card and versions.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# klein-4b at 1024 px: recipe, ours at equal work, speed / memory / budget modes, int8 / int4 / fp8, offload, TREAD
timeout 420 python3 bench/train_step.py --gpu --steps 6 2>&1 | tee "$OUT/train_step.log"
# issue 3: Qwen3-4B text encoding, full vs truncated (anchor 90 -> 126 captions/s)
timeout 120 python3 bench/text_encoding.py --real 2>&1 | tee "$OUT/text_encoding.log"
