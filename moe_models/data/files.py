"""Local text files (each file of --train_file, --validation_file): what is checked before one is read, and, when the reader
fails, which byte or line is at fault and how to fix it.

Text must be UTF-8. A file in another encoding is refused, naming the first byte that is not UTF-8, rather than
decoded with a guessed fallback that would silently train on mangled characters.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

# The file formats --train_file and --validation_file take: extension -> the datasets builder that reads it.
FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".csv": "csv"}
TEXT_BUILDERS = ("text", "json", "csv")  # the ones that decode UTF-8
CHUNK = 1 << 20


def file_problems(name: str, path: str) -> list[str]:
    """Problems of one data file flag (``name`` is the flag) that show without reading the file."""
    file = Path(path)
    if file.is_dir():
        return [f"{name} {path!r} is a folder; give its files with a glob, such as {str(Path(path) / '*.jsonl')!r} "
                f"(formats: {', '.join(FILE_BUILDERS)})"]
    if not file.is_file():
        return [f"{name} {path!r} does not exist"]
    if file.suffix.lower() not in FILE_BUILDERS:
        return [f"{name} {path!r}: unsupported extension {file.suffix!r}; use {', '.join(FILE_BUILDERS)}"]
    if file.stat().st_size == 0:
        return [f"{name} {path!r} is empty; give a file that holds text"]
    return []


def unreadable_reason(paths: list[str], builder: str, err: BaseException) -> str:
    """Why the datasets builder ``builder`` could not read ``paths`` (after it failed with ``err``), with the fix: the
    first file with a bad byte or line, else the reader's own reason."""
    for path in paths:
        fault = file_fault(path, builder)
        if fault:
            return fault
    shown = paths[0] if len(paths) == 1 else f"one of {', '.join(paths)}"
    return (f"could not read {shown} as {builder}: {_root_cause(err)}; check that the file is valid "
            f"{Path(paths[0]).suffix} (or give it the extension of its real format)")


def file_fault(path: str, builder: str) -> str | None:
    """What is wrong in ``path`` for the builder ``builder`` (a byte that is not UTF-8, a bad JSON line) and how to
    fix it, or None when neither is found."""
    if builder in TEXT_BUILDERS:
        offset = first_non_utf8_byte(Path(path))
        if offset is not None:
            byte, line = offset
            converted = Path(path).with_name(f"{Path(path).stem}.utf8{Path(path).suffix}")
            return (f"{path} is not UTF-8: the byte at offset {byte} (line {line}) is not valid UTF-8. Convert the "
                    f"file to UTF-8 (for Latin-1 text: `iconv -f latin1 -t utf-8 {path} > {converted}`) and pass "
                    "the converted file")
    if builder == "json":
        return first_bad_json_line(Path(path))
    return None


def first_non_utf8_byte(path: Path) -> tuple[int, int] | None:
    """(byte offset, 1-based line) of the first byte that is not UTF-8, or None if the whole file decodes."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed, newlines = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:  # err.start counts from the start of pending + chunk
                offset = consumed - len(pending) + err.start
                return offset, newlines + (pending + chunk)[:err.start].count(b"\n") + 1
            consumed += len(chunk)
            newlines += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:  # the file ends inside a character
            return consumed - len(err.object) + err.start, newlines + 1
    return None


def first_bad_json_line(path: Path) -> str | None:
    """For a JSON Lines file: the first line that is not a JSON object, said with its number and the fix."""
    if path.suffix.lower() == ".json":
        try:  # one JSON document (a list of records) is fine as a whole
            json.loads(path.read_text(encoding="utf-8"))
            return None
        except json.JSONDecodeError:
            pass
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                reason = f"{err.msg.removesuffix(' at')} at column {err.colno}"
                return (f"{path} line {number} is not valid JSON ({reason}); fix or remove that line (each line of a "
                        ".jsonl file is one JSON object)")
            if not isinstance(record, dict):
                return (f"{path} line {number} is a JSON {type(record).__name__}, not an object; write each line "
                        'as {"text": "..."}')
    return None


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"
