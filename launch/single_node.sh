#!/usr/bin/env bash
# One node, all its GPUs (or CPU ranks): expert parallelism inside data parallelism.
#   launch/single_node.sh 8 --ep_size 4 --num_experts 16 --train_file corpus.jsonl
# The first argument is the number of ranks; the rest go to train.py unchanged.
# On a machine without GPUs, DeepSpeed's CPU accelerator starts that many CPU ranks (gloo).
# Extra deepspeed launcher flags go in LAUNCHER_ARGS (e.g. LAUNCHER_ARGS="--launcher openmpi").
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:?usage: launch/single_node.sh NUM_RANKS [train.py flags...]}
shift
# shellcheck disable=SC2086  # LAUNCHER_ARGS is a list of launcher flags
exec deepspeed ${LAUNCHER_ARGS:-} --num_gpus "$ranks" --master_port "${MASTER_PORT:-29500}" train.py "$@"
