"""The value of --train_file and --validation_file: one or more files, comma-separated, each a path or a shell glob,
optionally named by a domain that every text in it belongs to.

    --train_file data/*.jsonl,extra.txt             several files and a glob, formats mixed
    --train_file code=src/*.jsonl,prose=books.txt   one domain per file (or per glob)

A glob's matches are taken in sorted order; every entry must name at least one file, and every file must exist and
have a supported extension (files.py). A comma cannot be part of a file name here.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .files import FILE_BUILDERS, file_problems

DOMAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class DataFile:
    """One file to read: its path, the datasets builder for its format, and the domain its entry names (or None)."""

    path: str
    builder: str
    domain: Optional[str] = None


def entries(spec: str) -> list[tuple[Optional[str], str]]:
    """(domain or None, path or glob) per comma-separated entry. ``name=path`` names a domain unless the entry as a
    whole is an existing path (a file name may hold "=") or the part before "=" is not a domain name."""
    found = []
    for entry in (part.strip() for part in spec.split(",")):
        name, sep, pattern = entry.partition("=")
        if sep and DOMAIN_NAME.fullmatch(name) and not Path(entry).exists():
            found.append((name, pattern))
        else:
            found.append((None, entry))
    return found


def resolve_files(flag: str, spec: str) -> tuple[list[DataFile], list[str]]:
    """The files ``spec`` (the value of ``--flag``) names, in order, and the problems found: an entry that names no
    file, a missing or unreadable file, an unsupported format."""
    files, problems = [], []
    for domain, pattern in entries(spec):
        shown = f"{domain}={pattern}" if domain else pattern
        if not pattern:
            problems.append(f"{flag} {spec!r} has an empty entry; give paths or globs separated by commas, such as "
                            "data/*.jsonl,extra.txt")
            continue
        if glob.has_magic(pattern):
            matches = sorted(path for path in glob.glob(pattern, recursive=True) if not Path(path).is_dir())
            if not matches:
                problems.append(f"{flag} pattern {shown!r} matches no file (relative paths start at "
                                f"{Path.cwd()}); check the folder and the extension")
            paths = matches
        else:
            paths = [pattern]
        for path in paths:
            found = file_problems(flag, path)
            if found and domain and not glob.has_magic(pattern):  # say which entry, as the user wrote it
                found = [problem.replace(repr(path), repr(shown), 1) for problem in found]
            problems += found
            if not found:
                files.append(DataFile(path, FILE_BUILDERS[Path(path).suffix.lower()], domain))
    return files, problems


def data_files(flag: str, spec: str) -> list[DataFile]:
    """The files of ``spec``; a ValueError listing the problems if there are any."""
    files, problems = resolve_files(flag, spec)
    if problems:
        raise ValueError("; ".join(problems))
    return files
