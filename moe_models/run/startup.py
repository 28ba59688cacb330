"""Rank 0's start-up lines: each phase before the first step (imports, checks, the process group, the model, the data,
the engine, ...) with the seconds it took, so that the time before training is never silent."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import psutil


def seconds_since_process_start() -> float:
    return time.time() - psutil.Process().create_time()


class StartupLines:
    """``with startup.phase("model"): ...`` prints `start-up: model 3.2 s` on rank 0 when the phase ends; a phase
    that may take minutes says so when it begins (``begins``)."""

    def __init__(self, is_main: bool):
        self.is_main = is_main

    def say(self, text: str) -> None:
        if self.is_main:
            print(f"start-up: {text}", flush=True)

    def imports_done(self) -> None:
        """The imports, the first phase: the seconds since the process started."""
        self.say(f"imports {seconds_since_process_start():.1f} s")

    @contextmanager
    def phase(self, name: str, begins: str | None = None) -> Iterator[None]:
        if begins:
            self.say(f"{begins} ...")
        started = time.perf_counter()
        yield
        self.say(f"{name} {time.perf_counter() - started:.1f} s")
