"""The DeepSpeed engine of a train.py run: the optimizer's parameter groups (expert parameters in groups of their own)
and ``deepspeed.initialize``, whose errors about the DeepSpeed JSON (training/ds_config.py) name the file and key."""

from __future__ import annotations

import re

import deepspeed
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from ..run.config import ConfigError
from ..run.library_noise import deepspeed_noise_dropped, drop_deprecated_all_gather_warning


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices, not biases or norms; then DeepSpeed splits expert params into their own groups
    (they are reduced over the expert-data-parallel group, not the whole world)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])


def build_engine(model: nn.Module, ds_config: dict, weight_decay: float,
                 config_file: str | None = None) -> deepspeed.DeepSpeedEngine:
    """The DeepSpeed engine; a parameter the DeepSpeed JSON (``config_file``, --deepspeed) gives its optimizer or
    schedule that the class does not take is a ConfigError naming the file and the key, not a library traceback."""
    drop_deprecated_all_gather_warning()
    try:
        with deepspeed_noise_dropped():
            engine, _, _, _ = deepspeed.initialize(model=model,
                                                   model_parameters=optimizer_param_groups(model, weight_decay),
                                                   config=ds_config)
    except TypeError as err:
        problem = unknown_parameter_problem(err, ds_config, config_file)
        if problem is None:
            raise
        raise ConfigError([problem]) from None
    return engine


def unknown_parameter_problem(err: TypeError, ds_config: dict, config_file: str | None) -> str | None:
    """Which section's "params" holds the keyword ``err`` says the optimizer or schedule class does not take."""
    found = re.search(r"unexpected keyword argument '(\w+)'", str(err))
    if found is None:
        return None
    key = found.group(1)
    for section in ("optimizer", "scheduler"):
        if key in (ds_config.get(section) or {}).get("params", {}):
            kind = ds_config[section].get("type")
            return (f"{section}.params.{key} in the DeepSpeed config {config_file or '(built in)'}: {section} "
                    f"{kind} takes no parameter {key!r}; remove it or fix its spelling (DeepSpeed passes "
                    f"{section}.params to the {kind} class as they are)")
    return None
