"""What DeepSpeed prints on every run (and torch warns of it) that is not the user's to act on, dropped where it is
made and by its exact text, so that a warning with any other text still shows.

- ``Attempting to get learning rate from scheduler before it has started``: a warning on DeepSpeed's logger when its
  engine asks the schedule for the learning rate before the first step, on every run; a filter on that logger while
  the engine is made drops it.
- torch's FutureWarning ``torch.distributed.all_gather_into_tensor is deprecated``, once per rank of a run of several:
  DeepSpeed's ZeRO optimizer calls it after each step; a warnings filter on that message, set with the engine.
- ``DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully`` (the CPU process group's shared-memory op,
  on every start) and ``No existing process group found, creating a new group named: ep_size_N`` (the engine making
  the expert-parallel groups): plain prints, which no log level silences; dropped from stdout while those calls run.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import warnings
from contextlib import contextmanager, redirect_stdout

DEEPSPEED_PRINTS = (re.compile(r"DeepSpeed \S+ built successfully"),
                    re.compile(r"No existing process group found, creating a new group named: \S+"))
DEEPSPEED_WARNINGS = ("Attempting to get learning rate from scheduler before it has started",)


class _LinesDropped(io.TextIOBase):
    """A text stream that passes every line on to ``stream`` except those ``patterns`` match whole."""

    def __init__(self, stream, patterns):
        self.stream, self.patterns, self.partial = stream, patterns, ""

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if not any(pattern.fullmatch(line) for pattern in self.patterns):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close_lines(self) -> None:
        if self.partial:
            self.stream.write(self.partial)
            self.partial = ""
        self.stream.flush()


def _not_noise(record: logging.LogRecord) -> bool:
    return record.getMessage() not in DEEPSPEED_WARNINGS


def drop_deprecated_all_gather_warning() -> None:
    """torch's deprecation of the collective DeepSpeed's ZeRO calls (not the user's to change), left out."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


@contextmanager
def deepspeed_noise_dropped():
    """While DeepSpeed starts its process group or makes its engine: its prints and warnings above left out."""
    from deepspeed.utils import logger
    stream = _LinesDropped(sys.stdout, DEEPSPEED_PRINTS)
    logger.addFilter(_not_noise)
    try:
        with redirect_stdout(stream):
            yield
    finally:
        logger.removeFilter(_not_noise)
        stream.close_lines()
