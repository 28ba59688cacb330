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

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moe_models.cli import parse_args  # noqa: E402
from moe_models.distributed import all_reduce_sum  # noqa: E402
from train import build  # noqa: E402


def seconds_per_step(trainer, steps: int, metrics_on: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per optimizer step over ``steps`` steps."""
    for layer in trainer.layers:
        layer.routing.enabled = metrics_on
    logging_steps = trainer.cfg.train.logging_steps
    sums = torch.zeros(3, device=trainer.world.device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        sums += trainer.train_step()
        if step % logging_steps == 0:
            if metrics_on:
                trainer.training_row(sums, seconds=1.0)
            else:
                all_reduce_sum(sums.clone()).tolist()
            sums.zero_()
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
        seconds_per_step(trainer, args.block_steps, metrics_on=True)  # warm-up
        times = {False: [], True: []}
        for _ in range(args.blocks):
            for metrics_on in (False, True):
                times[metrics_on].append(seconds_per_step(trainer, args.block_steps, metrics_on))
    print(f"{len(trainer.layers)} MoE layers, {trainer.layers[0].num_experts} experts, top-{trainer.layers[0].top_k}, "
          f"{trainer.tokens_per_step} tokens/step, logging every {cfg.train.logging_steps} steps, "
          f"{args.blocks} x {args.block_steps} steps per side, {torch.get_num_threads()} torch threads")
    medians = {side: [statistics.median(t[i] for t in times[side]) for i in (0, 1)] for side in times}
    for side, name in ((False, "off"), (True, "on ")):
        wall, cpu = medians[side]
        print(f"metrics {name}: {1000 * wall:.1f} ms/step wall, {1000 * cpu:.1f} ms/step CPU")
    print(f"on / off: {medians[True][0] / medians[False][0]:.3f} wall, {medians[True][1] / medians[False][1]:.3f} CPU")


if __name__ == "__main__":
    main()
