"""Aux-loss-free balancing of a model continued in place (hf/in_place.py) moves the family's own bias: where each
sparse block holds a correction bias (added to the scores for the choice of experts only, never to the weights, and
held outside the gradient: a buffer or a parameter without gradient), --router_bias_update_rate moves it after each
optimizer step as our layer moves its score bias: bias_e += rate x sign(mean load - load_e), the load counted over
every rank's routes of the step (moe/balance.py's ``update_correction_biases``); identity experts' entries
(LongCat-Flash's) stay, as our layer's null experts' without a compute target, and the experts' move by their mean
load. The bias stays the family's tensor where it was, in its router or in the block, held as an fp32 buffer, so
checkpoints save and restore it under the family's name. ``CORRECTION_BIASES`` names it in each family that has one."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..moe.balance import CorrectionBias
from ..moe.fused_experts import FusedExperts
from ..moe.identity_experts import identity_expert_count
from .in_place import EXPERTS_NAME, SparseBlock, sparse_blocks, swap_class
from .in_place_balance import has_balance_loss

# The names a correction bias goes by, each checked in its families' forward (transformers 5.17): chosen by
# top-k of the scores plus the bias, weighed by the scores alone, the bias a buffer or a parameter without gradient.
CORRECTION_BIASES = (
    "e_score_correction_bias",  # DeepSeek-V3 and its kin, GLM-4.5, MiniMax-M2, Nemotron-H, ERNIE-4.5, Laguna, ...
    "expert_bias",              # AFMoE (a parameter without gradient), LFM2-MoE (a buffer, with use_expert_bias)
    "balancing_biases",         # Zaya: E + 1 entries, the last its skip class's (refused below)
)


def correction_biases(model: nn.Module) -> list[tuple[SparseBlock, Optional[nn.Module]]]:
    """Each sparse block of ``model`` with the module that holds its correction bias (its router, or the block
    itself), None where it holds none; the experts are not searched."""
    found = []
    for block in sparse_blocks(model):
        owner = next((module for name, module in block.block.named_modules()
                      if name != EXPERTS_NAME and not name.startswith(f"{EXPERTS_NAME}.")
                      and bias_name(module) is not None), None)
        found.append((block, owner))
    return found


def bias_name(owner: nn.Module) -> Optional[str]:
    """The name of the correction bias ``owner`` holds (None: none)."""
    return next((name for name in CORRECTION_BIASES if isinstance(getattr(owner, name, None), torch.Tensor)), None)


def correction_bias_problem(model: nn.Module) -> Optional[str]:
    """Why --router_bias_update_rate cannot move a bias of ``model`` (the family's class, on any device, experts not
    swapped yet), or None."""
    for block, owner in correction_biases(model):
        if owner is None:
            return (f"has no correction bias ({', '.join(CORRECTION_BIASES)}) at {block.path}, so its routing "
                    "has no aux-loss-free bias to move")
        name = bias_name(owner)
        entries, classes = getattr(owner, name).numel(), routed_classes(block.experts)
        if entries != classes:
            return (f"has a correction bias ({name}) of {entries} entries for {classes} experts at {block.path}, "
                    "which the routes per expert cannot move")
    return None


def routed_classes(experts: nn.Module) -> int:
    """The classes the routes of a sparse block's experts module are counted over, swapped or not: its experts, and
    its identity experts where it has some (LongCat-Flash's, moe/identity_experts.py)."""
    if isinstance(experts, FusedExperts):
        return experts.num_experts + getattr(experts, "num_identity_experts", 0)
    return swap_class(experts).family_expert_count(experts) + identity_expert_count(experts)


def move_correction_biases(model: nn.Module, rate: float) -> None:
    """With ``rate`` > 0, give each swapped sparse block's experts (FusedExperts) its block's correction bias to move
    after each optimizer step (``correction_bias_problem`` checked that every block has one)."""
    if rate <= 0:
        return
    for block, owner in correction_biases(model):
        held_fp32(owner)
        block.block.get_submodule(EXPERTS_NAME).correction_bias = CorrectionBias(owner, bias_name(owner), rate)


def held_fp32(owner: nn.Module) -> None:
    """The correction bias of ``owner`` as an fp32 buffer of the same name (the state dict's entry is unchanged): steps
    of 1e-3 would round away in bf16 (a bf16 run reads it in bf16; a bias kept as a parameter without gradient,
    Laguna's or AFMoE's, DeepSpeed would cast to bf16, while it keeps fp32 buffers), as our own score bias is (moe/router.py)."""
    name = bias_name(owner)
    bias = getattr(owner, name).detach().float()
    if name in owner._parameters:
        delattr(owner, name)
    owner.register_buffer(name, bias)


def family_balance_fixes(model: nn.Module, rate: float) -> list[str]:
    """What counters a collapsing load in ``model`` continued in place, for the collapse warnings (our layer's flags
    are refused there): moving its correction bias where it has one, its own balance loss's coefficient where its
    config has one."""
    fixes = []
    if correction_bias_problem(model) is None:
        fixes.append(f"aux-loss-free balancing, --router_bias_update_rate 1e-3 (now {rate:g})")
    coef = getattr(model.config.get_text_config(), "router_aux_loss_coef", None)
    if isinstance(coef, (int, float)) and has_balance_loss(model):
        fixes.append(f"a larger router_aux_loss_coef, the family's balance loss, in the folder's config.json "
                     f"(now {coef:g})")
    return fixes or ["a lower --learning_rate: the family has neither a correction bias nor a balance loss"]
