"""Training speed with the non-finite guard on vs off, side by side in one process.

    python bench/nonfinite_guard.py [--blocks 6] [--block_steps 20] [--threads N] [train.py flags ...]

on:  the guard as training runs it (training/nonfinite.py): at ZeRO stage 1/2 it reads DeepSpeed's own overflow
     verdict; at stage 0 (`--deepspeed zero0`) it tests the gradients itself (one all-reduce, one host read).
off: no guard at all.
Blocks of steps alternate off/on after one warm-up block, so drift and other load hit both sides. Printed per
side: the median block's wall time and this process's CPU time per step, and on/off for both.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _on_off import compare, timed  # noqa: E402
from moe_models.training.nonfinite import FiniteStepOptimizer  # noqa: E402  (_on_off put the repository first)


class NoGuard:
    consecutive = total = 0
    exhausted = False

    def record(self, skipped: bool) -> None:
        pass


GUARDS: dict = {}  # the trainer's own guard and its engine's (guarded) optimizer, kept while they are off


def seconds_per_step(trainer, steps: int, guard_on: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per optimizer step over ``steps`` steps."""
    guard, optimizer = GUARDS.setdefault("real", (trainer.book.guard, trainer.engine.optimizer))
    trainer.book.guard = guard if guard_on else NoGuard()
    unguarded = optimizer.optimizer if isinstance(optimizer, FiniteStepOptimizer) else optimizer
    trainer.engine.optimizer = optimizer if guard_on else unguarded

    def run(steps: int) -> None:
        for _ in range(steps):
            trainer.train_step()  # the guard counts (and would end the run) inside

    return timed(run, steps)


def describe(trainer) -> str:
    guarded = isinstance(GUARDS["real"][1], FiniteStepOptimizer)
    checker = "the guard checks" if guarded else "DeepSpeed checks overflow"
    return f"ZeRO stage {trainer.engine.zero_optimization_stage()} ({checker})"


if __name__ == "__main__":
    compare(__doc__.split("\n")[0], "guard", seconds_per_step, describe)
