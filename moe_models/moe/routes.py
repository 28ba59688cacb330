"""The record of where a forward's tokens go (``Routes``), which the router makes and the dispatcher, the combine and
the routing counters read, and the helpers every routing rule shares: routes counted per expert, the token x expert
mask, top-k weights rescaled, and whether a forward is activation checkpointing's recompute.

Shape letters: moe/__init__.py.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Routes(NamedTuple):
    """Where every token of one forward goes."""

    logits_TE: torch.Tensor        # fp32 router logits (of the jittered input under noisy_gate_policy Jitter)
    topk_ids_TK: torch.Tensor      # global expert id of each token's k routes; -1 = dropped by capacity
    weights_TK: torch.Tensor       # fp32 combine weight of each route (0 for dropped routes)
    chosen_E: torch.Tensor         # routes per expert as chosen, before any drop (DeepSpeed's exp_counts)
    kept_E: torch.Tensor           # routes per expert the experts process (chosen_E less the drops)
    balance_loss: torch.Tensor     # the gate's load-balancing loss (a scalar; DeepSpeed's l_aux)
    chosen_null: Optional[torch.Tensor] = None  # [N] routes per null expert as chosen (--num_null_experts only;
    #                                             those routes are -1 in topk_ids_TK: they cost nothing)
    null_weight_T: Optional[torch.Tensor] = None  # [T] fp32 sum of each token's null-route weights, the weight of
    #                                               its input in its output (--null_expert_output identity only)


def routes_per_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routes per expert (int64), not counting dropped routes (-1): the one place routes are counted. A scatter,
    so no host sync (torch.bincount reads the largest index back to the host on CUDA)."""
    bins_R = torch.where(topk_ids_TK < 0, num_experts, topk_ids_TK).reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=bins_R.device)
    return counts.scatter_add_(0, bins_R, torch.ones_like(bins_R))[:num_experts]


def _mask(probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
    """1.0 where a token routes to an expert: a scatter (F.one_hot checks its input on the host on some devices)."""
    return torch.zeros_like(probs_TE).scatter_(1, ids_TK, 1.0)


def _renormalised(weights_TK: torch.Tensor) -> torch.Tensor:
    return weights_TK / weights_TK.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights_TK.dtype).eps)


def recomputing() -> bool:
    """Whether this forward is activation checkpointing's recompute, run by the autograd engine during backward:
    routes were counted in the first forward and must not be counted again (nor the step's load all-reduced)."""
    return torch._C._current_graph_task_id() != -1  # -1 outside a backward pass; torch has no public flag for it
