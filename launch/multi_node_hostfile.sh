#!/usr/bin/env bash
# Several nodes from ONE command on the first node: the deepspeed launcher reaches the others over
# passwordless ssh (pdsh) and starts every rank. Every node needs the same code path and environment.
#   launch/multi_node_hostfile.sh launch/hostfile.example --ep_size 8 --num_experts 64 ...
# Extra deepspeed launcher flags go in LAUNCHER_ARGS (e.g. LAUNCHER_ARGS="--launcher openmpi"). Every host must
# answer ssh first (SSH_CONNECT_TIMEOUT seconds each, default 10), unless LAUNCHER_ARGS has --no_ssh_check.
# pdsh's ssh session to a node that stops answering (its link or the node gone) would wait for ever after the ranks
# have given up (--dist_timeout_s): ssh's keep-alive ends it after SSH_ALIVE_INTERVAL x SSH_ALIVE_COUNT seconds
# without an answer (default 10 x 3), so the command returns.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/check_hostfile.sh
source launch/check_hostfile.sh
hostfile=${1:?usage: launch/multi_node_hostfile.sh HOSTFILE [train.py flags...]}
shift
check_hostfile "$hostfile"
case " ${LAUNCHER_ARGS:-} " in
  *" --no_ssh_check "* | *" --no_ssh "*) ;;  # as DeepSpeed's own check, skipped with these flags
  *) check_ssh_hosts "$hostfile" ;;
esac
export PDSH_SSH_ARGS_APPEND="${PDSH_SSH_ARGS_APPEND:-} -o ServerAliveInterval=${SSH_ALIVE_INTERVAL:-10} -o ServerAliveCountMax=${SSH_ALIVE_COUNT:-3}"
master_addr=${MASTER_ADDR:-$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1; exit}')}
# shellcheck disable=SC2086  # LAUNCHER_ARGS is a list of launcher flags
exec deepspeed ${LAUNCHER_ARGS:-} --hostfile "$hostfile" --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}" \
    train.py "$@"
