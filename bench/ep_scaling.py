"""EP=1 vs EP=2 training-step time on the same ranks, side by side in one run (the all-to-all cost).

    python bench/ep_scaling.py [--ranks 2] [--rounds 5] [--steps 10] [train.py flags...]

Starts the deepspeed launcher with --ranks processes (CPU ranks when there is no GPU). Every rank
builds the run twice, exactly as train.py does, once with --ep_size 1 and once with --ep_size RANKS,
then alternates timed blocks of --steps optimizer steps between the two for --rounds rounds (after a
warm-up block each), so both see the same machine state. Rank 0 prints the median step time of each
and the ratio. Extra flags go to both runs (e.g. --num_experts 16 --block_size 256).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_known_args()


def launch(args: argparse.Namespace, train_flags: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), __file__, "--worker",
               "--ranks", str(args.ranks), "--rounds", str(args.rounds), "--steps", str(args.steps), *train_flags]
    return subprocess.call(command, cwd=REPO, env=env)


def worker(args: argparse.Namespace, train_flags: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    from moe_models.run.cli import parse_args
    from train import build

    total_steps = (args.rounds + 1) * args.steps
    trainers = {}
    with tempfile.TemporaryDirectory() as scratch:
        for ep in sorted({1, args.ranks}):
            cfg = parse_args(["--max_steps", str(total_steps), "--disable_tqdm", *train_flags, "--ep_size", str(ep),
                              "--output_dir", f"{scratch}/ep{ep}"])
            world, trainers[ep] = build(cfg)
        seconds = {ep: [] for ep in trainers}
        for round_index in range(args.rounds + 1):  # round 0 warms up
            for ep, trainer in trainers.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    [value.item() for value in trainer.train_step().values()]  # wait for the device
                if round_index:
                    seconds[ep].append((time.perf_counter() - started) / args.steps)
    if world.is_main:
        report(seconds, trainers[1], world.world_size, args)


def report(seconds: dict, trainer, world_size: int, args: argparse.Namespace) -> None:
    import deepspeed
    import torch

    cfg = trainer.cfg
    tokens = trainer.tokens_per_step
    base = statistics.median(seconds[1])
    print(f"\nEP scaling: {world_size} ranks on {trainer.world.device.type}, torch {torch.__version__}, deepspeed "
          f"{deepspeed.__version__}; model {cfg.model.model_config or 'tiny-llama'}, {cfg.moe.num_experts} experts, "
          f"top-{cfg.moe.top_k}, {tokens} tokens/step; median of {args.rounds} x {args.steps} steps")
    print(f"{'ep_size':>8} {'s/step':>9} {'tokens/s':>10} {'vs ep=1':>8}")
    for ep, samples in seconds.items():
        median = statistics.median(samples)
        print(f"{ep:>8} {median:>9.4f} {tokens / median:>10.0f} {median / base:>7.2f}x")


if __name__ == "__main__":
    parsed, rest = parse()
    if parsed.worker:
        worker(parsed, rest)
    else:
        sys.exit(launch(parsed, rest))
