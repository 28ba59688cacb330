"""Checkpoints users can trust: complete-or-absent saves, exact resume, another world size. The folder's layout, its
tags, `latest`, completeness and retention belong to run/checkpoint_folder.py; this module writes and reads a tag's
contents through the DeepSpeed engine."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from ..data.batches import TrainBatches
from ..data.stream_batches import StreamBatches
from ..run.checkpoint_folder import CheckpointError, CheckpointFolder
from ..run.config import MoEConfig
from ..run.distributed import World, all_reduce_sum
from ..run.folder import RunFolder
from ..run.writes import is_write_failure, write_failure_text


@dataclass
class TrainState:
    """Progress that a checkpoint restores: optimizer steps taken and tokens read (over all ranks)."""

    step: int = 0
    tokens_seen: int = 0


def save(engine: deepspeed.DeepSpeedEngine, folder: CheckpointFolder, state: TrainState,
         batches: TrainBatches | StreamBatches,
         world: World, moe: MoEConfig, save_total_limit: int | None, extra_client_state: dict | None = None) -> Path:
    """Save on every rank; the tag becomes `latest` only after all ranks have written all their files.

    A write that fails on any rank (a full disk, a quota, a file system gone) fails the save on every rank: the
    partial tag folder is removed, `latest` keeps naming the previous complete tag, and a CheckpointError says so.
    """
    tag_dir = folder.tag_dir(state.step)
    client_state = {"step": state.step, "tokens_seen": state.tokens_seen, "data": batches.state_dict(),
                    **(extra_client_state or {})}
    failure = None
    try:
        engine.save_checkpoint(str(folder.path), tag=tag_dir.name, client_state=client_state, save_latest=False)
        torch.save(_rng_state(), folder.rng_file(tag_dir, world.rank))
        folder.data_position_file(tag_dir, world.rank).write_text(json.dumps(batches.state_dict()) + "\n")
    except Exception as err:  # torch.save reports a refused write as a RuntimeError of its zip writer
        if not is_write_failure(err):
            raise
        failure = write_failure_text(err)
    failed_ranks = int(all_reduce_sum(torch.tensor([float(failure is not None)], device=world.device)).item())
    if failed_ranks:  # every rank's files are settled (written or failed): the tag can go
        if world.is_main and tag_dir != folder.latest():
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist.barrier()
        raise CheckpointError(
            f"saving checkpoint {tag_dir} failed on {failed_ranks} of {world.world_size} ranks (rank {world.rank}: "
            f"{failure or 'its files were written'}). Nothing was lost: the partial folder is removed and "
            f"{folder.latest() or 'no earlier checkpoint'} is still the latest complete checkpoint. Free space or fix "
            "the file system, then relaunch with --resume_from_checkpoint latest.")
    dist.barrier()  # every rank's files are on disk
    if world.is_main:
        folder.mark_complete(tag_dir, {"step": state.step, **_layout(world, moe)})
        if save_total_limit:
            folder.prune(keep=save_total_limit)
    dist.barrier()  # nobody reads `latest` or starts the next save before it is in place
    return tag_dir


def load(engine: deepspeed.DeepSpeedEngine, tag_dir: Path, batches: TrainBatches | StreamBatches, world: World,
         moe: MoEConfig, reset_optimizer: bool) -> tuple[TrainState, dict]:
    """Restore weights, optimizer, LR schedule, data position and RNGs; returns the state and the client state.

    At another world or ep size, or with the other --moe_impl, weights load by global expert id; the optimizer
    state (sharded and ordered by the old layout) is refused unless `reset_optimizer`, which keeps the weights and
    the LR schedule.
    """
    folder = CheckpointFolder(tag_dir.parent)
    meta = folder.check_complete(tag_dir)
    problem = optimizer_layout_problem(tag_dir, meta, world.world_size, moe.ep_size, moe.moe_impl, reset_optimizer)
    if problem:
        raise CheckpointError(problem)
    same_ranks = meta["world_size"] == world.world_size
    try:
        _, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                 load_optimizer_states=not reset_optimizer,
                                                 load_lr_scheduler_states=True)
    except Exception as err:  # torch / DeepSpeed raise many kinds for a truncated or corrupt file
        unreadable = _unreadable_file(tag_dir)
        if unreadable is None:  # every file reads: they hold another model's tensors
            raise CheckpointError(
                f"cannot load {tag_dir} into this model ({_first_line(err)}); it was saved by a run with another "
                f"model or MoE shape: resume with that run's settings ({RunFolder.of_tag(tag_dir).record_path}) "
                "or start a new run without --resume_from_checkpoint") from err
        raise CheckpointError(f"cannot load {unreadable}: {_first_line(err)}; {folder.previous_good(tag_dir)}") \
            from err
    if reset_optimizer:
        if engine.optimizer is not None and hasattr(engine.optimizer, "refresh_fp32_params"):
            engine.optimizer.refresh_fp32_params()  # ZeRO keeps fp32 master weights: take them from the loaded module
        apply_schedule(engine)
    try:
        batches.resume(partial(_data_position, tag_dir, client_state["data"]), meta["world_size"])
    except ValueError as err:  # a position of the other kind (--streaming or not), or one that does not fit
        raise CheckpointError(f"{tag_dir}: {err}") from err
    if same_ranks:
        _set_rng_state(torch.load(CheckpointFolder.rng_file(tag_dir, world.rank), weights_only=False))
    return TrainState(step=client_state["step"], tokens_seen=client_state["tokens_seen"]), client_state


def dense_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights in a checkpoint of a run without MoE layers (all of them are in one file)."""
    return torch.load(CheckpointFolder.model_states(tag_dir), map_location="cpu", weights_only=False)["module"]


def load_position(engine: deepspeed.DeepSpeedEngine, tag_dir: Path, batches: TrainBatches | StreamBatches,
                  world: World) -> TrainState:
    """Take over another run's place from its checkpoint, not its weights or optimizer state: the step and tokens
    seen, the LR schedule, the data position and the RNGs, so that this run (another model: an upcycled one)
    continues the same schedule on the same batches."""
    meta = CheckpointFolder(tag_dir.parent).check_complete(tag_dir)
    saved = torch.load(CheckpointFolder.model_states(tag_dir), map_location="cpu", weights_only=False)
    if engine.lr_scheduler is not None and saved.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        apply_schedule(engine)
    engine.global_steps, engine.global_samples = saved["global_steps"], saved["global_samples"]
    try:
        batches.resume(partial(_data_position, tag_dir, saved["data"]), meta["world_size"])
    except ValueError as err:
        raise CheckpointError(f"{tag_dir}: {err}") from err
    if meta["world_size"] == world.world_size:
        _set_rng_state(torch.load(CheckpointFolder.rng_file(tag_dir, world.rank), weights_only=False))
    return TrainState(step=saved["step"], tokens_seen=saved["tokens_seen"])


def apply_schedule(engine: deepspeed.DeepSpeedEngine) -> None:
    """Give a fresh optimizer the learning rate its loaded schedule is at. A DeepSpeed schedule's load_state_dict
    sets only its position; the rate reaches the optimizer's param groups in step(), and a fresh optimizer holds
    the rate of the schedule's start (0 in the warm-up), so the first step after the load would apply that. Stepping
    the schedule to the position it already has applies its rate without moving it."""
    scheduler = engine.lr_scheduler
    if scheduler is not None:
        scheduler.step(scheduler.last_batch_iteration)


def optimizer_layout_problem(tag_dir: Path, meta: dict, world_size: int, ep_size: int, moe_impl: str,
                             reset_optimizer: bool) -> str | None:
    """Why the optimizer state of the checkpoint (its complete.json ``meta``) cannot be loaded at this layout: it is
    sharded and ordered by the world size, ep_size and moe_impl it was saved with (None: it can, or
    --reset_optimizer leaves it out)."""
    saved, layout = _saved_layout(meta), {"world_size": world_size, "ep_size": ep_size, "moe_impl": moe_impl}
    if saved == layout or reset_optimizer:
        return None
    return (f"{tag_dir} was saved with {_describe(saved)}, this run has {_describe(layout)}: the weights can be "
            "loaded by global expert id, but the optimizer state is sharded and ordered by the old layout (the "
            "grouped path holds SwiGLU experts stacked). Pass --reset_optimizer to load the weights and start a "
            "fresh optimizer state (the LR schedule continues).")


def _saved_layout(meta: dict) -> dict:
    # Checkpoints from before moe_impl was recorded hold every expert's parameters apart, in the stock order.
    return {"moe_impl": "deepspeed", **{key: meta[key] for key in ("world_size", "ep_size", "moe_impl") if key in meta}}


def _layout(world: World, moe: MoEConfig) -> dict:
    """What decides how the optimizer state is cut and ordered: the ranks, expert parallelism, the expert path."""
    return {"world_size": world.world_size, "ep_size": moe.ep_size, "moe_impl": moe.moe_impl}


def _describe(layout: dict) -> str:
    return f"{layout['world_size']} ranks, ep_size {layout['ep_size']} and --moe_impl {layout['moe_impl']}"


def _first_line(err: BaseException, limit: int = 300) -> str:
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return line if len(line) <= limit else line[:limit] + "..."


def _unreadable_file(tag_dir: Path) -> Path | None:
    """The first file of the tag that torch cannot read (only looked for after a load failed)."""
    for path in CheckpointFolder.torch_files(tag_dir):
        try:
            torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            return path
    return None


def _data_position(tag_dir: Path, rank0_position: dict, saved_rank: int) -> dict:
    """Where the saving rank ``saved_rank``'s next batch started. Checkpoints from before the per-rank files hold
    rank 0's in the client state, which was every rank's then."""
    path = CheckpointFolder.data_position_file(tag_dir, saved_rank)
    return json.loads(path.read_text()) if path.is_file() else rank0_position


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
