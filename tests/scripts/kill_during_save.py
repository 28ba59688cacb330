"""train.py whose process is SIGKILLed in the middle of writing one checkpoint (a node dying mid-save).

    python tests/scripts/kill_during_save.py KILL_TAG [train.py flags...]

The kill comes just before the first expert file of KILL_TAG (e.g. global_step6) is written, so
DeepSpeed's model file of that tag is already on disk and the rest is not.
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import torch

kill_tag = sys.argv.pop(1)
real_save = torch.save


def save_or_die(obj, f, *args, **kwargs):
    if kill_tag in str(f) and "_expert_" in Path(str(f)).name:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.save = save_or_die
repo = Path(__file__).resolve().parents[2]
sys.argv[0] = str(repo / "train.py")
runpy.run_path(str(repo / "train.py"), run_name="__main__")
