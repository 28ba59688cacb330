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
