"""Stop cleanly when the cluster asks: SIGTERM or SIGUSR1 (what SLURM sends before preemption or the
time limit) makes every rank finish its current step, save a checkpoint and exit 0."""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records a stop signal; `agreed()` tells every rank, at the same step, whether any rank received one.

    The signal reaches ranks at different moments, so they vote after each step with a tiny MAX all-reduce of a
    host tensor over a gloo group of its own (apart from the training collectives), started without waiting: the vote of step n is read at step n + 1, by when it has long arrived. So no step waits on the
    device or on the other ranks for it, and every rank stops after the same step, one step after the first
    signal.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous = {}
        self._group: Optional[dist.ProcessGroup] = None
        self._vote: Optional[tuple[dist.Work, torch.Tensor]] = None

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank enters, so every rank makes it
            self._group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._vote is not None and exc[0] is None:
            self._vote[0].wait()  # leave no collective in flight (all ranks end the loop at the same step)
        self._vote = None
        if self._group is not None and exc[0] is None:
            dist.destroy_process_group(self._group)
        self._group = None

    def _record(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank had received a signal by the previous call (on one rank: by now)."""
        if self._group is None:
            return self.received is not None
        previous, self._vote = self._vote, None
        stop = False
        if previous is not None:
            previous[0].wait()
            stop = bool(previous[1].item())  # a host tensor: no device sync
        if not stop:
            flag = torch.tensor([1.0 if self.received else 0.0])
            self._vote = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return stop
