"""CPU threads per rank: on a CPU every rank would otherwise start a thread per core, so the ranks of a node (and any
other job) fight over the same cores and a step runs several times slower. Each rank takes its share of the cores
it may run on, less the cores other work keeps busy (the load average, where it describes those cores), unless the
user chose the threads."""

from __future__ import annotations

import os
import time
from typing import Mapping, Optional

import torch

from .distributed import ranks_on_this_node

# Set by the user (or a launcher's core binding, `deepspeed --bind_cores_to_rank`): their choice stands.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cores_available() -> int:
    """The cores this process may run on (its affinity: a container's or numactl's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_load(cores: int, ranks: int = 1) -> float:
    """Other work's share of the machine's load average over the last minute (runnable threads), when it describes
    the cores this process may run on: its affinity is the whole machine. This launch's own ranks are left out: each
    has added about its CPU seconds so far / 60 (this process's, ``time.process_time``; start-up is a few seconds of
    imports). 0 for a share of a larger machine (its load is spread over cores this process does not use), or where
    the system keeps no load average."""
    if not hasattr(os, "getloadavg") or cores != os.cpu_count():
        return 0.0
    return max(0.0, os.getloadavg()[0] - ranks * min(1.0, time.process_time() / 60))


def choose_cpu_threads(env: Mapping[str, str] = os.environ, cores: Optional[int] = None,
                       load: Optional[float] = None) -> Optional[str]:
    """On a CPU, set this rank's torch threads to its share of the available cores (cores // ranks on this node,
    at least 1), less the cores that other work keeps busy (``load``, its load average: ``machine_load``; rounded,
    so that a busy core counts from a load of half a core), unless OMP_NUM_THREADS or MKL_NUM_THREADS is set; return
    the start-up line saying what was chosen and why. On a GPU nothing changes (None): the CPU only feeds the device
    there."""
    if torch.cuda.is_available():
        return None
    user_set = next((name for name in THREAD_VARIABLES if env.get(name, "").strip()), None)
    if user_set:
        return (f"CPU threads: {torch.get_num_threads()} per rank ({user_set}={env[user_set]} is set; unset it to "
                "share the cores among the ranks)")
    cores = cores_available() if cores is None else cores
    ranks = ranks_on_this_node(env)
    load = machine_load(cores, ranks) if load is None else load
    share = max(1, cores // ranks)
    busy = min(cores, round(load))  # cores' worth of other work
    threads = min(share, max(1, (cores - busy) // ranks))
    torch.set_num_threads(threads)
    per_node = f"{cores} cores available / {ranks} rank{'s' if ranks > 1 else ''} on this node"
    if threads < share:
        return (f"CPU threads: {threads} per rank, not {share} ({per_node}): the machine is busy, a load average of "
                f"{load:.1f} over the last minute keeps {'all' if busy == cores else f'about {busy}'} of its cores, "
                "and more threads than free cores "
                f"make every step wait; set OMP_NUM_THREADS={share} to take the share anyway")
    return f"CPU threads: {threads} per rank ({per_node}; set OMP_NUM_THREADS to choose)"
