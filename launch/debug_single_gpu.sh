#!/usr/bin/env bash
# One process on one GPU (or the CPU) with the full model: ep_size 1, small batches, frequent logs,
# the same code path as a multi-node run. Run it under a debugger with:
#   python -m pdb train.py --ep_size 1 --per_device_train_batch_size 2 --max_steps 20 --logging_steps 1
set -euo pipefail
cd "$(dirname "$0")/.."
exec python train.py --ep_size 1 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 \
    --max_steps 20 --logging_steps 1 --eval_steps 10 --max_eval_batches 2 \
    --output_dir "${OUTPUT_DIR:-outputs/debug}" --overwrite_output_dir "$@"
