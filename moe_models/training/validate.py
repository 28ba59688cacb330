"""Every setting checked before anything heavy starts: each part's own checks and the training section's,
gathered into one ConfigError that lists every problem; and, once the process group exists, that every rank
was given the same settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.distributed as dist

from ..data.prepare import cache_problems
from ..data.text import data_problems
from ..metrics.sinks import log_problems
from ..models.discovery import checkpoint_expert_count
from ..models.source import local_config, model_problems
from ..moe.checks import moe_problems
from ..moe.parallel import parallel_problems
from ..run.config import ROUTING_FLAGS, ConfigError, MoEConfig, RunConfig, TrainConfig
from ..run.config_values import empty_strings, too_small, with_source
from ..run.folder import RunFolder
from ..run.writes import writable_problem
from .clusters import plan_problems
from .compile import compile_problems
from .ds_config import build_deepspeed_config, deepspeed_config_problems, training_dtype
from .resumable import (check_not_finished, check_resumable, check_upcycle_source, resumed_record_path,
                        resumed_settings)


def validate(cfg: RunConfig, world_size: int = 1) -> dict:
    """Raise one ConfigError listing every problem in ``cfg``; ``world_size`` is the number of ranks the launcher
    started (1 for ``python train.py``). Then the checkpoints to resume or to upcycle, if any (a CheckpointError naming
    it), and the routing settings a resume takes from its run's record with the flags (a ConfigError naming where they
    came from). Returns the run's DeepSpeed config, its "auto" values filled from the flags (a ConfigError when it
    disagrees with them). Last, FinishedRun when the checkpoint to resume is at --max_steps."""
    problems = empty_strings(cfg)
    if problems:  # an empty path would be read as the current folder below
        raise ConfigError(problems)
    moe = checked_moe(cfg)
    problems = (moe_problems(moe) + parallel_problems(moe, world_size, planning=cfg.train.plan)
                + model_problems(cfg.model, cfg.data.block_size) + data_problems(cfg.data) + train_problems(cfg.train)
                + log_problems(cfg.log) + deepspeed_config_problems(cfg.train.deepspeed) + write_problems(cfg))
    if problems:
        raise ConfigError(problems)
    check_resumable(cfg, world_size)
    check_upcycle_source(cfg)
    resumed, _ = resumed_settings(cfg)
    problems = resumed_problems(cfg, resumed, world_size)
    if problems:
        raise ConfigError(problems)
    moe = checked_moe(resumed)
    ds_config = build_deepspeed_config(dataclasses.replace(resumed, moe=moe), world_size)  # its checks see the same
    problems = compile_problems(resumed, training_dtype(ds_config))  # the dtype is the DeepSpeed config's
    if problems:
        raise ConfigError(problems)
    check_not_finished(cfg)
    return ds_config


def checked_moe(cfg: RunConfig) -> MoEConfig:
    """The MoE settings the checks see: those of the flags, with an MoE checkpoint's own expert count when the model
    is one (continued in place: its experts come from the folder, not from --num_experts)."""
    config, _ = local_config(cfg.model)
    count = checkpoint_expert_count(config) if config and cfg.model.model_name_or_path else None
    return dataclasses.replace(cfg.moe, num_experts=count) if count else cfg.moe


def resumed_problems(cfg: RunConfig, resumed: RunConfig, world_size: int) -> list[str]:
    """What the routing settings a resume took from its run's record (``resumed``, from resumed_settings) do not go
    with, each problem saying that the setting is the resumed run's, from its run_config.json, and not a flag (the
    flags' own problems were refused before)."""
    inherited = {name: getattr(resumed.moe, name) for name in ROUTING_FLAGS
                 if getattr(resumed.moe, name) != getattr(cfg.moe, name)}
    if not inherited:
        return []

    def problems(settings: RunConfig) -> list[str]:
        moe = checked_moe(settings)
        return moe_problems(moe) + parallel_problems(moe, world_size, planning=settings.train.plan)

    whose = f"the resumed run's setting, from {resumed_record_path(cfg)}"
    own = problems(cfg)
    return [with_source(problem, inherited, whose) for problem in problems(resumed) if problem not in own]


def check_same_settings(cfg: RunConfig) -> None:
    """Once the process group exists: every rank must have been given the same settings. Raise a ConfigError
    naming the ranks that differ from rank 0 and in which flags."""
    settings = [None] * dist.get_world_size()
    dist.all_gather_object(settings, _flat(cfg.to_dict()))
    problems = []
    for rank, theirs in enumerate(settings[1:], start=1):
        differing = sorted(name for name in theirs.keys() | settings[0].keys()
                           if theirs.get(name) != settings[0].get(name))
        if differing:
            shown = ", ".join(f"--{name} {theirs.get(name)!r} (rank 0: {settings[0].get(name)!r})"
                              for name in differing[:3])
            problems.append(f"rank {rank} was given other settings than rank 0: {shown}"
                            + (f" and {len(differing) - 3} more" if len(differing) > 3 else ""))
    if problems:
        raise ConfigError(problems + ["every rank must get the same flags: start all ranks with one launcher "
                                      "command (on several nodes, the same command and files on each node)"])


def _flat(settings: dict) -> dict:
    """{"moe": {"top_k": 2}} -> {"top_k": 2}: flag names are unique across sections."""
    return {name: value for section in settings.values() for name, value in section.items()}


def write_problems(cfg: RunConfig) -> list[str]:
    """Every folder the run writes must be writable before anything is built (checked by writing a file there)."""
    problem = None if Path(cfg.train.output_dir).is_file() else writable_problem(Path(cfg.train.output_dir),
                                                                                  "--output_dir")
    return ([problem] if problem else []) + cache_problems(cfg.data)


def train_problems(train: TrainConfig) -> list[str]:
    problems = too_small(train, ("per_device_train_batch_size", "per_device_eval_batch_size",
                                 "gradient_accumulation_steps", "max_steps", "logging_steps"))
    problems += too_small(train, ("eval_steps", "save_steps", "max_eval_batches", "save_total_limit",
                                  "max_nonfinite_steps"), minimum=0)
    problems += too_small(train, ("dist_timeout_s",))
    resume = train.resume_from_checkpoint
    upcycle = train.upcycle_from_checkpoint
    if upcycle and not Path(upcycle).is_dir():
        problems.append(f"upcycle_from_checkpoint {upcycle!r} does not exist; give a dense run's checkpoint tag folder "
                        "(OUT/checkpoints/global_stepN) or checkpoints folder")
    if resume and resume != "latest" and not Path(resume).is_dir():
        problems.append(f"resume_from_checkpoint {resume!r} does not exist; give 'latest', a checkpoints folder or "
                        "a tag folder")
    if train.warmup_steps < 1:
        problems.append(f"warmup_steps ({train.warmup_steps}) must be >= 1 (DeepSpeed's WarmupCosineLR needs at "
                        "least one warmup step); use 1 for the shortest warmup")
    if train.learning_rate <= 0:
        problems.append(f"learning_rate ({train.learning_rate}) must be > 0")
    if train.device_memory_gb is not None and train.device_memory_gb <= 0:
        problems.append(f"device_memory_gb ({train.device_memory_gb}) must be > 0")
    if train.plan_world_size is not None and not train.plan:
        problems.append(f"plan_world_size ({train.plan_world_size}) is only used by --plan: add --plan, or drop "
                        "--plan_world_size and launch the ranks")
    elif train.plan_world_size is not None and train.plan_world_size < 1:
        problems.append(f"plan_world_size ({train.plan_world_size}) must be >= 1")
    problems += plan_problems(train)
    if train.max_grad_norm < 0:
        problems.append(f"max_grad_norm ({train.max_grad_norm}) must be >= 0")
    if not 0 <= train.min_lr_ratio <= 1:
        problems.append(f"min_lr_ratio ({train.min_lr_ratio}) must be in [0, 1]")
    output = Path(train.output_dir)
    if output.is_file():
        problems.append(f"output_dir {train.output_dir!r} is a file; give a folder")
    elif RunFolder(output).holds_run() and not (train.overwrite_output_dir or resume or train.plan):
        problems.append(f"output_dir {train.output_dir!r} already holds a run; pass --resume_from_checkpoint latest "
                        "to continue it, --overwrite_output_dir to start over in it, or choose another --output_dir")
    return problems
