"""Packed blocks cached by content: a second run on the same data, tokenizer and settings loads the blocks (memory
mapped) instead of reading and tokenising the text again.

    <cache dir>/<key>/blocks/      the train and validation blocks (datasets' save_to_disk)
    <cache dir>/<key>/entry.json   what the key was made of, and the run's domain list

The key is a hash of: each file's bytes (SHA-256; not its path or modification time, so a copy or a re-download of the
same data hits), its format and domain entry; the tokenizer as save_pretrained writes it; block_size, the text
column, the domain settings, the number of tokenising processes (it changes where blocks are cut), the held-out split
(percentage and seed) or the built-in corpus's size and seed; for conversational data the chat template file's bytes,
--loss_on_all_tokens, --packing and --overlong_sequences; and the source of the modules that make the blocks. An
entry is written to a temporary folder and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from datasets import DatasetDict, load_from_disk
from transformers import PreTrainedTokenizerBase

from ..run.writes import is_write_failure, write_failure_text

CACHE_ENV = "MOE_MODELS_DATA_CACHE"
DEFAULT_CACHE = "~/.cache/moe_models/data"
# The modules whose code decides what the blocks hold: editing one of them gives new keys.
PACKING_CODE = ("text.py", "synthetic.py", "domains.py", "file_specs.py", "files.py", "formats.py", "chat.py",
                "sequences.py")
CHUNK = 1 << 20


def cache_root(setting: Optional[str]) -> Path:
    """--data_cache_dir, else $MOE_MODELS_DATA_CACHE, else ~/.cache/moe_models/data."""
    return Path(setting or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def text_digest(path: Optional[str]) -> Optional[str]:
    """A hash of a settings file's bytes (--chat_template), or None when none is given."""
    return file_digest(path) if path else None


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's files as save_pretrained writes them (vocabulary, merges, special tokens, config)."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def code_digest() -> str:
    """A hash of the packing modules' source (an install without sources hashes the package version instead)."""
    digest = hashlib.sha256()
    for name in PACKING_CODE:
        source = Path(__file__).parent / name
        digest.update(source.read_bytes() if source.is_file() else _version().encode())
    return digest.hexdigest()


def _version() -> str:
    try:
        return importlib.metadata.version("moe-models")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def entry_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def cached_blocks(root: Path, parts: dict, build: Callable[[], tuple[DatasetDict, dict]]
                  ) -> tuple[DatasetDict, dict, Path, bool]:
    """The blocks and their meta (what ``build`` returned with them) for the key made of ``parts``: loaded from
    ``root`` when an entry exists, else built and stored. Returns (blocks, meta, entry folder, whether it was a hit)."""
    entry = root / entry_key(parts)
    if (entry / "entry.json").is_file():
        try:
            return load_from_disk(str(entry / "blocks")), json.loads((entry / "entry.json").read_text())["meta"], \
                entry, True
        except (OSError, ValueError, KeyError):  # damaged by hand: build it again
            shutil.rmtree(entry, ignore_errors=True)
    blocks, meta = build()
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
        blocks.save_to_disk(str(tmp / "blocks"))
        (tmp / "entry.json").write_text(json.dumps({"key": parts, "meta": meta}, indent=2) + "\n")
        os.replace(tmp, entry)
    except Exception as err:  # another process stored it first (the rename finds a full folder), or a refused write
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not is_write_failure(err):
            raise
        if not (entry / "entry.json").is_file():  # the cache is a speed-up: train from the blocks in memory
            print(f"note: could not store the data cache in {root} ({write_failure_text(err)}); training from the "
                  "blocks in memory", file=sys.stderr)
            return blocks, meta, entry, False
    return load_from_disk(str(entry / "blocks")), meta, entry, False
