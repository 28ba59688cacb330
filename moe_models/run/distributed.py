"""The process world: launched by `deepspeed` (env vars set) or a plain `python train.py` (one rank)."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Mapping

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from .library_noise import deepspeed_noise_dropped
from .nodes import master_resolution_error
from .socket_interfaces import interface_warnings
from .startup_waits import announced, rendezvous_error, wait_for_extension_locks

# The ranks of this node, as the launchers announce them: torchrun and accelerate, DeepSpeed's launcher (which sets
# LOCAL_SIZE only).
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")


def ranks_on_this_node(env: Mapping[str, str] = os.environ, default: int = 1) -> int:
    """How many ranks the launcher started on this process's node; ``default`` where no launcher said."""
    return next((int(env[name]) for name in LOCAL_SIZE_VARIABLES if env.get(name)), default)


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    nodes: dict[str, list[int]] = field(default_factory=dict)  # node address -> its ranks, if gathered (run/nodes.py)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """World size announced by a launcher, before any process group exists (1 for `python train.py`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's global rank as the launcher announced it (0 for `python train.py`)."""
    return int(os.environ.get("RANK", "0"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_world(timeout_s: int = 600) -> World:
    """Join (or, for a single process, create) the process group that DeepSpeed uses; no collective of the run
    waits longer than ``timeout_s`` for the other ranks (a RuntimeError that ``is_collective_timeout`` then).

    A plain `python train.py` gets the env a launcher would set for one rank, so that one process
    and `deepspeed train.py` run the same code path.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if not deepspeed.comm.is_initialized():  # also when another library (TrainingArguments) made torch's group
        timeout = timedelta(seconds=timeout_s)
        # torch gives a group made without a timeout of its own (DeepSpeed makes its expert-parallel and
        # expert-data-parallel groups so) its module-wide default, 30 minutes, not the world's: the run's timeout
        # becomes that default too. Written here because neither DeepSpeed nor torch has a setting for it.
        c10d.default_pg_timeout = timeout
        if isinstance(c10d.default_pg_nccl_timeout, timedelta):
            c10d.default_pg_nccl_timeout = timeout
        wait_for_extension_locks(say=lambda line: print(line, flush=True))  # DeepSpeed's JIT build waits silently
        for line in interface_warnings():
            print(line, flush=True)
        unresolved = master_resolution_error()
        if unresolved:
            raise ValueError(unresolved)  # before the rendezvous, which would retry the name until the timeout
        address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        try:
            with announced(f"rank {os.environ['RANK']} waits at {address} for all {os.environ['WORLD_SIZE']} ranks to "
                           f"join the process group (gives up after --dist_timeout_s {timeout_s} s)",
                           say=lambda line: print(line, flush=True)), deepspeed_noise_dropped():
                deepspeed.init_distributed(verbose=False, timeout=timeout)
        except (RuntimeError, dist.DistError) as err:
            if not is_collective_timeout(err) and not isinstance(err, dist.DistStoreError):
                raise
            raise rendezvous_error(err, timeout_s) from None
        _unlink_cpu_allreduce_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (one collective; no-op on one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def sum_over_ranks(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of ``named`` summed over all ranks by one all-reduce, in float64, and brought to the host once
    (what a logging interval reads): the same names, each tensor its own shape, on the CPU."""
    tensors = list(named.values())
    if not tensors:
        return {}
    flat = all_reduce_sum(torch.cat([t.detach().double().reshape(-1) for t in tensors])).cpu()
    parts = flat.split([t.numel() for t in tensors])
    return {name: part.view(t.shape) for (name, t), part in zip(named.items(), parts)}


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of a tensor over all ranks (one collective; no-op on one rank)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def is_collective_timeout(err: BaseException) -> bool:
    """Whether a collective gave up waiting for the other ranks (gloo and NCCL say "timed out" / "timeout")."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


@contextmanager
def main_process_first(world: World, timeout_s: int = 6 * 3600):
    """Rank 0 runs the block first (filling the datasets cache), the other ranks then read the cache. They wait on a
    group of their own whose timeout (default 6 h) allows for tokenizing a large corpus."""
    group = dist.new_group(timeout=timedelta(seconds=timeout_s)) if world.world_size > 1 else None
    if not world.is_main:
        with announced(f"rank {world.rank} waits for rank 0 to prepare the data (tokenize and pack, then cache)",
                       say=lambda line: print(line, flush=True)):
            dist.barrier(group=group)
    yield
    if world.is_main and world.world_size > 1:
        dist.barrier(group=group)


def _unlink_cpu_allreduce_buffer() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer once every rank has mapped it.

    On the CPU accelerator with all ranks on one machine, ``init_distributed`` makes a 66 MB file per rank in
    /dev/shm and maps every rank's file; DeepSpeed never removes them (its PR #4115 notes they stay until
    reboot), so each launch would leave them behind and fill /dev/shm, which is RAM. Written here because
    DeepSpeed has no cleanup to call. After the barrier every rank holds its mappings, which outlive the name.
    """
    world = os.environ.get("WORLD_SIZE")
    if os.environ.get("LOCAL_SIZE") != world or not deepspeed.get_accelerator().device_name() == "cpu":
        return  # DeepSpeed makes the buffers only for all-local CPU worlds: the same answer on every rank
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)
