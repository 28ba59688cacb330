"""Step 3 of an MoE forward: this rank's experts run on their rows (grouped by local expert, with a count each).

- ``StackedExperts``: SwiGLU experts held stacked in DeepSpeed's own ``GroupedExperts`` (``deepspeed.moe.ep_experts``:
  [L, F, D] and [L, D, F] weights run as grouped GEMMs without copying them), under the per-expert state-dict
  names of the module list it replaces, so DeepSpeed's checkpoints (one file per global expert), resharding and
  export see the stock layer's names and tensors.
- ``ExpertLoop``: any other FFN keeps its modules (DeepSpeed's list, under its name) and runs them one by one.

``local_experts`` picks one for a DeepSpeed ``Experts`` module. Shape letters: moe/__init__.py.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from deepspeed.moe.ep_experts import GroupedExperts
from deepspeed.moe.experts import Experts
from torch import nn


def local_experts(experts: Experts, gated_projections: Optional[tuple[str, str, str]],
                  expert_group_name: str) -> nn.Module:
    """The grouped form of DeepSpeed's ``Experts`` when a grouped GEMM can express its FFN, else the loop."""
    if _grouped_gemm_fits(experts.deepspeed_experts[0], gated_projections):
        return StackedExperts(experts.deepspeed_experts, gated_projections, expert_group_name)
    return ExpertLoop(experts)


def per_expert_key(i: int, projection: str) -> str:
    """State-dict key, relative to the experts module, of local expert i's ``projection`` weight: the stock
    ``Experts`` module's name, which every expert holder here keeps."""
    return f"deepspeed_experts.{i}.{projection}.weight"


class StackedExperts(GroupedExperts):
    """DeepSpeed's ``GroupedExperts`` made from a list of SwiGLU expert modules, under their names in state dicts.

    ``w1`` (gate) and ``w3`` (up) are [L, F, D], ``w2`` (down) [L, D, F]: local expert i's weights are the i-th
    slices, so no step copies them. The parameters carry DeepSpeed's expert flags (``allreduce=False``, the expert
    group's name), so the engine reduces and clips their gradients as it does the stock layer's. State dicts show
    the stock layer's keys, ``deepspeed_experts.{i}.{projection}.weight`` per local expert, and take them back.
    """

    STACKED = ("w1", "w3", "w2")  # GroupedExperts' parameters for the (gate, up, down) projections

    def __init__(self, experts: nn.ModuleList, projections: tuple[str, str, str], expert_group_name: str):
        gate = getattr(experts[0], projections[0])
        with torch.device("meta"):  # GroupedExperts allocates its own weights; they are replaced just below
            super().__init__(gate.in_features, gate.out_features, len(experts), activation="swiglu")
        self.projections = projections
        for stacked, projection in zip(self.STACKED, projections):
            with torch.no_grad():
                weight = torch.stack([getattr(expert, projection).weight for expert in experts])
            setattr(self, stacked, nn.Parameter(weight, requires_grad=gate.weight.requires_grad))
            param = getattr(self, stacked)  # flags after registering: accelerate's meta init re-creates it there
            param.allreduce, param.group_name, param.is_expert_group = False, expert_group_name, True
        self.register_state_dict_post_hook(_per_expert_state)
        self.register_load_state_dict_pre_hook(_stacked_state)

    def per_expert_keys(self, stacked: str) -> list[str]:
        """The state-dict keys (relative to this module) of the local experts' slices of parameter ``stacked``."""
        projection = self.projections[self.STACKED.index(stacked)]
        return [per_expert_key(i, projection) for i in range(self.num_experts)]

    def expert_weights(self, i: int, of: Callable = lambda param: param) -> dict[str, torch.Tensor]:
        """Local expert i's slice of ``of(parameter)`` (default: the weights, as views) for each of its weights,
        named as in its module, in its order: gate, up, down."""
        return {f"{projection}.weight": of(getattr(self, stacked))[i]
                for stacked, projection in zip(self.STACKED, self.projections)}


def _per_expert_state(module: StackedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: the stacked parameters become one entry per (local expert, projection), in module order."""
    stacked = {name: state_dict.pop(prefix + name) for name in module.STACKED}
    keys = {name: module.per_expert_keys(name) for name in module.STACKED}
    for i in range(module.num_experts):
        for name in module.STACKED:
            state_dict[prefix + keys[name][i]] = stacked[name][i]


def _stacked_state(module: StackedExperts, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: per-expert entries are stacked back (a missing one fails a strict load)."""
    for name in module.STACKED:
        keys = [prefix + key for key in module.per_expert_keys(name)]
        if all(key in state_dict for key in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])


class ExpertLoop(nn.Module):
    """Each local expert module on its rows, one after the other: for FFNs a grouped GEMM cannot express (GPT-2's
    Conv1D with biases and GELU, projections with biases, unaligned sizes). Holds DeepSpeed's module list under its
    name (``deepspeed_experts``), so state dicts keep the stock keys. Reads the counts to the host (one sync per
    layer)."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.deepspeed_experts = experts.deepspeed_experts

    def forward(self, x_ND: torch.Tensor, counts_L: torch.Tensor) -> torch.Tensor:
        counts = counts_L.tolist()
        chunks = x_ND.split([*counts, x_ND.shape[0] - sum(counts)])
        outputs = [_first(expert(chunk)) for expert, chunk in zip(self.deepspeed_experts, chunks)]
        return torch.cat([*outputs, chunks[-1].new_zeros(chunks[-1].shape)])


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _grouped_gemm_fits(expert: nn.Module, projections: Optional[tuple[str, str, str]]) -> bool:
    """Whether the expert is a bias-free SwiGLU (a silu gate: GroupedExperts' "swiglu") with 16-byte aligned rows,
    as torch's grouped_mm needs."""
    if projections is None or not hasattr(torch, "_grouped_mm") or not _is_silu(getattr(expert, "act_fn", None)):
        return False
    layers = [getattr(expert, name, None) for name in projections]
    if not all(isinstance(layer, nn.Linear) and layer.bias is None for layer in layers):
        return False
    # 8 elements = 16 bytes in bf16 (fp32 needs 4), so the check holds in either training dtype
    return all(size % 8 == 0 for size in layers[2].weight.shape)


def _is_silu(act_fn) -> bool:
    """Whether ``act_fn`` computes silu (HF families wrap it in several classes, so values are compared)."""
    if not callable(act_fn):
        return False
    probe = torch.linspace(-6, 6, 25, device="cpu")
    return torch.allclose(act_fn(probe), F.silu(probe))
