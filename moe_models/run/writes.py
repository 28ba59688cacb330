"""The one guard every write into a run folder, a cache or an export goes through: a failed write (permission
denied, a full disk, a quota, a read-only file system) becomes a WriteError that names the target and the fix,
whatever layer raised it; and the check, before anything is built, that a folder can be written at all.

torch.save reports a failed write as a RuntimeError from its zip writer, not an OSError, so catching OSError alone
misses real write failures (a permission denied at the second checkpoint ended in a traceback).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

# What torch's zip writer (and safetensors) say when the file system refuses a write; their RuntimeErrors carry no
# errno, so the message is all there is to tell a failed write from a bug.
WRITE_FAILURE_MESSAGES = ("PytorchStreamWriter failed", "file write failed", "Parent directory",
                          "unexpected pos", "cannot be opened", "No space left", "Permission denied",
                          "Read-only file system", "Disk quota exceeded", "Operation not permitted")


class WriteError(ValueError):
    """A file of the run could not be written; the message names it, the reason and the fix."""


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` is the file system refusing a write (an OSError, or torch's RuntimeError for one)."""
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and any(text in str(err) for text in WRITE_FAILURE_MESSAGES)


def write_failure_text(err: BaseException) -> str:
    """The reason in one line, without torch's C++ frames."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


@contextlib.contextmanager


def guarded_write(what: str, path: Path):
    """Turn a failed write of ``what`` (at ``path``) into a WriteError; other errors pass through."""
    try:
        yield
    except Exception as err:
        if not is_write_failure(err):
            raise
        raise WriteError(f"cannot write {what} {path} ({write_failure_text(err)}): free space or fix the folder's "
                         "permissions, or choose another folder") from None


def writable_problem(folder: Path, flag: str) -> str | None:
    """Why ``folder`` (to be created if missing) cannot be written, found by creating and removing a file in it or
    in its nearest existing parent; None when it can. Nothing is left behind."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{flag} {str(folder)!r}: {existing} is a file, not a folder; choose another {flag}"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as err:
        where = "" if existing == folder else f" (its nearest existing folder {existing})"
        return (f"{flag} {str(folder)!r} cannot be written{where}: {err.strerror}; fix its permissions or choose "
                f"another {flag}")
    return None


def atomic_write(path: Path, text: str, what: str = "file") -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never part of it (temp file +
    rename); a failed write leaves the old file and no temp file, and is a WriteError."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with guarded_write(what, path):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
