"""Continue an HF MoE in place: the model keeps its own class, and each sparse block's fused ``experts`` module is
swapped for ``FusedExperts`` (moe/fused_experts.py), this rank's share of the same experts as DeepSpeed MoE
parameters. The block's router, its shared experts, its attention, mixers, norms and dense blocks stay as they are,
and the block's own code still calls the router and the experts: routing is the family's rule, exactly, and the
router trains with the model.

A sparse block is found as a module whose child ``experts`` holds fused expert parameters (``gate_up_proj`` or
``up_proj`` [E, ...] and ``down_proj`` [E, ...]); its router is its child ``gate`` or ``router``. Experts whose
forward takes the router's top-k become ``FusedExperts``; those whose forward takes the hidden states alone (the
block hands every expert every token, expert-major: Llama 4) become ``ExpertMajorExperts``
(moe/expert_major_experts.py), which run the same routes sparsely; those that also run identity experts
(LongCat-Flash) become ``IdentityExperts`` (moe/identity_experts.py), and those that take the router's logits and
route by their own rule (Aria) ``SelfRoutingExperts`` (moe/self_routing_experts.py).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import nn

from ..moe.expert_major_experts import ExpertMajorExperts
from ..moe.fused_experts import FusedExperts, FusedExpertsLayer, forward_arguments
from ..moe.identity_experts import IdentityExperts, identity_expert_count
from ..moe.self_routing_experts import FORWARD as SELF_ROUTING_FORWARD, SelfRoutingExperts
from ..moe.parallel import expert_parallel_rank

ROUTER_NAMES = ("gate", "router")
EXPERTS_NAME = "experts"
# The block's buffer of gate_up_proj's rows past the experts' (LongCat-Flash's, one per identity expert, which its
# class allocates and never uses), kept for the export: outside the swapped module, whose non-expert entries
# DeepSpeed's checkpoint drops.
IDLE_GATE_UP_ROWS = "identity_experts_gate_up_proj"


class SparseBlock(NamedTuple):
    path: str                    # module path of the block holding the experts (``model.layers.1.mlp``)
    block: nn.Module
    experts: nn.Module           # the family's experts module
    router: Optional[nn.Module]  # the block's ``gate`` or ``router`` (None when the block has neither)


def sparse_blocks(model: nn.Module) -> list[SparseBlock]:
    """Every module of ``model`` with a child ``experts`` (fused or not, swapped or not; shared experts aside)."""
    found = []
    for path, module in model.named_modules():
        experts = getattr(module, EXPERTS_NAME, None)
        if isinstance(experts, nn.Module) and any(experts is child for child in module.children()) and \
                not isinstance(module, (FusedExperts, FusedExpertsLayer)):
            router = next((getattr(module, name) for name in ROUTER_NAMES
                           if isinstance(getattr(module, name, None), nn.Module)), None)
            found.append(SparseBlock(path, module, experts, router))
    return found


def in_place_problem(model: nn.Module) -> Optional[str]:
    """Why ``model``'s experts cannot be swapped in place (None when every sparse block's can)."""
    blocks = sparse_blocks(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if not blocks:
        return (f"model type {model_type!r}: no module of {type(model).__name__} holds an `experts` child, so no "
                "sparse block was found")
    hidden = model.get_input_embeddings().embedding_dim
    for found in blocks:
        problem = swap_class(found.experts).problem(found.experts, hidden, found.router)
        if problem:
            return f"model type {model_type!r}: at {found.path}.experts, {problem}"
    return None


def swap_experts(model: nn.Module, ep_size: int = 1, ep_rank: int | None = None) -> list[FusedExperts]:
    """Swap every sparse block's experts of ``model`` for ``FusedExperts`` holding this rank's E / ep_size of them
    (``ep_rank``: default, this rank's place in DeepSpeed's expert-parallel group, whose groups must then exist:
    moe/parallel.py's ``make_expert_parallel_groups``); the other experts' weights are let go. On the meta device
    the swap allocates nothing (hf/in_place_load.py reads the weights after it). Returns the new modules in model
    order. A ValueError says why a model whose experts are not fused (or whose expert count ep_size does not divide)
    cannot be swapped; nothing is changed then.
    """
    problem = in_place_problem(model)
    if problem:
        raise ValueError(f"{problem}; the model cannot be continued in place (docs/models.md lists the families "
                         "that can)")
    blocks = sparse_blocks(model)
    for found in blocks:
        count = swap_class(found.experts).family_expert_count(found.experts)
        if count % ep_size:
            raise ValueError(f"num_experts ({count}) at {found.path}.experts must be divisible by ep_size "
                             f"({ep_size}): pick an ep_size that divides {count}")
    rank = expert_parallel_rank(ep_size) if ep_rank is None else ep_rank
    hidden = model.get_input_embeddings().embedding_dim
    swapped = []
    for found in blocks:
        module = swap_class(found.experts)(found.experts, hidden, ep_size, rank, router=found.router)
        setattr(found.block, EXPERTS_NAME, module)
        if isinstance(module, IdentityExperts):
            found.block.register_buffer(IDLE_GATE_UP_ROWS, module.__dict__.pop("idle_gate_up_rows"))
        swapped.append(module)
    return swapped


def swap_class(experts: nn.Module) -> type[FusedExperts]:
    """What takes the place of the family's ``experts``: ``ExpertMajorExperts`` where its forward takes the hidden
    states alone (its block runs every expert on every token, expert-major), ``IdentityExperts`` where it runs
    identity experts past its experts (LongCat-Flash's), ``SelfRoutingExperts`` where it takes the router's logits
    and routes by its own rule (Aria's), ``FusedExperts`` otherwise."""
    if forward_arguments(experts) == ["hidden_states"]:
        return ExpertMajorExperts
    if forward_arguments(experts) == SELF_ROUTING_FORWARD:
        return SelfRoutingExperts
    return IdentityExperts if identity_expert_count(experts) else FusedExperts


def fused_experts_of(model: nn.Module) -> list[FusedExperts]:
    return [m for m in model.modules() if isinstance(m, FusedExperts)]
