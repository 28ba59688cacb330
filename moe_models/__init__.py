"""Turn Hugging Face causal LMs into DeepSpeed Mixture-of-Experts models and train them."""

import os

import torch

# Without a GPU, DeepSpeed would detect its CPU accelerator anyway, with a warning on every import.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from .moe.layer import MoEFeedForward, moe_layers_of
from .moe.model_layers import MoELayers, balance_loss
from .moe.surgery import convert_to_moe
from .run.config import ConfigError, DataConfig, LogConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig

__all__ = ["ConfigError", "DataConfig", "LogConfig", "ModelConfig", "MoEConfig", "RunConfig", "TrainConfig",
           "MoEFeedForward", "MoELayers", "MoETrainer", "balance_loss", "convert_to_moe", "moe_layers_of"]


def __getattr__(name: str):
    """``MoETrainer`` is imported on first use: importing transformers' Trainer takes seconds that `import moe_models`
    should not cost everyone."""
    if name == "MoETrainer":
        from .training.hf_trainer import MoETrainer
        return MoETrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
