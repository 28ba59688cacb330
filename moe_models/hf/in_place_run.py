"""What train.py does with ``--model_name_or_path FOLDER`` when the folder holds an HF MoE class (its config counts
experts): it continues the model in place (hf/in_place.py). The family is proven first on its probe
(hf/in_place_proof.py), then each rank reads its experts (hf/in_place_load.py). The run's MoE settings describe the
checkpoint (its experts per sparse block, its top-k, the sparse blocks); the routing and its balance loss are the
family's own (``output_router_logits`` on: the HF loss includes ``router_aux_loss_coef`` x the family's balance
loss), so flags that set our routing rule or loss are refused; --router_bias_update_rate moves the family's own
correction bias where it has one (hf/in_place_bias.py). ``in_place_on_meta`` is the same model on the meta device,
for the plan (training/preflight.py)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from torch import nn
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..models.discovery import EXPERT_COUNT_FIELDS
from ..models.probe import MOE_TOP_K_FIELDS
from ..models.source import check_vocabulary
from ..moe.parallel import make_expert_parallel_groups
from ..run.config import ConfigError, MoEConfig
from ..run.moe_layout import MoELayout
from .in_place import fused_experts_of, swap_experts
from .in_place_balance import use_family_balance_loss
from .in_place_bias import correction_bias_problem, move_correction_biases
from .in_place_load import load_in_place
from .in_place_proof import prove_in_place

# MoEConfig flags an in-place run takes from the command line: the rest describe a rule or loss of our own layer.
# (--router_bias_update_rate moves the family's correction bias, where it has one.)
IN_PLACE_FLAGS = ("ep_size", "moe_impl", "router_bias_update_rate")


def is_in_place_folder(name_or_path: str | None) -> bool:
    """A local folder whose config.json is an HF MoE class (it counts experts)."""
    if not name_or_path or not (Path(name_or_path) / "config.json").is_file():
        return False
    config = AutoConfig.from_pretrained(name_or_path)
    return bool(expert_count(config))


def expert_count(config: PretrainedConfig) -> int:
    text = config.get_text_config()
    return next((value for name in EXPERT_COUNT_FIELDS if isinstance(value := getattr(text, name, None), int)
                 and value > 1), 0)


def top_k_of(config: PretrainedConfig) -> int:
    text = config.get_text_config()
    return next((value for name in MOE_TOP_K_FIELDS if isinstance(value := getattr(text, name, None), int)), 1)


def continue_in_place(path: str, moe: MoEConfig, dtype: torch.dtype, vocab_needed: int,
                      given: frozenset[str] = frozenset()) -> tuple[nn.Module, MoEConfig, MoELayout]:
    """The model of ``path`` in its own class, this rank's experts swapped in (``moe.ep_size``), the MoE settings that
    describe it, and its layout. A ValueError (ConfigError for flags) says what stops it, before anything is
    written: a family whose probe fails, flags of our own routing rule, an ep_size that does not divide the
    experts, a folder that is incomplete or disagrees with its config."""
    config = proven_config(path, moe, given)
    make_expert_parallel_groups(moe.ep_size)
    model = load_in_place(path, moe.ep_size, dtype=dtype)
    check_vocabulary(model, vocab_needed)
    for module in fused_experts_of(model):  # the family's top-k, before the first forward counts it (FLOPs, metrics)
        module.routing.top_k = top_k_of(config)
    move_correction_biases(model, moe.router_bias_update_rate)
    use_family_balance_loss(model)  # it joins the LM loss
    blocks = sorted({int(found.group(1)) for module_path, module in model.named_modules()
                     if module in fused_experts_of(model) and (found := re.search(r"\.(\d+)\.", module_path))})
    settings = dataclasses.replace(moe, num_experts=expert_count(config), top_k=top_k_of(config), moe_layers=blocks,
                                   expert_init="copy", num_shared_experts=0, aux_loss_coef=0.0)
    layout = MoELayout.resolve(settings, config.get_text_config().num_hidden_layers)
    return model, settings, layout


def in_place_on_meta(path: str, moe: MoEConfig, given: frozenset[str] = frozenset()) -> nn.Module:
    """What ``continue_in_place`` would build, on the meta device and as at ep_size 1 (every expert swapped in, with
    the family's top-k): its config alone is read, nothing is allocated. Refused as ``continue_in_place`` is."""
    config = proven_config(path, moe, given)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # init_empty_weights re-creates assigned parameters: tie once outside it
    for module in swap_experts(model, ep_size=1, ep_rank=0):
        module.routing.top_k = top_k_of(config)
    return model


def proven_config(path: str, moe: MoEConfig, given: frozenset[str]) -> PretrainedConfig:
    """The config of ``path`` once the flags, ep_size and the family's probe are checked (what stops it raised as in
    ``continue_in_place``)."""
    config = AutoConfig.from_pretrained(path)
    ours = sorted(name for name in given if name not in IN_PLACE_FLAGS
                  and name in {f.name for f in dataclasses.fields(MoEConfig)})
    if ours:
        raise ConfigError([f"--{name}: {path} is continued in place ({config.model_type}), with the family's own "
                           "routing, balance loss and experts; leave it out (docs/models.md, Continue an MoE in "
                           "place)" for name in ours])
    if moe.moe_impl != "grouped":
        raise ConfigError([f"--moe_impl {moe.moe_impl}: {path} is continued in place ({config.model_type}), its experts "
                           "run grouped in the family's own block; leave the flag out"])
    experts = expert_count(config)
    if experts % moe.ep_size:
        raise ConfigError([f"ep_size ({moe.ep_size}) must divide the {experts} experts of {path}: pick an ep_size "
                           f"that divides {experts}"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if moe.router_bias_update_rate > 0 and (problem := correction_bias_problem(model)):
        raise ConfigError([f"--router_bias_update_rate: {path} ({config.model_type}) {problem}; leave it out "
                           "(docs/models.md, Continue an MoE in place)"])
    try:
        prove_in_place(type(model), config)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return config
