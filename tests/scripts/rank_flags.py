"""train.py with extra flags on one rank, run under the deepspeed launcher by tests/test_bad_inputs.py: what a
node started with another command line looks like.

Usage: deepspeed --num_gpus 2 tests/scripts/rank_flags.py <flags for every rank> -- <extra flags for rank 1>
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    common, extra = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
    train.main(common + (extra if os.environ.get("RANK") == "1" else []))
