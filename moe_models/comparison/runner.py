"""Running the payoff's runs one after the other, each as its own train.py process.

A process per run, not the runs in this process: each then is exactly a train.py run (its own process group, its
memory returned at the end), and under the `deepspeed` launcher every rank starts the same run at the same time with
the launcher's environment, which the child inherits. A run whose latest checkpoint is its last step is finished
and kept; any other continues from its own latest checkpoint (or starts), so a rerun of the interrupted command
resumes where it stopped.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ..run.folder import RunFolder
from .runs import OWN_CHECKPOINT, PayoffGrid, PayoffRun


class RunFailed(RuntimeError):
    def __init__(self, run: PayoffRun, code: int):
        self.code = code
        super().__init__(f"run {run.name} exited with status {code} (its output is above); fix the cause and rerun "
                         "the same command: finished runs are kept and the others resume")


def is_finished(run_dir: Path, max_steps: int) -> bool:
    checkpoints = RunFolder(run_dir).checkpoints
    latest = checkpoints.latest()
    return latest is not None and checkpoints.step_of(latest) >= max_steps


def run_all(grid: PayoffGrid, train_argv: list[str], is_main: bool) -> None:
    """Train every run of every cell of ``grid`` that is not finished, in order; RunFailed when one fails. After each
    run: the time it took and the time left at the pace so far (seconds per optimizer step)."""
    total, done, trained, seconds = grid.runs, 0, 0, 0.0
    for cell in grid.cells:
        for run in cell.runs:
            done += 1
            run_dir = cell.run_dir(run.name)
            if is_finished(run_dir, cell.max_steps):
                if is_main:
                    print(f"payoff: {run_dir} ({run.label}) finished earlier; kept", flush=True)
                continue
            if is_main:
                print(f"payoff: run {done}/{total}: {run_dir} ({run.label})", flush=True)
            start = OWN_CHECKPOINT if RunFolder(run_dir).checkpoints.latest() is not None else list(run.start)
            began = time.perf_counter()
            code = subprocess.call([sys.executable, "-m", "moe_models.train", *train_argv, *run.flags, *start])
            if code:
                raise RunFailed(run, code)
            seconds += time.perf_counter() - began
            trained += cell.steps_of(run)
            if is_main:
                left = grid.steps(after=done) * seconds / max(trained, 1)
                print(f"payoff: {run_dir} took {time.perf_counter() - began:.0f} s; about {left / 60:.0f} min left "
                      "for the runs after it at this pace", flush=True)
