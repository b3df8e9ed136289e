#!/usr/bin/env bash
# Full-scale runs on a multi-GPU box.
#   scripts/run_full.sh gpu   [ddp|fsdp|deepspeed_zero3]   # Qwen 1.5B -> 0.5B, full data
#   scripts/run_full.sh paper [fsdp|deepspeed_zero3]       # Llama-2 13B -> 7B from the hub
# Every stage is cached under $FIRST_HOME; re-running resumes what an interruption left.
# Precision: --precision / $FIRST_PRECISION (default auto: bf16 on GPUs that support it). The
# library passes it to accelerate itself, so the configs' `mixed_precision` is not what decides.
set -euo pipefail
profile=${1:-gpu}
launcher=${2:-ddp}
cd "$(dirname "$0")/.."
for setting in csqa boolq ood; do
  .venv/bin/first run --profile "$profile" --setting "$setting" --dry-run
  .venv/bin/accelerate launch --config_file "scripts/accelerate/${launcher}.yaml" \
    -m first_lib.cli run --profile "$profile" --setting "$setting" --out "runs/$profile/$setting"
done
