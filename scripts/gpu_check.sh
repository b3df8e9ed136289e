#!/usr/bin/env bash
# One short GPU check, for a machine with a CUDA GPU and an image that already holds torch,
# transformers, peft and accelerate (no downloads; the real models do not travel, so the bench
# uses randomly initialised models of the real Qwen2.5-Coder 0.5B/1.5B architectures).
#
#   bash scripts/gpu_check.sh OUT_DIR [BENCH_TIMEOUT_S]
#
# Writes OUT_DIR/info.json (first info), OUT_DIR/results-gpu.json (first bench --device cuda:
# matmul peak per precision, mfu, the ratios and their targets) and OUT_DIR/log.txt.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [BENCH_TIMEOUT_S]}
limit=${2:-420}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export FIRST_HOME=${FIRST_HOME:-/tmp/first-home} HF_HUB_OFFLINE=1
py=${PYTHON:-python3}
{
  echo "== versions"
  $py -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, torch.cuda.get_device_name(0))"
  echo "== first info"
  $py -m first_lib.cli info --json > "$out/info.json" && cat "$out/info.json"
  echo "== first bench --device cuda (limit ${limit}s)"
  timeout "$limit" $py -m first_lib.cli bench --device cuda --json "$out/results-gpu.json"
  echo "bench exit $?"
} 2>&1 | tee "$out/log.txt"
