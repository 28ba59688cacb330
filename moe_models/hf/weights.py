"""Where export reads a DeepSpeed MoE model's weights: a DeepSpeed checkpoint (the model file and one file per MoE
layer and global expert, at any ep_size), or one safetensors state of the whole model (``save_pretrained``'s
model.safetensors, sharded or not), which holds every expert only when one rank held them all.

Both give ``(module_state, expert_weights)``: the non-expert weights and routers under the DeepSpeed model's names,
and ``expert_weights(moe_layer_id, global_expert_id)`` -> the expert's (gate, up, down) weights, as the adapters'
``to_hf`` takes them (hf/adapters.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from deepspeed.checkpoint.utils import get_model_ckpt_name_for_rank
from deepspeed.runtime.engine import DeepSpeedEngine
from safetensors.torch import load_file

from ..models.architectures import SWIGLU, Architecture
from ..moe.layer import expert_weight_key
from ..run.moe_layout import MoELayout

ExpertWeights = Callable[[int, int], tuple[torch.Tensor, ...]]
SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"


def deepspeed_weights(checkpoints_dir: Path, tag_dir: Path, arch: Architecture,
                      layout: MoELayout) -> tuple[dict[str, torch.Tensor], ExpertWeights]:
    """The weights of DeepSpeed checkpoint ``tag_dir`` (a folder in ``checkpoints_dir``): the non-expert weights and
    routers from the model file, each expert from its own file."""
    module = module_state(checkpoints_dir, tag_dir)

    def expert_weights(moe_layer_id: int, expert_id: int) -> tuple[torch.Tensor, ...]:
        weights = expert_state(checkpoints_dir, tag_dir, moe_layer_id, expert_id)
        ffn = arch.ffn_path(layout.blocks[moe_layer_id])
        return tuple(weights[expert_weight_key(ffn, expert_id, projection)] for projection in SWIGLU)

    return module, expert_weights


def module_state(checkpoints_dir: Path, tag_dir: Path) -> dict[str, torch.Tensor]:
    """The model file's state of DeepSpeed checkpoint ``tag_dir``: every weight but the experts' (which DeepSpeed
    takes out), under the model's names. The file is the same at every ZeRO stage below 3 and every ep_size."""
    module_file = Path(get_model_ckpt_name_for_rank(str(tag_dir), "00"))
    if not module_file.is_file():
        raise ValueError(f"{module_file} not found: {tag_dir.name!r} is not a complete DeepSpeed checkpoint in "
                         f"{checkpoints_dir}")
    return torch.load(module_file, map_location="cpu", weights_only=True, mmap=True)["module"]


def expert_state(checkpoints_dir: Path, tag_dir: Path, moe_layer_id: int, expert_id: int) -> dict[str, torch.Tensor]:
    """The file DeepSpeed saves for global expert ``expert_id`` of its ``moe_layer_id``-th MoE module (written by
    the rank that held it, at any ep_size): that expert's state under the module's path, numbered by global id."""
    path = Path(DeepSpeedEngine._get_expert_ckpt_name(str(checkpoints_dir), moe_layer_id, expert_id, tag_dir.name))
    if not path.is_file():
        raise ValueError(f"{path} not found: checkpoint {tag_dir.name!r} lacks expert {expert_id} of MoE layer "
                         f"{moe_layer_id} (an interrupted save, or MoE settings from another run)")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def has_safetensors(folder: Path) -> bool:
    return (folder / SAFETENSORS_FILE).is_file() or (folder / SAFETENSORS_INDEX).is_file()


def safetensors_weights(folder: Path, arch: Architecture, layout: MoELayout,
                        ep_size: int) -> tuple[dict[str, torch.Tensor], ExpertWeights]:
    """The weights of the whole-model state in ``folder`` (``save_pretrained`` of the DeepSpeed MoE model), whose
    expert keys number experts by global id. A ValueError when an expert is missing: a model trained at ``ep_size``
    > 1 is saved by rank 0, which holds only its own experts."""
    state = _read_safetensors(folder)
    experts = {}
    for moe_layer_id, (block_id, num_experts) in enumerate(zip(layout.blocks, layout.num_experts)):
        ffn = arch.ffn_path(block_id)
        for expert_id in range(num_experts):
            keys = [expert_weight_key(ffn, expert_id, projection) for projection in SWIGLU]
            missing = [key for key in keys if key not in state]
            if missing:
                raise ValueError(
                    f"{folder} holds no weights for expert {expert_id} of MoE layer {moe_layer_id} ({missing[0]})"
                    + (f": trained at ep_size {ep_size}, its model file holds only rank 0's experts. Export a "
                       "checkpoint-N folder (its DeepSpeed checkpoint has every expert), or a folder of a "
                       "save_model() that every rank called" if ep_size > 1 else ""))
            experts[moe_layer_id, expert_id] = tuple(state.pop(key) for key in keys)
    return state, lambda moe_layer_id, expert_id: experts[moe_layer_id, expert_id]


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / SAFETENSORS_FILE).is_file():
        return load_file(folder / SAFETENSORS_FILE)
    shards = sorted(set(json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"].values()))
    return {key: tensor for shard in shards for key, tensor in load_file(folder / shard).items()}
