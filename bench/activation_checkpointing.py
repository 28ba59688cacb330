"""Activation checkpointing (--gradient_checkpointing) on vs off, side by side in one process: the memory the
backward keeps, and the time per step.

    python bench/activation_checkpointing.py [--blocks 4] [--block_steps 10] [--threads N] [train.py flags ...]

Memory: the bytes the forward of one micro-batch leaves for the backward to read. Off: every tensor autograd saves
(counted by a saved-tensors hook, each storage once, the weights left out since they are held anyway). On: what autograd saves outside the checkpointed decoder
blocks, plus each block's input hidden states, which the checkpoint keeps to recompute the block. On a GPU the
peak allocated memory of a training step is printed too. Time: blocks of optimizer steps alternate off/on after a
warm-up block; the median block's wall time per step on each side.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _on_off import compare, timed  # noqa: E402


def set_checkpointing(trainer, on: bool) -> None:
    model = trainer.engine.module
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def saved_bytes(trainer, on: bool) -> int:
    """Bytes the forward of one micro-batch keeps for the backward (see the module docstring)."""
    set_checkpointing(trainer, on)
    storages: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in trainer.engine.module.parameters()}  # held anyway

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    block_inputs = []
    hooks = [block.register_forward_pre_hook(lambda _, args: block_inputs.append(args[0].nbytes))
             for block in trainer.engine.module.model.layers] if on else []
    input_ids = next(trainer.batches)["input_ids"].to(trainer.world.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = trainer.engine(input_ids=input_ids, labels=input_ids).loss
    for hook in hooks:
        hook.remove()
    loss.backward()  # frees the graph (the gradients are dropped below)
    trainer.engine.module.zero_grad(set_to_none=True)
    return sum(storages.values()) + sum(block_inputs)


def seconds_per_step(trainer, steps: int, on: bool) -> tuple[float, float]:
    set_checkpointing(trainer, on)

    def run(steps: int) -> None:
        for _ in range(steps):
            trainer.train_step()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = timed(run, steps)
    if torch.cuda.is_available():
        PEAKS.setdefault(on, []).append(torch.cuda.max_memory_allocated() / 2**30)
    return result


PEAKS: dict[bool, list[float]] = {}


def describe(trainer) -> str:
    off, on = saved_bytes(trainer, False), saved_bytes(trainer, True)
    lines = [f"kept for the backward per micro-batch: off {off / 2**20:.1f} MiB, on {on / 2**20:.1f} MiB "
             f"({on / off:.3f} of off)"]
    if PEAKS:
        lines.append("peak allocated GiB per step: " + ", ".join(
            f"{'on' if on else 'off'} {statistics.median(values):.2f}" for on, values in sorted(PEAKS.items())))
    return "\n".join(lines) + "\n" + f"{len(trainer.engine.module.model.layers)} blocks"


if __name__ == "__main__":
    compare(__doc__.split("\n")[0], "checkpointing", seconds_per_step, describe)
