#!/usr/bin/env bash
# Several nodes without ssh: run this once on EVERY node, each with its own NODE_RANK (0 = the node
# whose address is MASTER_ADDR). The hostfile (same on all nodes) gives every node's slot count.
#   node 0: launch/multi_node_no_ssh.sh launch/hostfile.example 0 10.0.0.1 --ep_size 8 ...
#   node 1: launch/multi_node_no_ssh.sh launch/hostfile.example 1 10.0.0.1 --ep_size 8 ...
# Extra deepspeed launcher flags go in LAUNCHER_ARGS (e.g. LAUNCHER_ARGS="--launcher openmpi").
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/check_hostfile.sh
source launch/check_hostfile.sh
hostfile=${1:?usage: launch/multi_node_no_ssh.sh HOSTFILE NODE_RANK MASTER_ADDR [train.py flags...]}
node_rank=${2:?NODE_RANK missing}
master_addr=${3:?MASTER_ADDR missing}
shift 3
check_hostfile "$hostfile"
# shellcheck disable=SC2086  # LAUNCHER_ARGS is a list of launcher flags
exec deepspeed ${LAUNCHER_ARGS:-} --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" --master_addr "$master_addr" \
    --master_port "${MASTER_PORT:-29500}" train.py "$@"
