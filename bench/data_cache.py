"""What the content-keyed block cache saves: the data preparation of train.py (read, hold out, tokenise, pack) timed
in fresh processes on the same corpus, with the built-in byte-level tokenizer:

  cold                     empty block cache and empty datasets cache
  datasets cache           a new, empty block cache; datasets' own cache (warm after the cold run) as it is
  touched, datasets cache  the file rewritten with the same bytes (a new modification time, as a copy or a new
                           download has), a new, empty block cache: datasets' cache misses too
  touched, block cache     the same file, with the block cache of the cold run
  block cache              the block cache of the cold run

    python bench/data_cache.py --corpus synthetic --examples 200000
    python bench/data_cache.py --corpus jsonl --megabytes 50
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_WORDS = ("the", "cat", "sat", "on", "a", "mat", "while", "it", "rained", "over", "quiet", "river", "and", "city")


def prepare_once(args: argparse.Namespace) -> dict:
    """In this process: prepare the data as train.py does; seconds and whether the block cache was hit."""
    sys.path.insert(0, str(REPO))
    from moe_models.data.prepare import prepare_data
    from moe_models.models.tokenization import byte_level_tokenizer
    from moe_models.run.config import DataConfig

    data = DataConfig(train_file=args.train_file, synthetic_examples=args.examples, block_size=args.block_size,
                      data_cache_dir=args.data_cache_dir)
    tokenizer = byte_level_tokenizer()
    started = time.perf_counter()
    prepared = prepare_data(data, tokenizer, seed=0)
    return {"seconds": time.perf_counter() - started, "hit": prepared.cache["hit"], "blocks": len(prepared.train)}


def write_jsonl(path: Path, megabytes: int) -> int:
    rng = random.Random(0)
    texts = 0
    with path.open("w") as f:
        while f.tell() < megabytes * 1_000_000:
            f.write(json.dumps({"text": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 200)))}) + "\n")
            texts += 1
    return texts


def timed(folder: Path, cache: str, args: argparse.Namespace, train_file: str | None) -> dict:
    command = [sys.executable, __file__, "--child", "--examples", str(args.examples), "--block_size",
               str(args.block_size), "--data_cache_dir", str(folder / cache)]
    if train_file:
        command += ["--train_file", train_file]
    env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "hf_datasets"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=("synthetic", "jsonl"), default="synthetic")
    parser.add_argument("--examples", type=int, default=200000, help="synthetic corpus size")
    parser.add_argument("--megabytes", type=int, default=50, help="size of the generated .jsonl file")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--train_file", help=argparse.SUPPRESS)
    parser.add_argument("--data_cache_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(prepare_once(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train_file, described = None, f"the built-in corpus, {args.examples} examples"
        if args.corpus == "jsonl":
            train_file = str(folder / "train.jsonl")
            texts = write_jsonl(Path(train_file), args.megabytes)
            described = f"{train_file} ({os.path.getsize(train_file) / 1e6:.0f} MB, {texts} texts)"
        rows = [("cold", timed(folder, "blocks", args, train_file)),
                ("datasets cache", timed(folder, "empty", args, train_file))]
        if train_file:
            Path(train_file).write_bytes(Path(train_file).read_bytes())
            rows.append(("touched, datasets cache", timed(folder, "empty_too", args, train_file)))
            rows.append(("touched, block cache", timed(folder, "blocks", args, train_file)))
        rows.append(("block cache", timed(folder, "blocks", args, train_file)))
    print(f"{described}, block_size {args.block_size}, byte-level tokenizer\n")
    print("| run | seconds | block cache hit | blocks |\n|---|---|---|---|")
    for name, row in rows:
        print(f"| {name} | {row['seconds']:.2f} | {'yes' if row['hit'] else 'no'} | {row['blocks']} |")


if __name__ == "__main__":
    main()
