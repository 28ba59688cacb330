"""Expert parallelism: its rules (ep_size against the experts, the world and ZeRO), checked in one place for every
trainer and the preflight plan, and DeepSpeed's process groups for it, made once before any MoE layer is built.

DeepSpeed's engine would create the expert-parallel and expert-data-parallel groups at ``deepspeed.initialize``; they
are needed earlier, because surgery initialises each expert by its global id, which depends on this rank's place in
its expert-parallel group. Building a layer only reads that place (``expert_parallel_rank``).
"""

from __future__ import annotations

import deepspeed
import torch.distributed as dist
from deepspeed.utils import groups

from ..run.config import MoEConfig
from ..run.distributed import init_world, launched_world_size
from ..run.moe_layout import expert_counts


def parallel_problems(moe: MoEConfig, world_size: int | None = None, zero_stage: int | None = None,
                      planning: bool = False) -> list[str]:
    """What expert parallelism cannot do with these settings: ep_size must divide every layer's expert count and,
    when known, the number of ranks (``planning``: for a --plan, whose world --plan_world_size gives); ZeRO stage 3
    is refused (DeepSpeed's native MoE layer does not take it)."""
    ep, problems = moe.ep_size, []
    if ep < 1:
        return problems  # reported with the other settings (moe/checks.py)
    problems += [f"num_experts ({count}) must be divisible by ep_size ({ep}): pick num_experts as a multiple of {ep} "
                 f"or an ep_size that divides {count}" for count in expert_counts(moe) if count >= 1 and count % ep]
    if world_size is not None and world_size % ep:
        problems.append(f"ep_size ({ep}) must divide the number of ranks ({world_size}): "
                        + (f"pass the ranks the plan is for, such as --plan_world_size {ep}" if planning and
                           world_size == 1 else f"launch with `deepspeed --num_gpus {ep} train.py ...`"
                           if world_size == 1 else f"use an ep_size that divides {world_size}"))
    if zero_stage == 3:
        problems.append("ZeRO stage 3 does not work with DeepSpeed MoE layers (it partitions the expert weights that "
                        "expert parallelism already splits; DeepSpeed refuses its native MoE layer under stage 3); use "
                        "zero2 (optionally with optimizer offload) instead")
    return problems


def group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert-parallel group of ``ep_size`` (what a layer's ``expert_group_name`` is)."""
    return f"ep_size_{ep_size}"


def make_expert_parallel_groups(ep_size: int) -> None:
    """DeepSpeed's expert-parallel and expert-data-parallel groups for ``ep_size``, made once, before surgery. Under a
    launcher, the process group is joined first when no library has made it yet (train.py and MoETrainer make it
    with the run's timeout); without one, ep_size > 1 is refused with how to launch."""
    if ep_size == 1:
        return
    if not deepspeed.comm.is_initialized() and (dist.is_initialized() or launched_world_size() > 1):
        init_world()
    if not dist.is_initialized():
        raise RuntimeError(f"ep_size={ep_size} needs torch.distributed: launch with "
                           f"`deepspeed --num_gpus N train.py ...` where N is a multiple of {ep_size}")
    if group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's place in its expert-parallel group (DeepSpeed's group layout); the groups must exist
    (``make_expert_parallel_groups``)."""
    if ep_size == 1:
        return 0
    if not dist.is_initialized() or group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        raise RuntimeError(f"the expert-parallel groups of ep_size {ep_size} do not exist yet: call "
                           f"moe_models.moe.parallel.make_expert_parallel_groups({ep_size}) (convert_to_moe does) "
                           "before building MoE layers")
    return groups._get_expert_parallel_rank(group_name(ep_size))
