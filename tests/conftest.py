import os

# Tests never reach the hub or wandb's servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world():
    """A one-rank gloo process group in this test process (what `python train.py` makes)."""
    from moe_models.distributed import init_world
    return init_world()
