"""train.py whose LM loss is NaN on one rank at some optimizer steps (a diverging rank); gradients follow.

    NAN_RANK=1 NAN_STEPS=3,4 python tests/scripts/nan_on_rank.py [train.py flags...]

(Environment variables, because the launcher puts --local_rank first among the arguments.)
"""

import itertools
import os
import runpy
import sys
from pathlib import Path

rank, steps = int(os.environ["NAN_RANK"]), {int(s) for s in os.environ["NAN_STEPS"].split(",")}
repo = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(repo))
from moe_models.training import loop  # noqa: E402

real, calls = loop.lm_loss_of, itertools.count(1)


def poisoned(engine, inputs):
    lm_loss = real(engine, inputs)
    if next(calls) in steps and int(os.environ.get("RANK", "0")) == rank:
        lm_loss = lm_loss * float("nan")
    return lm_loss


loop.lm_loss_of = poisoned
sys.argv[0] = str(repo / "train.py")
runpy.run_path(str(repo / "train.py"), run_name="__main__")
