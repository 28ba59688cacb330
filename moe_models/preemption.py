"""Stop cleanly when the cluster asks: SIGTERM or SIGUSR1 (what SLURM sends before preemption or the
time limit) makes every rank finish its current step, save a checkpoint and exit 0."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records a stop signal; `agreed()` tells every rank at once whether any rank received one.

    The signal reaches ranks at different moments, so they agree after each step (one tiny
    all-reduce, only when there are several ranks) and all stop after the same step.
    """

    def __init__(self, device: torch.device):
        self.received: str | None = None
        self.device = device
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received is not None
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
