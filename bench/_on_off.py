"""What the on/off benchmarks share (bench/metrics_overhead.py, bench/nonfinite_guard.py): a trainer built from
train.py flags, blocks of steps alternating off/on after one warm-up block (so drift and other load hit both
sides), and the median block of each side in wall time and CPU time per step."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moe_models.run.cli import parse_args  # noqa: E402
from train import build  # noqa: E402


def timed(run_steps: Callable[[int], None], steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per step of ``run_steps(steps)``."""
    started, cpu_started = time.perf_counter(), time.process_time()
    run_steps(steps)
    return (time.perf_counter() - started) / steps, (time.process_time() - cpu_started) / steps


def compare(description: str, feature: str, block: Callable[[object, int, bool], tuple[float, float]],
            describe: Callable[[object], str]) -> None:
    """Parse the benchmark's flags (the rest are train.py's), build the trainer, time ``block(trainer, steps, on)``
    in alternating blocks and print ``describe(trainer)`` and the two sides."""
    parser = argparse.ArgumentParser(description=description)
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
        block(trainer, args.block_steps, True)  # warm-up
        times = {False: [], True: []}
        for _ in range(args.blocks):
            for on in (False, True):
                times[on].append(block(trainer, args.block_steps, on))
    print(f"{describe(trainer)}, {trainer.tokens_per_step} tokens/step, {args.blocks} x {args.block_steps} steps per "
          f"side, {torch.get_num_threads()} torch threads")
    medians = {on: [statistics.median(t[i] for t in times[on]) for i in (0, 1)] for on in times}
    for on, name in ((False, "off"), (True, "on ")):
        wall, cpu = medians[on]
        print(f"{feature} {name}: {1000 * wall:.1f} ms/step wall, {1000 * cpu:.1f} ms/step CPU")
    print(f"on / off: {medians[True][0] / medians[False][0]:.3f} wall, {medians[True][1] / medians[False][1]:.3f} CPU")
