"""Several runs of train.py in one process per rank, one after another: each line of RUNS_FILE is a JSON list of
train.py's arguments. One launch serves the runs of several models (tests/hf/test_in_place_families.py).

Usage: deepspeed --num_gpus 2 tests/scripts/train_in_turn.py RUNS_FILE
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train  # noqa: E402

if __name__ == "__main__":
    for line in Path(sys.argv[-1]).read_text().splitlines():  # the launcher puts --local_rank first
        train.main(json.loads(line))
