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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _on_off import compare, timed  # noqa: E402

from moe_models.run.distributed import sum_over_ranks  # noqa: E402


def seconds_per_step(trainer, steps: int, metrics_on: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per optimizer step over ``steps`` steps."""
    for layer in trainer.moe_layers.layers:
        layer.routing.enabled = metrics_on
    logging_steps = trainer.cfg.train.logging_steps

    def run(steps: int) -> None:
        lm_loss_sum = trainer.zero()
        for step in range(1, steps + 1):
            lm_loss_sum += trainer.train_step()
            if step % logging_steps == 0:
                if metrics_on:
                    trainer.book.training_row({"lm_loss": lm_loss_sum})
                else:
                    sum_over_ranks({"lm_loss": lm_loss_sum, **trainer.book.sums})
                    trainer.book.sums = trainer.book.zero_sums()
                lm_loss_sum = trainer.zero()

    return timed(run, steps)


def describe(trainer) -> str:
    layer = trainer.moe_layers.layers[0]
    return (f"{len(trainer.moe_layers.layers)} MoE layers, {layer.num_experts} experts, top-{layer.top_k}, logging every "
            f"{trainer.cfg.train.logging_steps} steps")


if __name__ == "__main__":
    compare(__doc__.split("\n")[0], "metrics", seconds_per_step, describe)
