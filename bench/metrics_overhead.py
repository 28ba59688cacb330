"""Training speed with the metrics on vs off, side by side in one process.

    python bench/metrics_overhead.py [--blocks 6] [--block_steps 20] [--threads N] [train.py flags ...]

on:  every MoE layer's routing counters (the gate hook) and, every --logging_steps, the full training
     row (one all-reduce of losses and counters, memory, energy where there is a GPU);
off: no routing counters; every --logging_steps only the loss sums are read (what the loop did
     before these metrics existed).
Blocks of steps alternate off/on after one warm-up block, so drift and other load hit both sides.
Printed per side: the median block's wall time and this process's CPU time per step, and on/off for
both. On a machine shared with other work, wall time swings with their load; with --threads 1 the
CPU time is the steadier measure of the work added (with more threads it also counts threads
spinning while they wait for a core).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _on_off import compare, timed  # noqa: E402

from moe_models.distributed import all_reduce_sum  # noqa: E402


def seconds_per_step(trainer, steps: int, metrics_on: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per optimizer step over ``steps`` steps."""
    for layer in trainer.layers:
        layer.routing.enabled = metrics_on
    logging_steps = trainer.cfg.train.logging_steps
    sums = torch.zeros(3, device=trainer.world.device)

    def run(steps: int) -> None:
        for step in range(1, steps + 1):
            sums.add_(trainer.train_step())
            if step % logging_steps == 0:
                if metrics_on:
                    trainer.training_row(sums, seconds=1.0)
                else:
                    all_reduce_sum(sums.clone()).tolist()
                sums.zero_()

    return timed(run, steps)


def describe(trainer) -> str:
    layer = trainer.layers[0]
    return (f"{len(trainer.layers)} MoE layers, {layer.num_experts} experts, top-{layer.top_k}, logging every "
            f"{trainer.cfg.train.logging_steps} steps")


if __name__ == "__main__":
    compare(__doc__.split("\n")[0], "metrics", seconds_per_step, describe)
