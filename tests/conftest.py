import os

# Tests never reach the hub or wandb's servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, set_seed  # noqa: E402

from moe_models.model_source import preset_config  # noqa: E402


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict:
    """Environment for a subprocess: this one's, without the rank variables the `world` fixture set
    (a child must make or join its own process group), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return {**env, **extra}


@pytest.fixture(scope="session")
def world():
    """A one-rank gloo process group in this test process (what `python train.py` makes)."""
    from moe_models.distributed import init_world
    return init_world()


def tiny_model(preset: str = "tiny-llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A small dense causal LM from a built-in preset, in eval mode (no dropout)."""
    set_seed(seed)
    config = preset_config(preset)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config).eval()
