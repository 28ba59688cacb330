"""A run that continued an HF MoE in place (hf/in_place_run.py), read back as its own class for export
(hf/exporter.py writes it): the stock class's config and state dict, whose ``save_pretrained`` then gives the hub's
layout of that class.

The DeepSpeed checkpoint holds the weights in two parts (hf/weights.py reads its files):
- the model file: every weight but the experts', under the class's own names (the routers, a correction bias, the
  shared experts, attention, norms, dense blocks);
- one file per global expert of each swapped ``experts`` module (``layer_L_expert_E_...``, written by the rank that
  held it, at any ep_size): under ``{block}.experts.deepspeed_moe.experts.deepspeed_experts.{E}.{name}``, expert E's
  slice of the family's fused parameter ``name`` (moe/fused_experts.py). The slices of all E experts, stacked in
  expert order, are the fused parameter again (``{block}.experts.{name}`` [E, ...]); LongCat-Flash's gate_up_proj
  [E + Z, ...] ends with the Z rows no expert uses, kept in the model file as a buffer of the block (hf/in_place.py).

The config is the run's (base_model/config.json: the source folder's, as the run's model held it), with
``output_router_logits`` as the source folder had it: the run turns it on so that the family's balance loss joins
its loss.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..moe.experts import per_expert_name
from .in_place import EXPERTS_NAME, IDLE_GATE_UP_ROWS, sparse_blocks, swap_class
from .weights import expert_state, module_state

ROUTER_LOGITS = "output_router_logits"


def in_place_state(checkpoints_dir: Path, tag_dir: Path, run_config: PretrainedConfig,
                   source: Optional[str]) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    """The config and the stock class's full state dict of DeepSpeed checkpoint ``tag_dir`` of a run that continued
    ``source`` in place (``run_config``: its model's config). A ValueError names a missing file or tensor."""
    config = exported_config(run_config, source)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    state = dict(module_state(checkpoints_dir, tag_dir))
    # DeepSpeed numbers its MoE modules in the order of named_modules(), as sparse_blocks finds the blocks
    for moe_layer_id, found in enumerate(sparse_blocks(model)):
        experts_path = f"{found.path}.{EXPERTS_NAME}"
        swap = swap_class(found.experts)
        count = swap.family_expert_count(found.experts)
        files = [expert_state(checkpoints_dir, tag_dir, moe_layer_id, expert_id) for expert_id in range(count)]
        for name in swap.family_parameter_names(found.experts):  # gate_up_proj, ... (Aria's fc1.weight, ...)
            keys = [f"{experts_path}.deepspeed_moe.experts.{per_expert_name(e, name)}" for e in range(count)]
            missing = [key for key, file in zip(keys, files) if key not in file]
            if missing:
                raise ValueError(f"checkpoint {tag_dir.name!r} has no {missing[0]} in the file of its expert: the "
                                 f"run's base_model/config.json ({config.model_type}) is not the model it saved")
            state[f"{experts_path}.{name}"] = torch.stack([file[key] for key, file in zip(keys, files)])
        idle = state.pop(f"{found.path}.{IDLE_GATE_UP_ROWS}", None)  # the rows no expert uses, after the experts'
        if idle is not None:
            state[f"{experts_path}.gate_up_proj"] = torch.cat([state[f"{experts_path}.gate_up_proj"], idle])
    return config, state


def exported_config(run_config: PretrainedConfig, source: Optional[str]) -> PretrainedConfig:
    """``run_config`` with ``output_router_logits`` (where the config has it) as in the source folder's config.json,
    or the class's default when that folder is gone."""
    config = copy.deepcopy(run_config)
    source_config = (AutoConfig.from_pretrained(source) if source and (Path(source) / "config.json").is_file()
                     else type(run_config)())
    for exported, original in ((config, source_config), (config.get_text_config(), source_config.get_text_config())):
        if hasattr(exported, ROUTER_LOGITS):
            setattr(exported, ROUTER_LOGITS, getattr(original, ROUTER_LOGITS, False))
    return config
