#!/usr/bin/env bash
# Sourced by the launch scripts: refuse a hostfile that DeepSpeed's runner would reject with a traceback.
# Every line that is not blank or a comment must read "HOSTNAME slots=N".
check_hostfile() {
  local hostfile=$1 line number=0
  if [ ! -f "$hostfile" ]; then
    echo "error: hostfile $hostfile does not exist; give a file with one 'HOSTNAME slots=N' line per node" >&2
    exit 1
  fi
  while IFS= read -r line || [ -n "$line" ]; do
    number=$((number + 1))
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    if ! [[ $line =~ ^[[:space:]]*[^[:space:]#]+[[:space:]]+slots=[1-9][0-9]*[[:space:]]*$ ]]; then
      echo "error: $hostfile line $number ('$line') is not 'HOSTNAME slots=N': give each node its number of" \
           "GPUs, e.g. 'node-1 slots=8' (see launch/hostfile.example)" >&2
      exit 1
    fi
  done < "$hostfile"
}

# Sourced by launch/multi_node_hostfile.sh: every host of the hostfile must answer ssh from this node (without a
# password, as pdsh will log in), all asked at once, each within SSH_CONNECT_TIMEOUT seconds (default 10); one line
# per host that does not, then exit 1. DeepSpeed's own check asks the first host only, and pdsh would otherwise
# leave the other nodes' ranks waiting for the missing one until --dist_timeout_s.
check_ssh_hosts() {
  local hostfile=$1 folder i failed=0 reason
  local -a hosts pids
  mapfile -t hosts < <(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1}')
  folder=$(mktemp -d)
  for i in "${!hosts[@]}"; do
    ssh -o BatchMode=yes -o ConnectTimeout="${SSH_CONNECT_TIMEOUT:-10}" "${hosts[$i]}" true </dev/null \
        >/dev/null 2>"$folder/$i" &
    pids[i]=$!
  done
  for i in "${!hosts[@]}"; do
    if ! wait "${pids[$i]}"; then
      reason=$(tr -d '\r' <"$folder/$i" | grep -v '^\s*$' | tail -n 1)
      echo "error: host ${hosts[$i]} in $hostfile does not answer ssh from $(hostname) (${reason:-no message})." \
           "Check that it is up and reachable, runs sshd, and takes this node's key without a password;" \
           "or remove it from the hostfile" >&2
      failed=1
    fi
  done
  rm -rf "$folder"
  if [ "$failed" -ne 0 ]; then
    exit 1
  fi
}
