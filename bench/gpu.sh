#!/usr/bin/env bash
# One GPU run, at most 5 minutes on one H100/H200: every measurement in one process (bench/gpu_run.py), each
# beside the plain recipe (bench/anchor_gpu.py) and the planner's prediction.
#   here, first:  bash bench/gpu_wheels.sh     (.whl/: every wheel needed beyond a bare CUDA torch install)
#   device:       run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=330)
#   CI:           bash bench/gpu.sh --dry-run  (CPU, reduced sizes, with only torch's and the carried
#                                               distributions on the path: proves the script and the wheel list)
# Results land in $OUT: gpu_run.jsonl (one JSON line per row), gpu_run.md (the table for bench/RESULTS.md),
# gpu.txt (card, driver, versions), gpu_run.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--dry-run" ]; then
  # as on the GPU machine, only torch's distributions and the carried wheels can be imported
  PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" bench/bare_env.py bench/gpu_requirements.txt \
    bench/gpu_run.py --dry-run 2>&1 | tee "$OUT/gpu_run.log"
  exit "${PIPESTATUS[0]}"
fi
start=$SECONDS
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed: run bash bench/gpu_wheels.sh here and carry .whl" >&2; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv \
  | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"
# 5 minutes in all: rows start only while they can finish inside the budget; the hard limit keeps the table
left=$((290 - (SECONDS - start)))
timeout "$left" "$PYTHON" bench/gpu_run.py --budget-s $((left - 25)) 2>&1 | tee "$OUT/gpu_run.log"
echo "gpu.sh: $((SECONDS - start)) s"
