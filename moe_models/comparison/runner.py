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
from pathlib import Path

from ..run.folder import RunFolder
from .runs import PayoffPlan, PayoffRun


class RunFailed(RuntimeError):
    def __init__(self, run: PayoffRun, code: int):
        self.code = code
        super().__init__(f"run {run.name} exited with status {code} (its output is above); fix the cause and rerun "
                         "the same command: finished runs are kept and the others resume")


def is_finished(run_dir: Path, max_steps: int) -> bool:
    checkpoints = RunFolder(run_dir).checkpoints
    latest = checkpoints.latest()
    return latest is not None and checkpoints.step_of(latest) >= max_steps


def run_all(plan: PayoffPlan, train_argv: list[str], is_main: bool) -> None:
    """Train every run of ``plan`` that is not finished, in order; RunFailed when one fails."""
    for number, run in enumerate(plan.runs, start=1):
        run_dir = plan.run_dir(run.name)
        if is_finished(run_dir, plan.max_steps):
            if is_main:
                print(f"payoff: {run.name} ({run.label}) finished earlier; kept", flush=True)
            continue
        if is_main:
            print(f"payoff: run {number}/{len(plan.runs)}: {run.name} ({run.label})", flush=True)
        code = subprocess.call([sys.executable, "-m", "moe_models.train", *train_argv, *run.flags])
        if code:
            raise RunFailed(run, code)
