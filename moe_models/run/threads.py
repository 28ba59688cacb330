"""CPU threads per rank: on a CPU every rank would otherwise start a thread per core, so the ranks of a node (and any
other job) fight over the same cores and a step runs several times slower. Each rank takes its share of the cores
it may run on, less the cores other work keeps busy right now (a short sample of the machine's CPU time, where the
machine is what the process runs on), unless the user chose the threads."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, Optional

import torch

from .distributed import ranks_on_this_node

# Set by the user (or a launcher's core binding, `deepspeed --bind_cores_to_rank`): their choice stands.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cores_available() -> int:
    """The cores this process may run on (its affinity: a container's or numactl's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


SAMPLE_S = 0.2  # how long start-up watches the machine's CPU time
PROC_STAT = Path("/proc/stat")


def busy_cores(cores: int, ranks: int = 1, seconds: float = SAMPLE_S) -> float:
    """Cores' worth of other work on the machine now: its busy CPU time over a ``seconds`` sample of /proc/stat
    (Linux), less this process's own and less this launch's other ranks on the node (starting beside this one, about
    a core each). A sample, not the load average: that is a minute's average, which still counts a job that has just
    ended and does not yet count one that has just started, and the choice is made once. 0 for a share of a larger
    machine (a container's or numactl's cores: the machine's time is spread over cores this process does not use),
    or where there is no /proc/stat."""
    if cores != os.cpu_count() or not PROC_STAT.is_file():
        return 0.0
    total_before, idle_before = _cpu_times()
    mine_before = time.process_time()
    time.sleep(seconds)
    total, idle = _cpu_times()
    total, idle, mine = total - total_before, idle - idle_before, time.process_time() - mine_before
    if total <= 0:
        return 0.0
    busy = (total - idle) / total * cores - mine / seconds
    return max(0.0, busy - (ranks - 1))


def _cpu_times() -> tuple[int, int]:
    """(all, idle) CPU time of the machine since boot, in clock ticks: /proc/stat's first line (idle and iowait are
    idle)."""
    values = [int(v) for v in PROC_STAT.read_text().splitlines()[0].split()[1:9]]
    return sum(values), values[3] + values[4]


def choose_cpu_threads(env: Mapping[str, str] = os.environ, cores: Optional[int] = None,
                       load: Optional[float] = None) -> Optional[str]:
    """On a CPU, set this rank's torch threads to its share of the available cores (cores // ranks on this node,
    at least 1), less the cores that other work keeps busy (``load``: ``busy_cores``; rounded, so that a busy core
    counts from half a core), unless OMP_NUM_THREADS or MKL_NUM_THREADS is set; return
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
    load = busy_cores(cores, ranks) if load is None else load
    share = max(1, cores // ranks)
    busy = min(cores, round(load))  # cores' worth of other work
    threads = min(share, max(1, (cores - busy) // ranks))
    torch.set_num_threads(threads)
    per_node = f"{cores} cores available / {ranks} rank{'s' if ranks > 1 else ''} on this node"
    if threads < share:
        return (f"CPU threads: {threads} per rank, not {share} ({per_node}): the machine is busy, other work keeps "
                f"{load:.1f} cores busy now ({'all' if busy == cores else f'about {busy}'} of its cores), and more "
                f"threads than free cores make every step wait; set OMP_NUM_THREADS={share} to take the share anyway")
    return f"CPU threads: {threads} per rank ({per_node}; set OMP_NUM_THREADS to choose)"
