"""CPU threads per rank: on a CPU every rank would otherwise start a thread per core, so the ranks of a node (and any
other job) fight over the same cores and a step runs several times slower. Each rank takes its share of the cores
it may run on, unless the user chose the threads."""

from __future__ import annotations

import os
from typing import Mapping, Optional

import torch

from .distributed import ranks_on_this_node

# Set by the user (or a launcher's core binding, `deepspeed --bind_cores_to_rank`): their choice stands.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cores_available() -> int:
    """The cores this process may run on (its affinity: a container's or numactl's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_cpu_threads(env: Mapping[str, str] = os.environ, cores: Optional[int] = None) -> Optional[str]:
    """On a CPU, set this rank's torch threads to its share of the available cores (cores // ranks on this node,
    at least 1), unless OMP_NUM_THREADS or MKL_NUM_THREADS is set; return the start-up line saying what was
    chosen and why. On a GPU nothing changes (None): the CPU only feeds the device there."""
    if torch.cuda.is_available():
        return None
    user_set = next((name for name in THREAD_VARIABLES if env.get(name, "").strip()), None)
    if user_set:
        return (f"CPU threads: {torch.get_num_threads()} per rank ({user_set}={env[user_set]} is set; unset it to "
                "share the cores among the ranks)")
    cores = cores_available() if cores is None else cores
    ranks = ranks_on_this_node(env)
    threads = max(1, cores // ranks)
    torch.set_num_threads(threads)
    return (f"CPU threads: {threads} per rank ({cores} cores available / {ranks} rank{'s' if ranks > 1 else ''} on "
            "this node; set OMP_NUM_THREADS to choose)")
