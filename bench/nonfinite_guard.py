"""Training speed with the non-finite guard on vs off, side by side in one process.

    python bench/nonfinite_guard.py [--blocks 6] [--block_steps 20] [--threads N] [train.py flags ...]

on:  the guard as training runs it (training/nonfinite.py): at ZeRO stage 1/2 it reads DeepSpeed's own overflow
     verdict; at stage 0 (`--deepspeed zero0`) it tests the gradients itself (one all-reduce, one host read).
off: no guard at all.
Blocks of steps alternate off/on after one warm-up block, so drift and other load hit both sides. Printed per
side: the median block's wall time and this process's CPU time per step, and on/off for both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moe_models.cli import parse_args  # noqa: E402
from train import build  # noqa: E402


class NoGuard:
    consecutive = 0

    def before_step(self) -> None:
        pass

    def after_step(self) -> bool:
        return False


def seconds_per_step(trainer, steps: int, guard) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per optimizer step over ``steps`` steps."""
    trainer.guard = guard
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        trainer.train_step()
        trainer.check_finite(step)
    return (time.perf_counter() - started) / steps, (time.process_time() - cpu_started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=6, help="measured blocks per side")
    parser.add_argument("--block_steps", type=int, default=20, help="optimizer steps per block")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args, train_flags = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as output_dir:
        cfg = parse_args(["--output_dir", output_dir, "--disable_tqdm", "--max_steps", "100000", *train_flags])
        _, trainer = build(cfg)
        trainer.engine.train()
        guard = trainer.guard
        seconds_per_step(trainer, args.block_steps, guard)  # warm-up
        times = {"off": [], "on": []}
        for _ in range(args.blocks):
            for side in times:
                times[side].append(seconds_per_step(trainer, args.block_steps, guard if side == "on" else NoGuard()))
    zero_stage = trainer.engine.zero_optimization_stage()
    checker = "DeepSpeed checks overflow" if guard.checked_by_deepspeed else "the guard checks"
    print(f"ZeRO stage {zero_stage} ({checker}), {trainer.tokens_per_step} tokens/step, "
          f"{args.blocks} x {args.block_steps} steps per side, "
          f"{torch.get_num_threads()} torch threads")
    medians = {side: [statistics.median(t[i] for t in times[side]) for i in (0, 1)] for side in times}
    for side, (wall, cpu) in medians.items():
        print(f"guard {side:3s}: {1000 * wall:.1f} ms/step wall, {1000 * cpu:.1f} ms/step CPU")
    print(f"on / off: {medians['on'][0] / medians['off'][0]:.3f} wall, {medians['on'][1] / medians['off'][1]:.3f} CPU")


if __name__ == "__main__":
    main()
