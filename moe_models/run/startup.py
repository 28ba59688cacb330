"""Rank 0's start-up lines: each phase before the first step (imports, checks, the process group, the model, the data,
the engine, ...) with the seconds it took, so that the time before training is never silent."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

import psutil

from .startup_waits import announced


def seconds_since_process_start() -> float:
    return time.time() - psutil.Process().create_time()


class StartupLines:
    """``with startup.phase("model"): ...`` prints `start-up: model 3.2 s` on rank 0 when the phase ends; a phase
    that may take minutes says so when it begins (``begins``), or, when it takes longer than ``notice_s``, what it
    is waiting for (``waits``; then every minute)."""

    notice_s = 10.0

    def __init__(self, is_main: bool):
        self.is_main = is_main

    def say(self, text: str) -> None:
        if self.is_main:
            print(f"start-up: {text}", flush=True)

    def imports_done(self) -> None:
        """The imports, the first phase: the seconds since the process started."""
        self.say(f"imports {seconds_since_process_start():.1f} s")

    @contextmanager
    def phase(self, name: str, begins: str | None = None, waits: str | None = None) -> Iterator[None]:
        if begins:
            self.say(f"{begins} ...")
        started = time.perf_counter()
        with announced(waits, notice_s=self.notice_s, say=self.say) if waits and self.is_main else nullcontext():
            yield
        self.say(f"{name} {time.perf_counter() - started:.1f} s")
