"""Start-up waits that speak: torch's extension build lock, the rendezvous of the ranks, a wait for rank 0.

DeepSpeed JIT-builds an op (on CPU, its shared-memory all-reduce) at ``init_distributed`` into torch's extensions
folder (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions/py{X}{Y}_{cpu|cuXXX}``), one sub-folder per
op, under torch's ``FileBaton``: a ``lock`` file in that sub-folder. A build that was interrupted (Ctrl-C, a killed
job) leaves the file, and every later start on the machine waits for it forever, printing nothing. Before the
process group is made, ``wait_for_extension_locks`` waits while a lock exists, says which after ``notice_s`` and
ends with ``StartupWaitError`` (the path and the fix) after ``bound_s`` (env ``MOE_MODELS_LOCK_WAIT_S``, default
300 s: DeepSpeed's build takes 1-2 minutes). ``announced`` says what a block waits for while it waits (the
rendezvous: the address and the world; rank 0's data preparation); ``rendezvous_error`` ends a rendezvous that timed
out with the address and the fix.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch.utils.cpp_extension

LOCK_WAIT_ENV = "MOE_MODELS_LOCK_WAIT_S"
DEFAULT_LOCK_WAIT_S = 300.0


class StartupWaitError(ValueError):
    """A start-up wait passed its bound; the message names what was waited for and the fix. (A ValueError, so that
    the command ends with the one-line message of a refused setting.)"""


def extension_locks() -> list[Path]:
    """The ``lock`` files in torch's extensions folder(s), as ``torch.utils.cpp_extension`` places them."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return sorted(Path(root).glob("*/lock"))
    default = Path(torch.utils.cpp_extension.get_default_build_root())  # one folder per python and accelerator
    return sorted(default.glob("*/*/lock"))


def wait_for_extension_locks(bound_s: float | None = None, notice_s: float = 10.0, poll_s: float = 0.5,
                             say: Callable[[str], None] = print) -> None:
    """Return once no extension build lock exists; say what is waited for after ``notice_s``; raise
    StartupWaitError after ``bound_s`` (default: env MOE_MODELS_LOCK_WAIT_S, else 300 s)."""
    if bound_s is None:
        bound_s = float(os.environ.get(LOCK_WAIT_ENV, DEFAULT_LOCK_WAIT_S))
    started, noticed = time.monotonic(), False
    while locks := extension_locks():
        waited = time.monotonic() - started
        if waited >= bound_s:
            raise StartupWaitError(
                f"torch's extension build lock {locks[0]} has existed for {waited:.0f} s ({LOCK_WAIT_ENV}={bound_s:g}): "
                f"DeepSpeed builds an op there at start-up, and an interrupted build (Ctrl-C, a killed job) leaves "
                f"its lock. If no build is running on this machine (no compiler process of another run), remove it "
                f"(rm {locks[0]}) and start again; if one is running, wait for it or raise {LOCK_WAIT_ENV}.")
        if waited >= notice_s and not noticed:
            say(f"waiting for torch's extension build lock {locks[0]} (another process is building DeepSpeed's op, "
                f"or an interrupted build left the file); giving up after {bound_s:g} s ({LOCK_WAIT_ENV})")
            noticed = True
        time.sleep(poll_s)


@contextmanager
def announced(what: str, notice_s: float = 10.0, every_s: float = 60.0, say: Callable[[str], None] = print):
    """Run the block; while it runs longer than ``notice_s`` (then every ``every_s``), say that it waits for ``what``."""
    done = threading.Event()
    started = time.monotonic()

    def speak() -> None:
        wait = notice_s
        while not done.wait(wait):
            say(f"still waiting after {time.monotonic() - started:.0f} s: {what}")
            wait = every_s
    speaker = threading.Thread(target=speak, daemon=True)
    speaker.start()
    try:
        yield
    finally:
        done.set()


def rendezvous_error(err: Exception, timeout_s: float) -> StartupWaitError:
    """The error when the ranks did not all join the process group within ``timeout_s``."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return StartupWaitError(
        f"rank {rank}: the {world} ranks did not all join the process group at {address} within {timeout_s:g} s "
        f"(--dist_timeout_s; {str(err).splitlines()[0] if str(err) else type(err).__name__}). Start every rank with "
        f"one launcher command (deepspeed, torchrun, srun) and check that each node reaches {address} "
        f"(MASTER_ADDR/MASTER_PORT, firewall, the network interface).")
